"""histosurv predict: risks from a model repository alone (ONNX Runtime, no model source code)."""

from __future__ import annotations

import argparse
import json
import time

from ._explain_options import add_explain_options, explain_slides
from ._slide_options import add_slide_options, print_notes, progress_printer, slide_config


def add_parser(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="score patients with a model from a repository",
        description="One case from its slides (--case-id with --slide FILE...: tissue, patches and patch encoder "
        "run first) or from feature files (--features FILE...), or a table of cases (--clinical with --features-dir). "
        "A patient's risk is the mean of its slides' risks.",
    )
    p.add_argument("--repo", required=True, help="model repository root")
    p.add_argument("--model", help="survival model in the repository (default: the repository's only one)")
    p.add_argument("--version", type=int, help="model version (default: the highest)")
    p.add_argument(
        "--engine",
        default="auto",
        help="fusion model engine: a key of the version's manifest (onnxruntime, onnxruntime_fp16, torch, "
        "torch_cuda, tensorrt) or auto, the best one this machine can run (default)",
    )
    p.add_argument("--genes", help="gene table CSV (case_id + one column per gene)")
    one = p.add_argument_group("one case")
    one.add_argument("--case-id", help="the case's row in the gene table (--genes)")
    one.add_argument("--features", nargs="+", metavar="H5", help="the case's slide feature files")
    one.add_argument("--slide", nargs="+", metavar="SLIDE", help="the case's slide files (.svs, .tiff, ...)")
    one.add_argument("--covariate", action="append", default=[], metavar="NAME=VALUE",
                     help="a clinical covariate of the case, for models trained with covariates (repeat: "
                     "--covariate age=63 --covariate stage=II); those not given are missing values. With "
                     "--clinical, the covariates are the table's columns")
    many = p.add_argument_group("a table of cases")
    many.add_argument("--clinical", help="CSV with case_id and slide_id (outcomes optional: then the c-index is printed)")
    many.add_argument("--features-dir", help="folder of <slide_id>.h5")
    p.add_argument("--out", help="write per-patient risks to this CSV (default: print)")
    add_explain_options(p)
    add_slide_options(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..data.cohort import case_files
    from ..data.tables import GeneTable, patients_from_clinical, read_clinical
    from ..errors import InputError
    from ..runtime.predict import FusionPredictor, score_cases

    if sum(map(bool, (args.features, args.slide, args.clinical))) != 1:
        raise InputError("give one of: --case-id with --slide, --case-id with --features, or --clinical with --features-dir")
    if not args.slide:
        used = [f for f in ("mpp", "encoder", "encoder_version", "slide_mpp") if getattr(args, f) is not None]
        if used:
            raise InputError(f"{', '.join('--' + f.replace('_', '-') for f in used)} apply to --slide (features are made already)")
    started = time.perf_counter()
    predictor = FusionPredictor.from_repository(
        args.repo, args.model, args.version, args.engine, allow_mismatch=args.allow_encoder_mismatch
    )
    genes = GeneTable.read(args.genes) if args.genes else None
    if args.covariate and args.clinical:
        raise InputError("--covariate is for one case; with --clinical the covariates are the table's columns")
    if args.explain and args.clinical:
        raise InputError("--explain explains one case: use it with --case-id and --slide or --features")
    if args.slide:
        return _predict_slides(args, predictor, genes, started)
    if args.features:
        if not args.case_id:
            raise InputError("--features needs --case-id (the row of the gene table to use)")
        cases, table = [(args.case_id, args.features)], None
        covariates = _covariate_table(args, predictor)
    else:
        if not args.features_dir:
            raise InputError("--clinical needs --features-dir")
        table = read_clinical(args.clinical, require_outcome=False)
        table.attrs["source"] = args.clinical
        cases = case_files(patients_from_clinical(table), args.features_dir)
        covariates = table
    results = score_cases(predictor, cases, genes, covariates)
    print_notes("predict", predictor.notes)
    _report(args, predictor, results, table, time.perf_counter() - started)
    if args.explain:
        _explain_features(args, predictor, genes, covariates, results[0])
    return 0


def _explain_features(args, predictor, genes, covariates, result) -> None:
    from ..data.features import read_bag

    bags = [read_bag(p, predictor.feature_dim) for p in args.features]
    vector = predictor.genes_for(genes, args.case_id) if genes is not None else None
    clinical = predictor.clinical_for(covariates, args.case_id, "--covariate")
    print(json.dumps({"explanations": explain_slides(args, predictor, bags, result.slides, vector, clinical)}, indent=1))


def _predict_slides(args, predictor, genes, started: float) -> int:
    from ..errors import InputError
    from ..runtime.pipeline import featurize_slide, open_encoder
    from ..runtime.predict import survival_fields

    if not args.case_id:
        raise InputError("--slide needs --case-id (the row of the gene table to use)")
    vector = None
    if "genes" in predictor.specs:
        if genes is None:
            raise InputError(f"model {predictor.version.name!r} needs --genes (a table with a row for {args.case_id!r})")
        vector = predictor.genes_for(genes, args.case_id)
    if predictor.feature_dim is None:
        raise InputError(f"model {predictor.version.name!r} takes no image features; score it without --slide")
    config = slide_config(args)
    encoder, choice = open_encoder(
        args.repo, predictor.version, args.encoder, args.encoder_version, args.encoder_engine, args.mpp,
        args.allow_encoder_mismatch,
    )
    print_notes("predict", choice.notes)
    clinical = predictor.clinical_for(_covariate_table(args, predictor), args.case_id, "--covariate")
    slides = [featurize_slide(s, encoder, config, progress_printer(s)) for s in args.slide]
    result = predictor.patient(args.case_id, [s.bag for s in slides], vector, clinical)
    explanations = explain_slides(args, predictor, [s.bag for s in slides], result.slides, vector, clinical,
                                  args.slide) if args.explain else None
    stages = {k: round(sum(s.seconds[k] for s in slides), 3) for k in ("open", "mask", "grid", "read", "encode", "wait")}
    stages["fuse"] = round(predictor.timings["fuse"], 3)
    stages["total"] = round(time.perf_counter() - started, 3)
    print(json.dumps({
        "case_id": result.case_id,
        "risk": result.risk,
        **survival_fields(predictor.version, result.survival, result.risk_group),
        "model": predictor.version.label,
        "encoder": encoder.version.label,
        "encoder_engine": encoder.engine.key,
        "patch_mpp": encoder.mpp,
        **({"overrides": choice.overrides} if choice.overrides else {}),
        "slides": [
            {"slide": r.source, "risk": r.risk, **survival_fields(predictor.version, r.survival, r.risk_group),
             "n_patches": r.n_patches, "mpp": f.grid.mpp, "level": f.grid.level,
             "tissue_fraction": round(f.mask.tissue_fraction, 4), "reader": f.slide["backend"]}
            for r, f in zip(result.slides, slides)
        ],
        "seconds": stages,
        **({"explanations": explanations} if explanations is not None else {}),
    }, indent=1))
    return 0


def _print_c_index(frame, unknown: str) -> None:
    """The c-index per part the patients played in training the model: a figure over patients the model
    was trained on is optimistic, and one over everybody mixes the two without saying so."""
    from ..data.concordance import concordance_index

    def line(part, what: str) -> str:
        if len(part) < 2 or not (part["censorship"] == 0).any():
            return f"c-index: - over {len(part)} {what} (too few patients or no deaths)"
        c = concordance_index(part["survival_months"], part["censorship"] == 0, part["risk"])
        return f"c-index {c.c_index:.4f} over {len(part)} {what} ({c.comparable} comparable pairs)"

    if "training_split" not in frame:
        print(line(frame, f"patients, all of the table's: which of them trained the model is unknown ({unknown})"))
        return
    labels = {
        "test": "held-out test patients of its training run (never seen in training)",
        "new": "patients not in its training cohort",
        "val": "validation patients of its training run (they chose its epoch)",
        "train": "patients it was trained on (optimistic)",
    }
    for split, what in labels.items():
        part = frame[frame["training_split"] == split]
        if len(part):
            print(line(part, what))


def _groups_line(head) -> str:
    cuts = [f"{c:+.4f}" for c in head.cutoffs]
    bounds = ["risk <= " + cuts[0]] + [f"{a} < risk <= {b}" for a, b in zip(cuts, cuts[1:])] + [f"risk > {cuts[-1]}"]
    return (", ".join(f"{g} ({b})" for g, b in zip(head.groups, bounds))
            + f": cut at the {head.grouping} of the training risks ({head.fitted_on})")


def _covariate_table(args, predictor):
    """--covariate NAME=VALUE pairs as a one-row table for ``predictor.clinical_for`` (None: none given)."""
    import pandas as pd

    from ..errors import InputError

    if not args.covariate:
        return None
    spec = predictor.clinical_spec
    if spec is None:
        raise InputError(f"model {predictor.version.name!r} takes no clinical covariates; drop --covariate")
    values = {}
    for item in args.covariate:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise InputError(f"--covariate takes NAME=VALUE, got {item!r}")
        if name.strip() not in spec.names:
            raise InputError(f"--covariate {name.strip()!r}: model {predictor.version.name!r} reads {', '.join(spec.names)}")
        values[name.strip()] = value.strip()
    return pd.DataFrame([{"case_id": args.case_id, **values}])


def _report(args, predictor, results, table, seconds: float) -> None:
    import pandas as pd

    from ..data.atomic import atomic_path
    from ..runtime.predict import survival_fields, training_splits

    frame = pd.DataFrame(
        {
            "case_id": [r.case_id for r in results],
            "risk": [r.risk for r in results],
            "n_slides": [len(r.slides) for r in results],
            "n_patches": [sum(s.n_patches for s in r.slides) for r in results],
        }
    )
    survival = predictor.version.info.survival
    if survival is not None:  # the unit in the file itself: a Cox log-hazard and minus summed survival differ
        frame.insert(2, "risk_scale", survival.risk_scale)
    curves = pd.DataFrame([survival_fields(predictor.version, r.survival, r.risk_group) for r in results])
    for k, column in enumerate(curves.columns):  # S(12), S(24), ..., risk_group: beside the risk they come from
        frame.insert(3 + k, column, curves[column].to_numpy())
    if table is not None and {"survival_months", "censorship"} <= set(table.columns):
        outcomes = table.drop_duplicates("case_id").set_index("case_id")[["survival_months", "censorship"]]
        frame = frame.join(outcomes, on="case_id")
    splits, unknown = training_splits(predictor.version)
    if splits is not None:
        frame["training_split"] = [splits.get(c, "new") for c in frame["case_id"]]
    if predictor.overrides:  # risks made under an override say so in the file itself
        frame["overrides"] = json.dumps(predictor.overrides, sort_keys=True)
    if args.out:
        with atomic_path(args.out, suffix=".csv") as tmp:
            frame.to_csv(tmp, index=False)
        print(f"wrote {len(frame)} patient risks to {args.out}")
    elif args.features:
        r = results[0]
        overrides = {"overrides": predictor.overrides} if predictor.overrides else {}
        print(json.dumps({"case_id": r.case_id, "risk": r.risk, **survival_fields(predictor.version, r.survival, r.risk_group),
                          **overrides, "slides": [
            {"source": s.source, "risk": s.risk, **survival_fields(predictor.version, s.survival, s.risk_group),
             "n_patches": s.n_patches} for s in r.slides]}, indent=1))
    else:
        print(frame.to_string(index=False))
    if survival is not None:
        print(f"risk: {survival.risk_definition}")
        if survival.has_curves:
            print(f"S(t): the predicted probability of surviving beyond t months; risk_group: "
                  f"{_groups_line(survival)}")
    if "survival_months" in frame and (frame["censorship"] == 0).any() and len(frame) > 1:
        _print_c_index(frame, unknown)
    t = predictor.timings
    engine = predictor.engine.describe()
    print(
        f"{predictor.version.name} v{predictor.version.version} on {engine['engine']} {engine.get('providers', '')}: "
        f"read {t['read']:.2f} s, fuse {t['fuse']:.2f} s, total {seconds:.2f} s"
    )
