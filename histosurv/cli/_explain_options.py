"""--explain for predict and score: options, and the torch-side parts added where torch is installed."""

from __future__ import annotations

from pathlib import Path

EXPLAIN_METHODS = ("auto", "occlusion", "ig", "all")
TORCH_ARCHITECTURES = ("mcat", "mome")  # whose internals histosurv.export.attribution shows
TRAIN_EXTRA = "pip install 'histosurv[train]'"


def add_explain_options(p, torch_side: bool = True) -> None:
    g = p.add_argument_group("explanations (off by default: each costs fusion passes)")
    methods = EXPLAIN_METHODS if torch_side else ("auto", "occlusion")
    g.add_argument(
        "--explain", nargs="?", const="auto", choices=methods,
        help="explain each slide's risk: gene attributions (occlusion: one fusion pass per gene group on the "
        "serving engine" + ("; ig: integrated gradients on the PyTorch model, needs histosurv[train]; all: both), "
                            "the most attended patches, and, with torch installed, MCAT's per-gene-group attention "
                            "and MoME's router choices" if torch_side else "), and the most attended patches")
        + ". Bare --explain (auto): occlusion where the model takes genes, and says why a part is not given")
    g.add_argument("--explain-top", type=int, default=8, metavar="K", help="attended patches to list (default 8)")
    if torch_side:
        g.add_argument("--ig-steps", type=int, default=64, metavar="N", help="integrated-gradients steps (default 64)")
        g.add_argument("--explain-dir", metavar="DIR",
                       help="also write DIR/<slide>.explanation.json and, with --slide, the top patches' crops as PNG")


def explain_slides(args, predictor, bags, slide_risks, genes, clinical, slides=None) -> list[dict]:
    """One explanation per slide (see ``histosurv.runtime.explain``) as JSON dicts; with --explain-dir each
    is also written there (crops as PNG beside it)."""
    from ..runtime.explain import explain_bag, write_explanation

    method = args.explain
    torch_side, why_not = torch_explainer(predictor.version, method, args.ig_steps)
    out = []
    for i, (bag, risk) in enumerate(zip(bags, slide_risks)):
        e = explain_bag(predictor, bag, genes, clinical, risk.attention, genes_required=method != "auto",
                        k=args.explain_top, slide=slides[i] if slides else None, occlusion=method != "ig")
        if torch_side is not None:
            torch_side(e, predictor.inputs_for(bag, genes, clinical), bag.coords)
        elif why_not:
            e.unavailable["internals"] = why_not
        if args.explain_dir:
            stem = Path(bag.source).name.split(".")[0] or f"slide{i + 1}"
            path = write_explanation(e, Path(args.explain_dir) / f"{stem}.explanation.json", args.explain_dir)
            print(f"wrote {path}")
        out.append(e.to_dict())
    return out


def torch_explainer(version, method: str, steps: int = 64):
    """(a function adding the torch-side parts to an explanation, or None; why there is none). Integrated
    gradients without torch is refused by name; MCAT's and MoME's internals are added where torch is."""
    import importlib.util

    from ..errors import InputError

    wants_ig = method in ("ig", "all")
    wants_internals = version.info.architecture in TORCH_ARCHITECTURES
    if not (wants_ig or wants_internals):
        return None, ""
    if importlib.util.find_spec("torch") is None:
        why = f"needs PyTorch and the model's reference weights, which this install lacks: {TRAIN_EXTRA}"
        if wants_ig:
            raise InputError(f"--explain {method}: integrated gradients {why}")
        return None, f"{version.info.architecture}'s internals {why}"
    from ..export.attribution import integrated_gradients, model_internals
    from ..export.verify import reference_model

    model = reference_model(version)

    def add(explanation, inputs, coords) -> None:
        if wants_ig:
            explanation.gene_attributions.append(integrated_gradients(version, inputs, steps, model=model))
        if wants_internals:
            explanation.internals = model_internals(version, inputs, coords, model=model)
            explanation.unavailable.pop("internals", None)

    return add, ""
