"""histosurv synth: write a synthetic cohort in the real input formats."""

from __future__ import annotations

import argparse

from ._options import add_dataclass_options, dataclass_values


def add_parser(sub) -> None:
    from ..data.synth import SIGNALS, SynthConfig

    p = sub.add_parser(
        "synth",
        help="write a synthetic cohort (clinical CSV, gene table, CLAM h5 bags) with a planted signal",
        description="Writes OUT/clinical.csv, OUT/genes.csv, OUT/features/<slide>.h5 and OUT/truth.csv. "
        "--signal picks the family of the planted risk: linear (linear in mean-pooled features and genes), "
        "share (share of an aggressive tissue type plus signal genes), contrast (difference of two genes), "
        "interaction (image x gene product) or spatial (layout of the aggressive patches, invisible to mean "
        "pooling); truth.csv holds each case's true log-hazard.",
    )
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_dataclass_options(p, SynthConfig, title="cohort", choices={"signal": SIGNALS})
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..data.synth import SynthConfig, write_synthetic_cohort
    from ..errors import InputError

    try:
        cfg = SynthConfig(**dataclass_values(args, SynthConfig))
    except ValueError as e:
        raise InputError(str(e)) from e
    out = write_synthetic_cohort(args.out, cfg, overwrite=args.overwrite)
    print(f"wrote a synthetic cohort of {cfg.n_patients} patients ({cfg.signal} signal) to {out}")
    return 0
