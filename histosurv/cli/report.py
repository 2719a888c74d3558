"""histosurv report: one case's slides and genes -> a self-contained HTML report (risk, S(t), QC, heatmap)."""

from __future__ import annotations

import argparse
import importlib
import time

from ._slide_options import add_slide_options, print_notes, progress_printer, slide_config


def add_parser(sub) -> None:
    p = sub.add_parser(
        "report",
        help="score one case from its slides and write a self-contained HTML report",
        description="Scores one case as 'predict --slide' does (tissue, patches, patch encoder, survival model) and "
        "writes one HTML file that opens without network: risk and its definition, risk group, S(t) with the "
        "training cohort's Kaplan-Meier curve, a QC thumbnail (tissue mask, patch grid), the attention heatmap, "
        "the most attended patches, gene attributions, provenance and data-quality facts.",
    )
    p.add_argument("--repo", required=True, help="model repository root")
    p.add_argument("--model", help="survival model in the repository (default: the repository's only one)")
    p.add_argument("--version", type=int, help="model version (default: the highest)")
    p.add_argument("--engine", default="auto", help="fusion model engine: a manifest key, or auto (default)")
    p.add_argument("--slide", nargs="+", required=True, metavar="SLIDE", help="the case's slide files (.svs, .tiff, ...)")
    p.add_argument("--genes", help="gene table CSV (case_id + one column per gene)")
    p.add_argument("--case-id", help="the case's row in the gene table (default: the first slide's file name)")
    p.add_argument("--covariate", action="append", default=[], metavar="NAME=VALUE",
                   help="a clinical covariate of the case, for models trained with covariates (repeat)")
    p.add_argument("--out", required=True, help="the HTML file to write")
    p.add_argument("--top-k", type=int, default=8, help="most attended patches shown per slide (default: 8)")
    add_slide_options(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..data.tables import GeneTable
    from ..errors import InputError
    from ..runtime.pipeline import featurize_slide, open_encoder
    from ..runtime.predict import FusionPredictor
    from ..runtime.report import case_report, explain_case, write_report
    from .predict import _covariate_table

    importlib.import_module("matplotlib")  # draws the figures: where it is missing, say so before any scoring

    if args.top_k < 0:
        raise InputError(f"--top-k must be 0 or more, got {args.top_k}")
    if not args.out.lower().endswith((".html", ".htm")):
        raise InputError(f"--out {args.out!r}: the report is an HTML file; name it .html")
    started = time.perf_counter()
    args.case_id = args.case_id or Path(args.slide[0]).stem
    predictor = FusionPredictor.from_repository(args.repo, args.model, args.version, args.engine,
                                                allow_mismatch=args.allow_encoder_mismatch)
    vector = _gene_vector(args, predictor, GeneTable.read(args.genes) if args.genes else None)
    if predictor.feature_dim is None:
        raise InputError(f"model {predictor.version.name!r} takes no image features; a report needs a slide model")
    config = slide_config(args)
    encoder, choice = open_encoder(args.repo, predictor.version, args.encoder, args.encoder_version,
                                   args.encoder_engine, args.mpp, args.allow_encoder_mismatch)
    print_notes("report", choice.notes)
    clinical = predictor.clinical_for(_covariate_table(args, predictor), args.case_id, "--covariate")
    slides = [featurize_slide(s, encoder, config, progress_printer(s)) for s in args.slide]
    result = predictor.patient(args.case_id, [s.bag for s in slides], vector, clinical)
    genes, why_not = explain_case(predictor, slides[0].bag, vector, clinical)
    notes = [*choice.notes, *([f"gene attributions: {why_not}"] if why_not else [])]
    case = case_report(predictor, encoder, slides, result, config, args.top_k, genes, notes)
    write_report(args.out, case)
    print_notes("report", predictor.notes)
    group = f", group {case.risk_group}" if case.risk_group else ""
    print(f"{case.case_id}: risk {case.risk:.4f}{group} ({sum(s.n_patches for s in case.slides)} patches); "
          f"wrote {args.out} in {time.perf_counter() - started:.1f} s")
    return 0


def _gene_vector(args, predictor, genes):
    from ..errors import InputError

    if "genes" not in predictor.specs:
        return None
    if genes is None:
        if predictor.genes_optional:
            return None
        raise InputError(f"model {predictor.version.name!r} needs --genes (a table with a row for {args.case_id!r})")
    return predictor.genes_for(genes, args.case_id)
