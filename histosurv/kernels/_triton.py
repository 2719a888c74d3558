"""Whether the Triton kernels can run here, and the launch facts they share.

Triton is an optional dependency (the ``dev`` extra, Linux only): nothing here imports it at module
level, so ``import histosurv.kernels`` works without it and the public functions fall back to torch.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any, NamedTuple

import torch

from ..errors import InputError
from .backends import BACKENDS, check_backend

__all__ = [
    "Launch", "cdiv", "interpreting", "launch_all", "next_pow2", "split_bag", "target_programs", "triton_available",
    "triton_unavailable_reason", "resolve_backend", "use_triton",
]

@functools.lru_cache(maxsize=1)
def _probe() -> str | None:
    """None when ``import triton`` works, else why not (one line)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install failing at import time
        return f"{type(exc).__name__}: {exc}"
    return None


def triton_available() -> bool:
    """True when the ``triton`` package imports (it still needs a CUDA device or ``TRITON_INTERPRET=1``)."""
    return _probe() is None


def triton_unavailable_reason() -> str:
    reason = _probe()
    return "" if reason is None else f"triton cannot be imported ({reason}); install it with pip install 'triton>=3.9'"


def interpreting() -> bool:
    """Triton's interpreter runs kernels on the CPU (slowly): read once, when triton.jit decorates."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def cdiv(a, b):
    """ceil(a / b) with integer division only, so that it also holds for the symbolic bag size N of
    ``torch.export`` (math.ceil of a SymInt ratio would specialise N)."""
    return (a + b - 1) // b


MAX_SPLITS = 256


def split_bag(n, rows: int, block_n: int, device: torch.device) -> tuple[object, object, int]:
    """How the kernels split a bag of ``n`` tokens (an int, or the SymInt N while exporting) over the
    device: (splits, tokens per split, most splits any n can take). ``rows`` (batch x heads) programs
    already run side by side, so each takes ``want`` splits, each at least one whole tile and none
    empty. ``want`` depends on the device and the static sizes only; so does the third value, which
    sizes the merge kernels' tiles, so one compiled kernel serves every N."""
    want = min(MAX_SPLITS, max(1, cdiv(target_programs(device), rows)))
    per_split = cdiv(cdiv(n, want), block_n) * block_n
    return cdiv(n, per_split), per_split, want


def target_programs(device: torch.device) -> int:
    """How many programs fill the device: a few per SM keep enough loads in flight to saturate HBM.
    On the CPU (interpreter) a handful, enough to exercise the split and merge paths."""
    if device.type != "cuda":
        return 16
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def resolve_backend(backend: str, device: torch.device, unsupported: str, what: str) -> str:
    """``backend`` ("auto" or one of ``backends.BACKENDS``) resolved to what runs: "torch", "triton" or
    "cuda". "cuda" insists on the CUDA C++ ops (raising where they are not built); the rest is
    :func:`use_triton`'s rule."""
    check_backend(backend, ("auto", *BACKENDS), what)
    if backend == "cuda":
        if device.type != "cuda":
            raise RuntimeError(f"{what}: backend='cuda' runs the CUDA C++ kernels on CUDA tensors, got {device} tensors")
        if unsupported:
            raise InputError(f"{what}: backend='cuda' cannot run these inputs: {unsupported}")
        return "cuda"
    return "triton" if use_triton(backend, device, unsupported, what) else "torch"


def use_triton(backend: str, device: torch.device, unsupported: str, what: str) -> bool:
    """Resolve ``backend`` ("auto", "triton" or "torch") to True (run the Triton kernel) or False (torch).

    ``unsupported`` says why the kernel cannot take these inputs ("" when it can). "auto" takes Triton
    for CUDA tensors it supports and torch otherwise; "triton" insists and raises when it cannot run
    (on CPU tensors it needs ``TRITON_INTERPRET=1``, which is how the tests run it).
    """
    check_backend(backend, ("auto", "torch", "triton"), what)
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{what}: backend='triton' but {triton_unavailable_reason()}")
        if unsupported:
            raise InputError(f"{what}: backend='triton' cannot run these inputs: {unsupported}")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(f"{what}: backend='triton' needs CUDA tensors (got {device}) or TRITON_INTERPRET=1")
        return True
    if device.type != "cuda" or unsupported:
        return False
    if not triton_available():
        warn_fallback_once(what)
        return False
    return True


@functools.lru_cache(maxsize=None)
def warn_fallback_once(what: str) -> None:
    """nanoGPT's habit: a CUDA tensor on the slow path says so once, instead of silently."""
    warnings.warn(f"{what}: CUDA tensors but {triton_unavailable_reason()}; using the torch fallback", stacklevel=3)


class Launch(NamedTuple):
    """One kernel launch, ``kernel[grid](*args, **meta)``. The wrappers plan their launches apart from
    running them, so that ``bench/kernels.py --compile-only`` can compile for a GPU exactly what a call
    would launch, on a machine without one."""

    kernel: Any
    grid: tuple
    args: tuple
    meta: dict


def launch_all(launches: list[Launch]) -> None:
    for launch in launches:
        launch.kernel[launch.grid](*launch.args, **launch.meta)
