"""Patch-encoder families, registered by name: how each is built, which weights it loads, and the
record (:class:`~histosurv.data.encoder_record.EncoderRecord`) every export of it carries.

A family is one entry of ``ENCODERS``. Its network takes what a slide reader returns, uint8 patches
(B, H, W, 3), and does its own preprocessing (resize, crop, normalisation) inside the graph, so every
engine takes raw patches and no client can forget or repeat a step. ``histosurv export --encoder NAME``
exports any entry; adding an encoder family is adding an entry (see docs/adding-a-model.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ...data.encoder_record import IMAGENET_MEAN, IMAGENET_STD, EncoderRecord, Preprocessing, WeightsIdentity
from ...errors import InputError
from .resnet import RESNETS, build_resnet, load_torchvision_state_dict

__all__ = ["EncoderFamily", "ENCODERS", "family", "build_encoder"]


@dataclass(frozen=True)
class EncoderFamily:
    name: str
    summary: str
    feature_dim: int
    feature: str  # which output is the feature, e.g. "pooled" (global average pool) or "cls"
    mpp: float  # µm per pixel of the patches it is meant to see
    patch_size: int  # default side of a patch as cut from the slide, px
    preprocessing: Preprocessing  # what the graph does to a cut patch before the network
    build: Callable[[], nn.Module]  # uint8 (B, H, W, 3) -> features (B, D); weights from torch's RNG
    load_weights: Callable[[nn.Module, dict, str], None]  # strict loader of the published checkpoint
    weights_of: Callable[[nn.Module], dict]  # what the version's reference file stores (published keys)
    weights_format: str  # what load_weights accepts, for messages and the manifest
    any_patch_size: bool = False  # a CNN with global pooling takes any side >= min_patch_size
    min_patch_size: int = 32

    def record(self, patch_size: int, mpp: float, weights: WeightsIdentity) -> EncoderRecord:
        input_size = self.preprocessing.crop or self.preprocessing.resize or patch_size
        return EncoderRecord(
            architecture=self.name,
            feature_dim=self.feature_dim,
            patch_size=patch_size,
            mpp=mpp,
            input_size=input_size,
            preprocessing=self.preprocessing,
            feature=self.feature,
            weights=weights,
        )

    def check_patch_size(self, patch_size: int) -> None:
        if self.any_patch_size and patch_size >= self.min_patch_size:
            return
        if not self.any_patch_size and patch_size == self.patch_size:
            return
        allowed = f"at least {self.min_patch_size} px" if self.any_patch_size else f"{self.patch_size} px only"
        raise InputError(f"encoder {self.name} takes patches of {allowed}, not {patch_size}")


def _resnet(name: str, summary: str) -> EncoderFamily:
    return EncoderFamily(
        name=name,
        summary=summary,
        feature_dim=RESNETS[name].feature_dim,
        feature="pooled",
        mpp=0.5,
        patch_size=256,
        preprocessing=Preprocessing(mean=IMAGENET_MEAN, std=IMAGENET_STD),  # fed as cut, as CLAM's 256 px patches
        build=lambda: build_resnet(name),
        load_weights=load_torchvision_state_dict,
        weights_of=lambda model: model.trunk.state_dict(),
        weights_format="torchvision state_dict (fc. and unused stages dropped)",
        any_patch_size=True,
    )


ENCODERS: dict[str, EncoderFamily] = {
    "resnet18": _resnet("resnet18", "torchvision ResNet18, average-pooled layer4 (AMMASurv's backbone), 512-d"),
    "resnet50_trunc": _resnet(
        "resnet50_trunc", "torchvision ResNet50 cut after layer3, average-pooled (CLAM's features), 1024-d"
    ),
}


def family(name: str) -> EncoderFamily:
    try:
        return ENCODERS[name]
    except KeyError:
        raise InputError(f"unknown patch encoder {name!r}; known: {', '.join(sorted(ENCODERS))}") from None


def build_encoder(name: str, seed: int = 0) -> nn.Module:
    """Family ``name``'s network with its initialisation drawn from ``seed``, in eval mode."""
    spec = family(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return spec.build().eval()
