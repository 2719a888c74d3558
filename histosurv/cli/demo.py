"""histosurv demo: the whole path, end to end, on a synthetic cohort and a real slide.

synthesise -> train AMMASurv -> export to a model repository -> verify every engine against PyTorch
-> predict the held-out patients from the repository alone -> c-index;
then a real Aperio slide -> tissue mask -> patch grid -> ResNet18 patch encoder -> AMMASurv -> risk,
with the time of each stage.
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
        help="synthesise a cohort, train, export, verify and predict, then score a real slide, printing timings",
    )
    p.add_argument("--out", default="demo_output", help="working folder, replaced on each run (default: demo_output)")
    p.add_argument("--patients", type=int, default=400, help="patients in the synthetic cohort (default: 400)")
    p.add_argument("--seed", type=int, default=0, help="draws the cohort and seeds training (default: 0)")
    p.add_argument("--epochs", type=int, help="training epochs (default: AMMASurv's recipe)")
    p.add_argument("--threads", type=int, help="CPU threads for torch and ONNX Runtime")
    p.add_argument("--slide", help="slide to score at the end (default: the bundled CMU Aperio SVS, fetched once)")
    p.add_argument("--encoder-weights", help="torchvision ResNet18 state_dict for the patch encoder (default: seeded init)")
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
    from ..export.cross_validation import baseline_config
    from ..export.training import recipe, train
    from ..export.verify import verify_version
    from ..data.demo_slide import demo_slide
    from ..data.features import write_bag
    from ..export.encoder_export import export_encoder
    from ..runtime.pipeline import SlideConfig, featurize_slide, open_encoder
    from ..runtime.predict import FusionPredictor, score_cases, survival_fields
    from ._slide_options import print_notes

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

    with stage("train AMMASurv, and the coxnet baseline on the same patients"):
        model_cfg = AMMASurvConfig(n_genes=len(cohort.gene_names), feature_dim=cohort.feature_dim)
        epochs = {"epochs": args.epochs} if args.epochs else {}
        train_cfg = recipe("ammasurv", seed=args.seed, **epochs)
        result = train(cohort, "ammasurv", model_cfg, train_cfg, log=print)
        baseline = train(cohort, "coxnet", baseline_config("ammasurv", model_cfg, cohort), train_cfg, splits=result.splits)
        save_run(out / "run", result, cohort, baseline=baseline)
        print(f"{len(result.history)} epochs; held-out c-index AMMASurv {result.test_c_index:.4f}, "
              f"coxnet {baseline.test_c_index:.4f} (penalty {baseline.model.chosen_alpha:.3g})")

    with stage("export"):
        mv = export_run(out / "run", out / "model_repository", "ammasurv")
        print(f"{mv.path}: {', '.join(sorted(mv.info.files))}")

    with stage("verify every engine against PyTorch"):
        reports = verify_version(out / "model_repository", "ammasurv", log=print)

    with stage("predict held-out patients (runtime only)"):
        splits = pd.read_csv(out / "run" / "splits.csv")
        held_out = set(splits.loc[splits["split"] == "test", "case_id"])
        clinical = read_clinical(cohort_dir / "clinical.csv")
        patients = [p for p in patients_from_clinical(clinical) if p.case_id in held_out]
        predictor = FusionPredictor.from_repository(out / "model_repository", "ammasurv")
        cases = case_files(patients, cohort_dir / "features")
        gene_table = GeneTable.read(cohort_dir / "genes.csv")
        results = score_cases(predictor, cases, gene_table)
        c = concordance_index([p.time for p in patients], [p.event for p in patients], [r.risk for r in results])
        curves = pd.DataFrame([survival_fields(predictor.version, r.survival, r.risk_group) for r in results])
        pd.concat([pd.DataFrame({"case_id": [r.case_id for r in results], "risk": [r.risk for r in results]}), curves],
                  axis=1).to_csv(out / "predictions.csv", index=False)
        head = predictor.version.info.survival
        print(f"{len(results)} patients -> {out / 'predictions.csv'}: risk, S({'), S('.join(f'{t:g}' for t in head.times)}) "
              f"and risk group ({'/'.join(head.groups)}, cut at the training patients' {head.grouping})")

    with stage("evaluate the held-out predictions (histosurv evaluate)"):
        evaluation = _evaluate(out, cohort_dir)

    with stage("export the ResNet18 patch encoder"):
        encoder_version = export_encoder(out / "model_repository", "resnet18", weights=args.encoder_weights, log=print)
        print(f"{encoder_version.path}: {', '.join(sorted(encoder_version.info.files))}")

    with stage("score a real slide: tissue, patches, encoder, AMMASurv"):
        slide = Path(args.slide) if args.slide else demo_slide(log=print)
        # AMMASurv learnt on synthetic features, which no encoder makes: scoring a real slide with it is
        # a mismatch the runtime refuses unless told, so the demo says so and the bag records it
        encoder, choice = open_encoder(out / "model_repository", predictor.version, encoder_version.name, allow_mismatch=True)
        print_notes("demo", choice.notes)
        features = featurize_slide(slide, encoder, SlideConfig())
        write_bag(out / "features" / f"{slide.stem}.h5", features.bag)
        case = patients[0]
        slide_risk = predictor.slide(features.bag, predictor.genes_for(gene_table, case.case_id))
        _slide_summary(slide, features, slide_risk, case.case_id, encoder_version, args.encoder_weights, predictor)

    with stage("per-case report of the slide (histosurv report)"):
        report = _case_report(out, predictor, encoder, features, gene_table, case.case_id, choice.notes)

    _summary(stage, c, len(patients), result, baseline, reports, predictor, time.perf_counter() - total)
    print(f"evaluation: {evaluation}\nreport: {report}")
    return 0 if all(r.passed for r in reports) else 1


def _evaluate(out: Path, cohort_dir: Path) -> Path:
    """``histosurv evaluate`` on the held-out predictions; prints its summary, returns its folder."""
    import pandas as pd

    from ..runtime.evaluation import (EvaluationSettings, evaluate, load_cohort, read_outcomes, summary_text,
                                      write_evaluation)

    # the held-out patients' outcomes are evaluated; the training patients' give the censoring distribution
    clinical, splits = pd.read_csv(cohort_dir / "clinical.csv"), pd.read_csv(out / "run" / "splits.csv")
    for part, name in (("test", "held_out_clinical.csv"), ("train", "train_clinical.csv")):
        clinical[clinical["case_id"].isin(splits.loc[splits["split"] == part, "case_id"])].to_csv(out / name, index=False)
    cohort = load_cohort(out / "predictions.csv", out / "held_out_clinical.csv")
    report = evaluate(cohort, EvaluationSettings(bootstrap=1000, seed=0), training=read_outcomes(out / "train_clinical.csv"))
    write_evaluation(report, out / "evaluation")
    print(summary_text(report))
    return out / "evaluation"


def _case_report(out: Path, predictor, encoder, features, gene_table, case_id: str, notes) -> Path | str:
    """``histosurv report`` for the demo slide (skipped, with the reason, where matplotlib is missing)."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        return "not written: matplotlib is missing (pip install 'histosurv[report]')"
    from ..runtime.pipeline import SlideConfig
    from ..runtime.report import case_report, explain_case, write_report

    genes = predictor.genes_for(gene_table, case_id)
    result = predictor.patient(case_id, [features.bag], genes)
    attributions, why_not = explain_case(predictor, features.bag, genes, None)
    notes = [*notes, *([f"gene attributions: {why_not}"] if why_not else [])]
    case = case_report(predictor, encoder, [features], result, SlideConfig(), 8, attributions, notes)
    path = write_report(out / "report.html", case)
    print(f"wrote {path} (open it in any browser; it needs no network)")
    return path


def _fresh_folder(out: Path) -> Path:
    from ..errors import InputError

    if out.exists():
        if not (out / MARKER).exists():
            raise InputError(f"{out} exists and was not made by 'histosurv demo'; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).touch()
    return out


def _slide_summary(slide: Path, features, slide_risk, case_id: str, encoder_version, weights, predictor) -> None:
    info, grid, mask = features.slide, features.grid, features.mask
    print(
        f"{slide.name}: {info['dimensions'][0]} x {info['dimensions'][1]} px, {info['mpp']} µm/px, "
        f"{len(info['levels'])} level(s), read with {info['backend']}"
    )
    print(
        f"tissue: {mask.tissue_fraction:.1%} of the slide (saturation > {mask.threshold:.0f}); "
        f"{len(grid)} of {grid.candidates} patches of {grid.patch_size} px at {grid.mpp:.3f} µm/px (level {grid.level})"
    )
    print(f"risk {slide_risk.risk:+.4f} (genes of synthetic case {case_id})")
    head = predictor.version.info.survival
    if slide_risk.survival is not None:
        at = ", ".join(f"S({t:g}) {s:.3f}" for t, s in zip(head.times, slide_risk.survival))
        print(f"{at}; risk group {head.groups[slide_risk.risk_group]}")
    print(features.timing_line())
    print(
        "note: AMMASurv was trained on synthetic 512-d features (scored here with the encoder-mismatch override) and "
        "the encoder has "
        + ("the weights given" if weights else "seeded random weights (no ImageNet weights can be downloaded here)")
        + "; this risk shows the path and its speed, not a clinical estimate."
    )


def _summary(stage: Stages, c, n_held_out: int, result, baseline, reports, predictor, total: float) -> None:
    print("\n== summary")
    print(f"held-out c-index (ONNX Runtime, {n_held_out} patients): {c.c_index:.4f}")
    print(f"held-out c-index (PyTorch, same patients, at training):  {result.test_c_index:.4f}")
    print(f"held-out c-index of coxnet (same patients, linear baseline): {baseline.test_c_index:.4f}")
    for r in reports:
        print(f"parity {r.engine}: largest relative risk difference {r.max_risk_rel:.1e}, S(t) {r.max_survival_abs:.1e} "
              f"({'pass' if r.passed else 'FAIL'})")
    print(f"runtime stages: read {predictor.timings['read']:.2f} s, fuse {predictor.timings['fuse']:.2f} s")
    for name, seconds in stage.seconds.items():
        print(f"  {name:55s} {seconds:7.1f} s")
    print(f"  {'total':55s} {total:7.1f} s")
