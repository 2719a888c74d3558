"""What every model of the zoo provides, so training, export, verify and serving treat them alike.

A zoo model is an ``nn.Module`` with

* ``cfg``: a frozen dataclass with at least ``n_genes``, ``feature_dim``, ``survival_head`` and
  ``n_bins``, saved in run and manifest configs;
* ``forward(features=None, coords=None, genes=None, return_attention=False)`` on batched bags
  (``features`` (B, N, D), ``genes`` (B, G) raw values in the manifest's order) returning logits
  (B, K), plus a (B, N) attention map over the patches when asked and the model reads patches;
* ``input_names``: the DESIGN.md inputs it reads; ``optional_inputs``: those it can run without
  (the runtime then feeds NaN, which the graph treats as "absent");
* ``attention_ops``: how many attentions must become fused attention nodes in an exported graph
  (0 for models whose attentions have a handful of queries or are Nystrom approximations, whose
  score matrices are already small);
* ``genes``: a :class:`GeneScaler` (or None), the per-gene standardisation fitted on the training
  split, kept as buffers so exported graphs take raw values.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import InputError
from .survival_head import risk_from_logits

__all__ = [
    "ATTENTION_IMPLS",
    "GeneScaler",
    "SurvivalModel",
    "genes_present",
    "check_attention_impl",
    "check_genes",
    "check_features",
]

# "sdpa": F.scaled_dot_product_attention (fused in exported graphs); "naive": the reference
# repositories' explicit softmax(QK^T)V. Models without dot-product attention accept both.
ATTENTION_IMPLS = ("sdpa", "naive")


def check_attention_impl(impl: str) -> None:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")


def check_genes(genes: torch.Tensor | None, n_genes: int, model: str, hint: str = "") -> None:
    """Refuses a missing or mis-sized (B, G) genes tensor with a message naming both sizes."""
    if genes is None:
        raise InputError(f"{model} reads gene expression: pass genes of shape (B, {n_genes})")
    if genes.dim() != 2 or genes.shape[-1] != n_genes:
        raise InputError(
            f"{model} was built for {n_genes} genes{hint}, got a genes tensor of shape {tuple(genes.shape)}; "
            f"expected (B, {n_genes}) in the manifest's gene order"
        )


def check_features(features: torch.Tensor | None, feature_dim: int, model: str) -> None:
    if features is None or features.dim() != 3 or features.shape[-1] != feature_dim:
        got = None if features is None else tuple(features.shape)
        raise InputError(f"{model} reads patch features of shape (B, N, {feature_dim}), got {got}")


class GeneScaler(nn.Module):
    """(B, G) raw values -> standardised values, with the training split's mean and scale as buffers."""

    def __init__(self, n_genes: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_genes))
        self.register_buffer("scale", torch.ones(n_genes))

    def forward(self, genes: torch.Tensor) -> torch.Tensor:
        return (genes - self.mean) / self.scale


def genes_present(genes: torch.Tensor) -> torch.Tensor:
    """(B, G) -> (B, 1) bool: False where the whole vector is NaN, the runtime's marker for "no genes"."""
    return ~torch.isnan(genes).all(dim=1, keepdim=True)


class SurvivalModel(nn.Module):
    """Defaults shared by the zoo; subclasses set ``cfg`` and ``genes`` and define ``forward``."""

    uses_image = True
    uses_genes = True
    attention_ops = 0
    optional_inputs: tuple[str, ...] = ()

    @property
    def input_names(self) -> tuple[str, ...]:
        return ("features",) * self.uses_image + ("genes",) * self.uses_genes

    def set_gene_scaler(self, mean: torch.Tensor, scale: torch.Tensor) -> None:
        if getattr(self, "genes", None) is None:
            return
        self.genes.mean.copy_(mean)
        self.genes.scale.copy_(scale)

    def risk(self, features=None, coords=None, genes=None) -> torch.Tensor:
        return risk_from_logits(self(features, coords, genes), self.cfg.survival_head)
