"""Gated attention pooling over a bag: ABMIL's scores, their softmax over N, and the weighted sum.

``gated_attention_pool(h, attention)`` equals :func:`attention_pool` ``(attention(h), h)`` for a
:class:`~histosurv.export.models.blocks.GatedAttention` ``attention``: for FP16/BF16 h on CUDA with
Triton installed it reads h once (one-pass kernel of :mod:`._gated_pool_triton`); elsewhere it runs
those two torch calls. Only the first score column is pooled, as ``attention_pool`` does when
n_scores > 1. The weights come back in h's dtype, as from ``attention_pool``.

:func:`attention_pool` is the plain torch twin, the one the models call outside compiled engines
(``export/models/blocks`` re-exports it); it lives here, with the kernels it is the twin of, so that
the kernels never import the model code.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError
from ._triton import resolve_backend

__all__ = ["attention_pool", "gated_attention_pool", "gated_attention_pool_reference", "MAX_FEATURES"]

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_FEATURES = 512  # a (16, L) tile of h stays in registers; wider bags use torch (ABMIL's L is 512)


def attention_pool(scores: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, K) scores, (B, N, L) tokens -> pooled (B, L) and softmax weights (B, N) of the first
    score column: the torch path of every model's gated pooling."""
    weights = torch.softmax(scores[..., 0], dim=1)
    return torch.einsum("bn,bnl->bl", weights, h), weights


def gated_attention_pool(h: torch.Tensor, attention: nn.Module, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled bag vector and attention weights of a gated attention module, for inference.

    Args:
        h: (B, N, L) tokens of B bags (FP16, BF16 or FP32), on the module's device.
        attention: a ``GatedAttention`` (``attention_a`` = Linear + Tanh, ``attention_b`` = Linear +
            Sigmoid, ``attention_c`` = Linear). In training mode (dropout) the torch path runs.
        backend: "auto" (Triton for FP16/BF16 h on CUDA with L <= 512 when installed, torch otherwise),
            "triton" (raise if it cannot run; CPU tensors need ``TRITON_INTERPRET=1``), "cuda" (the
            CUDA C++ op; raise where it is not built) or "torch" (see ``backends``).

    Returns:
        pooled (B, L) and weights (B, N), the softmax over N of the scores, in ``h``'s dtype.
    """
    linears = _linears(attention)
    _check(h, linears)
    if backend == "auto" and (attention.training or _prefer_torch(h)):
        backend = "torch"
    if backend in ("triton", "cuda") and attention.training:
        raise InputError(f"gated_attention_pool: the {backend} kernel is for inference; call attention.eval() first")
    chosen = resolve_backend(backend, h.device, _unsupported(h), "gated_attention_pool")
    if chosen == "triton":
        from ._gated_pool_triton import gated_attention_pool_triton

        return gated_attention_pool_triton(h, *_kernel_weights(linears, h.dtype))
    if chosen == "cuda":
        from . import cuda_ops

        return cuda_ops.gated_attention_pool(h, *_kernel_weights(linears, h.dtype))
    return attention_pool(attention(h), h)


def gated_attention_pool_reference(h: torch.Tensor, attention: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The naive twin in FP64 (scores, softmax, weighted sum), cast back to ``h``'s dtype. For tests."""
    a, b, c = _linears(attention)
    _check(h, (a, b, c), dtypes=DTYPES + (torch.float64,))
    x = h.double()

    def linear(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return x @ lin.weight.double().T + _bias(lin).double()

    gate = torch.tanh(linear(a, x)) * torch.sigmoid(linear(b, x))  # (B, N, DH)
    scores = linear(c, gate)[..., 0]  # (B, N): the first score column, as attention_pool
    weights = torch.softmax(scores, dim=1)
    return torch.einsum("bn,bnl->bl", weights, x).to(h.dtype), weights.to(h.dtype)


def _unsupported(h: torch.Tensor) -> str:
    """Why the Triton kernel would not take h ("" when it would)."""
    if h.shape[2] > MAX_FEATURES:
        return f"L = {h.shape[2]} features, the kernel takes at most {MAX_FEATURES}"
    return ""


def _prefer_torch(h: torch.Tensor) -> bool:
    """FP32 h: exact FP32 products run on the FMA units, and the kernel spills registers there (ptxas,
    sm_80 and sm_90); cuBLAS GEMMs serve FP32 better. "auto" takes the kernel for FP16 and BF16 only."""
    return h.dtype == torch.float32


def _linears(attention: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    """(attention_a[0], attention_b[0], attention_c): the layout of ``GatedAttention`` / ``Attn_Net_Gated``."""
    try:
        a, b, c = attention.attention_a, attention.attention_b, attention.attention_c
        activations_ok = isinstance(a[1], nn.Tanh) and isinstance(b[1], nn.Sigmoid)
        a, b = a[0], b[0]
    except (AttributeError, IndexError, TypeError) as exc:
        raise InputError(
            f"gated_attention_pool: expected a GatedAttention (attention_a/attention_b = Sequential(Linear, "
            f"Tanh/Sigmoid, ...), attention_c = Linear), got {type(attention).__name__}"
        ) from exc
    if not all(isinstance(m, nn.Linear) for m in (a, b, c)) or not activations_ok:
        raise InputError(f"gated_attention_pool: {type(attention).__name__} is not laid out as Linear+Tanh, Linear+Sigmoid, Linear")
    return a, b, c


def _check(h, linears, dtypes=DTYPES) -> None:
    a, b, c = linears
    if not isinstance(h, torch.Tensor) or h.dim() != 3:
        got = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
        raise InputError(f"gated_attention_pool: h must be (B, N, L), got {got}")
    B, N, L = h.shape
    if h.dtype not in dtypes:
        raise InputError(f"gated_attention_pool: h must be one of {dtypes}, got {h.dtype}")
    if N < 1:
        raise InputError(f"gated_attention_pool: the bag is empty (N = 0), h {tuple(h.shape)}")
    if a.in_features != L or b.in_features != L or a.out_features != b.out_features or c.in_features != a.out_features:
        raise InputError(
            f"gated_attention_pool: h has L = {L} features, the module maps {a.in_features} -> {a.out_features} "
            f"(tanh), {b.in_features} -> {b.out_features} (sigmoid), {c.in_features} -> {c.out_features}"
        )
    if a.weight.device != h.device:
        raise InputError(f"gated_attention_pool: h is on {h.device}, the module on {a.weight.device}")


def _bias(lin: nn.Linear) -> torch.Tensor:
    return lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features)


def _kernel_weights(linears, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """W_a, b_a, W_b, b_b, w_c (first score column), b_c as the kernel reads them: the two big
    matrices contiguous in h's dtype (tl.dot takes one dtype), the vectors as they are."""
    a, b, c = linears
    with torch.no_grad():
        w_a, w_b = (lin.weight.detach().to(dtype).contiguous() for lin in (a, b))
        vectors = (_bias(a), _bias(b), c.weight[0], _bias(c)[:1])
        b_a, b_b, w_c, b_c = (t.detach().contiguous() for t in vectors)
    return w_a, b_a, w_b, b_b, w_c, b_c
