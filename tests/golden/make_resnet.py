"""Writes tests/golden/resnet.json from torchvision's own ResNets, as AMMASurv and CLAM build them.

    PYTHONPATH=. /tmp/timmvenv/bin/python tests/golden/make_resnet.py

(torch 2.14.1 and torchvision 0.29.1 in a venv of their own, see make_vit.py: torchvision does not
import beside the project's CPU torch; histosurv itself is not imported here.)

- ``resnet18``: ``torchvision.models.resnet18(weights=None)`` without ``fc``: average-pooled layer4, 512-d.
- ``resnet50_trunc``: CLAM's ``resnet50_baseline`` (mahmoodlab/CLAM models/resnet_custom.py): torchvision's
  ResNet50 stem, layer1..layer3 (its ``Bottleneck_Baseline`` is torchvision's bottleneck, stride on the
  3x3 conv), then ``AdaptiveAvgPool2d(1)`` and a flatten; layer4 and fc are not built, and CLAM loads
  torchvision's ImageNet file into it with ``strict=False`` so those keys are dropped. The same network
  as CLAM's later ``TimmCNNEncoder('resnet50.tv_in1k', features_only, out_indices=(3,))`` + pooling.
  Here it is run as torchvision's ``resnet50`` cut after layer3, the weights loaded (strictly) under
  torchvision's key names.

For each: the key layout (every key of the state_dict histosurv's trunk must hold, BatchNorm's
``num_batches_tracked`` included), and in eval mode (BatchNorm's running statistics) the features of
(a) seeded normalised float images through the trunk, (b) seeded uint8 HWC patches through CLAM's own
eval transform (``ToTensor()`` = /255 to CHW, then ``Normalize`` with ImageNet mean/std), per patch.
Weights come from :func:`seeded_resnet_state_dict` (key-name seeded, BatchNorm statistics made
sensible), which the tests call too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.golden import HERE, seeded_tensor  # noqa: E402

SEED = 0
BATCH = 2
IMAGE_SIZE = 64  # any side works for a globally pooled CNN; small keeps the file and the tests light
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def seeded_resnet_state_dict(layout: dict[str, list[int]], seed: int = SEED) -> dict[str, torch.Tensor]:
    """Weights for a torchvision-layout ResNet, drawn from the key names (tests.golden.seeded_tensor),
    with BatchNorm as a trained network has it: gains near one, running variances positive and not
    one, running means not zero (so eval-mode BatchNorm is what the features show)."""
    out = {}
    for key, shape in layout.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(1000, dtype=torch.long)
            continue
        t = seeded_tensor(key, shape, seed)  # 1-d: 0.1 * N(0, 1)
        if key.endswith("running_var"):
            t = 0.5 + 10.0 * t.abs()  # 0.5 + |N(0, 1)|: 0.5 .. ~3.5
        elif len(shape) == 1 and key.endswith("weight"):  # BatchNorm gain
            t = 1.0 + t
        out[key] = t
    return out


def seeded_images(batch: int = BATCH, size: int = IMAGE_SIZE, seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised float images (B, 3, S, S), uint8 patches (B, S, S, 3) as a slide reader returns them)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g)
    patches = torch.randint(0, 256, (batch, size, size, 3), generator=g, dtype=torch.uint8)
    return images, patches


def _models():
    import torch.nn as nn
    import torchvision

    r18 = torchvision.models.resnet18(weights=None)
    r50 = torchvision.models.resnet50(weights=None)

    def trunk18(x):
        return torch.flatten(nn.Sequential(*list(r18.children())[:-1])(x), 1)

    def trunk50(x):  # CLAM's resnet50_baseline forward: conv1 bn1 relu maxpool layer1-3, avgpool, view
        m = r50
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        x = m.layer3(m.layer2(m.layer1(x)))
        return nn.AdaptiveAvgPool2d(1)(x).view(x.size(0), -1)

    return {"resnet18": (r18, trunk18, ("fc.",)), "resnet50_trunc": (r50, trunk50, ("layer4.", "fc."))}


def main() -> None:
    import torchvision
    from torchvision import transforms

    clam_eval = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    images, patches = seeded_images()
    out = {
        "torch": torch.__version__, "torchvision": torchvision.__version__, "seed": SEED, "batch": BATCH,
        "image_size": IMAGE_SIZE, "patch_sum": int(patches.long().sum()), "models": {},
    }
    for name, (model, trunk, dropped) in _models().items():
        full = {k: list(v.shape) for k, v in model.state_dict().items()}
        model.load_state_dict(seeded_resnet_state_dict(full), strict=True)  # fc (and layer4) too, as published
        model.eval()
        layout = {k: s for k, s in full.items() if not k.startswith(dropped)}
        with torch.no_grad():
            feats = trunk(images)
            normalised = torch.stack([clam_eval(p.numpy()) for p in patches])
            e2e = trunk(normalised)
        out["models"][name] = {
            "layout": layout,
            "features": [[float(f"{v:.9g}") for v in row] for row in feats.tolist()],
            "patch_features": [[float(f"{v:.9g}") for v in row] for row in e2e.tolist()],
        }
        print(f"{name}: {len(layout)} keys, feature {tuple(feats.shape)}, |f| max {feats.abs().max():.3g}, "
              f"mean {feats.mean():.3g}; patches |f| max {e2e.abs().max():.3g}")
    (HERE / "resnet.json").write_text(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
