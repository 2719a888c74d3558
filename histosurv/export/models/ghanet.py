"""G-HANet: genome-informed hyper-attention network (Wang et al., IEEE TMI 2025, arXiv 2403.10040).

Genes supervise training only: the cross-modal associating branch (CAB) learns, from the patches
alone, six tokens that reconstruct the six gene-signature groups; the hyper-attention survival
branch (HSB) then reads the patches through those tokens. Inference takes patch features only.
Layout and maths follow ``G_HANet_Surv`` (models/model_coattn.py) and ``Reconstruction_Net``
(models/model_reconstruction.py) of ZacharyWang-007/G-HANet @ 54020e8, module names included, so
the reference's checkpoints load as they are.

Per bag, with h the patches (N, 1024):

* CAB: c = LN_2(ReLU(W h)); 6 learned query tokens t cross-attend to c twice,
  r = CA0(LN_1 t, c), r += FFN0(LN_3 r); r, S = CA0(LN_4(t + r), c), r += FFN1(LN_5 r); r = LN_6 r.
  S (heads, 6, N) are the raw (pre-softmax, scaled) scores of the second call.
  NOTE: the reference calls ``cross_attention0`` both times; ``cross_attention1`` is built (and
  saved in its checkpoints) but never used. It is kept here, unused, so those checkpoints load.
* HSB: x = ReLU(LN(W' h)); morphology weights a = softmax_N(gated attention(x)) (1, N);
  M = mean over heads of S (6, N); hyperedge i keeps its k highest-scoring patches,
  e_i = softmax_N(M_i masked to them); G = (a + e) / 2 (6, N); hypergraph attention
  y = G x, y += ReLU(LN(W2 ReLU(LN(W1 y)))); fused tokens f = (y + r) / 2;
  f += SelfAttention(f); f += FFN(LN f); logits = W_c flatten(ReLU(LN(W_b f))).
* The reconstruction heads (per-group gene predictors for the training loss) are built only when
  ``recon_sizes`` is given; ``forward`` never runs them (:meth:`GHANet.predict_genes` does).

Deviations from the reference, on purpose:

* k = max(floor(N * ratio), 1) is computed from N inside the graph. The reference's
  ``int(N * 0.2)`` is a Python int, so both ONNX exporters bake the traced N's k as a constant.
  int(N * 0.2) == N // 5 for every integer N, so k here equals the reference's wherever it runs;
  other ratios are taken as the fraction p/q nearest to them (denominator <= 10000).
* N < 5 (k = 0): the reference raises IndexError (``topk(k=0)[0][:, -1]``). Here k = 1: each
  hyperedge keeps its best patch, so at N = 1 the whole graph collapses onto the single patch and
  the risk is finite and well defined.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels import routing
from .base import SurvivalModel, check_attention_impl
from .blocks import GatedAttention, patch_embedding
from .checkpoints import ReferenceFormat, strip_module_prefix
from .survival_head import n_outputs

__all__ = ["GHANetConfig", "GHANet"]

MASKED = -100000.0  # the reference's additive mask for patches outside a hyperedge


@dataclass(frozen=True)
class GHANetConfig:
    n_genes: int = 0  # genes in the manifest; G-HANet reads none at inference
    feature_dim: int = 1024
    dim: int = 512  # token width, also the attention width (heads * 128; the reference's ``wsi_size``)
    n_tokens: int = 6  # query tokens = hyperedges = gene-signature groups
    heads: int = 4
    ffn_mult: int = 4  # GEGLU feed-forward width multiplier
    gate_hidden: int = 256  # hidden width of the gated attention over the patches
    compress_dim: int = 256  # per-token width before the tokens are flattened (the reference's ``butter``)
    topk_ratio: float = 0.2  # fraction of patches each hyperedge keeps (the reference's ``ratio``)
    dropout: float = 0.25
    recon_sizes: tuple[int, ...] = ()  # gene-group sizes of the reconstruction heads used in training only (none: no heads)
    survival_head: str = "discrete"
    n_bins: int = 4

    def __post_init__(self):
        object.__setattr__(self, "recon_sizes", tuple(int(s) for s in self.recon_sizes))
        if self.n_genes < 0:
            raise ValueError(f"n_genes must be >= 0, got {self.n_genes}")
        if self.dim % self.heads:
            raise ValueError(f"dim = {self.dim} must be divisible by heads = {self.heads}")
        if not 0.0 < self.topk_ratio <= 1.0:
            raise ValueError(f"topk_ratio must be in (0, 1], got {self.topk_ratio}")
        if self.n_tokens < 1:
            raise ValueError(f"n_tokens must be at least 1, got {self.n_tokens}")
        if self.recon_sizes and len(self.recon_sizes) != self.n_tokens:
            raise ValueError(
                f"recon_sizes has {len(self.recon_sizes)} groups but there are n_tokens = {self.n_tokens} "
                "tokens (one reconstruction head per token); give one size per token or () for none"
            )
        if any(s < 1 for s in self.recon_sizes):
            raise ValueError(f"recon_sizes must be positive, got {self.recon_sizes}")
        n_outputs(self.survival_head, self.n_bins)

    @property
    def topk_fraction(self) -> tuple[int, int]:
        f = Fraction(self.topk_ratio).limit_denominator(10_000)
        return f.numerator, f.denominator

    def to_dict(self) -> dict:
        return asdict(self)


class GEGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gates = x.chunk(2, dim=-1)
        return x * F.gelu(gates)


class FeedForward(nn.Module):
    """Linear -> GEGLU -> Linear -> Dropout (the reference's ``FeedForward``)."""

    def __init__(self, dim: int, mult: int, dropout: float):
        super().__init__()
        hidden = dim * mult
        self.net = nn.Sequential(nn.Linear(dim, 2 * hidden), GEGLU(), nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TokenAttention(nn.Module):
    """Multi-head attention of a few query tokens (``Cross_Attention`` / ``Self_Attention``).

    With ``return_scores`` (CAB's second call: HSB reads its raw scores, (B, h, T, N) with T = 6,
    never N x N) or the "naive" build it is explicit matmul + softmax; otherwise SDPA, which the
    ONNX export fuses into one attention node.
    """

    def __init__(self, dim: int, heads: int, dropout: float, impl: str = "sdpa"):
        super().__init__()
        self.heads, self.scale, self.impl, self.p = heads, (dim // heads) ** -0.5, impl, dropout
        self.to_q = nn.Sequential(nn.Linear(dim, dim, bias=False))
        self.to_k = nn.Sequential(nn.Linear(dim, dim, bias=False))
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor, return_scores: bool = False):
        """x (B, T, d), context (B, N, d) -> out (B, T, d) [, scaled scores (B, h, T, N)]."""
        q, k, v = self._split(self.to_q(x)), self._split(self.to_k(context)), self._split(self.to_v(context))
        if self.impl == "sdpa" and not return_scores:
            out = routing.attention(q, k, v, dropout_p=self.p if self.training else 0.0)  # SDPA, or the kernel
            return self._merge(out)
        sim = (q @ k.transpose(-2, -1)) * self.scale  # (B, h, T, N)
        out = self._merge(self.dropout(sim.softmax(dim=-1)) @ v)
        return (out, sim) if return_scores else out

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, T, d) -> (B, h, T, hd)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_out(x.transpose(1, 2).flatten(2))  # (B, h, T, hd) -> (B, T, d)


class HyperAttention(nn.Module):
    """``Hyper_attention``: y = G x (hyperedges gather their patches), then y + MLP(y)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, incidence: torch.Tensor) -> torch.Tensor:
        y = incidence @ x  # (B, E, N) @ (B, N, d) -> (B, E, d)
        z = F.relu(self.ln1(self.linear1(y)))
        return F.relu(self.ln2(self.linear2(z))) + y


class CrossModalAssociation(nn.Module):
    """CAB (``Reconstruction_Net``): patches (B, N, D) -> tokens (B, T, d), raw scores (B, h, T, N)."""

    def __init__(self, cfg: GHANetConfig, attention_impl: str = "sdpa"):
        super().__init__()
        d = cfg.dim
        self.wsi_net = patch_embedding(cfg.feature_dim, d, cfg.dropout)
        if cfg.recon_sizes:
            self.sig_reconstruct_net = nn.ModuleList(
                nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d), nn.ELU(), nn.Dropout(cfg.dropout), nn.Linear(d, g))
                for g in cfg.recon_sizes
            )
        self.tokens = nn.Parameter(torch.randn(1, cfg.n_tokens, d))
        self.cross_attention0 = TokenAttention(d, cfg.heads, cfg.dropout, attention_impl)
        self.ffn0 = FeedForward(d, cfg.ffn_mult, cfg.dropout)
        self.cross_attention1 = TokenAttention(d, cfg.heads, cfg.dropout)  # NOTE: unused, as in the reference
        self.ffn1 = FeedForward(d, cfg.ffn_mult, cfg.dropout)
        for i in range(1, 7):
            self.add_module(f"ln_{i}", nn.LayerNorm(d))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        context = self.ln_2(self.wsi_net(features))  # (B, N, d)
        tokens = self.tokens.expand(features.shape[0], -1, -1)  # (B, T, d)
        r = self.cross_attention0(self.ln_1(tokens), context)
        r = self.ffn0(self.ln_3(r)) + r
        r, sim = self.cross_attention0(self.ln_4(tokens + r), context, return_scores=True)  # re-uses call 0
        r = self.ffn1(self.ln_5(r)) + r
        return self.ln_6(r), sim

    def reconstruct(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """(B, T, d) -> one (B, g_i) gene prediction per token (training loss only)."""
        heads = getattr(self, "sig_reconstruct_net", None)
        if heads is None:
            raise RuntimeError("this G-HANet was built without reconstruction heads; set recon_sizes to train them")
        return [head(tokens[:, i]) for i, head in enumerate(heads)]


class GHANet(SurvivalModel):
    """G-HANet (``G_HANet_Surv``): features (B, N, D) -> logits (B, n_bins), WSI only.

    Genes are read during training only (reconstruction targets); this model can run without genes,
    and at inference it never reads them. ``return_attention`` gives the morphology weights, the
    gated-attention softmax over the patches. ``attention_impl`` ("sdpa" or the reference's
    "naive" matmul + softmax) switches CAB's first cross-attention and the 6-token self-attention;
    CAB's second cross-attention is always explicit, as HSB reads its raw scores (6 x N, small).
    Export uses "sdpa" (``attention_ops`` = 2 fused nodes).
    """

    uses_image = True
    uses_genes = False
    attention_ops = 2  # SDPA: CAB's first cross-attention and the 6-token self-attention
    REFERENCE = ReferenceFormat(
        repository="ZacharyWang-007/G-HANet",
        commit="54020e8050ec3688f4485033f20f4b9077ee5f7e",
        model_class="G_HANet_Surv",
        unused=(r"recon_net\.sig_reconstruct_net\..*",),
        note="reconstruction heads (training loss only, shapes differ per fold) are dropped; "
        "build the model with recon_sizes=() to import",
    )

    def __init__(self, cfg: GHANetConfig, attention_impl: str = "sdpa"):
        super().__init__()
        check_attention_impl(attention_impl)
        self.cfg, self.genes = cfg, None
        d = cfg.dim
        self.gate = GatedAttention(d, cfg.gate_hidden)
        self.wsi_net = nn.Sequential(nn.Linear(cfg.feature_dim, d), nn.LayerNorm(d), nn.ReLU(), nn.Dropout(cfg.dropout))
        self.recon_net = CrossModalAssociation(cfg, attention_impl)
        self.classifier = nn.Linear(cfg.n_tokens * cfg.compress_dim, n_outputs(cfg.survival_head, cfg.n_bins))
        self.hyperconv1 = HyperAttention(d)
        self.attention = TokenAttention(d, cfg.heads, cfg.dropout, attention_impl)
        self.ffn = FeedForward(d, cfg.ffn_mult, cfg.dropout)
        self.ln1 = nn.LayerNorm(d)
        c = cfg.compress_dim
        self.butter = nn.Sequential(nn.Linear(d, c), nn.LayerNorm(c), nn.ReLU(), nn.Dropout(cfg.dropout))

    @staticmethod
    def config_from_reference(state: dict) -> dict:
        """Shape-deciding fields of a ``G_HANet_Surv`` state_dict. Not in the shapes: ``heads`` (the
        reference's 4 x 128 is the default) and ``topk_ratio`` (its ``--ratio``, default 0.2);
        ``recon_sizes`` stays () because the heads are not imported."""
        state = strip_module_prefix(state)
        tokens = state["recon_net.tokens"]
        n_tokens, dim = tokens.shape[1], tokens.shape[2]
        return dict(
            feature_dim=state["wsi_net.0.weight"].shape[1],
            dim=dim,
            n_tokens=n_tokens,
            ffn_mult=state["ffn.net.2.weight"].shape[1] // dim,
            gate_hidden=state["gate.attention_c.weight"].shape[1],
            compress_dim=state["butter.0.weight"].shape[0],
            n_bins=state["classifier.weight"].shape[0],
            survival_head="discrete",
        )

    def forward(self, features=None, coords=None, genes=None, return_attention: bool = False):
        tokens, sim = self.recon_net(features)  # (B, T, d), (B, h, T, N)
        x = self.wsi_net(features)  # (B, N, d)
        morphology = routing.gated_weights(self.gate, x)  # (B, N): softmax over N of the gate's scores
        edges = self._hyperedges(sim.mean(dim=1))  # (B, T, N)
        y = self.hyperconv1(x, (morphology[:, None] + edges) / 2)  # (B, T, d)
        f = (y + tokens) / 2
        f = self.attention(f, f) + f
        f = self.ffn(self.ln1(f)) + f
        logits = self.classifier(self.butter(f).flatten(1))  # (B, T * compress) -> (B, K)
        return (logits, morphology) if return_attention else logits

    def _hyperedges(self, matrix: torch.Tensor) -> torch.Tensor:
        """(B, T, N) head-averaged scores -> each row's softmax over its top-k patches."""
        p, q = self.cfg.topk_fraction
        # NOTE: k = max(N p // q, 1) from N inside the graph. topk(matrix, k) would give an output of
        # size k, on which torch.export guards (k != 1, k <= N) and specialises N; the k-th largest
        # read from the sorted rows at index k - 1 (a tensor) is the same value with no size in k.
        k = (torch.ones_like(matrix[..., :1], dtype=torch.long) * (matrix.shape[-1] * p // q)).clamp(min=1)
        kth = matrix.sort(dim=-1, descending=True).values.gather(-1, k - 1)  # (B, T, 1)
        keep = (matrix >= kth).float()  # ties at the k-th value are all kept, as in the reference
        return (matrix + (1 - keep) * MASKED).softmax(dim=-1).detach()

    def predict_genes(self, features: torch.Tensor) -> list[torch.Tensor]:
        """CAB's gene reconstructions, one (B, g_i) per group, for the training loss."""
        return self.recon_net.reconstruct(self.recon_net(features)[0])

    def auxiliary_loss(self, features: torch.Tensor, genes: torch.Tensor) -> torch.Tensor | None:
        """The reference's reconstruction loss, added to the survival loss during training:
        0.3 * sum over groups of (SCE cosine loss, alpha 3) + MSE between CAB's reconstruction and the
        standardised genes of that group (``utils/coattn_train_utils.py``). ``genes`` (B, G) are split
        by ``recon_sizes`` in order. The reference picks each group's genes per fold by a t-test;
        here the gene list given to training decides them. None without reconstruction heads."""
        if not self.cfg.recon_sizes:
            return None
        if genes.shape[1] != sum(self.cfg.recon_sizes):
            raise ValueError(
                f"recon_sizes {self.cfg.recon_sizes} sum to {sum(self.cfg.recon_sizes)} genes, the cohort has "
                f"{genes.shape[1]}; the reconstruction targets are the genes split into those groups in order"
            )
        loss = genes.new_zeros(())
        for pred, target in zip(self.predict_genes(features), torch.split(genes, list(self.cfg.recon_sizes), dim=1)):
            cos = F.cosine_similarity(pred, target, dim=-1, eps=1e-12)
            loss = loss + (1 - cos).pow(3).mean() + F.mse_loss(pred, target)
        return 0.3 * loss
