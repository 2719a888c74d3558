"""histosurv train: fit a survival model on feature bags, a clinical CSV and a gene table."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ._options import add_dataclass_options, add_union_options, dataclass_values, given_values

# Fields the data decides, not the user.
DERIVED = ("n_genes", "feature_dim", "pos_scale")


def add_parser(sub) -> None:
    from ..export.models import MODELS
    from ..export.training import TrainConfig

    p = sub.add_parser(
        "train",
        help="train a survival model (seeded; early stopping on a validation split, scored on a test split)",
        description="Writes a run directory (config, weights, history, splits, metrics) for 'histosurv export'. "
        "Model options apply to the architectures named in their help; each keeps its own defaults.",
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
    add_dataclass_options(p, TrainConfig, title="training")
    p.set_defaults(handler=run)


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
    from ..export.run import save_run
    from ..export.training import TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    if Path(args.out).exists() and not args.overwrite:
        raise InputError(f"{args.out} already exists; choose another --out or pass --overwrite")
    genes = _gene_list(args.gene_list) if args.gene_list else None
    cohort = load_cohort(args.clinical, args.genes, args.features_dir, genes=genes)
    fields = MODELS[args.architecture].config_cls.__dataclass_fields__
    derived = {"n_genes": len(cohort.gene_names)}
    if cohort.bags is not None:
        derived.update(feature_dim=cohort.feature_dim, pos_scale=_patch_size_level0(cohort))
    try:
        values = dict(model_values(args, args.architecture), **{k: v for k, v in derived.items() if k in fields})
        model_cfg = config_from_dict(args.architecture, values)
        train_cfg = TrainConfig(**dataclass_values(args, TrainConfig))
    except (ValueError, TypeError) as e:
        raise InputError(f"{args.architecture}: {flag_names(str(e), derived)}") from e
    for note in cohort.encoder_notes:
        print(f"histosurv train: note: {note}")
    what = f"{cohort.feature_dim}-d patch features" if cohort.bags is not None else "no patch features"
    print(f"training {args.architecture} on {len(cohort.patients)} patients, {len(cohort.gene_names)} genes, {what}")
    try:
        result = train(cohort, args.architecture, model_cfg, train_cfg, log=print)
    except ValueError as e:
        raise InputError(str(e)) from e
    save_run(args.out, result, cohort, overwrite=args.overwrite)
    print(
        f"best epoch {result.best_epoch}: validation c-index {result.val_c_index:.4f}, "
        f"test c-index {result.test_c_index:.4f} ({len(result.splits.test)} held-out patients); "
        f"{result.seconds:.1f} s; run written to {args.out}"
    )
    return 0


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
