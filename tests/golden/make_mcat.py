"""Writes tests/golden/{mcat,abmil,snn}.json from mahmoodlab/MCAT's own model code.

    PYTHONPATH=/tmp/ref/MCAT:. .venv/bin/python tests/golden/make_mcat.py --reference /tmp/ref/MCAT

``--reference`` is a checkout of mahmoodlab/MCAT (``git archive`` of the commit below), kept outside
this project. Every floating tensor of each reference model's state_dict is replaced by
``seeded_state_dict``; logits are read with a forward hook on the reference ``classifier`` (the
reference returns hazards and survival, not logits).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.golden import HERE, seeded_bag, seeded_state_dict, shapes_of  # noqa: E402

COMMIT = "b9cca63be83c67de7f95308d54a58f80b78b0da1"
SEED = 0
UCEC_OMIC_SIZES = [3, 24, 21, 22, 64, 15]
SNN_GENES = 80
BAG_SIZES = (1, 50, 300, 700)


def shim_linear_with_bias() -> str:
    """torch 2.x removed ``_LinearWithBias`` (model_coattn.py imports it); a plain Linear has its keys."""
    import torch.nn.modules.linear as linear

    if not hasattr(linear, "_LinearWithBias"):
        linear._LinearWithBias = torch.nn.Linear
    return "torch.nn.modules.linear._LinearWithBias = torch.nn.Linear (removed in torch 2.x; same keys)"


def seeded(ref: torch.nn.Module) -> dict[str, list[int]]:
    shapes = shapes_of(ref.state_dict())
    ref.load_state_dict(seeded_state_dict(shapes, SEED), strict=True)
    return shapes


def logits_hook(ref: torch.nn.Module) -> list:
    out = []
    ref.classifier.register_forward_hook(lambda m, i, o: out.append(o.detach().reshape(1, -1)))
    return out


def rounded(t: torch.Tensor) -> list:
    return [round(float(x), 7) for x in t.flatten()]


def make_mcat() -> dict:
    shims = [shim_linear_with_bias()]
    from models.model_coattn import MCAT_Surv

    kwargs = dict(fusion="concat", omic_sizes=UCEC_OMIC_SIZES, n_classes=4)
    ref = MCAT_Surv(**kwargs).eval()
    shapes, hook = seeded(ref), logits_hook(ref)
    cases = {}
    for n in BAG_SIZES:
        features, genes = seeded_bag(n, 1024, sum(UCEC_OMIC_SIZES), SEED)
        groups = torch.split(genes, UCEC_OMIC_SIZES)
        with torch.no_grad():
            _, S, _, att = ref(x_path=features, **{f"x_omic{i + 1}": g for i, g in enumerate(groups)})
        coattn = torch.softmax(att["coattn"].reshape(len(UCEC_OMIC_SIZES), n), dim=-1).mean(0)  # (N,)
        cases[str(n)] = dict(logits=rounded(hook.pop()), risk=-float(S.sum()), attention=rounded(coattn))
    return dict(
        model_class="models.model_coattn.MCAT_Surv",
        kwargs=kwargs,
        shims=shims,
        attention="co-attention softmax over N averaged over the 6 gene queries (the reference returns raw scores)",
        histosurv_config=dict(omic_sizes=UCEC_OMIC_SIZES, feature_dim=1024),
        shapes=shapes,
        cases=cases,
    )


def make_abmil() -> dict:
    from models.model_set_mil import MIL_Attention_FC_surv

    kwargs = dict(omic_input_dim=None, fusion=None, size_arg="small", n_classes=4)
    ref = MIL_Attention_FC_surv(**kwargs).eval()
    shapes, hook = seeded(ref), logits_hook(ref)
    scores = []
    ref.attention_net.register_forward_hook(lambda m, i, o: scores.append(o[0].detach()))
    cases = {}
    for n in BAG_SIZES:
        features, _ = seeded_bag(n, 1024, 1, SEED)
        with torch.no_grad():
            _, S, _, _, _ = ref(x_path=features)
        weights = torch.softmax(scores.pop()[:, 0], dim=0)  # (N,), as the reference's forward does
        cases[str(n)] = dict(logits=rounded(hook.pop()), risk=-float(S.sum()), attention=rounded(weights))
    return dict(
        model_class="models.model_set_mil.MIL_Attention_FC_surv",
        kwargs=kwargs,
        shims=[],
        attention="softmax of the gated-attention scores over N (read with a hook on attention_net)",
        histosurv_config=dict(feature_dim=1024),
        shapes=shapes,
        cases=cases,
    )


def make_snn() -> dict:
    import models.model_genomic as genomic

    genomic.MaxNet = genomic.SNN  # the class calls super(MaxNet, self).__init__()
    shims = [
        "models.model_genomic.MaxNet = models.model_genomic.SNN (SNN.__init__ calls super(MaxNet, self))",
        "constructed with input_dim= (core_utils.py passes omic_input_dim=, which SNN.__init__ does not take)",
    ]
    kwargs = dict(input_dim=SNN_GENES, model_size_omic="small", n_classes=4)
    ref = genomic.SNN(**kwargs).eval()
    shapes, hook = seeded(ref), logits_hook(ref)
    cases = {}
    for seed in range(4):  # SNN has no bag: one gene vector per case
        _, genes = seeded_bag(1, 1, SNN_GENES, seed)
        with torch.no_grad():
            _, S, _, _, _ = ref(x_omic=genes)
        cases[str(seed)] = dict(logits=rounded(hook.pop()), risk=-float(S.sum()))
    return dict(
        model_class="models.model_genomic.SNN",
        kwargs=kwargs,
        shims=shims,
        cases_are="gene-vector seeds of seeded_bag(1, 1, n_genes, seed)",
        histosurv_config=dict(n_genes=SNN_GENES),
        shapes=shapes,
        cases=cases,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, type=Path, help="checkout of mahmoodlab/MCAT")
    args = parser.parse_args()
    sys.path.insert(0, str(args.reference))
    torch.set_num_threads(1)
    common = dict(repository="mahmoodlab/MCAT", commit=COMMIT, torch=torch.__version__, seed=SEED)
    for name, make in (("mcat", make_mcat), ("abmil", make_abmil), ("snn", make_snn)):
        golden = dict(common, **make())
        (HERE / f"{name}.json").write_text(json.dumps(golden, separators=(",", ":")) + "\n")
        print(f"wrote {HERE / f'{name}.json'} ({len(golden['cases'])} cases)")


if __name__ == "__main__":
    main()
