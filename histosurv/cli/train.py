"""histosurv train: fit a survival model on feature bags, a clinical CSV and a gene table."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ._options import add_dataclass_options, add_union_options, given_values

# Fields the data decides, not the user.
DERIVED = ("n_genes", "feature_dim", "pos_scale")


def add_parser(sub) -> None:
    from ..export.models import MODELS
    from ..export.training import TrainConfig

    from ..export.training import RECIPES

    p = sub.add_parser(
        "train",
        help="train a survival model (seeded; K-fold cross-validation or one split; coxnet baseline beside it)",
        description="Writes a run directory (config, weights, history, splits, metrics) for 'histosurv export'. "
        "With enough patients (at least 100, and 25 events) it cross-validates 5 folds and refits on every "
        "patient; --folds 1 trains on one split. Model options apply to the architectures named in their help; "
        "each keeps its own defaults. Training options default to the architecture's recipe: "
        + "; ".join(f"{name}: {', '.join(f'{k} {v}' for k, v in r.items()) or 'the defaults'}" for name, r in sorted(RECIPES.items())),
    )
    p.add_argument("--clinical", required=True, help="CSV: case_id, slide_id, survival_months, censorship (1 = censored)")
    p.add_argument("--genes", required=True, help="CSV: case_id and one column per gene")
    p.add_argument(
        "--features-dir",
        help="folder of CLAM h5 files, <slide_id>.h5 (not for genes-only architectures, whose clinical table "
        "may then have one row per case and no slide_id)",
    )
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--gene-list", help="text file, one gene per line: the genes to use, in order (default: all)")
    p.add_argument("--architecture", default="ammasurv", choices=sorted(MODELS),
                   help="; ".join(f"{n}: {spec.summary}" for n, spec in sorted(MODELS.items())) + " (default: ammasurv)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    configs = {name: spec.config_cls for name, spec in MODELS.items()}
    add_union_options(p, configs, exclude=DERIVED, title="model (each option names the architectures it applies to)",
                      choices=model_choices())
    from ..export.training import STOPPING

    add_dataclass_options(p, TrainConfig, title="training (defaults: the architecture's recipe, see above)",
                          choices={"stop": list(STOPPING)})
    for action in p._actions:  # a flag not given keeps the recipe's value
        if action.dest in TrainConfig.__dataclass_fields__:
            action.default = argparse.SUPPRESS
    cv = p.add_argument_group("cross-validation")
    cv.add_argument("--folds", type=int, help="K-fold cross-validation at the patient level, stratified by event and "
                    "time; 1 = a single train/test split (default: 5 with at least 100 patients and 25 events, else 1)")
    cv.add_argument("--refit", action=argparse.BooleanOptionalAction, default=True,
                    help="after cross-validation, train once more on every patient; that model is the run's, and "
                    "'histosurv export --run RUN' exports it (--no-refit: export a fold, --fold K)")
    from ._clinical_options import add_clinical_column_options

    add_clinical_column_options(p)
    cov = p.add_argument_group(
        "clinical covariates",
        "columns of the clinical table the model takes as a third input (late fusion: a linear term added to "
        "its log-hazard; coxnet: more columns of its design); optional at inference",
    )
    cov.add_argument("--covariates", metavar="COL,COL", type=_names,
                     help="e.g. age,sex,stage: numeric columns are standardised, text columns one-hot encoded")
    cov.add_argument("--categorical", metavar="COL,COL", type=_names, default=None,
                     help="covariates to one-hot encode even though they hold numbers (e.g. grade)")
    p.set_defaults(handler=run)


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("name at least one column, comma-separated")
    return names


def model_choices() -> dict[str, list[str]]:
    """The fields of the model configs that take one of a fixed set of values."""
    from ..export.models import ammasurv, mcat, porpoise
    from ..export.models.survival_head import HEAD_KINDS

    return {
        "survival_head": list(HEAD_KINDS),
        "modality": list(ammasurv.MODALITIES),
        "fusion": sorted(set(mcat.FUSIONS) | set(porpoise.FUSIONS)),
    }


def model_values(args: argparse.Namespace, architecture: str) -> dict:
    from ..export.models import MODELS

    names = {f for spec in MODELS.values() for f in spec.config_cls.__dataclass_fields__}
    return given_values(args, MODELS[architecture].config_cls, names, exclude=DERIVED, owner=f"--architecture {architecture}")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data.cohort import load_cohort
    from ..errors import InputError
    from ..export.models import MODELS, config_from_dict
    from ..export.training import recipe
    from ._clinical_options import clinical_columns_from_args

    if args.threads:
        torch.set_num_threads(args.threads)
    if Path(args.out).exists() and not args.overwrite:
        raise InputError(f"{args.out} already exists; choose another --out or pass --overwrite")
    genes = _gene_list(args.gene_list) if args.gene_list else None
    columns = clinical_columns_from_args(args)
    covariates = _covariates(args)
    cohort = load_cohort(args.clinical, args.genes, args.features_dir, genes=genes, columns=columns, covariates=covariates)
    fields = MODELS[args.architecture].config_cls.__dataclass_fields__
    derived = {"n_genes": len(cohort.gene_names)}
    if cohort.bags is not None:
        derived.update(feature_dim=cohort.feature_dim, pos_scale=_patch_size_level0(cohort))
    try:
        values = dict(model_values(args, args.architecture), **{k: v for k, v in derived.items() if k in fields})
        values = default_model_values(args.architecture, values)
        if args.architecture == "coxnet" and cohort.bags is None and "modality" not in values:
            values["modality"] = "genes"  # no --features-dir: the linear model of the genes
        model_cfg = config_from_dict(args.architecture, values)
        train_cfg = recipe(args.architecture, **{k: getattr(args, k) for k in _train_fields() if hasattr(args, k)})
    except (ValueError, TypeError) as e:
        raise InputError(f"{args.architecture}: {flag_names(str(e), derived)}") from e
    for note in cohort.encoder_notes:
        print(f"histosurv train: note: {note}")
    folds = choose_folds(args.folds, cohort)
    extra = {"clinical_columns": columns.to_dict()}
    what = f"{cohort.feature_dim}-d patch features" if cohort.bags is not None else "no patch features"
    n_events = int(cohort.times_events(range(len(cohort.patients)))[1].sum())
    print(f"training {args.architecture} on {len(cohort.patients)} patients ({n_events} events), "
          f"{len(cohort.gene_names)} genes, {what}")
    if covariates is not None:
        print(f"clinical covariates: {cohort.covariate_spec(range(len(cohort.patients))).describe()}")
    try:
        if folds > 1:
            return _cross_validate(args, cohort, model_cfg, train_cfg, folds, extra)
        return _single_split(args, cohort, model_cfg, train_cfg, extra)
    except ValueError as e:
        raise InputError(str(e)) from e


def _covariates(args):
    from ..data.covariates import CovariateRequest
    from ..errors import InputError

    if not args.covariates:
        if args.categorical:
            raise InputError("--categorical names covariates; give them with --covariates too")
        return None
    return CovariateRequest(tuple(args.covariates), tuple(args.categorical or ()))


def _train_fields() -> tuple[str, ...]:
    from ..export.training import TrainConfig

    return tuple(TrainConfig.__dataclass_fields__)


def default_model_values(architecture: str, values: dict, quiet: bool = False) -> dict:
    """What the data cannot decide and the user did not give: MCAT-family gene groups on a plain table."""
    from ..export.models import MODELS
    from ..export.models.gene_groups import default_groups

    fields = MODELS[architecture].config_cls.__dataclass_fields__
    if "omic_sizes" in fields and not values.get("omic_sizes"):
        values = dict(values, omic_sizes=default_groups(values["n_genes"]))
        if not quiet:
            print(f"histosurv train: note: no --omic-sizes given; the {values['n_genes']} genes are split in table order "
                  f"into {len(values['omic_sizes'])} groups of {', '.join(map(str, values['omic_sizes']))} (see --help)")
    return values


def choose_folds(requested: int | None, cohort) -> int:
    from ..errors import InputError
    from ..export.cross_validation import assign_folds

    n = len(cohort.patients)
    events = int(cohort.times_events(range(n))[1].sum())
    if requested is None:
        if n >= 100 and events >= 25:
            return 5
        print(f"histosurv train: note: {n} patients and {events} events are too few for 5-fold cross-validation "
              "(100 and 25 at least); training on one split")
        return 1
    if requested < 1:
        raise InputError(f"--folds must be at least 1, got {requested}")
    if requested > 1:
        try:
            assign_folds(cohort, requested, 0)
        except ValueError as e:
            raise InputError(f"--folds {requested}: {e}") from e
    return requested


def _single_split(args, cohort, model_cfg, train_cfg, extra) -> int:
    from ..export.cross_validation import baseline_config
    from ..export.run import save_run
    from ..export.training import split_patients, train

    splits = split_patients(cohort, train_cfg)
    result = train(cohort, args.architecture, model_cfg, train_cfg, log=print, splits=splits)
    baseline = None
    if train_cfg.baseline and args.architecture != "coxnet":
        baseline = train(cohort, "coxnet", baseline_config(args.architecture, model_cfg, cohort), train_cfg, splits=splits)
    save_run(args.out, result, cohort, overwrite=args.overwrite, extra_config=extra, baseline=baseline)
    chosen = f"epoch {result.best_epoch} (best smoothed validation loss)" if train_cfg.uses_validation else \
        f"the last of {len(result.history)} epochs"
    if args.architecture == "coxnet":
        chosen = f"penalty {result.model.chosen_alpha:.4g}"
    versus = f" vs coxnet {baseline.test_c_index:.4f} on the same patients" if baseline is not None else ""
    print(
        f"{chosen}: test c-index {args.architecture} {result.test_c_index:.4f}{versus} "
        f"({len(result.splits.test)} held-out patients); {result.seconds:.1f} s; run written to {args.out}"
    )
    return 0


def _cross_validate(args, cohort, model_cfg, train_cfg, folds, extra) -> int:
    from ..export.cross_validation import cross_validate
    from ..export.run import save_cv_run

    cv = cross_validate(cohort, args.architecture, model_cfg, train_cfg, k=folds, refit=args.refit, log=print)
    save_cv_run(args.out, cv, cohort, overwrite=args.overwrite, extra_config=extra)
    s = cv.summary(cohort)
    line = f"{folds}-fold cross-validation: {args.architecture} {_pm(s['model'])}"
    if "coxnet" in s:
        line += f" vs coxnet {_pm(s['coxnet'])} on the same folds"
    print(line)
    print(f"pooled out-of-fold c-index: {args.architecture} {s['model']['c_index_pooled']:.4f}"
          + (f", coxnet {s['coxnet']['c_index_pooled']:.4f}" if "coxnet" in s else ""))
    model = "the model refitted on every patient" if cv.refit else "no refit (export a fold: --fold K)"
    print(f"{cv.seconds:.1f} s; run written to {args.out} ({model}; folds in {args.out}/folds)")
    return 0


def _pm(s: dict) -> str:
    return f"{s['c_index_mean']:.4f} ± {s['c_index_sd']:.4f}"


def flag_names(message: str, derived: dict) -> str:
    """A config's message in the words of the command line: ``n_genes = 60`` becomes where the number
    comes from (the data decides it), ``dim = 256`` becomes ``--dim 256``."""
    from ..export.models import MODELS

    sources = {
        "n_genes": f"the number of genes ({derived.get('n_genes')}: columns of --genes, or lines of --gene-list)",
        "feature_dim": f"the width of the bags' features ({derived.get('feature_dim')}, in --features-dir)",
        "pos_scale": "the bags' patch size at level 0",
    }
    fields = {f for spec in MODELS.values() for f in spec.config_cls.__dataclass_fields__}

    def words(match: re.Match) -> str:
        name, value = match.group(1), match.group(2)
        if name in sources:
            return sources[name]
        return "--" + name.replace("_", "-") + (f" {value}" if value else "")

    pattern = "|".join(sorted(map(re.escape, fields), key=len, reverse=True))
    return re.sub(rf"(?<![\w-])({pattern})(?:\s*=\s*(-?[\d.]+))?(?![\w-])", words, message)


def _gene_list(path: str) -> list[str]:
    from ..errors import InputError, MissingInputError

    if not Path(path).is_file():
        raise MissingInputError(f"{path}: gene list not found")
    names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not names:
        raise InputError(f"{path}: the gene list is empty")
    return names


def _patch_size_level0(cohort) -> float:
    """The positional unit: one patch, in level-0 pixels, from the bags' attributes when they say."""
    attrs = cohort.bags.get(cohort.patients[0].slide_ids[0]).attrs
    if "patch_size_level0" in attrs:
        return float(attrs["patch_size_level0"])
    if "patch_size" in attrs and int(attrs.get("patch_level", 0)) == 0:
        return float(attrs["patch_size"])
    return 256.0
