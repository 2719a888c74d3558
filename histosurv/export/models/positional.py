"""Fixed 2-D sinusoidal embedding of patch coordinates.

AMMASurv (section II.A) appends a position vector of size d_pos to every patch feature, computed as
in SeTranSurv. We use the standard 2-D form of the Transformer's sinusoids: half of the channels
encode x, half encode y, each as (sin, cos) pairs over geometric frequencies. Coordinates are level-0
pixels divided by ``scale`` (the patch size in level-0 pixels), so neighbouring patches differ by one
unit whatever the scan magnification.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["CoordinateEmbedding"]


class CoordinateEmbedding(nn.Module):
    """(B, N, 2) level-0 pixel coordinates -> (B, N, dim) fixed embedding."""

    def __init__(self, dim: int, scale: float = 256.0, max_period: float = 10000.0):
        super().__init__()
        if dim % 4:
            raise ValueError(f"positional dimension must be a multiple of 4 (sin and cos for x and y), got {dim}")
        if scale <= 0:
            raise ValueError(f"positional scale must be positive, got {scale}")
        self.dim = dim
        self.scale = float(scale)
        quarter = dim // 4
        freqs = torch.exp(-math.log(max_period) * torch.arange(quarter, dtype=torch.float32) / quarter)
        # A buffer, not a constant: it travels with state_dict and with .to(device).
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        grid = coords.to(self.freqs.dtype) / self.scale  # (B, N, 2) in patch units
        angles = grid.unsqueeze(-1) * self.freqs  # (B, N, 2, dim/4)
        emb = torch.cat([angles.sin(), angles.cos()], dim=-1)  # (B, N, 2, dim/2)
        return emb.flatten(-2)  # (B, N, dim): x channels, then y channels
