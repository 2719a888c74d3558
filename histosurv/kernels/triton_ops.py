"""The Triton kernels as torch operators (``torch.library.triton_op``), for compiled engines.

A kernel launched from Python is invisible to ``torch.export``; wrapped in a ``triton_op`` it becomes
one node of the exported graph (``histosurv_triton.few_query_attention``,
``histosurv_triton.gated_attention_pool``), and AOTInductor compiles the kernels behind that node
into the package's CUDA binary next to its own. The launch plans are the ones the eager wrappers use
(:func:`._few_query_triton.plan`, :func:`._gated_pool_triton.plan`); they hold for the symbolic bag
size N of the export, so one package serves every N.

The ops run the kernels on CUDA tensors (and on CPU tensors under ``TRITON_INTERPRET=1``, which is how
CI tests them); on other CPU tensors they run the same maths in torch. The namespace is not
``histosurv``: the CUDA C++ library defines that one (``TORCH_LIBRARY``), and both may be loaded.

Importing this module imports triton. Callers go through :mod:`.routing`.
"""

# No ``from __future__ import annotations``: the op schemas are inferred from the annotations.
from typing import Optional

import torch
import torch.nn.functional as F
from torch.library import triton_op, wrap_triton

from . import _few_query_triton, _gated_pool_triton
# Launched by these names below: torch reads a triton_op's source for the kernels it wraps, to key its
# compile caches on their code.
from ._few_query_triton import _merge_kernel as few_query_merge_kernel
from ._few_query_triton import _split_kernel as few_query_split_kernel
from ._gated_pool_triton import _pool_merge_kernel as pool_merge_kernel
from ._gated_pool_triton import _pool_split_kernel as pool_split_kernel
from ._triton import interpreting
from .few_query import _sdpa

__all__ = ["NAMESPACE", "few_query_attention", "gated_attention_pool"]

NAMESPACE = "histosurv_triton"


def _shapes_only(x: torch.Tensor) -> bool:
    """True where the op runs as its own fake implementation (FakeTensors, to learn the output shapes)
    under the interpreter: wrap_triton hands interpreted kernels back unwrapped, so nothing may launch."""
    from torch._subclasses.fake_tensor import is_fake

    return interpreting() and is_fake(x)


def _kernels_run_on(device: torch.device) -> bool:
    return device.type == "cuda" or interpreting()


@triton_op(f"{NAMESPACE}::few_query_attention", mutates_args=())
def few_query_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor], scale: float
) -> torch.Tensor:
    """softmax(q k^T * scale) v: q (B, H, M, d), k and v (B, H, N, d), key_mask (B, N) bool or None."""
    if not _kernels_run_on(q.device):
        return _sdpa(q, k, v, key_mask, scale)
    out, (split, merge) = _few_query_triton.plan(q, k, v, key_mask, scale)
    if not _shapes_only(q):
        wrap_triton(few_query_split_kernel)[split.grid](*split.args, **split.meta)
        wrap_triton(few_query_merge_kernel)[merge.grid](*merge.args, **merge.meta)
    return out


@triton_op(f"{NAMESPACE}::gated_attention_pool", mutates_args=())
def gated_attention_pool(
    h: torch.Tensor,
    w_a: torch.Tensor,
    b_a: torch.Tensor,
    w_b: torch.Tensor,
    b_b: torch.Tensor,
    w_c: torch.Tensor,
    b_c: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """h (B, N, L); W_a, W_b (DH, L) in h's dtype; b_a, b_b, w_c (DH,); b_c (1,) -> pooled (B, L),
    weights (B, N): softmax over N of w_c . (tanh(W_a h + b_a) * sigmoid(W_b h + b_b)) + b_c."""
    if not _kernels_run_on(h.device):
        gate = torch.tanh(F.linear(h, w_a, b_a.to(h.dtype))) * torch.sigmoid(F.linear(h, w_b, b_b.to(h.dtype)))
        scores = gate.float() @ w_c.float() + b_c.float()  # (B, N)
        weights = torch.softmax(scores, dim=1)
        return torch.einsum("bn,bnl->bl", weights, h.float()).to(h.dtype), weights.to(h.dtype)
    pooled, weights, (split, merge) = _gated_pool_triton.plan(h, w_a, b_a, w_b, b_b, w_c, b_c)
    if not _shapes_only(h):
        wrap_triton(pool_split_kernel)[split.grid](*split.args, **split.meta)
        wrap_triton(pool_merge_kernel)[merge.grid](*merge.args, **merge.meta)
    return pooled, weights
