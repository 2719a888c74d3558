"""Building blocks shared by the MIL-era models (MCAT, PORPOISE, ABMIL, SNN, MoME, G-HANet).

The reference repositories carry identical copies of these in their ``models/model_utils.py``;
here they exist once. Submodule layouts (``nn.Sequential`` indices, attribute names) follow the
references, so their checkpoints load through a rename of prefixes only (see :mod:`.checkpoints`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ...kernels.gated_pool import attention_pool  # the kernels' torch twin, used as is by the models

__all__ = ["snn_block", "GatedAttention", "attention_pool", "split_groups", "patch_embedding"]


def snn_block(d_in: int, d_out: int, dropout: float = 0.25) -> nn.Sequential:
    """Self-normalising block (Klambauer et al. 2017): Linear -> ELU -> AlphaDropout (``SNN_Block``)."""
    return nn.Sequential(nn.Linear(d_in, d_out), nn.ELU(), nn.AlphaDropout(p=dropout, inplace=False))


def patch_embedding(d_in: int, d_out: int, dropout: float = 0.25) -> nn.Sequential:
    """Per-patch Linear -> ReLU -> Dropout, the first layer of every MIL model of the family."""
    return nn.Sequential(nn.Linear(d_in, d_out), nn.ReLU(), nn.Dropout(dropout))


class GatedAttention(nn.Module):
    """Gated attention scores (Ilse et al. 2018, ``Attn_Net_Gated``): (..., N, L) -> (..., N, K)
    with a = tanh(V h) * sigmoid(U h), score = w a. Unnormalised: callers softmax over N."""

    def __init__(self, dim: int = 512, hidden: int = 256, dropout: float = 0.0, n_scores: int = 1):
        super().__init__()
        tail = [nn.Dropout(dropout)] if dropout else []
        self.attention_a = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), *tail)
        self.attention_b = nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid(), *tail)
        self.attention_c = nn.Linear(hidden, n_scores)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.attention_c(self.attention_a(h) * self.attention_b(h))


def split_groups(x: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """(B, G) -> one (B, g_i) tensor per gene group, in order (the MCAT signature groups)."""
    return list(torch.split(x, list(sizes), dim=1))
