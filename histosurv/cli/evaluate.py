"""histosurv evaluate: a predictions table against a clinical table, with the figures a statistician reads."""

from __future__ import annotations

import argparse

from ._clinical_options import add_clinical_column_options, clinical_columns_from_args


def add_parser(sub) -> None:
    from ..runtime.evaluation import GROUPINGS

    p = sub.add_parser(
        "evaluate",
        help="evaluate a predictions table against a clinical table (c-indices, AUC, Brier, calibration, KM)",
        description="Harrell's and Uno's c-index, time-dependent AUC at the reported times, the Brier score and "
        "calibration where the predictions have S(t) columns, Kaplan-Meier curves by risk group with the log-rank "
        "test; each scalar figure with a bootstrap 95% interval. Writes OUT/evaluation.json, OUT/summary.txt and, "
        "where matplotlib is installed, km_by_group.png, calibration.png and td_auc.png. Higher risk = worse prognosis.",
    )
    p.add_argument("--predictions", required=True, metavar="CSV",
                   help="case_id and risk, one row per patient (what predict --out writes); optional S(12), S(24), ... "
                   "(predicted survival probability at that many months) and risk_group columns")
    p.add_argument("--clinical", required=True, metavar="CSV", help="the outcomes of the evaluated patients")
    p.add_argument("--train-clinical", metavar="CSV",
                   help="the training cohort's outcomes, for the censoring distribution of Uno's c-index, the AUC and "
                   "the Brier score (default: the evaluated cohort itself)")
    p.add_argument("--times", metavar="MONTHS",
                   help="reported times, comma-separated (default: the predictions' S(t) columns, else 12,24,36,60); "
                   "those outside the follow-up are dropped with a note")
    p.add_argument("--groups", choices=list(GROUPINGS),
                   help="without a risk_group column: cut the cohort's risks at these quantiles (default: median)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="bootstrap replicates, 0 for none (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default: 0)")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_clinical_column_options(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..runtime.evaluation import (EvaluationSettings, evaluate, load_cohort, parse_times, read_outcomes,
                                      summary_text, write_evaluation)

    columns = clinical_columns_from_args(args)
    settings = EvaluationSettings(times=parse_times(args.times), groups=args.groups, bootstrap=args.bootstrap,
                                  seed=args.seed)
    cohort = load_cohort(args.predictions, args.clinical, columns)
    training = read_outcomes(args.train_clinical, columns) if args.train_clinical else None
    report = evaluate(cohort, settings, training)
    written = write_evaluation(report, args.out, overwrite=args.overwrite)
    print(summary_text(report))
    print(f"wrote {', '.join(written)} to {args.out}")
    return 0
