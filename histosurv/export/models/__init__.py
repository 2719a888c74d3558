"""The model zoo, registered by architecture name.

Every model takes batched bags as keyword tensors named as in DESIGN.md (``features`` (B, N, D),
``coords`` (B, N, 2), ``genes`` (B, G)), returns survival logits (B, K), lists the inputs it reads in
``input_names`` and takes an ``attention_impl`` build switch ("sdpa" or the reference "naive" form).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .ammasurv import AMMASurv, AMMASurvConfig
from .abmil import ABMIL, ABMILConfig
from .clinical import with_clinical
from .coxnet import CoxNet, CoxNetConfig
from .mcat import MCAT, MCATConfig
from .snn import SNN, SNNConfig
from .early_fusion import EarlyFusionConfig, EarlyFusionMIL
from .ghanet import GHANet, GHANetConfig
from .mome import MoMEConfig, MoMETransformer
from .porpoise import PorpoiseConfig, PorpoiseMMF
from .survival_head import risk_from_logits

__all__ = ["MODELS", "ModelSpec", "build_model", "config_from_dict", "risk_from_logits"]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config_cls: type
    model_cls: type[nn.Module]
    summary: str


MODELS: dict[str, ModelSpec] = {
    "mcat": ModelSpec("mcat", MCATConfig, MCAT, "multimodal co-attention transformer (ICCV 2021)"),
    "abmil": ModelSpec("abmil", ABMILConfig, ABMIL, "gated attention MIL, image only (MCAT's AMIL baseline)"),
    "snn": ModelSpec("snn", SNNConfig, SNN, "self-normalising network, genes only (MCAT's SNN baseline)"),
    "porpoise": ModelSpec("porpoise", PorpoiseConfig, PorpoiseMMF, "AMIL + SNN, gated Kronecker fusion (Cancer Cell 2022)"),
    "early_fusion": ModelSpec("early_fusion", EarlyFusionConfig, EarlyFusionMIL, "gated-attention MIL over [patch; genes] instances"),
    "mome": ModelSpec("mome", MoMEConfig, MoMETransformer, "mixture of multimodal experts (MICCAI 2024)"),
    "ammasurv": ModelSpec(
        "ammasurv", AMMASurvConfig, AMMASurv, "asymmetric multi-modal attention transformer (BIBM 2021)"
    ),
    "ghanet": ModelSpec(
        "ghanet", GHANetConfig, GHANet, "genome-informed hyper-attention network, WSI-only inference (TMI 2025)"
    ),
    "coxnet": ModelSpec("coxnet", CoxNetConfig, CoxNet, "elastic-net Cox on mean-pooled features and genes (linear baseline)"),
}


def _spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; available: {', '.join(sorted(MODELS))}") from None


def config_from_dict(name: str, values: dict[str, Any]):
    spec = _spec(name)
    fields = spec.config_cls.__dataclass_fields__
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{name}: unknown configuration fields {unknown}")
    return spec.config_cls(**values)


def build_model(name: str, config, attention_impl: str = "sdpa", clinical=None) -> nn.Module:
    """Builds architecture ``name`` from a config object or a dict of its fields; with ``clinical`` (a
    :class:`~histosurv.data.covariates.ClinicalSpec` or its JSON dict) the model takes clinical
    covariates too (:class:`.clinical.WithClinical`)."""
    spec = _spec(name)
    if isinstance(config, dict):
        config = config_from_dict(name, config)
    model = spec.model_cls(config, attention_impl=attention_impl)
    if clinical is None:
        return model
    if isinstance(clinical, dict):
        from ...data.covariates import ClinicalSpec
        from ...data.typed_json import from_json_dict

        clinical = from_json_dict(ClinicalSpec, clinical, "clinical")
    return with_clinical(model, clinical)
