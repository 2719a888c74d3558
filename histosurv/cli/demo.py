"""histosurv demo: the whole path, end to end, on a synthetic cohort.

synthesise -> train AMMASurv -> export to a model repository -> verify ONNX Runtime against PyTorch
-> predict the held-out patients from the repository alone -> c-index and per-stage timings.
"""

from __future__ import annotations

import argparse
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

MARKER = ".histosurv-demo"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="synthesise a cohort, train, export, verify and predict, printing c-index and timings",
    )
    p.add_argument("--out", default="demo_output", help="working folder, replaced on each run (default: demo_output)")
    p.add_argument("--patients", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-epochs", type=int, default=20)
    p.add_argument("--threads", type=int, help="CPU threads for torch and ONNX Runtime")
    p.set_defaults(handler=run)


class Stages:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        print(f"\n== {name}")
        t0 = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - t0


def run(args: argparse.Namespace) -> int:
    import os

    import pandas as pd
    import torch

    from ..data.cohort import case_files, load_cohort
    from ..data.synth import SynthConfig, write_synthetic_cohort
    from ..data.tables import GeneTable, patients_from_clinical, read_clinical
    from ..export.concordance import concordance_index
    from ..export.models.ammasurv import AMMASurvConfig
    from ..export.repository_writer import export_run
    from ..export.run import save_run
    from ..export.training import TrainConfig, train
    from ..export.verify import verify_version
    from ..runtime.predict import FusionPredictor, score_cases

    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["HISTOSURV_THREADS"] = str(args.threads)
    out = _fresh_folder(Path(args.out))
    stage = Stages()
    total = time.perf_counter()

    with stage("synthesise cohort"):
        cohort_dir = write_synthetic_cohort(out / "cohort", SynthConfig(n_patients=args.patients, seed=args.seed))
        cohort = load_cohort(cohort_dir / "clinical.csv", cohort_dir / "genes.csv", cohort_dir / "features")
        n_slides = sum(len(p.slide_ids) for p in cohort.patients)
        print(f"{len(cohort.patients)} patients, {n_slides} slides, {len(cohort.gene_names)} genes -> {cohort_dir}")

    with stage("train AMMASurv"):
        model_cfg = AMMASurvConfig(n_genes=len(cohort.gene_names), feature_dim=cohort.feature_dim)
        result = train(cohort, "ammasurv", model_cfg, TrainConfig(seed=args.seed, max_epochs=args.max_epochs), log=print)
        save_run(out / "run", result, cohort)
        print(f"best epoch {result.best_epoch}, validation c-index {result.val_c_index:.4f}")

    with stage("export"):
        mv = export_run(out / "run", out / "model_repository", "ammasurv")
        print(f"{mv.path}: {', '.join(sorted(mv.info.files))}")

    with stage("verify ONNX Runtime against PyTorch"):
        reports = verify_version(out / "model_repository", "ammasurv", log=print)

    with stage("predict held-out patients (runtime only)"):
        splits = pd.read_csv(out / "run" / "splits.csv")
        held_out = set(splits.loc[splits["split"] == "test", "case_id"])
        clinical = read_clinical(cohort_dir / "clinical.csv")
        patients = [p for p in patients_from_clinical(clinical) if p.case_id in held_out]
        predictor = FusionPredictor.from_repository(out / "model_repository", "ammasurv")
        cases = case_files(patients, cohort_dir / "features")
        results = score_cases(predictor, cases, GeneTable.read(cohort_dir / "genes.csv"))
        c = concordance_index([p.time for p in patients], [p.event for p in patients], [r.risk for r in results])
        pd.DataFrame({"case_id": [r.case_id for r in results], "risk": [r.risk for r in results]}).to_csv(
            out / "predictions.csv", index=False
        )

    _summary(stage, c, len(patients), result, reports, predictor, time.perf_counter() - total)
    return 0 if all(r.passed for r in reports) else 1


def _fresh_folder(out: Path) -> Path:
    from ..errors import InputError

    if out.exists():
        if not (out / MARKER).exists():
            raise InputError(f"{out} exists and was not made by 'histosurv demo'; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).touch()
    return out


def _summary(stage: Stages, c, n_held_out: int, result, reports, predictor, total: float) -> None:
    print("\n== summary")
    print(f"held-out c-index (ONNX Runtime, {n_held_out} patients): {c.c_index:.4f}")
    print(f"held-out c-index (PyTorch, same patients, at training):  {result.test_c_index:.4f}")
    for r in reports:
        print(f"parity {r.engine}: largest relative risk difference {r.max_risk_rel:.1e} ({'pass' if r.passed else 'FAIL'})")
    print(f"runtime stages: read {predictor.timings['read']:.2f} s, fuse {predictor.timings['fuse']:.2f} s")
    for name, seconds in stage.seconds.items():
        print(f"  {name:45s} {seconds:7.1f} s")
    print(f"  {'total':45s} {total:7.1f} s")
