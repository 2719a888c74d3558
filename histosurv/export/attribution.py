"""Explanations that need the PyTorch model: integrated gradients over genes, and architecture internals.

Both rebuild the model of a repository version from its reference weights (as ``histosurv verify`` does),
on the CPU, so they need the ``train`` extra (``pip install 'histosurv[train]'``).

Integrated gradients (Sundararajan et al., ICML 2017): attribution of gene i =
``(x_i - x0_i) * mean over alpha of d risk / d genes_i at x0 + alpha (x - x0)``, the midpoint rule over
``steps`` alphas, the baseline x0 every gene at its training mean (as occlusion's). It is additive up to
the quadrature error: ``completeness_gap = sum(attributions) - (risk(x) - risk(x0))`` is reported, and
should be small against ``risk(x) - risk(x0)``; a model whose function jumps along the path (MoME's hard
routing switching expert) leaves a gap that more steps do not close. Group values are sums of their genes'.
The path's points go through the model as one batch (the features repeated), in chunks that bound memory.

What each architecture's graph exposes (the ``attention`` output, one weight per patch), and what the
torch side adds here (``model_internals``; the exported graphs' outputs are left as they are):

=============  =====================================================  ==========================================
architecture   graph ``attention``                                    added from the torch model
=============  =====================================================  ==========================================
ammasurv       class token's attention over the image tokens          -
abmil          gated-attention pooling weights                        -
porpoise       the path branch's gated-attention weights              -
early_fusion   gated-attention weights over [patch; genes] instances  -
ghanet         morphology weights                                     -
coxnet         1/N (mean pooling: flat)                               -
mcat           co-attention averaged over the gene-group queries      each gene group's co-attention over the
                                                                      patches (top patches per group)
mome           class token row of the final Nystrom attention         each MoME layer's chosen expert and the
                                                                      router's probabilities
snn            none (genes only)                                      -
=============  =====================================================  ==========================================
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..runtime.explain.genes import GeneAttributions, GroupAttribution, baseline_genes, gene_groups, refuse_without_genes
from ..runtime.explain.patches import top_patches
from ..runtime.repository import ModelVersion
from .models.mcat import CoAttention
from .models.mome import EXPERTS, RoutingNetwork
from .models.survival_head import risk_from_logits
from .verify import reference_model

__all__ = ["integrated_gradients", "model_internals", "INTERNALS", "DEFAULT_STEPS"]

DEFAULT_STEPS = 64
CHUNK_VALUES = 1 << 24  # feature values per batch of path points (64 MiB of FP32)
INTERNALS = ("mcat", "mome")  # architectures with more than one attention vector to show


def _batched(model: torch.nn.Module, inputs: dict[str, np.ndarray], genes: torch.Tensor) -> dict[str, torch.Tensor]:
    """The model's keyword inputs for a batch of gene vectors (B, G), the bag repeated without copying."""
    b = genes.shape[0]
    out = {}
    for name in model.input_names:
        if name == "genes":
            out[name] = genes
        elif name in inputs:
            t = torch.from_numpy(np.ascontiguousarray(inputs[name]))
            out[name] = t[None].expand(b, *t.shape)
    return out


def _risk(model, inputs, genes: torch.Tensor) -> torch.Tensor:
    """(B,) risks for (B, G) gene vectors on the same bag."""
    return risk_from_logits(model(**_batched(model, inputs, genes)), model.cfg.survival_head)


def integrated_gradients(mv: ModelVersion, inputs: dict[str, np.ndarray], steps: int = DEFAULT_STEPS,
                         model: torch.nn.Module | None = None) -> GeneAttributions:
    """Integrated gradients of the risk over the genes of ``inputs`` (engine inputs of one bag)."""
    refuse_without_genes(mv)
    if steps < 1:
        raise ValueError(f"integrated gradients needs at least 1 step, got {steps}")
    started = time.perf_counter()
    model = model if model is not None else reference_model(mv)
    x = torch.from_numpy(np.asarray(inputs["genes"], np.float32).reshape(-1))
    baseline, described = baseline_genes(mv)
    x0 = torch.from_numpy(baseline)
    n_values = max(1, int(np.prod(np.shape(inputs.get("features", np.zeros(1))))))
    chunk = max(1, min(steps, CHUNK_VALUES // n_values))
    alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps
    total = torch.zeros_like(x)
    for a in alphas.split(chunk):
        path = (x0 + a[:, None] * (x - x0)).requires_grad_(True)  # (b, G)
        grad, = torch.autograd.grad(_risk(model, inputs, path).sum(), path)
        total += grad.sum(dim=0)
    with torch.no_grad():
        risk, at_baseline = (float(r) for r in _risk(model, inputs, torch.stack([x, x0])))
    per_gene = ((x - x0) * total / steps).numpy().astype(np.float64)
    groups = gene_groups(mv)
    names = mv.info.gene_names
    rows = [GroupAttribution(n, [names[i] for i in m], float(per_gene[m].sum())) for n, m in zip(groups.names, groups.members)]
    survival = mv.info.survival
    return GeneAttributions(
        method="integrated_gradients", model=mv.label, engine="torch (reference weights)", baseline=described,
        grouping=groups.source + "; a group's value is the sum of its genes'", risk=risk, baseline_risk=at_baseline,
        groups=rows, genes=dict(zip(names, map(float, per_gene))), passes=steps + 1,
        seconds=round(time.perf_counter() - started, 4), risk_definition=survival.risk_definition if survival else "",
        completeness_gap=float(per_gene.sum() - (risk - at_baseline)), steps=steps,
    )


def model_internals(mv: ModelVersion, inputs: dict[str, np.ndarray], coords: np.ndarray | None = None, k: int = 8,
                    model: torch.nn.Module | None = None) -> dict | None:
    """What an MCAT or MoME model holds beyond its graph's ``attention`` (see the table above), for one bag
    (``coords``: its patches' level-0 positions, which name the top patches); None for the other architectures."""
    if mv.info.architecture not in INTERNALS:
        return None
    model = model if model is not None else reference_model(mv)
    captured: list[tuple[str, torch.Tensor]] = []
    hooks = [module.register_forward_hook(_capture(name, captured)) for name, module in model.named_modules()
             if isinstance(module, (CoAttention, RoutingNetwork))]
    try:
        with torch.no_grad():
            genes = torch.from_numpy(np.asarray(inputs["genes"], np.float32).reshape(1, -1))
            _risk(model, inputs, genes)
    finally:
        for h in hooks:
            h.remove()
    if mv.info.architecture == "mcat":
        return _mcat(mv, captured, coords, k)
    return _mome(captured)


def _capture(name: str, into: list):
    def hook(module, args, output):
        into.append((name, output[1] if isinstance(output, tuple) else output))
    return hook


def _mcat(mv: ModelVersion, captured, coords, k: int) -> dict:
    _, weights = captured[0]  # (1, groups, N)
    weights = weights[0].numpy()
    if coords is None:
        coords = np.zeros((weights.shape[1], 2), np.int64)  # MCAT reads no positions: rows are still named
    groups = gene_groups(mv)
    return {
        "architecture": "mcat",
        "what": "each gene group's co-attention over the patches (a softmax per group; the graph's attention "
                "output is their mean)",
        "groups": [{"group": name, "n_genes": len(members),
                    "top_patches": [p.to_dict() for p in top_patches(row, coords, min(k, len(row)))]}
                   for name, members, row in zip(groups.names, groups.members, weights)],
    }


def _mome(captured) -> dict:
    layers = []
    for name, probabilities in captured:  # in the order the layers ran
        p = probabilities[0].numpy().astype(np.float64)
        layers.append({"layer": name.removesuffix(".routing_network"), "expert": EXPERTS[int(p.argmax())],
                       "probabilities": dict(zip(EXPERTS, map(float, p)))})
    return {
        "architecture": "mome",
        "what": "the expert the router chose in each MoME layer (hard routing: only that expert runs) and the "
                "router's probabilities",
        "layers": layers,
    }
