"""Writes tests/golden/ghanet.json from the reference G-HANet code (ZacharyWang-007/G-HANet).

    PYTHONPATH=/tmp/refdeps:/tmp/ref/G-HANet:. .venv/bin/python tests/golden/make_ghanet.py --reference /tmp/ref/G-HANet

(/tmp/refdeps holds einops, installed with ``pip install --no-deps --target``.)

The reference forward takes ``x_path`` (N, 1024) only and returns (hazards, S, Y_hat, None,
reconstructed omics, head-averaged scores (6, N)); the logits are taken from a hook on its
``classifier``, the morphology weights from a hook on its ``gate``.

The reference fails at N < 5 (k = int(0.2 N) = 0 -> IndexError). For N = 1 and 3, the golden
values come from the reference with its ``ratio`` set to 1/N so that k = 1: histosurv's choice.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.golden import HERE, seeded_bag, seeded_state_dict, shapes_of  # noqa: E402

COMMIT = "54020e8050ec3688f4485033f20f4b9077ee5f7e"
SEED = 0
RECON_SIZES = [3, 24, 21, 22, 64, 15]  # UCEC's group sizes, as a small stand-in for per-fold sizes
SIZES = (1, 3, 5, 9, 50, 300, 700)  # k = N // 5: 0, 0, 1, 1, 10, 60, 140
FORCED_K1 = (1, 3)  # below the reference's domain: reference run with ratio = 1/N (k = 1)
SCORES_UP_TO = 50  # the (6, N) score matrices are stored for small N only (file size)


def _round(t: torch.Tensor) -> list:
    return [round(float(v), 8) for v in t.flatten()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference", required=True, type=Path)
    ap.add_argument("--commit", default=COMMIT, help="the reference snapshot's commit (an archive has no .git)")
    args = ap.parse_args()
    sys.path.insert(0, str(args.reference))
    from models.model_coattn import G_HANet_Surv

    kwargs = dict(omic_sizes=RECON_SIZES, n_classes=4, num_tokens=6, ratio=0.2)
    ref = G_HANet_Surv(**kwargs).eval()
    shapes = shapes_of(ref.state_dict())
    ref.load_state_dict(seeded_state_dict(shapes, SEED))
    seen = {}
    ref.classifier.register_forward_hook(lambda m, i, o: seen.__setitem__("logits", o))
    ref.gate.register_forward_hook(lambda m, i, o: seen.__setitem__("gate", o))

    cases = {}
    for n in SIZES:
        features, _ = seeded_bag(n, 1024, 0, SEED)
        ref.ratio = 1.0 / n if n in FORCED_K1 else 0.2
        with torch.no_grad():
            hazards, _, _, _, omics, matrix = ref(x_path=features)
        logits = seen["logits"]
        assert torch.allclose(torch.sigmoid(logits), hazards)
        s = torch.cumprod(1 - hazards, dim=1)
        case = dict(
            logits=_round(logits),
            risk=round(float(-s.sum()), 8),
            morphology=_round(torch.softmax(seen["gate"].T, dim=1)),
            omics=[_round(o) for o in omics],
            k=int(n * ref.ratio),
            forced_k1=n in FORCED_K1,
        )
        if n <= SCORES_UP_TO:
            case["scores"] = _round(matrix)
        cases[str(n)] = case

    golden = dict(
        repository="ZacharyWang-007/G-HANet",
        commit=args.commit,
        reference_class="models.model_coattn.G_HANet_Surv",
        constructor=kwargs,
        shims=["ratio set to 1/N for N in forced_k1 (the reference raises IndexError at N < 5)"],
        seed=SEED,
        feature_dim=1024,
        torch=torch.__version__,
        shapes=shapes,
        cases=cases,
    )
    out = HERE / "ghanet.json"
    out.write_text(json.dumps(golden, separators=(",", ":")))
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
