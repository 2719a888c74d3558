"""Writes tests/golden/vit.json from timm's own VisionTransformer, as each foundation model builds it.

    python3 -m venv /tmp/timmvenv && /tmp/timmvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm==1.0.31 safetensors
    PYTHONPATH=. /tmp/timmvenv/bin/python tests/golden/make_vit.py

(timm imports torchvision, which does not import beside the CPU torch the project installs, so this
runs in a venv of its own; histosurv itself is not imported here.)

For each encoder: the timm model as its authors create it (arguments from their model cards and
TRIDENT's loaders, see ../shared/research/encoders.md), once at full size on the meta device, for the
key names and shapes a published checkpoint has, and once with 2 blocks at seeded weights
(tests/golden's seeded_state_dict, from key names), run on seeded images: its features are what
histosurv's plain-torch ViT must give with the same weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import timm
import torch
from timm.layers import SwiGLUPacked

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.golden import HERE, seeded_state_dict, shapes_of  # noqa: E402

SWIGLU = dict(mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU)
# name -> (timm architecture, keyword arguments as the authors pass them, feature rule)
MODELS = {
    "uni": ("vit_large_patch16_224", dict(img_size=224, init_values=1e-5, num_classes=0), "cls"),
    "uni2_h": ("vit_giant_patch14_224", dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5,
                                             embed_dim=1536, mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True,
                                             reg_tokens=8, **SWIGLU), "cls"),
    "virchow2": ("vit_huge_patch14_224", dict(img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375,
                                              global_pool="", reg_tokens=4, **SWIGLU), "cls+mean"),
    "h_optimus_0": ("vit_giant_patch14_reg4_dinov2", dict(img_size=224, init_values=1e-5, num_classes=0), "cls"),
    "gigapath": ("vit_giant_patch14_dinov2", dict(img_size=224, patch_size=16, embed_dim=1536, depth=40, num_heads=24,
                                                  init_values=1e-5, mlp_ratio=5.33334, num_classes=0), "cls"),
}
GOLDEN_DEPTH = 2
BATCH = 2
SEED = 0


def features(model, images: torch.Tensor, rule: str) -> torch.Tensor:
    tokens = model.forward_features(images)
    if rule == "cls+mean":
        return torch.cat([tokens[:, 0], tokens[:, model.num_prefix_tokens:].mean(dim=1)], dim=-1)
    return tokens[:, 0]


def main() -> None:
    out = {"timm": timm.__version__, "torch": torch.__version__, "depth": GOLDEN_DEPTH, "seed": SEED, "models": {}}
    for name, (arch, kwargs, rule) in MODELS.items():
        with torch.device("meta"):
            full = timm.create_model(arch, pretrained=False, **kwargs)
        small = timm.create_model(arch, pretrained=False, **{**kwargs, "depth": GOLDEN_DEPTH}).eval()
        shapes = shapes_of(small.state_dict())
        small.load_state_dict(seeded_state_dict(shapes, SEED), strict=True)
        size = small.patch_embed.img_size[0]
        g = torch.Generator().manual_seed(SEED)
        images = torch.randn(BATCH, 3, size, size, generator=g)
        with torch.no_grad():
            feats = features(small, images, rule)
        out["models"][name] = {
            "arch": arch,
            "kwargs": {k: v if isinstance(v, (int, float, str, bool)) else getattr(v, "__name__", "SwiGLUPacked")
                       for k, v in kwargs.items()},
            "feature": rule,
            "layout": {k: list(v.shape) for k, v in full.state_dict().items()},
            "image_size": size,
            "features": feats.tolist(),
        }
        print(f"{name}: {arch}, {sum(v.numel() for v in full.state_dict().values()) / 1e6:.0f} M parameters, "
              f"feature {tuple(feats.shape)}")
    (HERE / "vit.json").write_text(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
