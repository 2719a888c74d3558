"""MCAT: multimodal co-attention transformer for survival (Chen et al., ICCV 2021).

As implemented in ``mahmoodlab/MCAT`` ``models/model_coattn.py`` (``MCAT_Surv``, "small" WSI size):

* patches: Linear(D -> 256) + ReLU + Dropout, one token per patch                  (``wsi_net``)
* genes: split into the signature groups of ``omic_sizes``; group i -> SNN(g_i -> 256 -> 256),
  one token per group                                                        (``sig_networks``)
* genomic-guided co-attention: one head, the group tokens query the N patch tokens
  -> one co-attended token per group                                              (``coattn``)
* path and omic branches: a 2-layer post-norm transformer (8 heads, ff 512, dropout 0.25, ReLU)
  over the group tokens, gated-attention pooling, rho Linear + ReLU + Dropout
* concat fusion Linear(512 -> 256) + ReLU + Linear(256 -> 256) + ReLU, classifier -> K logits.

Differences from the reference code, none of which changes the function computed:

* The reference's copy of ``MultiheadAttention`` picks its projections by testing
  ``torch.equal(query, key)``, a data-dependent branch that ``torch.export`` refuses. In the
  co-attention the queries (gene tokens) and keys (patch tokens) always differ, so the
  encoder-decoder path (Q from the first third of ``in_proj_weight``, K and V from the rest) is
  taken unconditionally. The reference also imports ``torch.nn.modules.linear._LinearWithBias``,
  which torch 2.x no longer has; here ``out_proj`` is a plain Linear with the same keys.
* The reference runs one bag with a batch axis of 1 in the middle (``(N, 1, 256)``); here bags are
  batched on axis 0 and every operation stays within its bag.
* The co-attention has a handful of queries (one per signature group) and its weights are an
  output, so it is written as explicit matmul + softmax (G x N scores). The transformers'
  self-attention over the G tokens uses ``scaled_dot_product_attention`` ("sdpa", fused into
  ``MultiHeadAttention`` on export: ``attention_ops`` = 2 x depth) or the explicit form ("naive").
* ``return_attention`` gives the co-attention softmax over the patches averaged over the group
  queries, (B, N), summing to 1 per bag; the reference returns the raw pre-softmax scores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InputError
from .base import GeneScaler, SurvivalModel, check_attention_impl, check_features, check_genes
from .blocks import GatedAttention, attention_pool, patch_embedding, snn_block, split_groups
from .checkpoints import ReferenceFormat, strip_module_prefix
from .survival_head import n_outputs

__all__ = ["MCATConfig", "MCAT"]

FUSIONS = ("concat",)
MCAT_COMMIT = "b9cca63be83c67de7f95308d54a58f80b78b0da1"


@dataclass(frozen=True)
class MCATConfig:
    n_genes: int = 0  # 0: derived as sum(omic_sizes); otherwise must equal it
    omic_sizes: tuple[int, ...] = ()  # genes per signature group, in the gene list's order
    feature_dim: int = 1024
    dim: int = 256  # token width (the reference's co-attention is fixed at 256)
    omic_hidden: tuple[int, ...] = (256, 256)  # widths of each gene group's SNN, ending at --dim (the reference's 'big': 1024,1024,1024,256)
    depth: int = 2  # layers of each transformer
    heads: int = 8
    ff_dim: int = 512  # feed-forward width of the transformer layers
    dropout: float = 0.25
    fusion: str = "concat"  # how the path and gene vectors meet: concat, or bilinear (a gated Kronecker product)
    survival_head: str = "discrete"
    n_bins: int = 4

    def __post_init__(self):
        object.__setattr__(self, "omic_sizes", tuple(int(s) for s in self.omic_sizes))
        object.__setattr__(self, "omic_hidden", tuple(int(s) for s in self.omic_hidden))
        if not self.omic_sizes or min(self.omic_sizes) < 1:
            raise ValueError(
                f"omic_sizes must list at least one positive group size (MCAT uses 6 signature groups, "
                f"e.g. UCEC (3, 24, 21, 22, 64, 15)), got {self.omic_sizes}"
            )
        total = sum(self.omic_sizes)
        if self.n_genes == 0:
            object.__setattr__(self, "n_genes", total)
        elif self.n_genes != total:
            raise ValueError(
                f"n_genes = {self.n_genes} but omic_sizes {self.omic_sizes} sum to {total}; the genes are "
                f"split into those groups in order, so the two must agree"
            )
        if not self.omic_hidden or self.omic_hidden[-1] != self.dim:
            raise ValueError(f"omic_hidden must end at dim = {self.dim} (the token width), got {self.omic_hidden}")
        if self.dim % self.heads:
            raise ValueError(f"dim = {self.dim} must be divisible by heads = {self.heads}")
        if self.depth < 1:
            raise ValueError(f"depth must be at least 1, got {self.depth}")
        if self.fusion not in FUSIONS:
            raise ValueError(
                f"fusion {self.fusion!r} is not implemented; available: {FUSIONS} (the reference's default)"
            )
        n_outputs(self.survival_head, self.n_bins)

    def to_dict(self) -> dict:
        return asdict(self)


def _attend(q, k, v, dropout: float, training: bool):
    """softmax(q k^T / sqrt(d)) v over (..., T, d) tensors; returns the output and the weights."""
    weights = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), dim=-1)  # (..., Tq, Tk)
    return F.dropout(weights, dropout, training) @ v, weights


class CoAttention(nn.Module):
    """One-head genomic-guided co-attention: (B, G, d) group tokens query (B, N, d) patch tokens.

    Parameters are laid out as ``nn.MultiheadAttention``'s (``in_proj_weight`` = [W_q; W_k; W_v]).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, genes: torch.Tensor, patches: torch.Tensor):
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        q = F.linear(genes, wq, bq)  # (B, G, d)
        k, v = F.linear(patches, wk, bk), F.linear(patches, wv, bv)  # (B, N, d)
        out, weights = _attend(q, k, v, 0.0, self.training)  # (B, G, d), (B, G, N)
        return self.out_proj(out), weights


class SelfAttention(nn.Module):
    """Multi-head self-attention over a few tokens, with ``nn.MultiheadAttention``'s parameter names."""

    def __init__(self, dim: int, heads: int, dropout: float, impl: str = "sdpa"):
        super().__init__()
        self.heads, self.dropout, self.impl = heads, dropout, impl
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # 3 x (B, T, d)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in qkv)  # (B, h, T, hd)
        if self.impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        else:
            out, _ = _attend(q, k, v, self.dropout, self.training)
        return self.out_proj(out.transpose(1, 2).flatten(2))  # (B, T, d)


class EncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer`` with its defaults (post-norm, ReLU, eps 1e-5) and key names."""

    def __init__(self, dim: int, heads: int, ff_dim: int, dropout: float, impl: str = "sdpa"):
        super().__init__()
        self.self_attn = SelfAttention(dim, heads, dropout, impl)
        self.linear1, self.linear2 = nn.Linear(dim, ff_dim), nn.Linear(ff_dim, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout, self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.dropout1(self.self_attn(x)))
        return self.norm2(x + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x))))))


class Encoder(nn.Module):
    """``nn.TransformerEncoder`` without a final norm (as the reference builds it)."""

    def __init__(self, cfg: MCATConfig, impl: str = "sdpa"):
        super().__init__()
        layers = (EncoderLayer(cfg.dim, cfg.heads, cfg.ff_dim, cfg.dropout, impl) for _ in range(cfg.depth))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def _rho(dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout))


def _omic_network(g: int, hidden: tuple[int, ...]) -> nn.Sequential:
    widths = (g,) + hidden
    return nn.Sequential(*(snn_block(a, b) for a, b in zip(widths[:-1], widths[1:])))


class MCAT(SurvivalModel):
    """Batched bags: features (B, N, D), genes (B, sum(omic_sizes)) -> logits (B, K)."""

    REFERENCE = ReferenceFormat(
        repository="mahmoodlab/MCAT",
        commit=MCAT_COMMIT,
        model_class="models.model_coattn.MCAT_Surv",
        note="same key names as MCAT_Surv(fusion='concat'); the gene scaler is not part of it",
    )

    def __init__(self, cfg: MCATConfig, attention_impl: str = "sdpa"):
        super().__init__()
        check_attention_impl(attention_impl)  # the transformers' self-attention; the co-attention is explicit
        self.cfg = cfg
        d = cfg.dim
        self.genes = GeneScaler(cfg.n_genes)
        self.wsi_net = patch_embedding(cfg.feature_dim, d, 0.25)
        self.sig_networks = nn.ModuleList(_omic_network(g, cfg.omic_hidden) for g in cfg.omic_sizes)
        self.coattn = CoAttention(d)
        self.path_transformer = Encoder(cfg, attention_impl)
        self.path_attention_head = GatedAttention(d, d, cfg.dropout)
        self.path_rho = _rho(d, cfg.dropout)
        self.omic_transformer = Encoder(cfg, attention_impl)
        self.omic_attention_head = GatedAttention(d, d, cfg.dropout)
        self.omic_rho = _rho(d, cfg.dropout)
        self.mm = nn.Sequential(nn.Linear(2 * d, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU())
        self.classifier = nn.Linear(d, n_outputs(cfg.survival_head, cfg.n_bins))

    @property
    def attention_ops(self) -> int:
        """The transformers' self-attentions (2 x depth); the co-attention, whose weights are an
        output, stays explicit matmul + softmax (G x N scores)."""
        return 2 * self.cfg.depth

    def forward(self, features=None, coords=None, genes=None, return_attention: bool = False):
        check_features(features, self.cfg.feature_dim, "MCAT")
        h_omic = self.gene_tokens(genes)  # (B, G, d)
        h_coattn, coattn = self.coattn(h_omic, self.wsi_net(features))  # (B, G, d), (B, G, N)
        h_path = self._branch(h_coattn, self.path_transformer, self.path_attention_head, self.path_rho)
        h_gene = self._branch(h_omic, self.omic_transformer, self.omic_attention_head, self.omic_rho)
        logits = self.classifier(self.mm(torch.cat([h_path, h_gene], dim=-1)))
        return (logits, coattn.mean(dim=1)) if return_attention else logits

    def gene_tokens(self, genes: torch.Tensor) -> torch.Tensor:
        """(B, G) raw genes -> (B, groups, d): one SNN per signature group."""
        check_genes(genes, self.cfg.n_genes, "MCAT", f" (omic_sizes {self.cfg.omic_sizes})")
        groups = split_groups(self.genes(genes), self.cfg.omic_sizes)
        return torch.stack([net(x) for net, x in zip(self.sig_networks, groups)], dim=1)

    @staticmethod
    def _branch(tokens, transformer, attention_head, rho) -> torch.Tensor:
        h = transformer(tokens)  # (B, G, d)
        pooled, _ = attention_pool(attention_head(h), h)  # (B, d)
        return rho(pooled)

    @staticmethod
    def config_from_reference(state: dict) -> dict:
        """The shape-deciding fields of a ``MCAT_Surv`` state_dict: omic_sizes, omic_hidden,
        feature_dim, depth and n_bins (heads, ff_dim and dropout are the reference's fixed values)."""
        state = strip_module_prefix(state)
        if "mm.0.weight" not in state:
            raise InputError(
                "not an MCAT_Surv(fusion='concat') state_dict: no 'mm.0.weight' (bilinear fusion is not supported)"
            )
        groups = sorted({int(k.split(".")[1]) for k in state if k.startswith("sig_networks.")})
        blocks = sorted({int(k.split(".")[2]) for k in state if k.startswith("sig_networks.0.")})
        depth = len({k.split(".")[2] for k in state if k.startswith("path_transformer.layers.")})
        return dict(
            omic_sizes=tuple(state[f"sig_networks.{i}.0.0.weight"].shape[1] for i in groups),
            omic_hidden=tuple(state[f"sig_networks.0.{j}.0.weight"].shape[0] for j in blocks),
            feature_dim=state["wsi_net.0.weight"].shape[1],
            dim=state["wsi_net.0.weight"].shape[0],
            depth=depth,
            n_bins=state["classifier.weight"].shape[0],
        )
