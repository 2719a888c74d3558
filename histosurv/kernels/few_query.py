"""Attention of a few queries over a long bag: softmax(q k^T * scale) v, with M << N.

The shape of MCAT's and G-HANet's six gene-group queries, AMMASurv's gene tokens and MoME's bottleneck
tokens over tens of thousands of patch tokens. On CUDA with Triton installed this runs the split-KV
kernel of :mod:`._few_query_triton`; elsewhere it runs ``F.scaled_dot_product_attention`` (same maths).
:func:`few_query_attention_reference` is the obvious twin the tests compare both against.

Masked keys (``key_mask`` False) take no weight. A query whose keys are all masked gets a zero output
(SDPA would give NaN); every backend here, the reference included, returns zeros for it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InputError
from ._triton import resolve_backend

__all__ = ["few_query_attention", "few_query_attention_reference", "MAX_QUERIES", "MAX_HEAD_DIM"]

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_QUERIES = 128  # the kernel holds all M queries of a head in registers; more queries suit FlashAttention
MAX_HEAD_DIM = 512


def few_query_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """softmax(q k^T * scale) v for a few queries over many keys.

    Args:
        q: (B, H, M, d) queries, M small (1 to 32 in the models); any strides.
        k, v: (B, H, N, d) keys and values, same dtype (FP16, BF16 or FP32) and device as ``q``.
        key_mask: optional (B, N) bool, True = attend to this key. All-False rows give zeros.
        scale: softmax scale, default 1 / sqrt(d).
        backend: "auto" (Triton on CUDA when installed and M <= 128, d <= 512; torch otherwise),
            "triton" (raise if it cannot run; on CPU tensors it needs ``TRITON_INTERPRET=1``), "cuda"
            (the CUDA C++ op; raise where it is not built) or "torch" (see ``backends``).

    Returns:
        (B, H, M, d) in ``q``'s dtype; FP32 accumulation on every backend.
    """
    check_inputs(q, k, v, key_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    chosen = resolve_backend(backend, q.device, _unsupported(q), "few_query_attention")
    if chosen == "triton":
        from ._few_query_triton import few_query_attention_triton

        return few_query_attention_triton(q, k, v, key_mask, scale)
    if chosen == "cuda":
        from . import cuda_ops

        return cuda_ops.few_query_attention(q, k, v, key_mask, scale)
    return _sdpa(q, k, v, key_mask, scale)


def few_query_attention_reference(q, k, v, key_mask=None, scale=None) -> torch.Tensor:
    """The naive twin: materialises the (B, H, M, N) scores in FP32. For tests only."""
    check_inputs(q, k, v, key_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    scores = torch.einsum("bhmd,bhnd->bhmn", q.float(), k.float()) * scale  # (B, H, M, N)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all keys masked: NaN -> 0 weights
    return torch.einsum("bhmn,bhnd->bhmd", weights, v.float()).to(q.dtype)


def _sdpa(q, k, v, key_mask, scale) -> torch.Tensor:
    """The torch fallback: SDPA picks its fused CPU/GPU kernel; fully-masked rows are zeroed after."""
    if key_mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    mask = key_mask[:, None, None, :]  # (B, 1, 1, N), broadcast over heads and queries
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return torch.where(mask.any(-1, keepdim=True), out, torch.zeros((), dtype=out.dtype, device=out.device))


def _unsupported(q: torch.Tensor) -> str:
    """Why the Triton kernel would not take these queries ("" when it would)."""
    M, d = q.shape[-2:]
    if M > MAX_QUERIES:
        return f"{M} queries per head, the kernel takes at most {MAX_QUERIES} (use SDPA for many queries)"
    if d > MAX_HEAD_DIM:
        return f"head dim {d}, the kernel takes at most {MAX_HEAD_DIM}"
    return ""


def check_inputs(q, k, v, key_mask) -> None:
    """Clear errors for the shapes, dtypes and devices the kernels assume."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise InputError(f"few_query_attention: {name} must be a 4-d tensor (B, H, tokens, d), got {got}")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise InputError(f"few_query_attention: q, k, v must share one dtype of {DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise InputError(f"few_query_attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, M, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, H) or k.shape[3] != d:
        raise InputError(
            f"few_query_attention: expected k and v of shape (B, H, N, d) = ({B}, {H}, N, {d}) for q {tuple(q.shape)}, "
            f"got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    if M < 1 or k.shape[2] < 1 or d < 1:
        raise InputError(f"few_query_attention: needs at least one query, one key and d >= 1, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if key_mask is not None:
        _check_mask(key_mask, (B, k.shape[2]), q.device)


def _check_mask(key_mask, shape: tuple[int, int], device) -> None:
    if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool or tuple(key_mask.shape) != shape:
        got = (key_mask.dtype, tuple(key_mask.shape)) if isinstance(key_mask, torch.Tensor) else type(key_mask).__name__
        raise InputError(f"few_query_attention: key_mask must be a bool tensor of shape (B, N) = {shape}, got {got}")
    if key_mask.device != device:
        raise InputError(f"few_query_attention: key_mask is on {key_mask.device}, the inputs on {device}")
