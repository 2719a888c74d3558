"""Writes tests/golden/porpoise.json from the reference PORPOISE code (mahmoodlab/PORPOISE).

    PYTHONPATH=/tmp/ref/PORPOISE:. .venv/bin/python tests/golden/make_porpoise.py --reference /tmp/ref/PORPOISE

Cases: ``PorpoiseMMF`` with the class defaults (bilinear fusion, gates, skip, dropinput 0.10, which
shifts the attention_net indices), with ``concat`` fusion and dropinput 0 (the CLI default), and
with bilinear fusion without gates or skip and scale_dim 4; plus the ``BilinearFusion`` of
``models/model_utils.py`` alone (use_bilinear, dropout after the encoders: Pathomic Fusion's and
MCAT's variant). The reference forward is unbatched: x_path (N, 1024), x_omic (1, G).

Shim: the reference builds the Kronecker product's appended ones with ``torch.cuda.FloatTensor``;
on a CPU that name is replaced by a function returning an uninitialised CPU float tensor (the
reference fills it with ones right away).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.golden import HERE, seeded_bag, seeded_state_dict, shapes_of  # noqa: E402

COMMIT = "3390dc40e15995ba852d7a561faf0e996cf20501"
SEED = 0
N_GENES = 60
SIZES = (1, 5, 50, 300, 700)
ATTENTION_UP_TO = 50  # attention weights stored for small N only (file size)
SHIMS = ["torch.cuda.FloatTensor -> CPU torch.empty (the reference fills it with ones)"]
CASES = {
    "bilinear": dict(fusion="bilinear", dropinput=0.10),  # the class defaults
    "concat": dict(fusion="concat", dropinput=0.0),
    "bilinear_plain": dict(fusion="bilinear", dropinput=0.0, gate_path=0, gate_omic=0, skip=False, scale_dim1=4, scale_dim2=4),
}
FUSION_ONLY = dict(skip=1, use_bilinear=1, gate1=1, gate2=1, dim1=32, dim2=24, scale_dim1=2, scale_dim2=3, mmhid=16)


def _round(t: torch.Tensor) -> list:
    return [round(float(v), 8) for v in t.flatten()]


def _shim() -> None:
    torch.cuda.FloatTensor = lambda *shape: torch.empty(*shape)


def _mmf_case(cls, overrides: dict) -> dict:
    kwargs = dict(omic_input_dim=N_GENES, path_input_dim=1024, n_classes=4, **overrides)
    ref = cls(**kwargs).eval()
    shapes = shapes_of(ref.state_dict())
    ref.load_state_dict(seeded_state_dict(shapes, SEED))
    seen = {}
    ref.attention_net.register_forward_hook(lambda m, i, o: seen.__setitem__("scores", o[0]))
    bags = {}
    for n in SIZES:
        features, genes = seeded_bag(n, 1024, N_GENES, SEED)
        with torch.no_grad():
            logits = ref(x_path=features, x_omic=genes[None])
        s = torch.cumprod(1 - torch.sigmoid(logits), dim=1)
        bag = dict(logits=_round(logits), risk=round(float(-s.sum()), 8))
        if n <= ATTENTION_UP_TO:
            bag["attention"] = _round(torch.softmax(seen["scores"][:, 0], dim=0))
        bags[str(n)] = bag
    return dict(constructor=kwargs, shapes=shapes, bags=bags)


def _fusion_case(cls) -> dict:
    ref = cls(**FUSION_ONLY).eval()
    shapes = shapes_of(ref.state_dict())
    ref.load_state_dict(seeded_state_dict(shapes, SEED))
    g = torch.Generator().manual_seed(SEED)
    vec1, vec2 = torch.randn(3, FUSION_ONLY["dim1"], generator=g), torch.randn(3, FUSION_ONLY["dim2"], generator=g)
    with torch.no_grad():
        out = ref(vec1, vec2)
    return dict(constructor=FUSION_ONLY, shapes=shapes, vec1=_round(vec1), vec2=_round(vec2), output=_round(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference", required=True, type=Path)
    ap.add_argument("--commit", default=COMMIT, help="the reference snapshot's commit (an archive has no .git)")
    args = ap.parse_args()
    sys.path.insert(0, str(args.reference))
    _shim()
    from models.model_porpoise import PorpoiseMMF
    from models.model_utils import BilinearFusion

    golden = dict(
        repository="mahmoodlab/PORPOISE",
        commit=args.commit,
        reference_class="models.model_porpoise.PorpoiseMMF",
        shims=SHIMS,
        seed=SEED,
        n_genes=N_GENES,
        inputs="tests.golden.seeded_bag(n, 1024, n_genes, seed); x_omic = genes[None]",
        cases={name: _mmf_case(PorpoiseMMF, overrides) for name, overrides in CASES.items()},
        fusion_only=dict(reference_class="models.model_utils.BilinearFusion", **_fusion_case(BilinearFusion)),
    )
    path = HERE / "porpoise.json"
    path.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
