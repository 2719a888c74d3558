"""Where the models' attentions meet the kernels: SDPA and torch pooling, or the kernel ops when asked.

The models call :func:`attention` where a few query tokens attend to the patch bag and
:func:`gated_pool` where gated attention pools the bag. Outside :func:`use_kernels` those are
``F.scaled_dot_product_attention`` and ``attention_pool(attention(h), h)``, as before; inside it
they call one of the kernel ops, which is what ``torch.export`` then records for a compiled engine:

* ``"triton"``: ``torch.ops.histosurv_triton.*`` (:mod:`.triton_ops`); AOTInductor compiles the
  Triton kernels into the package, which then needs neither triton nor histosurv to run;
* ``"cuda"``: ``torch.ops.histosurv.*``, the CUDA C++ kernels of ``csrc/`` (:mod:`.cuda_ops`); the
  package calls them by name, so ``libhistosurv_kernels.so`` must be loaded where it runs.

The switch is a context, not a model attribute, because the same trained weights serve every engine:
``export_pt2`` traces inside ``use_kernels``; training and the eager reference never enter it.
Calls the kernels do not take keep the torch path: dropout in training, a number of queries known
only at run time (AMMASurv's image tokens), more queries or wider heads than the kernels hold.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars

import torch
import torch.nn.functional as F
from torch import nn

from ._triton import triton_unavailable_reason, triton_available
from .backends import KERNELS, check_backend
from .few_query import MAX_HEAD_DIM, MAX_QUERIES
from .gated_pool import MAX_FEATURES, _kernel_weights, _linears, attention_pool

__all__ = ["active_backend", "attention", "gated_pool", "gated_weights", "kernel_calls", "use_kernels"]

# op names as they appear in an exported graph's call_function targets, e.g. "histosurv_triton.few_query_attention.default"
_OP_NAMESPACES = {"triton": "histosurv_triton", "cuda": "histosurv"}
_OPS = ("few_query_attention", "gated_attention_pool")

_active: contextvars.ContextVar[str | None] = contextvars.ContextVar("histosurv_kernels", default=None)


@contextlib.contextmanager
def use_kernels(backend: str | None):
    """Route the models' few-query attentions and gated pooling to ``backend``'s ops (None: torch).
    Raises when the backend cannot be loaded here; tracing needs no GPU, running needs one."""
    if backend is not None:
        _require(backend)
    token = _active.set(backend)
    try:
        yield
    finally:
        _active.reset(token)


def active_backend() -> str | None:
    return _active.get()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, H, T, d) tensors: SDPA, or the few-query kernel op."""
    backend = _active.get()
    if backend is None or dropout_p or _needs_grad(q, k, v) or not _few_static_queries(q):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    scale = q.shape[-1] ** -0.5
    if backend == "triton":
        from . import triton_ops

        return triton_ops.few_query_attention(q, k, v, None, scale)
    return torch.ops.histosurv.few_query_attention(q, k, v, None, scale)


def gated_pool(attention_module: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, L) tokens -> pooled (B, L) and the softmax weights (B, N) of a ``GatedAttention``:
    ``attention_pool(attention_module(h), h)``, or the one-pass pooling kernel op."""
    backend = _active.get()
    if backend is None or not _pool_takes(attention_module, h):
        return attention_pool(attention_module(h), h)
    weights = _kernel_weights(_linears(attention_module), h.dtype)
    if backend == "triton":
        from . import triton_ops

        return triton_ops.gated_attention_pool(h, *weights)
    return torch.ops.histosurv.gated_attention_pool(h, *weights)


def gated_weights(attention_module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """(B, N, L) -> (B, N): the softmax over N of a ``GatedAttention``'s first score column (G-HANet's
    morphology weights). The kernel computes the pooled vector too, at no extra read of h."""
    if _active.get() is None or not _pool_takes(attention_module, h):
        return attention_module(h)[..., 0].softmax(dim=-1)
    return gated_pool(attention_module, h)[1]


def kernel_calls(graph: torch.fx.Graph) -> collections.Counter:
    """Calls of the kernel ops in an exported graph, by "namespace.op" (both backends)."""
    found = collections.Counter()
    names = {f"{ns}.{op}" for ns in _OP_NAMESPACES.values() for op in _OPS}
    for node in graph.nodes:
        if node.op == "call_function":
            name = str(node.target).rsplit(".", 1)[0]  # drop the overload (".default")
            if name in names:
                found[name] += 1
    return found


def _needs_grad(*tensors: torch.Tensor) -> bool:
    """The kernel ops have no backward: anything being trained stays on torch."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _pool_takes(attention_module: nn.Module, h: torch.Tensor) -> bool:
    if attention_module.training or h.shape[-1] > MAX_FEATURES:
        return False
    return not _needs_grad(h, *attention_module.parameters())


def _few_static_queries(q: torch.Tensor) -> bool:
    """The kernel holds all queries of a head at once: their number must be a small constant."""
    m, d = q.shape[-2], q.shape[-1]
    return isinstance(m, int) and m <= MAX_QUERIES and isinstance(d, int) and d <= MAX_HEAD_DIM


def _require(backend: str) -> None:
    check_backend(backend, KERNELS, "kernels (None for torch)")
    if backend == "triton" and not triton_available():
        raise RuntimeError(f"kernels='triton': {triton_unavailable_reason()}")
    if backend == "cuda":
        from . import cuda_ops

        if not cuda_ops._load():
            raise RuntimeError(f"kernels='cuda': {cuda_ops.load_error()}")
