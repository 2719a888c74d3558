"""Fused attention kernels for the shapes these models spend their time in: a few queries over a long bag.

* :func:`few_query_attention`: softmax(q k^T * scale) v with M (1 to ~32) queries over N keys, split
  over the keys (flash-decoding) so that K and V are read once by a device full of programs.
* :func:`gated_attention_pool`: ABMIL's gated attention scores, softmax over the bag and weighted sum,
  in one pass over h.

Each runs its Triton kernel on CUDA tensors when ``triton`` is installed, and the same maths in torch
otherwise (``backend="torch"`` forces that; ``backend="triton"`` or ``"cuda"`` insists on that kernel;
:mod:`.backends` names the choices once). Each has a
``*_reference`` twin that the tests compare with. Importing this package does not import triton.
The CUDA C++ versions live in ``csrc/`` and register as ``torch.ops.histosurv.*`` when built
(:mod:`.cuda_ops`). :mod:`.triton_ops` wraps the Triton kernels as ``torch.ops.histosurv_triton.*``, so
that ``torch.export`` records them, and :mod:`.routing` is where the models call SDPA and torch pooling
or, inside ``use_kernels``, one of those ops (``histosurv export --add-engine torch --kernels``).
"""

from ._triton import triton_available, triton_unavailable_reason
from .backends import BACKENDS, KERNELS
from .few_query import few_query_attention, few_query_attention_reference
from .gated_pool import gated_attention_pool, gated_attention_pool_reference

__all__ = [
    "BACKENDS",
    "KERNELS",
    "few_query_attention",
    "few_query_attention_reference",
    "gated_attention_pool",
    "gated_attention_pool_reference",
    "triton_available",
    "triton_unavailable_reason",
]
