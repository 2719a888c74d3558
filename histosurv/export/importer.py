"""``histosurv import``: a checkpoint saved by a reference repository -> a run directory.

The run directory is the one ``histosurv train`` writes (config.json + model.safetensors), so an
imported model goes through ``export``, ``verify``, ``predict`` and the server like a trained one.
Shape-deciding configuration (omic group sizes, feature width, ...) is read from the checkpoint's
tensors; the gene names, which a state_dict cannot hold, come from the user, in the order the model
was trained with. The references standardise genes outside the model with a per-fold scaler; give
it as a CSV (gene, mean, scale) to put it in the graph, or leave the genes standardised upstream.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file

from .. import __version__
from ..data.atomic import atomic_dir
from ..errors import InputError
from ..runtime.repository import sha256_file
from .models import MODELS, build_model
from .models.checkpoints import load_reference_checkpoint, read_checkpoint
from .run import RUN_CONFIG, RUN_WEIGHTS

__all__ = ["import_checkpoint", "read_scaler"]


def import_checkpoint(
    checkpoint: str | os.PathLike,
    architecture: str,
    out_dir: str | os.PathLike,
    genes: Sequence[str] | None = None,
    overrides: dict | None = None,
    extra: str | os.PathLike | None = None,
    scaler: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> dict:
    """Writes ``out_dir`` and returns its config; InputError names what does not fit."""
    if architecture not in MODELS:
        raise InputError(f"unknown architecture {architecture!r}; available: {', '.join(sorted(MODELS))}")
    model_cls = MODELS[architecture].model_cls
    if getattr(model_cls, "REFERENCE", None) is None:
        raise InputError(f"{architecture} has no reference implementation to import checkpoints from")
    state = read_checkpoint(checkpoint)
    values = dict(model_cls.config_from_reference(state)) if hasattr(model_cls, "config_from_reference") else {}
    values.update(overrides or {})
    try:
        model = build_model(architecture, values)
    except (TypeError, ValueError) as e:
        raise InputError(f"{architecture}: {e}") from e
    needs_genes = "genes" in model.input_names
    if needs_genes and genes is None:
        raise InputError(f"{architecture} reads genes: give the {model.cfg.n_genes} gene names in training order (--gene-list)")
    if needs_genes and model.cfg.n_genes != len(genes):
        raise InputError(f"{checkpoint}: the checkpoint takes {model.cfg.n_genes} genes, the gene list has {len(genes)}")
    report = load_reference_checkpoint(model, state, _extra(extra))
    names = list(genes) if needs_genes else []
    if scaler is not None:
        if not needs_genes:
            raise InputError(f"{architecture} reads no genes; a gene scaler does not apply")
        mean, scale = read_scaler(scaler, names)
        model.set_gene_scaler(torch.from_numpy(mean), torch.from_numpy(scale))
        report.defaulted = []
    fmt = model_cls.REFERENCE
    config = {
        "histosurv_version": __version__,
        "architecture": architecture,
        "model": model.cfg.to_dict(),
        "train": {},
        "genes": names,
        "trained_on": None,  # the reference checkpoints do not say which encoder made their features
        "time_bins": None,
        "imported_from": {
            "checkpoint": str(Path(checkpoint).resolve()),
            "sha256": sha256_file(checkpoint),
            "repository": fmt.repository,
            "commit": fmt.commit,
            "class": fmt.model_class,
            "tensors_loaded": len(report.loaded),
            "unused": report.unused,
            "gene_scaler": str(scaler) if scaler else "identity (genes standardised upstream)",
        },
    }
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / RUN_CONFIG).write_text(json.dumps(config, indent=1))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / RUN_WEIGHTS))
    return config


def read_scaler(path: str | os.PathLike, genes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) in the model's gene order from a CSV with columns gene, mean, scale."""
    try:
        table = pd.read_csv(path).set_index("gene")
        table = table.loc[list(genes), ["mean", "scale"]]
    except FileNotFoundError:
        raise InputError(f"{path}: gene scaler not found") from None
    except KeyError as e:
        raise InputError(f"{path}: a gene scaler needs columns gene, mean, scale and a row per gene ({e})") from e
    values = table.to_numpy(np.float32)
    if not np.isfinite(values).all() or (values[:, 1] <= 0).any():
        raise InputError(f"{path}: every mean must be finite and every scale positive")
    return values[:, 0], values[:, 1]


def _extra(path) -> dict[str, torch.Tensor] | None:
    return None if path is None else read_checkpoint(path)
