"""ABMIL: gated attention-based MIL for survival (Ilse et al. 2018), image only.

As implemented in ``mahmoodlab/MCAT`` ``models/model_set_mil.py`` (``MIL_Attention_FC_surv`` with
``fusion=None``, the "AMIL" baseline): Linear(D -> 512) + ReLU + Dropout per patch, gated attention
(512 -> 256 -> 1), softmax over the N patches, attention-weighted sum, rho Linear(512 -> 256) + ReLU +
Dropout, classifier -> K logits.

The model reads patch features only (``input_names == ("features",)``): it runs without genes, and
any genes passed are ignored. ``n_genes`` stays in the config for the zoo contract (default 0).
``return_attention`` gives the softmax weights over the patches, (B, N).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from ...errors import InputError
from ...kernels import routing
from .base import SurvivalModel, check_attention_impl, check_features
from .blocks import GatedAttention, patch_embedding
from .checkpoints import ReferenceFormat, strip_module_prefix
from .mcat import MCAT_COMMIT
from .survival_head import n_outputs

__all__ = ["ABMILConfig", "ABMIL"]


@dataclass(frozen=True)
class ABMILConfig:
    n_genes: int = 0  # not read: ABMIL is image only
    feature_dim: int = 1024
    hidden_dim: int = 512  # width of the patch embedding (the reference's size_dict_path[size_arg][1])
    attention_dim: int = 256  # hidden width of the gated attention (the reference's 'small'; 'big' is 384)
    dropout: float = 0.25
    survival_head: str = "discrete"
    n_bins: int = 4

    def __post_init__(self):
        if self.n_genes < 0:
            raise ValueError(f"n_genes must be >= 0, got {self.n_genes}")
        for name in ("feature_dim", "hidden_dim", "attention_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        n_outputs(self.survival_head, self.n_bins)

    def to_dict(self) -> dict:
        return asdict(self)


class ABMIL(SurvivalModel):
    """Batched bags: features (B, N, D) -> logits (B, K); genes are not read."""

    uses_genes = False
    REFERENCE = ReferenceFormat(
        repository="mahmoodlab/MCAT",
        commit=MCAT_COMMIT,
        model_class="models.model_set_mil.MIL_Attention_FC_surv",
        # the reference chains fc and the gated attention in one nn.Sequential named attention_net
        renames=((r"^attention_net\.3\.", "attention."), (r"^attention_net\.", "fc.")),
        note="MIL_Attention_FC_surv(fusion=None), the image-only AMIL baseline",
    )

    def __init__(self, cfg: ABMILConfig, attention_impl: str = "sdpa"):
        super().__init__()
        check_attention_impl(attention_impl)  # no dot-product attention here; accepted for the zoo contract
        self.cfg = cfg
        self.genes = None
        self.fc = patch_embedding(cfg.feature_dim, cfg.hidden_dim, cfg.dropout)
        self.attention = GatedAttention(cfg.hidden_dim, cfg.attention_dim, cfg.dropout)
        self.rho = nn.Sequential(nn.Linear(cfg.hidden_dim, cfg.attention_dim), nn.ReLU(), nn.Dropout(cfg.dropout))
        self.classifier = nn.Linear(cfg.attention_dim, n_outputs(cfg.survival_head, cfg.n_bins))

    def forward(self, features=None, coords=None, genes=None, return_attention: bool = False):
        check_features(features, self.cfg.feature_dim, "ABMIL")
        h = self.fc(features)  # (B, N, L)
        pooled, weights = routing.gated_pool(self.attention, h)  # (B, L), (B, N)
        logits = self.classifier(self.rho(pooled))
        return (logits, weights) if return_attention else logits

    @staticmethod
    def config_from_reference(state: dict) -> dict:
        """feature_dim, hidden_dim, attention_dim and n_bins from a ``MIL_Attention_FC_surv`` state_dict."""
        state = strip_module_prefix(state)
        if any(k.startswith(("fc_omic.", "mm.")) for k in state):
            raise InputError(
                "this MIL_Attention_FC_surv checkpoint has a genomic branch (fusion='concat' or 'bilinear'); "
                "histosurv's abmil is the image-only model (fusion=None)"
            )
        fc = state["attention_net.0.weight"]
        return dict(
            feature_dim=fc.shape[1],
            hidden_dim=fc.shape[0],
            attention_dim=state["rho.0.weight"].shape[0],
            n_bins=state["classifier.weight"].shape[0],
        )
