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
from .survival_head import risk_from_logits

__all__ = ["MODELS", "ModelSpec", "build_model", "config_from_dict", "risk_from_logits"]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config_cls: type
    model_cls: type[nn.Module]
    summary: str


MODELS: dict[str, ModelSpec] = {
    "ammasurv": ModelSpec(
        "ammasurv", AMMASurvConfig, AMMASurv, "asymmetric multi-modal attention transformer (BIBM 2021)"
    ),
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


def build_model(name: str, config, attention_impl: str = "sdpa") -> nn.Module:
    """Builds architecture ``name`` from a config object or a dict of its fields."""
    spec = _spec(name)
    if isinstance(config, dict):
        config = config_from_dict(name, config)
    return spec.model_cls(config, attention_impl=attention_impl)
