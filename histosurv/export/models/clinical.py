"""Clinical covariates by late fusion: any zoo model's logits plus a linear term in the covariates.

The lecture in ``shared/seeds/002`` puts simple covariates in at the end, and that is what this is:
``logits = model(features, coords, genes) + w . encode(clinical) + b``, the same shift added to every
logit (a Cox head's log-hazard, or every time bin's hazard logit of a discrete head, which moves the
whole hazard curve up or down together). The encoding lives in the graph, as buffers: numeric values are
standardised with the training patients' mean and scale, categorical codes are one-hot encoded, and NaN
(missing) contributes nothing (the mean of a numeric covariate, no category of a categorical one). See
:mod:`histosurv.data.covariates` for the wire format.

The term is zero at initialisation, so a model trained with covariates starts where the same model
without them starts, and :func:`training` gives its parameters their own learning rate: with the deep
models' 2e-4 and ~100 AdamW steps a coefficient can move by about 0.02, far short of a stage's log-hazard
ratio of 0.5 or more.
"""

from __future__ import annotations

import torch
from torch import nn

from ...data.covariates import ClinicalSpec

__all__ = ["ClinicalEncoder", "WithClinical", "with_clinical", "base_model", "clinical_spec_of"]


class ClinicalEncoder(nn.Module):
    """(B, C) wire values -> (B, E) encoded: z-scores for numeric covariates, one-hot for categorical ones."""

    def __init__(self, spec: ClinicalSpec):
        super().__init__()
        num = [(j, c) for j, c in enumerate(spec.covariates) if c.kind == "numeric"]
        slots = [(j, k) for j, c in enumerate(spec.covariates) if c.kind == "categorical" for k in range(len(c.categories))]
        self.register_buffer("numeric_index", torch.tensor([j for j, _ in num], dtype=torch.long))
        self.register_buffer("numeric_mean", torch.tensor([c.mean for _, c in num], dtype=torch.float32))
        self.register_buffer("numeric_scale", torch.tensor([c.scale for _, c in num], dtype=torch.float32))
        self.register_buffer("category_index", torch.tensor([j for j, _ in slots], dtype=torch.long))
        self.register_buffer("category_code", torch.tensor([float(k) for _, k in slots], dtype=torch.float32))
        self.width = len(num) + len(slots)

    def forward(self, clinical: torch.Tensor) -> torch.Tensor:
        parts = []
        if self.numeric_index.numel():
            x = clinical.index_select(1, self.numeric_index)
            z = (x - self.numeric_mean) / self.numeric_scale
            parts.append(torch.where(torch.isnan(z), torch.zeros_like(z), z))
        if self.category_index.numel():
            codes = clinical.index_select(1, self.category_index)
            parts.append((codes == self.category_code).to(clinical.dtype))  # NaN equals no code
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class WithClinical(nn.Module):
    """A zoo model (``base``) with a late-fused linear term in clinical covariates.

    It presents the zoo contract of :mod:`.base` (``cfg``, ``input_names``, ``optional_inputs``,
    ``attention_ops``, ``genes``, ...) by delegating to ``base``, with ``clinical`` added to the inputs;
    the covariates are optional at inference (all NaN: the term is its bias alone)."""

    def __init__(self, base: nn.Module, spec: ClinicalSpec):
        super().__init__()
        self.base = base
        self.spec = spec
        self.clinical = ClinicalEncoder(spec)
        self.clinical_head = nn.Linear(self.clinical.width, 1)
        nn.init.zeros_(self.clinical_head.weight)
        nn.init.zeros_(self.clinical_head.bias)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base"], name)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(self.base.input_names) + ("clinical",)

    @property
    def optional_inputs(self) -> tuple[str, ...]:
        return tuple(getattr(self.base, "optional_inputs", ())) + ("clinical",)

    def set_gene_scaler(self, mean: torch.Tensor, scale: torch.Tensor) -> None:
        self.base.set_gene_scaler(mean, scale)

    def clinical_term(self, clinical: torch.Tensor) -> torch.Tensor:
        """(B, C) wire values -> (B, 1) shift of every logit."""
        return self.clinical_head(self.clinical(clinical))

    def forward(self, features=None, coords=None, genes=None, clinical=None, return_attention: bool = False):
        out = self.base(features=features, coords=coords, genes=genes, return_attention=return_attention)
        logits, attention = out if isinstance(out, tuple) else (out, None)
        if clinical is not None:
            logits = logits + self.clinical_term(clinical)
        return (logits, attention) if attention is not None else logits

    def risk(self, features=None, coords=None, genes=None, clinical=None) -> torch.Tensor:
        from .survival_head import risk_from_logits

        return risk_from_logits(self(features, coords, genes, clinical), self.cfg.survival_head)


def with_clinical(model: nn.Module, spec: ClinicalSpec | None) -> nn.Module:
    return model if spec is None else WithClinical(model, spec)


def base_model(model: nn.Module) -> nn.Module:
    return model.base if isinstance(model, WithClinical) else model


def clinical_spec_of(model: nn.Module) -> ClinicalSpec | None:
    return model.spec if isinstance(model, WithClinical) else None
