"""Loading a published patch-encoder checkpoint, strictly: unwrapped, every key accounted for.

A half-loaded encoder gives plausible-looking features that no model was trained on, so a missing,
unexpected or mis-shaped key is an error naming the keys and the file, never ``strict=False``.
Checkpoints come wrapped in several ways (``{"state_dict": ...}``, ``{"model": ...}``, a DINO
``{"teacher": ...}``, DataParallel's ``module.``, a ``backbone.`` prefix); :func:`unwrap` removes those.
"""

from __future__ import annotations

from torch import nn

from ...errors import InputError

__all__ = ["unwrap", "check_layout", "load_strictly"]

WRAPPERS = ("state_dict", "model", "teacher")
PREFIXES = ("module.", "backbone.")


def unwrap(state_dict, source: str) -> dict:
    """The bare state_dict inside the usual wrappers, without DataParallel's and backbone prefixes."""
    if not isinstance(state_dict, dict):
        raise InputError(f"{source}: holds a {type(state_dict).__name__}, not a state_dict")
    for wrapper in WRAPPERS:
        if isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
    for prefix in PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k.removeprefix(prefix): v for k, v in state_dict.items()}
    return state_dict


def load_strictly(module: nn.Module, state_dict: dict, source: str, what: str) -> None:
    """``module.load_state_dict(state_dict, strict=True)`` after checking keys, types and shapes, so the
    error names them (``what``: e.g. "torchvision resnet18 weights")."""
    check_layout(module.state_dict(), state_dict, source, what)
    module.load_state_dict(state_dict, strict=True)


def check_layout(own: dict, state_dict: dict, source: str, what: str) -> None:
    """Refuses ``state_dict`` unless it has exactly the keys of ``own`` (name -> tensor), every one a
    tensor of the same shape; the InputError names the file, the keys and the shapes."""
    import torch

    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys ({_few(missing)})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys ({_few(unexpected)})")
    not_tensors = sorted(k for k, v in state_dict.items() if k in own and not isinstance(v, torch.Tensor))
    if not_tensors:
        problems.append(f"not tensors ({', '.join(not_tensors[:5])})")
    shapes = [
        f"{k}: {tuple(v.shape)} for {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape
    ]
    if shapes:
        problems.append(f"wrong shapes ({'; '.join(shapes[:3])})")
    if problems:
        raise InputError(f"{source}: not {what}: {'; '.join(problems)}")


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
