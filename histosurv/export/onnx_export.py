"""Export a fusion model to ONNX for ONNX Runtime, with fused attention and a dynamic bag size.

``torch.onnx.export(dynamo=True)`` turns every ``scaled_dot_product_attention`` into MatMul/Softmax
nodes, and ONNX Runtime's CPU kernels for those (and for the opset-23 ``Attention`` op) materialise
the full score matrix: 8.4 GB at N = 16k (shared/research/deps.md section 3). onnxscript's
``optimize_for_ort`` rewrites them into ``com.microsoft.MultiHeadAttention``, whose CPU kernel is
flash-style and flat in memory, including AMMA's shape (more queries than keys). The export checks
that every attention was rewritten and refuses to write a graph where one was not.

A second graph, at opset 23 with one standard ``Attention`` node per attention, is what TensorRT
(10.14 and newer) builds its fused attention from; it is written beside the first.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..data.atomic import atomic_path
from ..errors import HistosurvError
from ..runtime.manifest import EngineEntry
from ..runtime.survival import discrete_bin_index
from .models import risk_from_logits
from .models.clinical import clinical_spec_of

__all__ = [
    "SingleBag",
    "export_onnx",
    "export_onnx_standard",
    "export_onnx_fp16",
    "FusedAttentionMissing",
    "OPSET",
    "STANDARD_OPSET",
]

OPSET = 20  # what the dynamo exporter and onnxscript's ORT fusions target together
STANDARD_OPSET = 23  # the first opset with the standard Attention op
EXAMPLE_N = 37  # any N >= 2 (torch.export specialises sizes 0 and 1)


class FusedAttentionMissing(HistosurvError, RuntimeError):
    pass


class SingleBag(nn.Module):
    """The serving signature: one slide's unbatched tensors -> ``risk`` (1,), ``attention`` (N,) where the
    model has patch attention, and, where the model carries a fitted survival reference
    (``model.survival_reference``, a :class:`SurvivalHead` with times and cut-offs, set by export),
    ``survival`` (T,) S at the reference's times and ``risk_group`` (1,) INT64."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.has_attention = "features" in model.input_names
        head = getattr(model, "survival_reference", None)
        self.has_curves = head is not None and head.has_curves
        if self.has_curves:
            # buffers of the wrapper, not the model: the reference weights stay the training run's
            device = next(model.parameters()).device
            self.register_buffer("cutoffs", torch.tensor(head.cutoffs, dtype=torch.float32, device=device))
            if head.kind == "cox":
                self.register_buffer("baseline_hazard", torch.tensor(head.baseline_hazard, dtype=torch.float32, device=device))
            else:
                self.register_buffer("bins_ended", torch.from_numpy(discrete_bin_index(head)).to(device))

    def forward(self, features=None, coords=None, genes=None, clinical=None):
        given = (("features", features), ("coords", coords), ("genes", genes), ("clinical", clinical))
        batched = {name: t[None] for name, t in given if t is not None}
        head = self.model.cfg.survival_head
        if self.has_attention:
            logits, attention = self.model(**batched, return_attention=True)
            outputs = (risk_from_logits(logits, head), attention[0])
        else:
            logits = self.model(**batched)
            outputs = (risk_from_logits(logits, head),)
        if self.has_curves:
            outputs += self._curves(logits, outputs[0], head)
        return outputs

    def _curves(self, logits, risk, head: str):
        if head == "cox":
            # clamped as runtime/survival.py does: exp(80) is finite, and 0 * inf would be NaN where H0 is 0
            survival = torch.exp(-self.baseline_hazard * torch.exp(risk.clamp(max=80.0)))
        else:
            log_survival = torch.cumsum(torch.nn.functional.logsigmoid(-logits[0]), dim=0)
            survival = torch.exp(torch.cat([log_survival.new_zeros(1), log_survival]).index_select(0, self.bins_ended))
        group = (risk[:, None] > self.cutoffs[None, :]).sum(dim=1)
        return survival, group

    def output_names(self) -> list[str]:
        return ["risk"] + ["attention"] * self.has_attention + ["survival", "risk_group"] * self.has_curves


def example_inputs(model: nn.Module, n: int = EXAMPLE_N, seed: int = 0) -> dict[str, torch.Tensor]:
    """Plausible unbatched inputs on the CPU (wherever the model is): non-negative features, distinct grid
    coords, genes near the scaler's mean."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    side = max(int(n**0.5) + 1, 1)
    cells = torch.randperm(side * side, generator=g)[:n]
    inputs = {
        "features": torch.randn(n, cfg.feature_dim, generator=g).abs(),
        "coords": torch.stack([cells % side, cells // side], dim=1).long() * 256,
    }
    if "genes" in model.input_names:
        scaler = model.genes
        mean, scale = scaler.mean.detach().cpu(), scaler.scale.detach().cpu()  # the model may be on a GPU
        inputs["genes"] = mean + scale * torch.randn(cfg.n_genes, generator=g)
    spec = clinical_spec_of(model)
    if spec is not None:  # a plausible patient: a value near the mean, a seen category
        inputs["clinical"] = torch.tensor(
            [c.mean + c.scale * float(torch.randn(1, generator=g)) if c.kind == "numeric"
             else float(torch.randint(len(c.categories), (1,), generator=g)) for c in spec.covariates],
            dtype=torch.float32,
        )
    return {k: v for k, v in inputs.items() if k in model.input_names}


def export_onnx(model: nn.Module, path: str | os.PathLike, max_bag: int = 1 << 20) -> EngineEntry:
    """Writes ``path`` atomically; returns its manifest entry (opset and node counts in ``details``)."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    program = _dynamo_export(model, OPSET, max_bag)
    fused, fusions = optimize_for_ort(program.model)
    proto = ir.serde.serialize_model(fused)
    ops = _save_checked(model, proto, path, "com.microsoft::MultiHeadAttention")
    details = {
        **_facts(OPSET, ops, max_bag),
        "attention": "com.microsoft.MultiHeadAttention",
        "fusions": {k: v for k, v in fusions.items() if v},
    }
    return EngineEntry(Path(path).name, "onnxruntime", "fp32", details=details)


def export_onnx_standard(model: nn.Module, path: str | os.PathLike, max_bag: int = 1 << 20) -> EngineEntry:
    """The same signature at opset 23, every attention one standard ``ai.onnx::Attention`` node: the
    graph TensorRT 10.14+ turns into its fused IAttention layer. ONNX Runtime's CPU kernel for that op
    materialises the N x N scores, so this graph is for TensorRT, not for serving on a CPU."""
    program = _dynamo_export(model, STANDARD_OPSET, max_bag)
    ops = _save_checked(model, program.model_proto, path, "ai.onnx::Attention")
    details = {**_facts(STANDARD_OPSET, ops, max_bag), "attention": "ai.onnx::Attention", "for": "tensorrt>=10.14"}
    # no backend: not served as is; `histosurv export --add-engine tensorrt` builds model.plan from it
    return EngineEntry(Path(path).name, None, "fp32", details=details)


def export_onnx_fp16(model: nn.Module, source: str | os.PathLike, path: str | os.PathLike, max_bag: int = 1 << 20) -> EngineEntry:
    """An FP16 copy of the fused graph at ``source`` (see :mod:`.fp16`), for ONNX Runtime's GPU
    providers: inputs and outputs stay FP32, the coordinate embedding too."""
    import onnx

    from .fp16 import to_fp16

    proto = to_fp16(onnx.load(str(source)))
    ops = _save_checked(model, proto, path, "com.microsoft::MultiHeadAttention")
    details = {**_facts(OPSET, ops, max_bag), "attention": "com.microsoft.MultiHeadAttention",
               "for": "ONNX Runtime CUDA / TensorRT providers"}
    return EngineEntry(Path(path).name, "onnxruntime", "fp16", details=details)


def _dynamo_export(model: nn.Module, opset: int, max_bag: int):
    model = model.eval()
    wrapper = SingleBag(model).eval()
    kwargs = example_inputs(model)
    bag = torch.export.Dim("N", min=1, max=max_bag)
    dynamic = {name: ({0: bag} if name in ("features", "coords") else None) for name in kwargs}
    with _quiet_exporter(), torch.no_grad():
        return torch.onnx.export(
            wrapper,
            (),
            kwargs=kwargs,
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=dynamic,
            input_names=list(kwargs),
            output_names=wrapper.output_names(),
            optimize=True,
            verbose=False,
        )


def _save_checked(model: nn.Module, proto, path, attention_op: str) -> collections.Counter:
    import onnx

    ops = collections.Counter(f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in _all_nodes(proto.graph))
    _check_attention_fused(model, ops, attention_op)
    with atomic_path(path, suffix=".onnx") as tmp:
        onnx.save_model(proto, str(tmp))
        onnx.checker.check_model(str(tmp))
    return ops


def _all_nodes(graph):
    """Every node, those inside If/Loop subgraphs (MoME's routing) included: an attention hidden in a
    branch must be counted like any other."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _all_nodes(sub)


def _facts(opset: int, ops: collections.Counter, max_bag: int) -> dict:
    import onnx

    return {
        "opset": opset,
        "ops": dict(sorted(ops.items())),
        "max_bag": max_bag,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
    }


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's deprecation warnings and 'torchvision is not installed' notes are not the user's business."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _check_attention_fused(model: nn.Module, ops: collections.Counter, attention_op: str) -> None:
    expected, got = model.attention_ops, ops.get(attention_op, 0)
    if got != expected:
        raise FusedAttentionMissing(
            f"the exported graph has {got} {attention_op} nodes, the model has {expected} attentions; "
            f"an unfused attention would be decomposed into an N x N matrix (op counts: {dict(ops)})"
        )
