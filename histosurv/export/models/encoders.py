"""Patch-encoder families, registered by name: how each is built, which weights it loads, and the
record (:class:`~histosurv.data.encoder_record.EncoderRecord`) every export of it carries.

A family is one entry of ``ENCODERS``. Its network takes what a slide reader returns, uint8 patches
(B, H, W, 3), and does its own preprocessing (resize, crop, normalisation) inside the graph, so every
engine takes raw patches and no client can forget or repeat a step. ``histosurv export --encoder NAME``
exports any entry; adding an encoder family is adding an entry (see docs/adding-a-model.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from ...data.encoder_record import IMAGENET_MEAN, IMAGENET_STD, EncoderRecord, Preprocessing, WeightsIdentity
from ...errors import InputError
from .resnet import RESNETS, build_resnet, load_torchvision_state_dict
from .swin import CTRANSPATH, build_ctranspath, load_ctranspath_state_dict
from .vit import PatchPreprocess, ViTConfig, ViTEncoder
from .vit_layouts import HF_DINOV2, HF_VIT, TIMM, TRIDENT_CONCH, Layout, load_published

__all__ = ["EncoderFamily", "ENCODERS", "VITS", "LAYOUTS", "family", "build_encoder", "build_vit"]


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


H_OPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)  # Bioptimus' own statistics (model card)
H_OPTIMUS_STD = (0.211883, 0.230117, 0.177517)
SWIGLU = dict(mlp="swiglu", init_values=1e-5)

# name -> (architecture, patch side cut from the slide at 0.5 µm/px, preprocessing, summary), as each
# model's authors build it (timm arguments in tests/golden/make_vit.py; sources in shared/research)
VITS: dict[str, tuple[ViTConfig, int, Preprocessing, str]] = {
    "uni": (
        ViTConfig(patch_size=16, dim=1024, depth=24, heads=16, mlp_hidden=4096),
        256, Preprocessing(224, "bilinear-antialias", 224),
        "UNI (Mahmood lab), ViT-L/16 with layer scale; 256 px patches resized to 224; CLS, 1024-d",
    ),
    "uni2_h": (
        ViTConfig(patch_size=14, dim=1536, depth=24, heads=24, mlp_hidden=8192, reg_tokens=8, no_embed_class=True, **SWIGLU),
        256, Preprocessing(224, "bilinear-antialias", 224),
        "UNI2-h (Mahmood lab), ViT-H-class /14, 8 registers, SwiGLU; 256 px patches resized to 224; CLS, 1536-d",
    ),
    "virchow2": (
        ViTConfig(patch_size=14, dim=1280, depth=32, heads=16, mlp_hidden=6832, reg_tokens=4, feature="cls+mean", **SWIGLU),
        224, Preprocessing(),
        "Virchow2 (Paige), ViT-H/14, 4 registers, SwiGLU; native 224 px tiles; CLS with the mean patch token, 2560-d",
    ),
    "h_optimus_0": (
        ViTConfig(patch_size=14, dim=1536, depth=40, heads=24, mlp_hidden=8192, reg_tokens=4, no_embed_class=True, **SWIGLU),
        224, Preprocessing(mean=H_OPTIMUS_MEAN, std=H_OPTIMUS_STD),
        "H-optimus-0 (Bioptimus), ViT-g/14, 4 registers, SwiGLU; native 224 px tiles, its own mean/std; CLS, 1536-d",
    ),
    "gigapath": (
        ViTConfig(patch_size=16, dim=1536, depth=40, heads=24, mlp_hidden=8192, **SWIGLU),
        256, Preprocessing(256, "bicubic-antialias", 224),
        "Prov-GigaPath tile encoder, ViT-g/16 (DINOv2 layout), SwiGLU; 256 px patches, centre crop 224; CLS, 1536-d",
    ),
    # TRIDENT's CONCHVisionTower (model_zoo/conchv1_5/conchv1_5.py): vit_large(init_values=1.0), trained at
    # 224 px (14 x 14 position embedding) and run at 448 px; attentional pooler 768-d, 8 heads, 1 query;
    # Resize(448, BILINEAR) + CenterCrop(448) on PIL images (antialiased), ImageNet mean/std
    "conch_v1_5": (
        ViTConfig(img_size=448, patch_size=16, dim=1024, depth=24, heads=16, mlp_hidden=4096, init_values=1.0,
                  pos_grid=14, feature="pool", pool_dim=768, pool_heads=8),
        512, Preprocessing(448, "bilinear-antialias", 448),
        "CONCH v1.5 (Mahmood lab) image tower, ViT-L/16 at 448 px + attentional pooler; 512 px patches resized to 448; 768-d",
    ),
    # owkin/phikon-v2 config.json: Dinov2Model, hidden 1024, 24 layers, 16 heads, patch 16, image 224,
    # layerscale 1.0, layer_norm_eps 1e-6, GELU (exact), qkv bias; feature last_hidden_state[:, 0] (TRIDENT).
    # (image_size 224 is not confirmed from the hub file here; a file stored for another grid is refused
    # by name at load, "wrong shapes (embeddings.position_embeddings: ...)", never resampled silently)
    "phikon_v2": (
        ViTConfig(patch_size=16, dim=1024, depth=24, heads=16, mlp_hidden=4096, init_values=1.0, mask_token=True),
        224, Preprocessing(),
        "Phikon-v2 (Owkin), DINOv2 ViT-L/16; native 224 px tiles; CLS, 1024-d",
    ),
    # owkin/phikon config.json: ViTModel, hidden 768, 12 layers, 12 heads, intermediate 3072, patch 16, image
    # 224, hidden_act "gelu" (exact), qkv_bias true, layer_norm_eps 1e-6 (huggingface.co/owkin/phikon, config.json
    # as changed by discussion #1, "Update layer_norm_eps to match timm", merged by Owkin: "layer_norm_eps=1e-6
    # following iBOT official implementation"; an earlier revision, e9ad8d13, had transformers' default 1e-12). No layer
    # scale, no registers. Feature last_hidden_state[:, 0] of ViTModel(add_pooling_layer=False) (model card,
    # TRIDENT's PhikonInferenceEncoder at a91fa84, with ImageNet mean/std and 224 px tiles at 20x)
    "phikon": (
        ViTConfig(patch_size=16, dim=768, depth=12, heads=12, mlp_hidden=3072, init_values=None),
        224, Preprocessing(),
        "Phikon (Owkin), iBOT ViT-B/16; native 224 px tiles; CLS, 768-d",
    ),
}
# how each publishes its weights (vit_layouts.py); timm's VisionTransformer state_dict unless named here
LAYOUTS: dict[str, Layout] = {"conch_v1_5": TRIDENT_CONCH, "phikon_v2": HF_DINOV2, "phikon": HF_VIT}


def build_vit(name: str, depth: int | None = None) -> ViTEncoder:
    """Encoder ``name`` (see ``VITS``); ``depth`` fewer blocks for tests (same code, same key names)."""
    cfg, _, prep, _ = VITS[name]
    if depth is not None:
        cfg = replace(cfg, depth=depth)
    mode = prep.resize_filter.removesuffix("-antialias") if prep.resize else "bilinear"
    return ViTEncoder(cfg, PatchPreprocess(prep.resize, prep.crop, mode, prep.mean, prep.std), name).eval()


def _vit(name: str) -> EncoderFamily:
    cfg, patch_size, prep, summary = VITS[name]
    layout = LAYOUTS.get(name, TIMM)
    return EncoderFamily(
        name=name,
        summary=summary,
        feature_dim=cfg.feature_dim,
        feature={"cls+mean": "cls+mean-patch", "pool": "pooled"}.get(cfg.feature, cfg.feature),
        mpp=0.5,
        patch_size=patch_size,
        preprocessing=prep,
        build=lambda: build_vit(name),
        load_weights=lambda model, state_dict, source: load_published(layout, model, state_dict, source),
        weights_of=layout.reference,
        weights_format=layout.format,
    )


ENCODERS: dict[str, EncoderFamily] = {
    "resnet18": _resnet("resnet18", "torchvision ResNet18, average-pooled layer4 (AMMASurv's backbone), 512-d"),
    "resnet50_trunc": _resnet(
        "resnet50_trunc", "torchvision ResNet50 cut after layer3, average-pooled (CLAM's features), 1024-d"
    ),
    **{name: _vit(name) for name in VITS},
    "ctranspath": EncoderFamily(
        name="ctranspath",
        summary="CTransPath (Wang et al. 2022), Swin-T with a conv stem; 256 px patches at 10x resized to 224; "
        "average-pooled, 768-d",
        feature_dim=CTRANSPATH.feature_dim,
        feature="pooled",
        mpp=1.0,  # 10x, as TRIDENT runs it
        patch_size=256,
        preprocessing=Preprocessing(224, "bilinear-antialias"),  # TRIDENT: Resize(224, bilinear, antialias)
        build=build_ctranspath,
        load_weights=load_ctranspath_state_dict,
        weights_of=lambda model: model.trunk.state_dict(),
        weights_format="CTransPath checkpoint ({'model': state_dict}, timm 0.5.4 Swin layout; timm >= 0.9 layout mapped)",
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
