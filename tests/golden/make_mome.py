"""Writes tests/golden/mome.json from the reference MoME code (BearCleverProud/MoME).

    PYTHONPATH=/tmp/refdeps:/tmp/ref/MoME:. .venv/bin/python tests/golden/make_mome.py --reference /tmp/ref/MoME

/tmp/refdeps holds ``pip install --no-deps --target /tmp/refdeps admin-torch==0.1.0
nystrom-attention==0.0.14 einops``. The reference runs on a CPU with one shim: ``Tensor.cuda`` is the
identity (it moves its bottleneck and class tokens with ``.cuda()``). Every floating tensor of its
state_dict, and the four bottleneck tokens and the class token it keeps outside it, are filled by
``seeded_state_dict``; the expert each MoME layer picks is recorded from its router's output.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.golden import HERE, seeded_bag, seeded_state_dict, shapes_of  # noqa: E402

OMIC_SIZES = [3, 24, 21, 22, 64, 15]  # UCEC signature groups
KWARGS = dict(n_bottlenecks=2, omic_sizes=OMIC_SIZES, n_classes=4)
FEATURE_DIM = 1024
SIZES = (1, 5, 50, 300, 700)
SEED = 0
LAYERS = ("MoME_patho1", "MoME_genom1", "MoME_patho2", "MoME_genom2")


def not_saved_shapes(ref) -> dict[str, list[int]]:
    shapes = {f"{n}.BottleneckTransFusion.bottleneck": list(getattr(ref, n).BottleneckTransFusion.bottleneck.shape)
              for n in LAYERS}
    shapes["cls_multimodal"] = list(ref.cls_multimodal.shape)
    return shapes


def build_reference():
    torch.Tensor.cuda = lambda self, *a, **k: self  # shim: the reference calls .cuda() on two tensors
    from models.model_mome import MoMETransformer

    torch.manual_seed(0)
    ref = MoMETransformer(**KWARGS).eval()
    ref.load_state_dict(seeded_state_dict(shapes_of(ref.state_dict()), SEED))
    extra = seeded_state_dict(not_saved_shapes(ref), SEED)
    for n in LAYERS:
        getattr(ref, n).BottleneckTransFusion.bottleneck = extra[f"{n}.BottleneckTransFusion.bottleneck"]
    ref.cls_multimodal = extra["cls_multimodal"]
    return ref


def run(ref, n: int) -> dict:
    features, genes = seeded_bag(n, FEATURE_DIM, sum(OMIC_SIZES), SEED)
    omics = torch.split(genes, OMIC_SIZES)
    choices, final_input, logits = [], [], []
    routers = [getattr(ref, name).routing_network for name in LAYERS]
    hooks = [r.register_forward_hook(lambda m, a, out: choices.append(int(out.argmax(1)))) for r in routers]
    hooks.append(ref.multi_layer1.attn.register_forward_pre_hook(lambda m, a: final_input.append(a[0])))
    hooks.append(ref.classifier.register_forward_hook(lambda m, a, out: logits.append(out[0])))
    try:
        with torch.no_grad():
            _, S, _, _ = ref(x_path=features, **{f"x_omic{i + 1}": g for i, g in enumerate(omics)})  # S: (1, 4)
            _, attn = ref.multi_layer1.attn(final_input[0], return_attn=True)  # (1, h, T_pad, T_pad)
    except Exception as e:  # the reference's squeeze() fails at N = 1
        return {"n": n, "error": f"{type(e).__name__}: {e}"}
    finally:
        for h in hooks:
            h.remove()
    pad = attn.shape[-1] - (n + 7)
    row = attn[0, :, pad, pad + 1 : pad + 1 + n].mean(0)  # class token over the patches, heads averaged
    return {"n": n, "logits": logits[0].tolist(), "risk": -S.sum().item(), "experts": choices, "attention": row.tolist()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", required=True, type=Path)
    args = ap.parse_args()
    git = ["git", "-C", str(args.reference), "rev-parse", "HEAD"]
    commit = subprocess.run(git, capture_output=True, text=True).stdout.strip()  # empty for a `git archive` copy
    ref = build_reference()
    golden = {
        "repository": "BearCleverProud/MoME",
        "commit": commit or "6c13b31f88616f4e332226c2b192335a2d381a0a",
        "class": "models.model_mome.MoMETransformer",
        "kwargs": KWARGS,
        "feature_dim": FEATURE_DIM,
        "deps": ["admin-torch==0.1.0", "nystrom-attention==0.0.14", "einops"],
        "shims": ["torch.Tensor.cuda -> identity"],
        "seed": SEED,
        "shapes": shapes_of(ref.state_dict()),
        "not_saved_shapes": not_saved_shapes(ref),
        "logits_from": "the output of the reference's classifier (forward hook); risk = -sum(S)",
        "runs": [run(ref, n) for n in SIZES],
    }
    (HERE / "mome.json").write_text(json.dumps(golden, indent=1))
    for r in golden["runs"]:
        print(r["n"], r.get("experts"), r.get("risk"), r.get("error", ""))


if __name__ == "__main__":
    main()
