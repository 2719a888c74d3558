"""Does training learn? Every architecture and coxnet, K-fold cross-validated, on a grid of synthetic
cohorts whose true hazard is known.

For each cohort (signal family x size x seed, from ``histosurv synth``) and each architecture, the
script runs ``histosurv train``'s cross-validation (the same folds for every architecture: they depend
only on the cohort and the seed) with each architecture's recipe, and records the folds' mean
c-index. The oracle is the c-index of the true log-hazard on the same test folds: no model can be
expected to beat it, and the gap to it is what a model failed to learn. coxnet (elastic-net Cox on
mean-pooled features and genes) is the linear baseline every deep model has to beat where the signal
is not linear in the mean.

The printed table has one row per (signal, size): the oracle, then each architecture's c-index averaged
over seeds, with its difference in brackets to coxnet on the same inputs and folds (image-only ABMIL
against image-only coxnet, genes-only SNN against genes-only coxnet; the coxnet column itself uses
both), and the seconds of one cross-validation. The
goals of issue 20 are checked at the end, each line saying met or missed.

Results go to ``--out`` (JSON lines) as they come, and a rerun with the same file skips what is
there, so the full grid (hours on 2 cores) can be run in pieces.

    python bench/learning.py                          # the full grid: sizes 150/400/1000, 3 seeds
    python bench/learning.py --small                  # minutes: one 200-patient cohort per family, 3 folds
    python bench/learning.py --signals interaction --sizes 400 --architectures ammasurv,coxnet --seeds 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

ARCHITECTURES = ("coxnet", "ammasurv", "abmil", "snn", "porpoise", "mcat", "mome", "early_fusion", "ghanet")
LINEAR, NONLINEAR = ("linear",), ("share", "interaction", "contrast", "spatial")


def main(argv=None) -> int:
    from histosurv.data.synth import SIGNALS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--signals", default="linear,share,interaction", help=f"signal families, of {','.join(SIGNALS)}")
    p.add_argument("--sizes", default="150,400,1000", help="patients per cohort")
    p.add_argument("--seeds", default="0,1,2", help="cohort and training seeds")
    p.add_argument("--architectures", default=",".join(ARCHITECTURES))
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--feature-dim", type=int, default=512)
    p.add_argument("--small", action="store_true", help="one 200-patient cohort per family, 3 folds, one seed")
    p.add_argument("--out", default="bench-learning.jsonl", help="results file (JSON lines); existing rows are kept")
    p.add_argument("--threads", type=int, help="torch threads")
    args = p.parse_args(argv)
    if args.small:
        args.sizes, args.seeds, args.folds = "200", "0", 3
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    grid = [(s, int(n), int(seed)) for s in args.signals.split(",") for n in args.sizes.split(",") for seed in args.seeds.split(",")]
    architectures = args.architectures.split(",")
    out = Path(args.out)
    done = _done(out)
    for signal, n, seed in grid:
        todo = [a for a in architectures if (signal, n, seed, args.folds, a) not in done]
        if not todo:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            cohort = _cohort(Path(tmp), signal, n, seed, args.feature_dim)
            for arch in todo:
                row = _cross_validate(cohort, Path(tmp), signal, n, seed, args.folds, arch)
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{signal:12s} {n:5d} seed {seed}  {arch:13s} {row['c_index']:.3f} ± {row['sd']:.3f}  "
                      f"oracle {row['oracle']:.3f}  {row['seconds']:.0f} s", flush=True)
    rows = [r for r in map(json.loads, out.read_text().splitlines()) if r["folds"] == args.folds]
    print()
    print(table(rows, architectures))
    print()
    for line in goals(rows):
        print(line)
    return 0


def _done(out: Path) -> set:
    if not out.is_file():
        return set()
    return {(r["signal"], r["n"], r["seed"], r["folds"], r["architecture"]) for r in map(json.loads, out.read_text().splitlines())}


def _cohort(tmp: Path, signal: str, n: int, seed: int, feature_dim: int):
    from histosurv.data.cohort import load_cohort
    from histosurv.data.synth import SynthConfig, write_synthetic_cohort

    cfg = SynthConfig(n_patients=n, seed=seed, biology_seed=seed, signal=signal, feature_dim=feature_dim, n_genes=60)
    d = write_synthetic_cohort(tmp / "cohort", cfg)
    cohort = load_cohort(d / "clinical.csv", d / "genes.csv", d / "features")
    truth = pd.read_csv(d / "truth.csv").set_index("case_id")
    cohort.true_log_hazard = truth.loc[[p.case_id for p in cohort.patients], "log_hazard"].to_numpy()
    return cohort


def model_config(architecture: str, cohort):
    from histosurv.cli.train import default_model_values
    from histosurv.export.models import MODELS, config_from_dict

    fields = MODELS[architecture].config_cls.__dataclass_fields__
    values = {"n_genes": len(cohort.gene_names)}
    if "feature_dim" in fields and cohort.feature_dim:
        values["feature_dim"] = cohort.feature_dim
    if architecture == "coxnet" and cohort.bags is None:
        values["modality"] = "genes"
    return config_from_dict(architecture, default_model_values(architecture, values, quiet=True))


def _cross_validate(cohort, tmp: Path, signal: str, n: int, seed: int, folds: int, architecture: str) -> dict:
    from histosurv.export.concordance import concordance_index
    from histosurv.export.cross_validation import cross_validate
    from histosurv.export.training import recipe

    # each deep model's baseline is coxnet on its own inputs (image-only ABMIL against the image-only
    # linear model), fitted on the same folds inside the cross-validation
    cfg = recipe(architecture, seed=seed, baseline=architecture != "coxnet")
    started = time.perf_counter()
    cv = cross_validate(cohort, architecture, model_config(architecture, cohort), cfg, k=folds, refit=False)
    seconds = time.perf_counter() - started
    oracle = []
    for f in range(folds):
        idx = np.flatnonzero(cv.folds_of == f)
        oracle.append(concordance_index(*cohort.times_events(idx), cohort.true_log_hazard[idx]).c_index)
    c = cv.c_indices()
    baseline = float(cv.c_indices(baseline=True).mean()) if cv.oof_baseline is not None else float(c.mean())
    return dict(signal=signal, n=n, seed=seed, folds=folds, architecture=architecture, c_index=float(c.mean()),
                coxnet_same_inputs=baseline,
                sd=float(c.std(ddof=1)), oracle=float(np.mean(oracle)), seconds=round(seconds, 1),
                recipe=dataclasses.asdict(cfg))


def table(rows: list[dict], architectures: list[str]) -> str:
    df = pd.DataFrame(rows)
    if df.empty:
        return "(no results)"
    if "coxnet_same_inputs" not in df:
        df["coxnet_same_inputs"] = np.nan
    mean = df.groupby(["signal", "n", "architecture"])[["c_index", "coxnet_same_inputs", "oracle", "seconds"]].mean()
    present = [a for a in architectures if a in set(df["architecture"])]
    head = "| signal | patients | oracle | " + " | ".join(present) + " |"
    lines = [head, "|" + "---|" * (3 + len(present))]
    for (signal, n), block in mean.groupby(level=[0, 1]):
        block = block.droplevel([0, 1])
        oracle = block["oracle"].mean()
        cells = []
        for a in present:
            if a not in block.index:
                cells.append("")
                continue
            c, cox = block.loc[a, "c_index"], block.loc[a, "coxnet_same_inputs"]
            delta = "" if a == "coxnet" or np.isnan(cox) else f" ({c - cox:+.2f})"
            cells.append(f"{c:.3f}{delta}")
        lines.append(f"| {signal} | {n} | {oracle:.3f} | " + " | ".join(cells) + " |")
    seconds = df.groupby("architecture")["seconds"].mean()
    lines.append("")
    lines.append("seconds per cross-validation (mean over cohorts): " + ", ".join(f"{a} {seconds[a]:.0f}" for a in present))
    return "\n".join(lines)


def goals(rows: list[dict]) -> list[str]:
    """Issue 20's goals, each met or missed, on the rows measured."""
    df = pd.DataFrame(rows)
    if df.empty or "coxnet" not in set(df["architecture"]):
        return ["goals: need coxnet rows"]
    m = df.groupby(["signal", "n", "architecture"])[["c_index", "coxnet_same_inputs", "oracle"]].mean().reset_index()
    attention = {"ammasurv", "mcat", "mome", "abmil", "porpoise", "early_fusion", "ghanet"}
    out = []
    for r in m.itertuples():
        if r.architecture == "coxnet" or np.isnan(r.coxnet_same_inputs):
            continue
        d = r.c_index - r.coxnet_same_inputs
        if r.signal in LINEAR and r.architecture in attention:
            out.append(_goal(d >= -0.02, f"{r.signal} {r.n}: {r.architecture} within 0.02 of coxnet ({d:+.3f})"))
        if r.signal in ("share", "interaction") and r.architecture in ("ammasurv", "mcat", "mome"):
            out.append(_goal(d >= 0.03, f"{r.signal} {r.n}: {r.architecture} above coxnet by 0.03 ({d:+.3f})"))
            if r.architecture == "ammasurv" and r.n >= 400:
                gap = r.oracle - r.c_index
                out.append(_goal(gap <= 0.03, f"{r.signal} {r.n}: ammasurv within 0.03 of the oracle ({-gap:+.3f})"))
    low = [r for r in m.itertuples() if r.oracle > 0.65 and r.c_index < 0.55]
    out += [_goal(False, f"{r.signal} {r.n}: {r.architecture} at least 0.55 ({r.c_index:.3f})") for r in low]
    if not low:
        out.append(_goal(True, "every model at least 0.55 wherever the oracle is above 0.65"))
    return out


def _goal(met: bool, text: str) -> str:
    return f"{'met   ' if met else 'MISSED'}  {text}"


if __name__ == "__main__":
    sys.exit(main())
