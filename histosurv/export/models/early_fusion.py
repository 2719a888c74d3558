"""Early fusion: one gated-attention MIL model whose instances carry the genes (histosurv's own).

Early fusion "integrates information from all modalities at the input level before feeding it into
a single model" (shared/seeds/002). Here every instance is a patch's features concatenated with the
patient's standardised gene vector, x_i = [f_i; g], so the genes enter the first layer beside every
patch and modulate both the patch embedding and its attention score:

    h_i = Dropout(ReLU(W [f_i; g] + b))              (B, N, hidden)
    a = softmax_i(gated_attention(h_i)),  m = sum_i a_i h_i
    logits = classifier(rho(m))

No reference repository implements this model (no golden test; its tests check that the genes move
the risk and that it exports). Genes are required.

NOTE: W [f_i; g] = W_f f_i + W_g g, so the (B, N, D + G) concatenation is never built: the gene term
is computed once per bag and broadcast over N (the weight is still one Linear over D + G; the tests
compare against the explicit concatenation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels import routing
from .base import GeneScaler, SurvivalModel, check_attention_impl
from .blocks import GatedAttention
from .survival_head import n_outputs

__all__ = ["EarlyFusionConfig", "EarlyFusionMIL"]



@dataclass(frozen=True)
class EarlyFusionConfig:
    n_genes: int
    feature_dim: int = 1024
    hidden_dim: int = 512  # width of the patch embedding, as PORPOISE's
    attention_dim: int = 256  # gated-attention hidden width and rho's output
    dropout: float = 0.25
    survival_head: str = "discrete"
    n_bins: int = 4

    def __post_init__(self):
        for name in ("n_genes", "feature_dim", "hidden_dim", "attention_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)} (early fusion needs genes)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        n_outputs(self.survival_head, self.n_bins)

    def to_dict(self) -> dict:
        return asdict(self)


class EarlyFusionMIL(SurvivalModel):
    """Batched bags: features (B, N, D), genes (B, G) -> logits (B, K) [and attention (B, N)]."""

    def __init__(self, cfg: EarlyFusionConfig, attention_impl: str = "sdpa"):
        super().__init__()
        check_attention_impl(attention_impl)  # accepted for the zoo's interface; no SDPA here
        self.cfg = cfg
        self.genes = GeneScaler(cfg.n_genes)
        self.instance = nn.Linear(cfg.feature_dim + cfg.n_genes, cfg.hidden_dim)  # W over [f_i; g]
        self.instance_dropout = nn.Dropout(cfg.dropout)
        self.attention = GatedAttention(cfg.hidden_dim, cfg.attention_dim, cfg.dropout)
        self.rho = nn.Sequential(nn.Linear(cfg.hidden_dim, cfg.attention_dim), nn.ReLU(), nn.Dropout(cfg.dropout))
        self.classifier = nn.Linear(cfg.attention_dim, n_outputs(cfg.survival_head, cfg.n_bins))

    def forward(self, features=None, coords=None, genes=None, return_attention: bool = False):
        h = self.embed_instances(features, self.genes(genes))  # (B, N, hidden)
        pooled, weights = routing.gated_pool(self.attention, h)  # (B, hidden), (B, N)
        logits = self.classifier(self.rho(pooled))
        return (logits, weights) if return_attention else logits

    def embed_instances(self, features: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """(B, N, D) features, (B, G) standardised genes -> (B, N, hidden) = ReLU(W [f_i; g] + b)."""
        d = self.cfg.feature_dim
        w_f, w_g = self.instance.weight[:, :d], self.instance.weight[:, d:]
        gene_term = F.linear(z, w_g, self.instance.bias)  # (B, hidden): once per bag
        h = F.linear(features, w_f) + gene_term[:, None, :]  # (B, N, hidden)
        return self.instance_dropout(F.relu(h))
