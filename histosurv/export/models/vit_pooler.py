"""CONCH v1.5's attentional pooler: learned queries attending over every token of the ViT, CoCa style.

The published facts, from mahmoodlab/TRIDENT@a91fa84
``trident/patch_encoder_models/model_zoo/conchv1_5/conchv1_5.py`` (``AttentionalPooler``,
``CONCHVisionTower``):

* ``query`` (n_queries, d_model) is a parameter; ``ln_q`` (d_model) normalises it and ``ln_k``
  (context_dim) normalises the ViT's tokens (the class token included), both ``nn.LayerNorm`` at
  torch's default eps 1e-5 (the trunk's norms use 1e-6);
* ``to_q`` (d_model -> d_model), ``to_kv`` (context_dim -> 2 d_model: keys, then values) and ``to_out``
  (d_model -> d_model) are bias-free linears; ``n_head`` heads of d_model / n_head, scaled by
  head_dim^-0.5, softmax over the tokens (TRIDENT subtracts the row maximum first, which softmax
  does anyway);
* CONCH v1.5 builds it with d_model 768, context_dim 1024, 8 heads, 1 query, takes query 0 and
  applies ``ln_contrast`` (LayerNorm 768, eps 1e-5): the 768-d feature.

Here the attention is one ``F.scaled_dot_product_attention`` call, which the exporter keeps fused.
The key names are TRIDENT's, so the published ``pytorch_model_vision.bin`` loads as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AttentionalPooler"]


class AttentionalPooler(nn.Module):
    """Tokens (B, N, context_dim) -> pooled queries (B, n_queries, d_model)."""

    def __init__(self, d_model: int, context_dim: int, heads: int, n_queries: int = 1):
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.ln_k = nn.LayerNorm(context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * d_model, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, _ = tokens.shape
        nq, d = self.query.shape
        # the queries go through their projection per image (expanded first), so the exported graph
        # has the same batched MatMul -> attention pattern as a block's self-attention
        q = self.to_q(self.ln_q(self.query.expand(b, nq, d)))
        k, v = self.to_kv(self.ln_k(tokens)).chunk(2, dim=-1)
        q, k, v = (t.reshape(b, -1, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # default scale: head_dim^-0.5, as TRIDENT's
        return self.to_out(out.transpose(1, 2).reshape(b, nq, d))
