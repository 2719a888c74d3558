"""SNN: a self-normalising network over gene expression only (Klambauer et al. 2017).

As implemented in ``mahmoodlab/MCAT`` ``models/model_genomic.py`` (``SNN``, the genomics-only
baseline): four SNN blocks (Linear -> ELU -> AlphaDropout 0.25) to 256 ('small': 256, 256, 256, 256;
'big': 1024, 1024, 1024, 256), then Linear -> K logits.

The reference class does not run as written (it calls ``super(MaxNet, self).__init__()`` and the
training code passes ``omic_input_dim`` to a constructor that takes ``input_dim``); its layout is
clear, and this is it. Besides the reference's discrete-time head (4 logits), ``survival_head="cox"``
gives one log-hazard logit for training with a Cox loss.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .base import GeneScaler, SurvivalModel, check_attention_impl, check_genes
from .blocks import snn_block
from .checkpoints import ReferenceFormat, strip_module_prefix
from .mcat import MCAT_COMMIT
from .survival_head import n_outputs

__all__ = ["SNNConfig", "SNN"]


@dataclass(frozen=True)
class SNNConfig:
    n_genes: int
    feature_dim: int = 1024  # not read: SNN is genes only
    hidden: tuple[int, ...] = (256, 256, 256, 256)  # widths of the SNN layers (the reference's 'big': 1024,1024,1024,256)
    dropout: float = 0.25
    survival_head: str = "discrete"
    n_bins: int = 4

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if self.n_genes < 1:
            raise ValueError(f"SNN reads gene expression: n_genes must be at least 1, got {self.n_genes}")
        if not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"hidden must list at least one positive width, got {self.hidden}")
        n_outputs(self.survival_head, self.n_bins)

    def to_dict(self) -> dict:
        return asdict(self)


class SNN(SurvivalModel):
    """Batched genes (B, G) raw values -> logits (B, K); patch features are not read."""

    uses_image = False
    REFERENCE = ReferenceFormat(
        repository="mahmoodlab/MCAT",
        commit=MCAT_COMMIT,
        model_class="models.model_genomic.SNN",
        note="same key names as the reference SNN (fc_omic.*, classifier.*)",
    )

    def __init__(self, cfg: SNNConfig, attention_impl: str = "sdpa"):
        super().__init__()
        check_attention_impl(attention_impl)  # no attention here; accepted for the zoo contract
        self.cfg = cfg
        self.genes = GeneScaler(cfg.n_genes)
        widths = (cfg.n_genes,) + cfg.hidden
        self.fc_omic = nn.Sequential(*(snn_block(a, b, cfg.dropout) for a, b in zip(widths[:-1], widths[1:])))
        self.classifier = nn.Linear(cfg.hidden[-1], n_outputs(cfg.survival_head, cfg.n_bins))
        self._init_weights()

    def _init_weights(self) -> None:
        """LeCun normal weights and zero biases, what self-normalising units assume (``init_max_weights``)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, m.weight.shape[1] ** -0.5)
                nn.init.zeros_(m.bias)

    def forward(self, features=None, coords=None, genes=None, return_attention: bool = False) -> torch.Tensor:
        # return_attention is ignored: there are no patches to attend to
        check_genes(genes, self.cfg.n_genes, "SNN")
        return self.classifier(self.fc_omic(self.genes(genes)))

    @staticmethod
    def config_from_reference(state: dict) -> dict:
        """n_genes, hidden and n_bins from a reference ``SNN`` state_dict."""
        state = strip_module_prefix(state)
        blocks = sorted({int(k.split(".")[1]) for k in state if k.startswith("fc_omic.")})
        classifier = state["classifier.weight"]
        head = dict(survival_head="cox") if classifier.shape[0] == 1 else dict(n_bins=classifier.shape[0])
        return dict(
            n_genes=state["fc_omic.0.0.weight"].shape[1],
            hidden=tuple(state[f"fc_omic.{i}.0.weight"].shape[0] for i in blocks),
            **head,
        )
