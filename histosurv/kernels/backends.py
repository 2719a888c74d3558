"""The one vocabulary for where a kernel's maths runs, shared by the eager functions, the routing
inside compiled engines and ``histosurv export --kernels``.

* ``"torch"``: the plain torch twin (SDPA; softmax and a weighted sum), on any device;
* ``"triton"``: histosurv's Triton kernels (CUDA tensors, or the CPU through ``TRITON_INTERPRET=1``);
* ``"cuda"``: histosurv's CUDA C++ kernels, ``torch.ops.histosurv.*`` once ``libhistosurv_kernels.so``
  is built (see :mod:`.cuda_ops`).

The eager functions also take ``"auto"`` (Triton where it runs, torch otherwise); an engine compiles
in one of :data:`KERNELS` or none.
"""

from __future__ import annotations

from ..errors import InputError

__all__ = ["BACKENDS", "KERNELS", "check_backend"]

BACKENDS = ("torch", "triton", "cuda")
KERNELS = ("triton", "cuda")  # the ones that are histosurv's own kernels: what --kernels compiles in


def check_backend(backend: str, allowed: tuple[str, ...], what: str) -> None:
    if backend not in allowed:
        raise InputError(f"{what}: backend must be one of {', '.join(allowed)}, got {backend!r}")
