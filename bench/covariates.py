"""What do clinical covariates add? Each architecture cross-validated twice on the same folds, without
and with age, sex and stage as a third input (``histosurv train --covariates age,sex,stage``).

The cohorts come from ``histosurv synth --clinical``: age (0.02 per year) and stage (I 0, II 0.3, III
0.6, IV 1.0) raise the log-hazard, sex does not (a negative control). Two oracles bound what a model
can reach: the c-index of the true log-hazard without its clinical part (the best a model without
covariates can do) and of the whole true log-hazard (the best with them). A model that uses the
covariates well closes most of the gap between the two.

    python bench/covariates.py                      # share and linear families, 300 patients, 5 folds
    python bench/covariates.py --signals interaction --sizes 400 --architectures coxnet,ammasurv
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from learning import model_config  # noqa: E402

COVARIATES = ("age", "sex", "stage")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--signals", default="share,linear")
    p.add_argument("--sizes", default="300")
    p.add_argument("--seeds", default="0")
    p.add_argument("--architectures", default="coxnet,snn,abmil,ammasurv")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--feature-dim", type=int, default=256)
    p.add_argument("--out", default="bench-covariates.jsonl", help="results (JSON lines); a rerun skips what is there")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    done = set()
    if out.is_file():
        done = {(r["signal"], r["n"], r["seed"], r["folds"], r["architecture"], r["covariates"])
                for r in map(json.loads, out.read_text().splitlines())}
    for signal in args.signals.split(","):
        for n in map(int, args.sizes.split(",")):
            for seed in map(int, args.seeds.split(",")):
                todo = [(a, c) for a in args.architectures.split(",") for c in (False, True)
                        if (signal, n, seed, args.folds, a, c) not in done]
                if not todo:
                    continue
                with tempfile.TemporaryDirectory() as tmp:
                    cohorts = {c: _cohort(Path(tmp), signal, n, seed, args.feature_dim, c) for c in (False, True)}
                    for arch, with_cov in todo:
                        row = _run(cohorts[with_cov], signal, n, seed, args.folds, arch, with_cov)
                        with out.open("a") as f:
                            f.write(json.dumps(row) + "\n")
                        print(f"{signal:8s} {n:5d} seed {seed} {arch:9s} covariates {str(with_cov):5s} "
                              f"{row['c_index']:.3f} ± {row['sd']:.3f}  {row['seconds']:.0f} s", flush=True)
    rows = [r for r in map(json.loads, out.read_text().splitlines()) if r["folds"] == args.folds]
    print()
    print(table(rows))
    return 0


def _cohort(tmp: Path, signal: str, n: int, seed: int, feature_dim: int, covariates: bool):
    from histosurv.data.cohort import load_cohort
    from histosurv.data.covariates import CovariateRequest
    from histosurv.data.synth import SynthConfig, write_synthetic_cohort

    d = tmp / "cohort"
    if not d.exists():
        cfg = SynthConfig(n_patients=n, seed=seed, biology_seed=seed, signal=signal, feature_dim=feature_dim,
                          n_genes=60, clinical=True)
        write_synthetic_cohort(d, cfg)
    request = CovariateRequest(COVARIATES) if covariates else None
    cohort = load_cohort(d / "clinical.csv", d / "genes.csv", d / "features", covariates=request)
    truth = pd.read_csv(d / "truth.csv").set_index("case_id").loc[[p.case_id for p in cohort.patients]]
    cohort.true_log_hazard = truth["log_hazard"].to_numpy()
    cohort.true_without_clinical = (truth["log_hazard"] - truth["r_clinical"]).to_numpy()
    return cohort


def _run(cohort, signal: str, n: int, seed: int, folds: int, architecture: str, covariates: bool) -> dict:
    from histosurv.export.concordance import concordance_index
    from histosurv.export.cross_validation import cross_validate
    from histosurv.export.training import recipe

    cfg = recipe(architecture, seed=seed, baseline=False)
    started = time.perf_counter()
    cv = cross_validate(cohort, architecture, model_config(architecture, cohort), cfg, k=folds, refit=False)
    seconds = time.perf_counter() - started
    oracle, oracle_no_clinical = [], []
    for f in range(folds):
        idx = np.flatnonzero(cv.folds_of == f)
        te = cohort.times_events(idx)
        oracle.append(concordance_index(*te, cohort.true_log_hazard[idx]).c_index)
        oracle_no_clinical.append(concordance_index(*te, cohort.true_without_clinical[idx]).c_index)
    c = cv.c_indices()
    return dict(signal=signal, n=n, seed=seed, folds=folds, architecture=architecture, covariates=covariates,
                c_index=float(c.mean()), sd=float(c.std(ddof=1)), oracle=float(np.mean(oracle)),
                oracle_without_clinical=float(np.mean(oracle_no_clinical)), seconds=round(seconds, 1))


def table(rows: list[dict]) -> str:
    df = pd.DataFrame(rows)
    lines = ["| cohort | oracle without / with clinical | model | without covariates | with covariates | gain |",
             "|---|---|---|---|---|---|"]
    for (signal, n), block in df.groupby(["signal", "n"], sort=False):
        o0, o1 = block["oracle_without_clinical"].mean(), block["oracle"].mean()
        for arch, b in block.groupby("architecture", sort=False):
            without = b[~b["covariates"]]["c_index"].mean()
            with_ = b[b["covariates"]]["c_index"].mean()
            lines.append(f"| {signal}, {n} patients | {o0:.3f} / {o1:.3f} | {arch} | {without:.3f} | {with_:.3f} | "
                         f"{with_ - without:+.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
