"""AMMASurv: asymmetrical multi-modal attention for survival (Wang et al., BIBM 2021).

Section II of the paper (shared/seeds/000), equation by equation:

* image tokens: Z_1 = [class token; F_p ++ P]  with F_p (n, d1) patch features and P (n, d_pos)
  positional embeddings, so d = d1 + d_pos                                               (eqs. 1-2)
* gene tokens: standardised genes split into m groups of d2 values, each group expanded to d1 by
  repeating values, padded with d_pos zeros, then Z_2 = ReLU(M F'_g)                      (eq. 3)
* AMMA: one multi-head attention whose queries are the image and gene tokens together and whose
  keys and values are the image tokens only. Image tokens attend to image tokens; gene tokens are
  induced by image tokens; nothing attends to gene tokens                               (eqs. 4-7)
* L pre-LayerNorm layers of AMMA + GELU MLP with residuals                              (eqs. 8-11)
* y = [LN(class token); LN(mean of gene tokens)], logits = W2 ReLU(W1 y)               (eqs. 12-15)

Choices the paper leaves open are fields of :class:`AMMASurvConfig`, recorded in the manifest.
Scores use the per-head scale 1/sqrt(d/heads) of standard multi-head attention (the paper writes
1/sqrt(d) for its single-head notation).

The ``modality`` field builds the paper's single-modality ablations with the same code:
``image`` drops the gene tokens (y = LN(class token)); ``genes`` drops the image tokens, so the gene
tokens only pass through the MLP blocks (there is nothing for them to attend to).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels import routing
from .base import ATTENTION_IMPLS, check_attention_impl
from .positional import CoordinateEmbedding
from .survival_head import n_outputs, risk_from_logits

__all__ = ["AMMASurvConfig", "AMMASurv", "ATTENTION_IMPLS"]

MODALITIES = ("both", "image", "genes")


@dataclass(frozen=True)
class AMMASurvConfig:
    n_genes: int  # G, the length of the gene list in the manifest
    feature_dim: int = 512  # d1: ResNet18 patch features
    pos_dim: int = 32  # d_pos, width of the patch-position embedding; 0 turns it off
    pos_scale: float = 256.0  # level-0 pixels per positional unit (the patch size at level 0)
    gene_groups: int = 16  # m: groups the genes are split into, one token each
    depth: int = 2  # L
    heads: int = 8
    mlp_ratio: float = 2.0  # feed-forward width over token width
    head_hidden: int = 128  # hidden width of the risk head (W1 in eq. 15)
    dropout: float = 0.1
    modality: str = "both"  # both, or the image-only / genes-only ablations of the paper
    survival_head: str = "cox"
    n_bins: int = 4  # used by the discrete-time head only

    def __post_init__(self):
        d = self.feature_dim + self.pos_dim
        if self.pos_dim % 4:
            raise ValueError(f"pos_dim must be a multiple of 4 (sin and cos for x and y), got {self.pos_dim}")
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        if d % self.heads:
            raise ValueError(
                f"the token width ({d}: feature_dim {self.feature_dim} plus pos_dim {self.pos_dim}) must be divisible by "
                f"heads = {self.heads}"
            )
        if self.depth < 1:
            raise ValueError(f"depth must be at least 1, got {self.depth}")
        if self.n_genes < 1 and self.modality != "image":
            raise ValueError("AMMASurv needs at least one gene unless modality = image")
        if self.uses_genes and self.group_size > self.feature_dim:
            raise ValueError(
                f"{self.n_genes} genes in {self.gene_groups} groups give {self.group_size} values per group, "
                f"more than feature_dim = {self.feature_dim} (the paper requires d2 < d1): raise gene_groups "
                f"to at least {math.ceil(self.n_genes / self.feature_dim)}"
            )
        n_outputs(self.survival_head, self.n_bins)

    @property
    def dim(self) -> int:
        return self.feature_dim + self.pos_dim

    @property
    def group_size(self) -> int:  # d2
        return math.ceil(self.n_genes / self.gene_groups)

    @property
    def uses_genes(self) -> bool:
        return self.modality != "image"

    @property
    def uses_image(self) -> bool:
        return self.modality != "genes"

    def to_dict(self) -> dict:
        return asdict(self)


class GeneTokens(nn.Module):
    """(B, G) raw genes -> (B, m, d) gene tokens (eq. 3).

    The standardisation (mean, scale) fitted on the training split is a buffer, so an exported
    graph takes raw expression values in the manifest's gene order.
    """

    def __init__(self, cfg: AMMASurvConfig):
        super().__init__()
        self.groups, self.group_size, self.pos_dim = cfg.gene_groups, cfg.group_size, cfg.pos_dim
        self.pad = cfg.gene_groups * cfg.group_size - cfg.n_genes
        self.register_buffer("mean", torch.zeros(cfg.n_genes))
        self.register_buffer("scale", torch.ones(cfg.n_genes))
        # Value j of a group fills columns [j*d1/d2, (j+1)*d1/d2): "expanding G by repeating values".
        expand = torch.arange(cfg.feature_dim) * cfg.group_size // cfg.feature_dim
        self.register_buffer("expand_index", expand, persistent=False)
        self.project = nn.Linear(cfg.dim, cfg.dim)  # M

    def forward(self, genes: torch.Tensor) -> torch.Tensor:
        z = (genes - self.mean) / self.scale  # (B, G)
        z = F.pad(z, (0, self.pad)).unflatten(1, (self.groups, self.group_size))  # (B, m, d2)
        z = z.index_select(2, self.expand_index)  # (B, m, d1)
        z = F.pad(z, (0, self.pos_dim))  # (B, m, d): zeros where image tokens hold positions
        return F.relu(self.project(z))


class AsymmetricAttention(nn.Module):
    """AMMA (eqs. 4-7): queries from image and gene tokens, keys and values from image tokens only."""

    def __init__(self, dim: int, heads: int, dropout: float, impl: str = "sdpa"):
        super().__init__()
        check_attention_impl(impl)
        self.heads, self.dropout, self.impl = heads, dropout, impl
        self.q = nn.Linear(dim, dim)  # W^Q, shared by both modalities
        self.kv = nn.Linear(dim, 2 * dim)  # W^K and W^V, applied to image tokens only
        self.out = nn.Linear(dim, dim)

    def forward(self, img: torch.Tensor, gene: torch.Tensor, keep_cls_weights: bool = False):
        n = img.shape[1]
        q = self._split_heads(self.q(torch.cat([img, gene], dim=1)))  # (B, h, n+m, hd)
        k, v = (self._split_heads(t) for t in self.kv(img).chunk(2, dim=-1))  # (B, h, n, hd)
        o = self._attend(q, k, v, gene.shape[1])  # (B, h, n+m, hd)
        o = self.out(o.transpose(1, 2).flatten(2))  # (B, n+m, d)
        cls_weights = self._cls_weights(q, k) if keep_cls_weights else None
        return o[:, :n], o[:, n:], cls_weights

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, T, d) -> (B, h, T, hd)

    def _attend(self, q, k, v, m: int):
        p = self.dropout if self.training else 0.0
        if self.impl == "sdpa" and routing.active_backend() and m and not p:
            # a compiled engine with kernels: the m gene queries (a constant) take the few-query kernel,
            # the N + 1 image queries (known at run time only) stay on SDPA's flash kernel
            img = F.scaled_dot_product_attention(q[:, :, :-m], k, v)
            return torch.cat([img, routing.attention(q[:, :, -m:], k, v)], dim=2)
        if self.impl == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        # The reference repositories' form: materialises the (n+m) x n score matrix.
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        return F.dropout(scores.softmax(dim=-1), p, self.training) @ v

    @staticmethod
    def _cls_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        # One query row (the class token) against all image tokens: O(n), never the n x n matrix.
        scores = (q[:, :, :1] @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, h, 1, n)
        return scores.softmax(dim=-1).mean(dim=1)[:, 0]  # (B, n), heads averaged


class AMMALayer(nn.Module):
    """Pre-LN encoder layer (eqs. 8-11); LayerNorms and the MLP are shared by both modalities."""

    def __init__(self, cfg: AMMASurvConfig, impl: str):
        super().__init__()
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = AsymmetricAttention(cfg.dim, cfg.heads, cfg.dropout, impl)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, hidden), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(hidden, cfg.dim)
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.attends = cfg.uses_image  # the genes-only ablation has no image tokens to attend to

    def forward(self, img, gene, keep_cls_weights: bool = False):
        cls_weights = None
        if self.attends:
            a_img, a_gene, cls_weights = self.attn(self.norm1(img), self.norm1(gene), keep_cls_weights)
            img, gene = img + self.drop(a_img), gene + self.drop(a_gene)
        img = img + self.drop(self.mlp(self.norm2(img)))
        gene = gene + self.drop(self.mlp(self.norm2(gene)))
        return img, gene, cls_weights


class AMMASurv(nn.Module):
    """Batched bags: features (B, N, d1), coords (B, N, 2), genes (B, G) -> logits (B, K).

    ``attention_impl`` is a build-time switch ("sdpa" or the reference "naive" form); both compute
    the same function and share the same state_dict.
    """

    def __init__(self, cfg: AMMASurvConfig, attention_impl: str = "sdpa"):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.pos = CoordinateEmbedding(cfg.pos_dim, cfg.pos_scale) if cfg.pos_dim else None
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.genes = GeneTokens(cfg) if cfg.uses_genes else None
        self.layers = nn.ModuleList(AMMALayer(cfg, attention_impl) for _ in range(cfg.depth))
        self.norm_img = nn.LayerNorm(d) if cfg.uses_image else None  # eq. 12
        self.norm_gene = nn.LayerNorm(d) if cfg.uses_genes else None  # eq. 13
        width = d * (cfg.uses_image + cfg.uses_genes)
        out = n_outputs(cfg.survival_head, cfg.n_bins)
        self.head = nn.Sequential(nn.Linear(width, cfg.head_hidden), nn.ReLU(), nn.Linear(cfg.head_hidden, out))
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    @property
    def attention_ops(self) -> int:
        """Attention calls per forward pass (each must become one fused op in an exported graph)."""
        return self.cfg.depth if self.cfg.uses_image else 0

    @property
    def input_names(self) -> tuple[str, ...]:
        """The named inputs this configuration reads (DESIGN.md tensor names)."""
        names = ()
        if self.cfg.uses_image:
            names += ("features", "coords") if self.pos is not None else ("features",)
        return names + (("genes",) if self.cfg.uses_genes else ())

    def set_gene_scaler(self, mean: torch.Tensor, scale: torch.Tensor) -> None:
        if self.genes is None:
            return
        self.genes.mean.copy_(mean)
        self.genes.scale.copy_(scale)

    def encode(self, features=None, coords=None, genes=None, keep_cls_weights: bool = False):
        """Runs the encoder; returns every layer's (image tokens, gene tokens) and the class-token
        attention over the patches of the last layer (None unless asked for)."""
        img, gene = self._tokens(features, coords, genes)
        states, cls_weights = [], None
        for i, layer in enumerate(self.layers):
            last = i == len(self.layers) - 1
            img, gene, cls_weights = layer(img, gene, keep_cls_weights and last)
            states.append((img, gene))
        if cls_weights is not None:
            cls_weights = cls_weights[:, 1:]  # (B, N): drop the class token's weight on itself
        return states, cls_weights

    def forward(self, features=None, coords=None, genes=None, return_attention: bool = False):
        states, cls_weights = self.encode(features, coords, genes, keep_cls_weights=return_attention)
        img, gene = states[-1]
        parts = []
        if self.cfg.uses_image:
            parts.append(self.norm_img(img[:, 0]))  # y1: the class token
        if self.cfg.uses_genes:
            parts.append(self.norm_gene(gene.mean(dim=1)))  # y2: mean of the gene tokens
        logits = self.head(torch.cat(parts, dim=-1))
        return (logits, cls_weights) if return_attention else logits

    def risk(self, features, coords, genes) -> torch.Tensor:
        return risk_from_logits(self(features, coords, genes), self.cfg.survival_head)

    def _tokens(self, features, coords, genes):
        ref = features if self.cfg.uses_image else genes  # inputs a configuration ignores may be None
        b, d = ref.shape[0], self.cfg.dim
        if self.cfg.uses_image:
            z0 = torch.cat([features, self.pos(coords)], dim=-1) if self.pos is not None else features
            img = torch.cat([self.cls_token.expand(b, -1, -1), z0], dim=1)  # (B, 1+N, d)
        else:
            img = ref.new_zeros(b, 0, d)
        if self.cfg.uses_genes:
            gene = self.genes(genes)  # (B, m, d)
        else:
            gene = ref.new_zeros(b, 0, d)
        return img, gene
