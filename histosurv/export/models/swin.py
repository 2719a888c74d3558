"""CTransPath: a Swin-T with a convolutional stem, in plain torch with its published key names.

CTransPath (Wang et al., Medical Image Analysis 2022; github.com/Xiyue-Wang/TransPath ``ctran.py``, and
TRIDENT's ``model_zoo/ctranspath/ctran.py``) is ``swin_tiny_patch4_window7_224`` of ``timm_ctp`` (the
authors' fork of timm 0.5.4) with the patch embedding replaced by ``ConvStem`` (two 3x3 stride-2 convs
with BatchNorm and ReLU, then a 1x1 conv to 96 channels; LayerNorm after it) and the head removed
(``model.head = nn.Identity()``). The feature is the final LayerNorm's tokens, average-pooled: 768-d.

Its checkpoint (``ctranspath.pth``, and CHIEF's ``CHIEF_CTransPath.pth`` that TRIDENT downloads) is
``{"model": state_dict}`` in timm 0.5.4's Swin layout, which this module holds exactly:

* ``layers.N.downsample`` (PatchMerging: ``norm``, then ``reduction`` without bias) at the *end* of
  stage N, for N = 0, 1, 2 (timm >= 0.9 moved it to the start of stage N + 1);
* persistent buffers ``layers.N.blocks.M.attn.relative_position_index`` (int64) and, in the shifted
  blocks (odd M of stages 0-2; stage 3's 7 x 7 grid is one window, never shifted),
  ``layers.N.blocks.M.attn_mask`` (0 / -100 between the regions a cyclic shift brings together).

Those buffers are functions of the configuration, not learned: :func:`load_ctranspath_state_dict`
checks any a file holds against the model's own (a mismatch means another resolution or window: an
error) and fills those a file lacks (TRIDENT drops ``attn_mask`` before loading; timm >= 0.9 never saves
either). A file in timm >= 0.9's layout (``layers.3.downsample``, no buffers) is mapped back, as timm's
own ``checkpoint_filter_fn`` maps the other way. Every learned tensor must be there: never ``strict=False``.

Window attention calls ``F.scaled_dot_product_attention`` with the relative position bias (plus the
shift mask) as ``attn_mask``: the same sums as timm's ``softmax(q k^T * scale + bias + mask) v``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ...data.encoder_record import IMAGENET_MEAN, IMAGENET_STD
from ...errors import InputError
from .encoder_weights import load_strictly, unwrap
from .vit import PatchPreprocess

__all__ = ["SwinConfig", "SwinTransformer", "SwinEncoder", "CTRANSPATH", "build_ctranspath", "load_ctranspath_state_dict"]


@dataclass(frozen=True)
class SwinConfig:
    img_size: int = 224
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    heads: tuple[int, ...] = (3, 6, 12, 24)
    window: int = 7
    mlp_ratio: float = 4.0

    @property
    def feature_dim(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)


CTRANSPATH = SwinConfig()


class ConvStem(nn.Module):
    """CTransPath's patch embedding: (B, 3, H, W) -> (B, H/4 * W/4, dim), LayerNorm'd."""

    def __init__(self, dim: int):
        super().__init__()
        layers, c_in, c_out = [], 3, dim // 8
        for _ in range(2):
            layers += [nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in, c_out = c_out, c_out * 2
        layers.append(nn.Conv2d(c_in, dim, 1))
        self.proj = nn.Sequential(*layers)  # keys proj.0, proj.1 (BN), proj.3, proj.4 (BN), proj.6
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


def relative_position_index(window: int) -> torch.Tensor:
    """(w*w, w*w) index into the (2w-1)^2 bias table of the offset between two tokens of a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def windows_of(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, w*w, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def merge_windows(x: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    c = x.shape[-1]
    x = x.view(-1, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def shift_mask(resolution: int, window: int, shift: int) -> torch.Tensor:
    """(nW, w*w, w*w): 0 within a region of the shifted image, -100 across regions (timm's values)."""
    img = torch.zeros(1, resolution, resolution, 1)
    spans = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, (hs, ws) in enumerate((hs, ws) for hs in spans for ws in spans):
        img[:, hs, ws, :] = i
    regions = windows_of(img, window).squeeze(-1)
    diff = regions.unsqueeze(1) - regions.unsqueeze(2)
    return torch.where(diff != 0, torch.tensor(-100.0), torch.tensor(0.0))


class WindowAttention(nn.Module):
    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads, self.window = heads, window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def bias(self) -> torch.Tensor:
        n = self.window * self.window
        return self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        bw, n, c = x.shape  # (batch * windows, tokens of a window, dim)
        q, k, v = self.qkv(x).view(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.bias().unsqueeze(0)  # (1, heads, n, n)
        if mask is not None:  # (nW, n, n), the same for every image: repeated over the batch
            bias = (bias + mask.unsqueeze(1)).repeat(bw // mask.shape[0], 1, 1, 1)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(x.transpose(1, 2).reshape(bw, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, resolution: int, window: int, shift: int, mlp_ratio: float):
        super().__init__()
        if resolution <= window:  # one window covers the map: no shift (timm's rule)
            window, shift = resolution, 0
        self.resolution, self.window, self.shift = resolution, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.register_buffer("attn_mask", shift_mask(resolution, window, shift) if shift else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        r, s = self.resolution, self.shift
        y = self.norm1(x).view(b, r, r, c)
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        y = merge_windows(self.attn(windows_of(y, self.window), self.attn_mask), self.window, r, r)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        x = x + y.reshape(b, n, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """(B, R*R, C) -> (B, R/2 * R/2, 2C): each 2x2 neighbourhood concatenated (timm's order), LayerNorm, Linear."""

    def __init__(self, dim: int, resolution: int):
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        x = x.view(b, self.resolution, self.resolution, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.reshape(b, -1, 4 * c)))


class Stage(nn.Module):
    def __init__(self, cfg: SwinConfig, i: int):
        super().__init__()
        dim, resolution = cfg.embed_dim * 2**i, cfg.img_size // 4 // 2**i
        self.blocks = nn.ModuleList(
            SwinBlock(dim, cfg.heads[i], resolution, cfg.window, 0 if j % 2 == 0 else cfg.window // 2, cfg.mlp_ratio)
            for j in range(cfg.depths[i])
        )
        # timm 0.5.4: at the end of every stage but the last (absent, not None'd keys, in the last)
        self.downsample = PatchMerging(dim, resolution) if i < len(cfg.depths) - 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class SwinTransformer(nn.Module):
    """Normalised images (B, 3, img_size, img_size) -> average-pooled features (B, feature_dim)."""

    def __init__(self, cfg: SwinConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = ConvStem(cfg.embed_dim)
        self.layers = nn.Sequential(*(Stage(cfg, i) for i in range(len(cfg.depths))))
        self.norm = nn.LayerNorm(cfg.feature_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, WindowAttention):
                nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.norm(self.layers(self.patch_embed(images))).mean(dim=1)


class SwinEncoder(nn.Module):
    """uint8 patches (B, H, W, 3) -> features (B, 768); the trunk holds the published keys."""

    def __init__(self, cfg: SwinConfig, preprocess: PatchPreprocess, name: str):
        super().__init__()
        self.preprocess, self.trunk, self.name = preprocess, SwinTransformer(cfg), name

    @property
    def feature_dim(self) -> int:
        return self.trunk.cfg.feature_dim

    @property
    def attention_ops(self) -> int:
        """Attentions the exported graph must keep fused: one per block. onnxscript's optimize_for_ort
        turns each SDPA, its relative position bias (plus shift mask, repeated over the batch) as
        attn_mask, into com.microsoft.MultiHeadAttention with that bias as its attention_bias input
        (checked in tests/test_swin.py, onnxscript 0.7, ONNX Runtime CPU)."""
        return sum(self.trunk.cfg.depths)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.preprocess(patches))


def build_ctranspath(depths: tuple[int, ...] | None = None) -> SwinEncoder:
    """CTransPath: 256 px patches resized to 224 (bilinear, antialiased, as TRIDENT's transform), ImageNet
    mean/std; ``depths`` fewer blocks per stage for tests (same code, same key names)."""
    cfg = CTRANSPATH if depths is None else replace(CTRANSPATH, depths=tuple(depths))
    return SwinEncoder(cfg, PatchPreprocess(224, None, "bilinear", IMAGENET_MEAN, IMAGENET_STD), "ctranspath").eval()


DERIVED = ("relative_position_index", "attn_mask")  # buffers computed from the configuration


def _from_new_timm_layout(state_dict: dict) -> dict:
    """timm >= 0.9 (``layers.N.downsample`` at the start of stage N, N = 1..3) -> timm 0.5.4 (end of N - 1)."""
    import re

    def old(key: str) -> str:
        return re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", key)

    return {old(k): v for k, v in state_dict.items()}


def load_ctranspath_state_dict(model: SwinEncoder, state_dict: dict, source: str = "state_dict") -> None:
    """Loads CTransPath's published weights (``{"model": ...}``, timm 0.5.4 Swin layout) strictly.

    The derived buffers (relative position index, shift masks) a file holds must equal the model's
    own; those it lacks are the model's own. Every learned tensor must be present, none left over."""
    state_dict = unwrap(state_dict, source)
    if any(k.startswith("layers.3.downsample.") for k in state_dict):  # timm >= 0.9: stage 0 has none
        state_dict = _from_new_timm_layout(state_dict)
    own = model.trunk.state_dict()
    state_dict = dict(state_dict)
    for key, value in own.items():
        if not key.endswith(DERIVED):
            continue
        if key not in state_dict:
            state_dict[key] = value
            continue
        given = state_dict[key]
        if not isinstance(given, torch.Tensor) or given.shape != value.shape or not torch.equal(given.to(value.dtype), value):
            raise InputError(
                f"{source}: not {model.name} weights (timm Swin layout): {key} differs from a "
                f"{model.trunk.cfg.img_size} px, window {model.trunk.cfg.window} Swin's"
            )
        state_dict[key] = value
    load_strictly(model.trunk, state_dict, source, f"{model.name} weights (timm Swin layout)")
