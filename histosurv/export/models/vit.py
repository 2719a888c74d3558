"""Vision transformers as the pathology foundation models are built, in plain torch with timm's key names.

UNI, UNI2-h, Virchow2, H-optimus-0 and Prov-GigaPath are all timm ``VisionTransformer`` variants and
publish timm state_dicts. This module builds the same network from a :class:`ViTConfig` with the same
parameter names and shapes, so a published ``pytorch_model.bin`` loads strictly, without timm (which
imports torchvision, and torchvision does not import beside the CPU torch the project installs).
``tests/test_vit.py`` compares every variant with timm's own model at seeded weights
(``tests/golden/make_vit.py`` made the outputs once, in a venv with timm).

What differs between the variants, and how timm spells it:

* the MLP: GELU (``mlp.fc1`` -> GELU -> ``mlp.fc2``) or SwiGLU packed into one ``fc1`` of twice the
  hidden width (timm's ``SwiGLUPacked``: SiLU of the first half times the second half);
* register tokens (``reg_token``, after the class token) and whether the position embedding covers the
  class and register tokens (``no_embed_class=False``) or the patch tokens only;
* layer scale (``ls1.gamma``, ``ls2.gamma``) where the model was trained with ``init_values``;
* the feature: the class token after the final norm, or (Virchow2) the class token concatenated with
  the mean of the patch tokens, registers excluded.

Attention calls ``F.scaled_dot_product_attention``, which the exporters keep fused. The position
embedding is used at the size it was trained for (the input is resized and cropped to it inside the
graph), so no interpolation of it ever reaches an exported graph. CONCH v1.5 is the exception: it
was trained at 224 px (a 14 x 14 embedding, as published) and runs at 448 px, where TRIDENT
re-interpolates the embedding on every forward; here that interpolation runs once, when the weights
arrive (:meth:`VisionTransformer.refresh_input_pos_embed`), and the graph holds its result as a
constant. Its feature is an attentional pooler over all tokens (``vit_pooler.py``). Phikon-v2 is
published in transformers' ``Dinov2Model`` layout; ``vit_layouts.py`` maps it onto these names.
"""

from __future__ import annotations

from dataclasses import dataclass

import math

import torch
import torch.nn.functional as F
from torch import nn

from .vit_pooler import AttentionalPooler

__all__ = ["ViTConfig", "VisionTransformer", "PatchPreprocess", "ViTEncoder"]


@dataclass(frozen=True)
class ViTConfig:
    img_size: int = 224
    patch_size: int = 16
    dim: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_hidden: int = 4096  # fc1's output width: twice the gated width for SwiGLU
    mlp: str = "gelu"  # "gelu" or "swiglu" (timm SwiGLUPacked)
    init_values: float | None = 1e-5  # layer scale; None: none
    reg_tokens: int = 0
    no_embed_class: bool = False  # True: the position embedding covers the patch tokens only
    feature: str = "cls"  # "cls", "cls+mean" (class token, then the mean of the patch tokens) or "pool"
    pos_grid: int | None = None  # grid the stored position embedding covers, if not the input's (resampled once)
    pool_dim: int = 0  # feature "pool": the attentional pooler's width (then LayerNorm), and its heads
    pool_heads: int = 0
    mask_token: bool = False  # carry DINOv2's (unused) mask token, so its published file round-trips

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def prefix_tokens(self) -> int:
        return 1 + self.reg_tokens

    @property
    def feature_dim(self) -> int:
        if self.feature == "pool":
            return self.pool_dim
        return 2 * self.dim if self.feature == "cls+mean" else self.dim

    @property
    def stored_grid(self) -> int:
        return self.pos_grid or self.grid


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.dim, cfg.patch_size, cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, grid^2, dim)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, kind: str):
        super().__init__()
        self.kind = kind
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden // 2 if kind == "swiglu" else hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if self.kind == "swiglu":
            gate, value = x.chunk(2, dim=-1)
            return self.fc2(F.silu(gate) * value)
        return self.fc2(F.gelu(x))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.attn = Attention(cfg.dim, cfg.heads)
        self.ls1 = LayerScale(cfg.dim, cfg.init_values) if cfg.init_values is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.mlp = Mlp(cfg.dim, cfg.mlp_hidden, cfg.mlp)
        self.ls2 = LayerScale(cfg.dim, cfg.init_values) if cfg.init_values is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """Normalised images (B, 3, img_size, img_size) -> features (B, feature_dim)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        if cfg.reg_tokens:
            self.reg_token = nn.Parameter(torch.zeros(1, cfg.reg_tokens, cfg.dim))
        embedded_prefix = 0 if cfg.no_embed_class else cfg.prefix_tokens
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.stored_grid**2 + embedded_prefix, cfg.dim) * 0.02)
        if cfg.mask_token:  # DINOv2's masked-image-modelling token: never used at inference
            self.register_buffer("mask_token", torch.zeros(1, cfg.dim))
        self.blocks = nn.Sequential(*(Block(cfg) for _ in range(cfg.depth)))
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        nn.init.normal_(self.cls_token, std=1e-6)
        if cfg.reg_tokens:
            nn.init.normal_(self.reg_token, std=1e-6)
        if cfg.stored_grid != cfg.grid:
            # the embedding at the input's grid: derived from pos_embed, not stored (the published file
            # holds the trained grid), refreshed whenever weights are loaded
            self.register_buffer("input_pos_embed", torch.empty(1, cfg.grid**2 + embedded_prefix, cfg.dim), persistent=False)
            self.refresh_input_pos_embed()
            self.register_load_state_dict_post_hook(lambda module, _: module.refresh_input_pos_embed())

    @torch.no_grad()
    def refresh_input_pos_embed(self) -> None:
        """``input_pos_embed`` from ``pos_embed``, exactly as TRIDENT's CONCH v1.5 trunk interpolates it on
        every forward (mahmoodlab/TRIDENT@a91fa84 model_zoo/conchv1_5/conchv1_5.py,
        ``VisionTransformer.interpolate_pos_encoding``, after DINO): the patch part as a square grid,
        ``F.interpolate(mode="bicubic")`` (align_corners False, no antialias) with ``scale_factor``
        (new grid + 0.1) / old grid, DINO's guard against rounding down; torch then maps output to input
        pixels with that factor, not with 28 / 14, so a ``size=`` resize would differ. The class token's
        embedding is kept as is."""
        cfg = self.cfg
        prefix = 0 if cfg.no_embed_class else cfg.prefix_tokens
        old, new = cfg.stored_grid, cfg.grid
        patch = self.pos_embed[:, prefix:].reshape(1, old, old, cfg.dim).permute(0, 3, 1, 2)
        scale = (new + 0.1) / math.sqrt(old * old)
        patch = F.interpolate(patch, scale_factor=(scale, scale), mode="bicubic")
        assert patch.shape[-2:] == (new, new), patch.shape
        patch = patch.permute(0, 2, 3, 1).reshape(1, new * new, cfg.dim)
        self.input_pos_embed.copy_(torch.cat([self.pos_embed[:, :prefix], patch], dim=1))

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Every token after the final norm: class, registers, then patches."""
        x = self.patch_embed(images)
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.cfg.reg_tokens:
            prefix.append(self.reg_token.expand(x.shape[0], -1, -1))
        pos_embed = self.input_pos_embed if self.cfg.stored_grid != self.cfg.grid else self.pos_embed
        if self.cfg.no_embed_class:  # position embedding on the patch tokens only
            x = torch.cat([*prefix, x + pos_embed], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1) + pos_embed
        return self.norm(self.blocks(x))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The class-token features (feature "cls" or "cls+mean"); "pool" features need the pooler,
        which :class:`ViTEncoder` holds."""
        x = self.tokens(images)
        if self.cfg.feature == "cls+mean":
            return torch.cat([x[:, 0], x[:, self.cfg.prefix_tokens:].mean(dim=1)], dim=-1)
        return x[:, 0]


class PatchPreprocess(nn.Module):
    """uint8 patches (B, H, W, 3) -> the network's input: [0, 1], resize of the shorter side (antialiased,
    as PIL resizes), centre crop, then mean/std, all inside the graph."""

    def __init__(self, resize: int | None, crop: int | None, mode: str, mean, std):
        super().__init__()
        self.resize, self.crop, self.mode = resize, crop, mode
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = patches.permute(0, 3, 1, 2).to(self.mean.dtype) / 255.0
        if self.resize is not None and x.shape[-1] != self.resize:
            x = F.interpolate(x, size=(self.resize, self.resize), mode=self.mode, antialias=True, align_corners=False)
            if self.mode == "bicubic":  # PIL clamps what cubic overshoots
                x = x.clamp(0.0, 1.0)
        if self.crop is not None and x.shape[-1] != self.crop:
            top = (x.shape[-1] - self.crop) // 2
            x = x[..., top:top + self.crop, top:top + self.crop]
        return (x - self.mean) / self.std


class ViTEncoder(nn.Module):
    """A patch encoder: uint8 patches (B, H, W, 3) -> features (B, D). The trunk holds the timm keys;
    with feature "pool" the pooler and its norm sit beside it under TRIDENT's CONCHVisionTower names
    (``attn_pool_contrast``, ``ln_contrast``), so this module's own state_dict is that published layout
    (the preprocessing holds no persistent state)."""

    def __init__(self, cfg: ViTConfig, preprocess: PatchPreprocess, name: str):
        super().__init__()
        self.preprocess, self.trunk, self.name = preprocess, VisionTransformer(cfg), name
        if cfg.feature == "pool":
            self.attn_pool_contrast = AttentionalPooler(cfg.pool_dim, cfg.dim, cfg.pool_heads)
            self.ln_contrast = nn.LayerNorm(cfg.pool_dim)  # torch's default eps, as TRIDENT's

    @property
    def feature_dim(self) -> int:
        return self.trunk.cfg.feature_dim

    @property
    def attention_ops(self) -> int:
        """Attentions the exported graph must keep fused: one per block, and the pooler's."""
        return self.trunk.cfg.depth + (1 if self.trunk.cfg.feature == "pool" else 0)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, S, S) at the network's input size -> features (B, D)."""
        if self.trunk.cfg.feature != "pool":
            return self.trunk(images)
        return self.ln_contrast(self.attn_pool_contrast(self.trunk.tokens(images))[:, 0])

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.features(self.preprocess(patches))
