"""Loading state_dicts saved by the reference repositories' training code into histosurv's modules.

Each model class that has a reference implementation declares a :class:`ReferenceFormat`: which
repository and commit its layout was read from, regex renames from the reference's key names to
histosurv's, reference keys that inference does not use (training-only heads), and histosurv
tensors a reference checkpoint does not contain (the gene scaler, which the references keep
outside the model; MoME's bottleneck and class tokens, which it creates as plain tensors).

Files are read with ``torch.load(weights_only=True)``: a checkpoint is data, never code.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ...errors import InputError

__all__ = [
    "ReferenceFormat",
    "ImportReport",
    "read_checkpoint",
    "map_reference_keys",
    "load_reference_checkpoint",
    "strip_module_prefix",
]

# Reference checkpoints never hold the per-fold StandardScaler; the scaler stays the identity
# (genes already standardised) unless set afterwards.
SCALER_KEYS = ("genes.mean", "genes.scale")


@dataclass(frozen=True)
class ReferenceFormat:
    repository: str  # owner/name on GitHub
    commit: str  # the snapshot the layout was read from
    model_class: str  # the reference class whose state_dict this maps
    renames: tuple[tuple[str, str], ...] = ()  # (regex, replacement), applied in order to each key
    unused: tuple[str, ...] = ()  # regexes: reference keys with no part in inference (dropped, reported)
    not_saved: tuple[str, ...] = ()  # histosurv keys the reference does not save; must come as `extra`
    note: str = ""


@dataclass
class ImportReport:
    loaded: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    defaulted: list[str] = field(default_factory=list)


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat {key: tensor} from a reference checkpoint: a bare state_dict, or one inside the usual
    wrappers ('state_dict', 'model_state_dict', 'model'); DataParallel's 'module.' prefix removed."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{path}: no such checkpoint") from None
    except Exception as e:  # UnpicklingError for anything but tensors and containers
        raise InputError(f"{path}: not a weights-only PyTorch checkpoint ({type(e).__name__}: {e})") from e
    for wrapper in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"{path}: expected a state_dict (a mapping of names to tensors), got {type(obj).__name__}")
    return strip_module_prefix(obj)


def strip_module_prefix(state: dict) -> dict:
    """Keys as the bare module has them (DataParallel saves 'module.<key>')."""
    return {k.removeprefix("module."): v for k, v in state.items()}


def map_reference_keys(state: dict[str, torch.Tensor], fmt: ReferenceFormat) -> tuple[dict, list[str]]:
    """(histosurv-named tensors, reference keys dropped as unused)."""
    mapped, unused = {}, []
    for key, value in state.items():
        if any(re.fullmatch(p, key) for p in fmt.unused):
            unused.append(key)
            continue
        new = key
        for pattern, repl in fmt.renames:
            new = re.sub(pattern, repl, new)
        mapped[new] = value
    return mapped, unused


def load_reference_checkpoint(
    model: nn.Module,
    checkpoint: str | os.PathLike | dict,
    extra: dict[str, torch.Tensor] | None = None,
) -> ImportReport:
    """Loads a reference repository's state_dict into ``model`` (built with the matching config),
    refusing missing, unexpected and mis-shaped tensors by name."""
    fmt: ReferenceFormat | None = getattr(type(model), "REFERENCE", None)
    if fmt is None:
        raise InputError(f"{type(model).__name__} has no reference implementation to import checkpoints from")
    state = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint)
    where = "checkpoint" if isinstance(checkpoint, dict) else str(checkpoint)
    mapped, unused = map_reference_keys(state, fmt)
    mapped.update(extra or {})
    expected = model.state_dict()
    defaulted = [k for k in SCALER_KEYS if k in expected and k not in mapped]
    missing = sorted(set(expected) - set(mapped) - set(defaulted))
    unexpected = sorted(set(mapped) - set(expected))
    wrong = [(k, tuple(mapped[k].shape), tuple(expected[k].shape)) for k in expected if k in mapped and mapped[k].shape != expected[k].shape]
    problems = []
    if wrong:
        problems.append(
            "shapes differ (checkpoint vs this configuration): "
            + ", ".join(f"{k} {a} vs {b}" for k, a, b in wrong[:6])
            + "; build the model with the configuration the checkpoint was trained with"
        )
    not_saved = [k for k in missing if any(re.fullmatch(p, k) for p in fmt.not_saved)]
    if not_saved:
        problems.append(f"{fmt.model_class} does not save {not_saved} in its state_dict; pass them as extra tensors ({fmt.note})")
    missing = [k for k in missing if k not in not_saved]
    if missing:
        problems.append(f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if problems:
        raise InputError(f"{where}: not a {fmt.model_class} checkpoint for this configuration: " + "; ".join(problems))
    with torch.no_grad():
        for k, v in mapped.items():
            expected[k].copy_(v)
    return ImportReport(loaded=sorted(mapped), unused=sorted(unused), defaulted=defaulted)
