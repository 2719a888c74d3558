"""Nystrom self-attention (Xiong et al., AAAI 2021) as the ``nystrom-attention`` library computes it.

MoME's and TransMIL's ``TransLayer`` use lucidrains' ``NystromAttention`` (v0.0.12-0.0.14,
``nystrom_attention/nystrom_attention.py``). This module reproduces its forward pass, submodule
names included (``to_qkv``, ``to_out.0``, ``res_conv``), so reference state_dicts load unchanged:

* the N tokens are zero-padded at the FRONT to m * l tokens, l = ceil(N / m), m landmarks;
* landmarks are the means of l consecutive (padded) queries and keys;
* softmax(Q K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T) V, with the iterative Moore-Penrose
  pseudo-inverse (6 iterations), plus a depthwise convolution over V along the tokens (kernel 33);
* the padded rows are dropped from the output.

Two deliberate deviations from the library, both needed for an exported graph and a server:

1. The padding and l are computed from N at run time. The library takes them as Python ints, so a
   traced or exported graph bakes the example's values and is wrong (or fails) at any other N.
2. The pseudo-inverse's initial scale, 1 / (max column sum * max row sum), is taken per bag. The
   library takes ``torch.max`` over the whole (B, heads, m, m) tensor, so one bag's output depends on
   the other bags of its batch. At batch size 1 the two are identical.

Cost: O(N m) time and memory per head; the N x N attention matrix is never formed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NystromAttention", "moore_penrose_pinv"]


def moore_penrose_pinv(x: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """(B, h, m, m) -> (B, h, m, m) iterative pseudo-inverse (Razavi et al. 2014), initial scale per bag."""
    a = x.abs()
    col = a.sum(dim=-1).flatten(1).amax(dim=1)  # (B,): the library's torch.max(col), per bag
    row = a.sum(dim=-2).flatten(1).amax(dim=1)
    z = x.transpose(-1, -2) / (col * row)[:, None, None, None]
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - (xz @ (15 * eye - (xz @ (7 * eye - xz)))))
    return z


class NystromAttention(nn.Module):
    """(B, N, dim) -> (B, N, dim); ``cls_row`` also gives token 0's attention row over all N tokens."""

    def __init__(
        self,
        dim: int,
        dim_head: int = 64,
        heads: int = 8,
        num_landmarks: int = 256,
        pinv_iterations: int = 6,
        residual_conv_kernel: int = 33,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.heads, self.num_landmarks, self.pinv_iterations = heads, num_landmarks, pinv_iterations
        self.scale = dim_head**-0.5
        inner = heads * dim_head
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        k = residual_conv_kernel
        self.res_conv = nn.Conv2d(heads, heads, (k, 1), padding=(k // 2, 0), groups=heads, bias=False)

    def forward(self, x: torch.Tensor, cls_row: bool = False):
        b, n, _ = x.shape
        m = self.num_landmarks
        l = (n + m - 1) // m  # NOTE: tokens per landmark, from N at run time (never a baked int)
        pad = m * l - n  # 0 when N is a multiple of m
        x = F.pad(x, (0, 0, pad, 0))  # (B, m*l, dim), zeros in front as the library does
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
        q = q * self.scale  # q, k, v: (B, h, m*l, dh)
        q_land = q.unflatten(2, (m, l)).mean(dim=3)  # (B, h, m, dh): segment means
        k_land = k.unflatten(2, (m, l)).mean(dim=3)
        attn1 = (q @ k_land.transpose(-1, -2)).softmax(dim=-1)  # (B, h, m*l, m)
        attn2 = (q_land @ k_land.transpose(-1, -2)).softmax(dim=-1)  # (B, h, m, m)
        # NOTE: attn3 is kept transposed, (B, h, m*l, m), softmax over the landmarks' axis: the same
        # numbers, but onnxscript's ORT fusions would otherwise take softmax(q~ k^T) v for a standard
        # attention and rewrite it into a MultiHeadAttention node, which the export counts as an SDPA.
        attn3_t = (k @ q_land.transpose(-1, -2)).softmax(dim=-2)  # (B, h, m*l, m)
        attn2_inv = moore_penrose_pinv(attn2, self.pinv_iterations)
        out = (attn1 @ attn2_inv) @ (attn3_t.transpose(-1, -2) @ v) + self.res_conv(v)  # (B, h, m*l, dh)
        out = self.to_out(out.transpose(1, 2).flatten(2))[:, pad:]  # (B, N, dim): padded rows dropped
        if not cls_row:
            return out
        # Token 0's row of attn1 @ attn2_inv @ attn3: (1 x m)(m x m)(m x N), O(N m), heads averaged.
        row = (attn1[:, :, pad : pad + 1] @ attn2_inv) @ attn3_t[:, :, pad:].transpose(-1, -2)  # (B, h, 1, N)
        return out, row[:, :, 0].mean(dim=1)  # (B, N)
