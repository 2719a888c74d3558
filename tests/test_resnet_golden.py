"""The ResNet patch encoders (ResNet18, CLAM's ResNet50 cut after layer3) against torchvision's own models.

tests/golden/resnet.json was written by tests/golden/make_resnet.py with torchvision 0.29.1 (in a venv of
its own): the key layout each trunk must hold, and in eval mode the features of seeded normalised images
and of seeded uint8 patches through CLAM's eval transform (ToTensor, ImageNet Normalize), at weights
seeded from torchvision's key names (fc and layer4 included, as a published file holds them). Here
histosurv's plain-torch encoder loads the same file strictly and must give the same features.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from histosurv.export.models.encoders import ENCODERS, build_encoder
from histosurv.export.models.resnet import RESNETS
from .golden import load_golden
from .golden.make_resnet import seeded_images, seeded_resnet_state_dict

GOLDEN = load_golden("resnet")
NAMES = sorted(RESNETS)
TORCHVISION_NAME = {"resnet18": "resnet18", "resnet50_trunc": "resnet50"}
# every key of torchvision's resnet18 / resnet50, as a published ImageNet file holds them
TORCHVISION_KEYS = json.loads((Path(__file__).parent / "data" / "torchvision_resnet_keys.json").read_text())
RELATIVE = 1e-4


@pytest.fixture(scope="module", params=NAMES)
def loaded(request):
    name = request.param
    encoder = build_encoder(name)
    published = seeded_resnet_state_dict(TORCHVISION_KEYS[TORCHVISION_NAME[name]], GOLDEN["seed"])
    ENCODERS[name].load_weights(encoder, published, f"{name}.pth")
    return name, encoder


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def test_golden_covers_every_resnet_and_inputs_are_reproduced():
    assert set(GOLDEN["models"]) == set(RESNETS)
    _, patches = seeded_images(GOLDEN["batch"], GOLDEN["image_size"], GOLDEN["seed"])
    assert int(patches.long().sum()) == GOLDEN["patch_sum"]


@pytest.mark.parametrize("name", NAMES)
def test_layout_is_torchvisions(name):
    encoder = build_encoder(name)
    ours = {k: list(v.shape) for k, v in encoder.trunk.state_dict().items()}
    assert ours == GOLDEN["models"][name]["layout"]


def test_trunk_features_match_torchvision(loaded):
    name, encoder = loaded
    images, _ = seeded_images(GOLDEN["batch"], GOLDEN["image_size"], GOLDEN["seed"])
    assert not encoder.training and not any(m.training for m in encoder.modules())
    with torch.no_grad():
        got = encoder.trunk(images)
    want = torch.tensor(GOLDEN["models"][name]["features"])
    assert got.shape == want.shape == (GOLDEN["batch"], ENCODERS[name].feature_dim)
    assert relative_error(got, want) <= RELATIVE, relative_error(got, want)


def test_uint8_patches_end_to_end_match_clams_transform_and_torchvision(loaded):
    name, encoder = loaded
    _, patches = seeded_images(GOLDEN["batch"], GOLDEN["image_size"], GOLDEN["seed"])
    with torch.no_grad():
        got = encoder(patches)
    want = torch.tensor(GOLDEN["models"][name]["patch_features"])
    assert got.shape == want.shape
    assert relative_error(got, want) <= RELATIVE, relative_error(got, want)


def test_the_golden_features_are_eval_mode_batchnorm(loaded):
    """Batch statistics (train mode) would give other features: the match above is the running statistics."""
    name, encoder = loaded
    images, _ = seeded_images(GOLDEN["batch"], GOLDEN["image_size"], GOLDEN["seed"])
    want = torch.tensor(GOLDEN["models"][name]["features"])
    training = copy.deepcopy(encoder).train()  # a copy: train mode updates the running statistics
    with torch.no_grad():
        got = training.trunk(images)
    assert relative_error(got, want) > 1e-2
