"""histosurv import: load a checkpoint saved by a reference repository (MCAT, PORPOISE, MoME, G-HANet, ...)."""

from __future__ import annotations

import argparse

from ._options import add_union_options
from .train import model_choices

COMMAND = "import"


def add_parser(sub) -> None:
    from ..export.models import MODELS

    importable = sorted(name for name, spec in MODELS.items() if getattr(spec.model_cls, "REFERENCE", None))
    p = sub.add_parser(
        COMMAND,
        help="turn a reference repository's checkpoint into a run directory for 'histosurv export'",
        description="Reads the state_dict with torch.load(weights_only=True), maps its keys to histosurv's "
        "module (refusing missing or mis-shaped tensors by name) and writes a run directory. Shape-deciding "
        "options are read from the checkpoint; give only what it cannot tell.",
    )
    p.add_argument("checkpoint", help="the .pt file the reference training code saved")
    p.add_argument("--architecture", required=True, choices=importable, help="the reference model the checkpoint is of")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--gene-list", help="text file, one gene per line, in the order the model was trained with")
    p.add_argument("--gene-scaler", help="CSV gene,mean,scale: the training fold's standardisation (default: identity)")
    p.add_argument("--extra", help="a .pt state_dict of tensors the reference keeps outside its state_dict (MoME)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_union_options(p, {n: MODELS[n].config_cls for n in importable}, exclude=("n_genes",), title="model",
                      choices=model_choices())
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import InputError
    from ..export.importer import import_checkpoint
    from ..export.models import MODELS
    from ._options import given_values
    from .train import _gene_list

    if Path(args.out).exists() and not args.overwrite:
        raise InputError(f"{args.out} already exists; choose another --out or pass --overwrite")
    names = {f for spec in MODELS.values() for f in spec.config_cls.__dataclass_fields__}
    try:
        overrides = given_values(args, MODELS[args.architecture].config_cls, names, exclude=("n_genes",))
    except ValueError as e:
        raise InputError(str(e)) from e
    genes = _gene_list(args.gene_list) if args.gene_list else None
    config = import_checkpoint(
        args.checkpoint, args.architecture, args.out, genes, overrides, args.extra, args.gene_scaler, args.overwrite
    )
    src = config["imported_from"]
    print(
        f"imported {src['class']} ({src['repository']}@{src['commit'][:7]} layout): {src['tensors_loaded']} tensors, "
        f"{len(src['unused'])} training-only tensors left out; gene scaler: {src['gene_scaler']}; run written to {args.out}"
    )
    return 0
