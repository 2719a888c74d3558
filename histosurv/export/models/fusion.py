"""Late-fusion blocks: the gated Kronecker-product fusion of Pathomic Fusion and PORPOISE.

:class:`BilinearFusion` follows ``BilinearFusion`` of ``mahmoodlab/PORPOISE/models/model_porpoise.py``
(and of PathomicFusion's ``fusion.py`` and MCAT's ``model_utils.py``) term by term, with the same
parameter names so the references' checkpoints load unchanged:

* gated multimodal units: h_m = ReLU(W_h v_m), z_m = W_z [v_1; v_2] (or a bilinear form),
  o_m = Dropout(ReLU(W_o (sigmoid(z_m) * h_m)))                     (one per modality)
* append a 1 to each, o_m' = [o_m; 1], and take the Kronecker product o_1' (x) o_2': with
  scale_dim 8 and 256-wide inputs, 33 x 33 = 1089 terms, which hold o_1, o_2 and every product
* dropout, encoder1 (1089 -> 256), optional skip [.; v_1; v_2], encoder2 (-> mmhid)

The reference builds the appended ones with ``torch.cuda.FloatTensor`` (fails on a CPU); here they
are ``x.new_ones``. ``keep2`` is histosurv's addition for a missing second modality: where it is
False, o_2 is zeroed, so o_1' (x) o_2' = [0, ..., 0, o_1, 1] keeps exactly the first modality's
terms (the appended 1 is what makes that possible).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BilinearFusion", "concat_fusion"]


class BilinearFusion(nn.Module):
    """(B, dim1), (B, dim2) -> (B, mmhid). Arguments as the reference's.

    Args:
        skip: concatenate the two inputs to the encoded product before ``encoder2``.
        use_bilinear: gate logits z_m from an ``nn.Bilinear`` of both inputs instead of a Linear of
            their concatenation (PORPOISE never sets it; Pathomic Fusion does).
        gate1, gate2: use the sigmoid gate for modality 1 (paths) / 2 (genes).
        scale_dim1, scale_dim2: each modality is reduced to dim // scale_dim before the product.
        encoder_dropout: Dropout after each encoder (MCAT's and Pathomic Fusion's copy; PORPOISE's
            has none). Parameter names are the same either way.
    """

    def __init__(
        self,
        skip: bool = False,
        use_bilinear: bool = False,
        gate1: bool = True,
        gate2: bool = True,
        dim1: int = 128,
        dim2: int = 128,
        scale_dim1: int = 1,
        scale_dim2: int = 1,
        mmhid: int = 256,
        dropout_rate: float = 0.25,
        encoder_dropout: bool = False,
    ):
        super().__init__()
        self.skip, self.use_bilinear, self.gate1, self.gate2 = bool(skip), bool(use_bilinear), bool(gate1), bool(gate2)
        small1, small2 = dim1 // scale_dim1, dim2 // scale_dim2
        if small1 < 1 or small2 < 1:
            raise ValueError(f"dim // scale_dim must be at least 1, got {dim1}//{scale_dim1} and {dim2}//{scale_dim2}")
        skip_dim = dim1 + dim2 if skip else 0
        self.linear_h1, self.linear_z1, self.linear_o1 = self._unit(dim1, dim2, small1, dropout_rate)
        self.linear_h2, self.linear_z2, self.linear_o2 = self._unit(dim2, dim1, small2, dropout_rate, second=True)
        self.post_fusion_dropout = nn.Dropout(p=dropout_rate)
        tail = [nn.Dropout(p=dropout_rate)] if encoder_dropout else []
        self.encoder1 = nn.Sequential(nn.Linear((small1 + 1) * (small2 + 1), 256), nn.ReLU(), *tail)
        self.encoder2 = nn.Sequential(nn.Linear(256 + skip_dim, mmhid), nn.ReLU(), *tail)

    def _unit(self, dim: int, other: int, small: int, p: float, second: bool = False):
        """One gated multimodal unit's layers: (linear_h, linear_z, linear_o)."""
        d1, d2 = (other, dim) if second else (dim, other)  # z always reads [v_1; v_2]
        z = nn.Bilinear(d1, d2, small) if self.use_bilinear else nn.Sequential(nn.Linear(d1 + d2, small))
        h = nn.Sequential(nn.Linear(dim, small), nn.ReLU())
        o = nn.Sequential(nn.Linear(small, small), nn.ReLU(), nn.Dropout(p=p))
        return h, z, o

    def forward(self, vec1: torch.Tensor, vec2: torch.Tensor, keep2: torch.Tensor | None = None) -> torch.Tensor:
        """``keep2``: optional (B, 1) bool, False where modality 2 is absent (its o_2 is zeroed)."""
        o1 = self._gated(vec1, vec2, self.linear_h1, self.linear_z1, self.linear_o1, self.gate1, vec1)
        o2 = self._gated(vec1, vec2, self.linear_h2, self.linear_z2, self.linear_o2, self.gate2, vec2)
        if keep2 is not None:
            o2 = torch.where(keep2, o2, 0.0)
        o1 = torch.cat([o1, o1.new_ones(o1.shape[0], 1)], dim=1)  # (B, d1 + 1)
        o2 = torch.cat([o2, o2.new_ones(o2.shape[0], 1)], dim=1)  # (B, d2 + 1)
        o12 = (o1.unsqueeze(2) * o2.unsqueeze(1)).flatten(start_dim=1)  # (B, (d1+1)(d2+1)), row-major as bmm
        out = self.encoder1(self.post_fusion_dropout(o12))
        if self.skip:
            out = torch.cat([out, vec1, vec2], dim=1)
        return self.encoder2(out)

    def _gated(self, vec1, vec2, linear_h, linear_z, linear_o, gate: bool, own: torch.Tensor) -> torch.Tensor:
        h = linear_h(own)
        if not gate:
            return linear_o(h)
        z = linear_z(vec1, vec2) if self.use_bilinear else linear_z(torch.cat([vec1, vec2], dim=1))
        return linear_o(torch.sigmoid(z) * h)


def concat_fusion(dim1: int, dim2: int, out: int) -> nn.Sequential:
    """PORPOISE's and MCAT's ``concat`` fusion: [v_1; v_2] -> Linear, ReLU, Linear, ReLU."""
    return nn.Sequential(nn.Linear(dim1 + dim2, out), nn.ReLU(), nn.Linear(out, out), nn.ReLU())
