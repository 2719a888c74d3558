"""The CUDA C++ kernels of ``csrc/`` as torch custom ops, when ``libhistosurv_kernels.so`` is built.

``cmake -S . -B build -G Ninja && cmake --build build`` (top-level ``CMakeLists.txt``) builds the library
and copies it next to this file; ``HISTOSURV_KERNELS_LIB`` may name another path. Importing this module
never fails: without the library (or on a torch that cannot load it) :func:`available` is False and
:func:`load_error` says why.

* ``torch.ops.histosurv.few_query_attention(q, k, v, key_mask=None, scale=None) -> out``:
  q (B, H, M, d), k and v (B, H, N, d), key_mask (B, N) bool (True = attend); out (B, H, M, d).
* ``torch.ops.histosurv.gated_attention_pool(h, wa, ba, wb, bb, wc, bc) -> (pooled, weights)``:
  h (B, N, L); wa, wb (A, L); ba, bb (A,); wc (1, A) or (A,); bc (1,); pooled (B, L), weights (B, N).

Only CUDA kernels are registered in C++. The fake (meta) implementations below let ``torch.export``
and ``torch.compile`` trace graphs that call the ops, e.g. to put them in an AOTInductor package.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["LIBRARY_NAME", "available", "few_query_attention", "gated_attention_pool", "library_path", "load_error"]

LIBRARY_NAME = "libhistosurv_kernels.so"

_state: dict[str, object] = {"loaded": False, "error": None, "tried": False}


def library_path() -> Path:
    """Where the library is looked for: ``$HISTOSURV_KERNELS_LIB`` or next to this file."""
    override = os.environ.get("HISTOSURV_KERNELS_LIB")
    return Path(override) if override else Path(__file__).resolve().parent / LIBRARY_NAME


def _load() -> bool:
    if _state["tried"]:
        return bool(_state["loaded"])
    _state["tried"] = True
    path = library_path()
    if not path.is_file():
        _state["error"] = f"{path} is not built (cmake -S . -B build -G Ninja && cmake --build build, on a machine with nvcc)"
        return False
    try:
        if not hasattr(torch.ops.histosurv, "few_query_attention"):
            torch.ops.load_library(str(path))
        _register_fakes()
    except (OSError, RuntimeError, AttributeError) as exc:  # wrong torch ABI, missing CUDA runtime, ...
        _state["error"] = f"could not load {path}: {exc}"
        return False
    _state["loaded"] = True
    return True


def available() -> bool:
    """True when the ops are loaded and a CUDA device can run them."""
    return _load() and torch.cuda.is_available()


def load_error() -> str | None:
    """Why :func:`available` is False (None when the library loaded)."""
    _load()
    if _state["loaded"] and not torch.cuda.is_available():
        return "the library is loaded but torch sees no CUDA device"
    return _state["error"]  # type: ignore[return-value]


def few_query_attention(q, k, v, key_mask=None, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v with the CUDA C++ split-KV kernel; see the module docstring for shapes."""
    _require()
    return torch.ops.histosurv.few_query_attention(q, k, v, key_mask, scale)


def gated_attention_pool(h, wa, ba, wb, bb, wc, bc) -> tuple[torch.Tensor, torch.Tensor]:
    """ABMIL gated attention pooling in one pass over h; returns (pooled (B, L), weights (B, N))."""
    _require()
    return torch.ops.histosurv.gated_attention_pool(h, wa, ba, wb, bb, wc, bc)


def _require() -> None:
    if not _load():
        raise RuntimeError(f"histosurv CUDA kernels unavailable: {_state['error']}")


def _register_fakes() -> None:
    """Shape-only twins for tracing (FakeTensor / meta); registered once per process."""
    if _state.get("fakes"):
        return

    @torch.library.register_fake("histosurv::few_query_attention")
    def _(q, k, v, key_mask=None, scale=None):
        return q.new_empty(q.shape)  # (B, H, M, d), contiguous, q's dtype

    @torch.library.register_fake("histosurv::gated_attention_pool")
    def _(h, wa, ba, wb, bb, wc, bc):
        batch, n, features = h.shape
        return h.new_empty(batch, features), h.new_empty(batch, n)

    _state["fakes"] = True
