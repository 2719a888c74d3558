"""PORPOISE multimodal fusion (Chen et al., Cancer Cell 2022): ``PorpoiseMMF`` of mahmoodlab/PORPOISE.

A late-fusion model (shared/seeds/002 files it under late fusion: AMIL + SNN + Kronecker product):

* paths: per-patch Linear(1024 -> 512) + ReLU + Dropout (after an optional input Dropout,
  ``dropinput``), gated attention (512 -> 256 -> 1), softmax over the N patches, attention-weighted
  sum, rho Linear(512 -> 256) + ReLU + Dropout                                   -> h_path (B, 256)
* genes: standardised vector through SNN(G -> 256) -> SNN(256 -> 256) (or MLP blocks) -> h_omic (B, 256)
* fusion: gated Kronecker product (:class:`.fusion.BilinearFusion`, scale_dim 8 -> 33 x 33) or
  ``concat``, then Linear(256 -> n_bins) discrete-hazard logits.

Missing genes (histosurv's addition, off by default): with ``modality_dropout > 0`` each patient's
gene embedding is zeroed with that probability in training (dropout-based robustness to a missing
modality, seeds/002), and at inference an all-NaN genes row (the runtime's "no genes" marker) gets
the same zero embedding, through ``torch.where`` in the graph so an exported model does the same. In
the bilinear fusion the genes' gated unit is zeroed too, so the Kronecker product keeps exactly the
path-only terms [o_path, 1]. With ``modality_dropout = 0`` genes stay required: an all-NaN row
propagates NaN, as does any row with some NaN values (those are never treated as absent).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ...kernels import routing
from .base import GeneScaler, SurvivalModel, check_attention_impl, genes_present
from .blocks import GatedAttention, patch_embedding, snn_block
from .checkpoints import ReferenceFormat
from .fusion import BilinearFusion, concat_fusion
from .survival_head import n_outputs

__all__ = ["PorpoiseConfig", "PorpoiseMMF"]

FUSIONS = ("bilinear", "concat")
PATH_HIDDEN, ATTENTION_HIDDEN, OMIC_HIDDEN = 512, 256, 256  # size_arg "small" (the only one that runs)


@dataclass(frozen=True)
class PorpoiseConfig:
    n_genes: int  # omic_input_dim
    feature_dim: int = 1024  # path_input_dim
    fusion: str = "bilinear"  # bilinear (gated Kronecker product) or concat
    dropout: float = 0.25
    scale_dim1: int = 8  # divides the path vector's 256 units before the Kronecker product (8: 32 units)
    scale_dim2: int = 8  # divides the gene vector's 256 units before the Kronecker product
    gate_path: bool = True  # gate the path vector by the genes in the bilinear fusion
    gate_omic: bool = True  # gate the gene vector by the path in the bilinear fusion
    skip: bool = True  # add the unimodal vectors back after the Kronecker product
    dropinput: float = 0.10  # dropout on the input features in training (the reference model's default; its CLI's is 0)
    use_mlp: bool = False  # MLP blocks (Linear, ReLU, Dropout) instead of SNN blocks for the genes
    modality_dropout: float = 0.0  # probability of zeroing a patient's gene embedding in training, so the model also serves without genes
    survival_head: str = "discrete"
    n_bins: int = 4

    def __post_init__(self):
        if self.n_genes < 1:
            raise ValueError(f"PORPOISE needs at least one gene, got n_genes = {self.n_genes}")
        if self.feature_dim < 1:
            raise ValueError(f"feature_dim must be positive, got {self.feature_dim}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r} (the reference's 'lrb' does not run)")
        for name in ("scale_dim1", "scale_dim2"):
            value = getattr(self, name)
            if not 1 <= value <= OMIC_HIDDEN:
                raise ValueError(f"{name} must be in [1, {OMIC_HIDDEN}] (256 // {name} units per modality), got {value}")
        for name in ("dropout", "dropinput", "modality_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        n_outputs(self.survival_head, self.n_bins)

    def to_dict(self) -> dict:
        return asdict(self)


class PorpoiseMMF(SurvivalModel):
    """Batched bags: features (B, N, D), genes (B, G) -> logits (B, K) [and attention (B, N)]."""

    REFERENCE = ReferenceFormat(
        repository="mahmoodlab/PORPOISE",
        commit="3390dc40e15995ba852d7a561faf0e996cf20501",
        model_class="PorpoiseMMF",
        # attention_net = [Dropout(dropinput)?, Linear, ReLU, Dropout, Attn_Net_Gated]: the Linear is
        # index 0 or 1 and the gated attention 3 or 4 depending on dropinput; the other index of each
        # pair holds no parameters, so both layouts map.
        renames=((r"^attention_net\.[01]\.", "patch_embedding.0."), (r"^attention_net\.[34]\.", "attention.")),
        not_saved=(),
        note="the reference keeps gene standardisation outside the model: the scaler stays the identity",
    )

    def __init__(self, cfg: PorpoiseConfig, attention_impl: str = "sdpa"):
        super().__init__()
        check_attention_impl(attention_impl)  # accepted for the zoo's interface; no SDPA here
        self.cfg = cfg
        self.genes = GeneScaler(cfg.n_genes)
        self.input_dropout = nn.Dropout(cfg.dropinput)  # identity in eval, no parameters
        self.patch_embedding = patch_embedding(cfg.feature_dim, PATH_HIDDEN, cfg.dropout)
        self.attention = GatedAttention(PATH_HIDDEN, ATTENTION_HIDDEN, cfg.dropout)
        self.rho = nn.Sequential(nn.Linear(PATH_HIDDEN, ATTENTION_HIDDEN), nn.ReLU(), nn.Dropout(cfg.dropout))
        # The reference's omic blocks use dropout 0.25 whatever `dropout` says.
        block = patch_embedding if cfg.use_mlp else snn_block
        self.fc_omic = nn.Sequential(block(cfg.n_genes, OMIC_HIDDEN, 0.25), block(OMIC_HIDDEN, OMIC_HIDDEN, 0.25))
        if cfg.fusion == "bilinear":
            self.mm = BilinearFusion(
                skip=cfg.skip, gate1=cfg.gate_path, gate2=cfg.gate_omic, dim1=ATTENTION_HIDDEN, dim2=OMIC_HIDDEN,
                scale_dim1=cfg.scale_dim1, scale_dim2=cfg.scale_dim2, mmhid=ATTENTION_HIDDEN, dropout_rate=0.25,
            )  # fmt: skip
        else:
            self.mm = concat_fusion(ATTENTION_HIDDEN, OMIC_HIDDEN, ATTENTION_HIDDEN)
        self.classifier_mm = nn.Linear(ATTENTION_HIDDEN, n_outputs(cfg.survival_head, cfg.n_bins))

    @property
    def optional_inputs(self) -> tuple[str, ...]:
        # Only a model trained with genes dropped may run without them.
        return ("genes",) if self.cfg.modality_dropout > 0 else ()

    def forward(self, features=None, coords=None, genes=None, return_attention: bool = False):
        h_path, weights = self.encode_path(features)
        h_omic, keep = self.encode_genes(genes)
        logits = self.classifier_mm(self.fuse(h_path, h_omic, keep))
        return (logits, weights) if return_attention else logits

    def encode_path(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, D) -> h_path (B, 256) and the attention softmax (B, N)."""
        h = self.patch_embedding(self.input_dropout(features))  # (B, N, 512)
        pooled, weights = routing.gated_pool(self.attention, h)  # (B, 512), (B, N)
        return self.rho(pooled), weights

    def encode_genes(self, genes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, G) raw -> h_omic (B, 256) and keep (B, 1) bool (None when genes are required)."""
        x = self.genes(genes)
        if not self.optional_inputs:
            return self.fc_omic(x), None
        keep = genes_present(genes)  # only all-NaN rows are absent
        x = torch.where(keep, x, 0.0)  # NOTE: NaN must not reach the SNN (0 * NaN = NaN)
        if self.training:
            dropped = torch.rand(keep.shape, device=x.device) < self.cfg.modality_dropout
            keep = keep & ~dropped
        return torch.where(keep, self.fc_omic(x), 0.0), keep

    def fuse(self, h_path: torch.Tensor, h_omic: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 256) x 2 -> (B, 256); ``keep`` (B, 1) marks patients whose genes are present."""
        if self.cfg.fusion == "bilinear":
            return self.mm(h_path, h_omic, keep2=keep)
        return self.mm(torch.cat([h_path, h_omic], dim=1))

    @staticmethod
    def config_from_reference(state: dict) -> dict:
        """The fields a reference ``PorpoiseMMF`` state_dict's shapes decide: n_genes, feature_dim,
        n_bins, fusion, scale_dim1/2 and skip; ``dropinput`` > 0 shows as a shifted layer index (its
        value does not: the class default 0.10 is assumed). Shapes cannot tell gate_path/gate_omic
        (the gate layers exist either way) nor use_mlp (same shapes as SNN blocks): give those."""
        shifted = "attention_net.1.weight" in state  # attention_net.0 is the input Dropout
        cfg = {
            "n_genes": state["fc_omic.0.0.weight"].shape[1],
            "feature_dim": state[f"attention_net.{int(shifted)}.weight"].shape[1],
            "n_bins": state["classifier_mm.weight"].shape[0],
            "dropinput": 0.10 if shifted else 0.0,
            "fusion": "bilinear" if "mm.encoder1.0.weight" in state else "concat",
        }
        if cfg["fusion"] == "bilinear":
            cfg["scale_dim1"] = OMIC_HIDDEN // state["mm.linear_h1.0.weight"].shape[0]
            cfg["scale_dim2"] = OMIC_HIDDEN // state["mm.linear_h2.0.weight"].shape[0]
            cfg["skip"] = state["mm.encoder2.0.weight"].shape[1] > 256
        return cfg
