"""Vision transformers as the pathology foundation models are built, in plain torch with timm's key names.

UNI, UNI2-h, Virchow2, H-optimus-0 and Prov-GigaPath are all timm ``VisionTransformer`` variants and
publish timm state_dicts. This module builds the same network from a :class:`ViTConfig` with the same
parameter names and shapes, so a published ``pytorch_model.bin`` loads strictly, without timm (which
imports torchvision, and torchvision does not import beside the CPU torch the project installs).
``tests/test_vit.py`` compares every variant with timm's own model at seeded weights
(``tests/golden/make_vit_golden.py`` made the outputs once, in a venv with timm).

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
graph), so no interpolation of it ever reaches an exported graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

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
    feature: str = "cls"  # "cls" or "cls+mean" (class token, then the mean of the patch tokens)

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def prefix_tokens(self) -> int:
        return 1 + self.reg_tokens

    @property
    def feature_dim(self) -> int:
        return 2 * self.dim if self.feature == "cls+mean" else self.dim


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
        positions = cfg.grid**2 + (0 if cfg.no_embed_class else cfg.prefix_tokens)
        self.pos_embed = nn.Parameter(torch.randn(1, positions, cfg.dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(cfg) for _ in range(cfg.depth)))
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        nn.init.normal_(self.cls_token, std=1e-6)
        if cfg.reg_tokens:
            nn.init.normal_(self.reg_token, std=1e-6)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Every token after the final norm: class, registers, then patches."""
        x = self.patch_embed(images)
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.cfg.reg_tokens:
            prefix.append(self.reg_token.expand(x.shape[0], -1, -1))
        if self.cfg.no_embed_class:  # position embedding on the patch tokens only
            x = torch.cat([*prefix, x + self.pos_embed], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
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
    """A patch encoder: uint8 patches (B, H, W, 3) -> features (B, D); the trunk holds the published keys."""

    def __init__(self, cfg: ViTConfig, preprocess: PatchPreprocess, name: str):
        super().__init__()
        self.preprocess, self.trunk, self.name = preprocess, VisionTransformer(cfg), name

    @property
    def feature_dim(self) -> int:
        return self.trunk.cfg.feature_dim

    @property
    def attention_ops(self) -> int:
        """Attentions the exported graph must keep fused (one per block)."""
        return self.trunk.cfg.depth

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.preprocess(patches))
