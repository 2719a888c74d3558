"""Patch encoders: ResNet18 (512-d) and ResNet50 truncated after layer3 (1024-d), in plain torch.

Their ``state_dict`` keys are torchvision's (``conv1.weight``, ``layer1.0.bn1.running_mean``,
``layer2.0.downsample.0.weight``, ...), so published ImageNet weights, and CLAM's ``resnet50_trunc``
(torchvision's ResNet50 without layer4 and fc, the features most MIL survival models were trained on),
load unchanged. torchvision itself is not a dependency: its wheels do not import beside every torch
build, and an encoder needs only the trunk.

``PatchEncoder`` takes what a slide reader returns, uint8 (B, H, W, 3), and does the ImageNet
normalisation inside the graph, so every engine (ONNX Runtime, TensorRT, Triton) takes raw patches
and no client can forget or repeat the normalisation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ...data.encoder_record import IMAGENET_MEAN, IMAGENET_STD
from ...errors import InputError, MissingInputError
from .encoder_weights import load_strictly, unwrap

__all__ = ["RESNETS", "ResNetSpec", "PatchEncoder", "build_resnet", "load_torchvision_state_dict", "read_weights_file"]



class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        # stride on the 3x3 conv (torchvision's "ResNet v1.5"), which its published weights assume
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNetTrunk(nn.Module):
    """torchvision's ResNet up to ``stages`` residual stages, then global average pooling."""

    def __init__(self, block: type, layers: tuple[int, ...]):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        for i, blocks in enumerate(layers):
            setattr(self, f"layer{i + 1}", self._stage(block, 64 * 2**i, blocks, stride=1 if i == 0 else 2))
        self.stages = len(layers)
        self.out_dim = 64 * 2 ** (len(layers) - 1) * block.expansion
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self._init_weights()

    def _stage(self, block: type, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        # torchvision's scheme, so an encoder built without weights behaves like an untrained torchvision one
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return torch.flatten(self.avgpool(x), 1)


class PatchEncoder(nn.Module):
    """uint8 patches (B, H, W, 3) -> features (B, D), ImageNet normalisation included."""

    def __init__(self, trunk: ResNetTrunk, name: str):
        super().__init__()
        self.trunk, self.name = trunk, name
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0, persistent=False)

    @property
    def feature_dim(self) -> int:
        return self.trunk.out_dim

    def normalise(self, patches: torch.Tensor) -> torch.Tensor:
        x = patches.permute(0, 3, 1, 2).to(self.mean.dtype)
        return (x - self.mean) / self.std

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.normalise(patches))


@dataclass(frozen=True)
class ResNetSpec:
    build: Callable[[], ResNetTrunk]
    feature_dim: int
    dropped: tuple[str, ...]  # torchvision state_dict prefixes the encoder does not use
    description: str


RESNETS: dict[str, ResNetSpec] = {
    "resnet18": ResNetSpec(
        lambda: ResNetTrunk(BasicBlock, (2, 2, 2, 2)), 512, ("fc.",), "torchvision ResNet18, average-pooled layer4"
    ),
    "resnet50_trunc": ResNetSpec(
        lambda: ResNetTrunk(Bottleneck, (3, 4, 6)),
        1024,
        ("layer4.", "fc."),
        "torchvision ResNet50 truncated after layer3, average-pooled (CLAM's features)",
    ),
}


def build_resnet(name: str) -> PatchEncoder:
    """The named ResNet encoder with torchvision's initialisation (from torch's current RNG state)."""
    return PatchEncoder(RESNETS[name].build(), name).eval()


def load_torchvision_state_dict(encoder: PatchEncoder, state_dict: dict, source: str = "state_dict") -> None:
    """Loads torchvision ResNet weights into ``encoder``, strictly (see encoder_weights.py): the usual
    wrappers and DataParallel's ``module.`` are removed, and the prefixes the encoder does not use
    (``fc.``, and ``layer4.`` for the truncated ResNet50) dropped; any other missing or unexpected key,
    or a shape that differs, is an error naming the keys."""
    state_dict = unwrap(state_dict, source)
    dropped = RESNETS[encoder.name].dropped
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(dropped)}
    load_strictly(encoder.trunk, state_dict, source, f"torchvision {encoder.name} weights")


def read_weights_file(path: str | os.PathLike) -> dict:
    """The tensors of a .pth/.pt (read with ``weights_only``: a pickle that would run code is refused)
    or .safetensors checkpoint, for an encoder family's strict loader."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: encoder weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state_dict = load_file(str(path))
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise InputError(f"{path}: not a readable weights file ({type(e).__name__}: {e})") from e
    if not isinstance(state_dict, dict):
        raise InputError(f"{path}: holds a {type(state_dict).__name__}, not a state_dict")
    return state_dict
