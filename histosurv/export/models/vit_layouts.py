"""How each foundation-model ViT's authors publish its weights, and the one strict way in and out.

A layout says which key names the authors' file uses and how they map onto :class:`ViTEncoder`:

* ``TIMM`` (UNI, UNI2-h, Virchow2, H-optimus-0, Prov-GigaPath): a timm ``VisionTransformer``
  state_dict, which is ``model.trunk``'s own.
* ``TRIDENT_CONCH`` (CONCH v1.5): ``pytorch_model_vision.bin`` from MahmoodLab/conchv1_5, which
  TRIDENT loads strictly into its ``CONCHVisionTower`` (``trunk.*`` timm names, ``attn_pool_contrast.*``,
  ``ln_contrast.*``; mahmoodlab/TRIDENT@a91fa84 model_zoo/conchv1_5/conchv1_5.py,
  ``create_model_from_pretrained``): the whole ``ViTEncoder``'s own state_dict. TRIDENT first passes
  ``trunk.pos_embed`` through timm's ``resample_abs_pos_embed`` when its shape is not the 224 px model's
  (1, 197, 1024); a file with another grid is refused here instead of being resampled twice.
* ``HF_DINOV2`` (Phikon-v2): ``model.safetensors`` from owkin/phikon-v2 in transformers' ``Dinov2Model``
  names, as transformers 4.x wrote them and 5.x still reads and writes them (its in-memory
  ``q_proj``/``o_proj`` names are renamed on load and reverted on save:
  transformers/conversion_mapping.py, "Dinov2Model"). The mapping onto the trunk's timm names is
  :data:`DINOV2_RENAMES` plus query/key/value concatenated into ``qkv`` (timm's order: q, k, v).
  ``embeddings.mask_token`` is the masked-image-modelling token of DINOv2 training (used only with
  ``bool_masked_pos``): it is carried as the trunk's ``mask_token`` buffer, never used in the forward
  pass, so the authors' file round-trips bit for bit.

Loading is :func:`load_published`: wrappers removed (:func:`~.encoder_weights.unwrap`), then the file
must have exactly the authors' keys and shapes, checked under the authors' names (a missing, extra or
mis-shaped key is an InputError naming the file and the key), then it is loaded strictly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .encoder_weights import check_layout, unwrap
from .vit import ViTEncoder

__all__ = ["Layout", "TIMM", "TRIDENT_CONCH", "HF_DINOV2", "DINOV2_RENAMES", "load_published", "to_dinov2", "from_dinov2"]


@dataclass(frozen=True)
class Layout:
    description: str  # in messages: "<encoder> weights (<description>)"
    format: str  # what the family accepts, for messages and the manifest
    published: Callable[[ViTEncoder], dict]  # the model's weights under the authors' key names (may share memory)
    assign: Callable[[ViTEncoder, dict], None]  # a checked file in the authors' names -> the model, strictly
    weights_of: Callable[[ViTEncoder], dict] | None = None  # as published, fit to save; None: ``published``

    def reference(self, model: ViTEncoder) -> dict:
        """The model's weights in the authors' layout, as the version's reference file stores them."""
        return (self.weights_of or self.published)(model)


def load_published(layout: Layout, model: ViTEncoder, state_dict, source: str) -> None:
    state_dict = unwrap(state_dict, source)
    check_layout(layout.published(model), state_dict, source, f"{model.name} weights ({layout.description})")
    layout.assign(model, state_dict)


# (ours, transformers') for the keys that are renamed one to one
DINOV2_RENAMES = (
    ("cls_token", "embeddings.cls_token"),
    ("mask_token", "embeddings.mask_token"),
    ("pos_embed", "embeddings.position_embeddings"),
    ("patch_embed.proj.weight", "embeddings.patch_embeddings.projection.weight"),
    ("patch_embed.proj.bias", "embeddings.patch_embeddings.projection.bias"),
    ("norm.weight", "layernorm.weight"),
    ("norm.bias", "layernorm.bias"),
)
DINOV2_BLOCK_RENAMES = (
    ("norm1", "norm1"),
    ("attn.proj", "attention.output.dense"),
    ("norm2", "norm2"),
    ("mlp.fc1", "mlp.fc1"),
    ("mlp.fc2", "mlp.fc2"),
)
DINOV2_QKV = ("query", "key", "value")


def _renames(depth: int):
    yield from DINOV2_RENAMES
    for i in range(depth):
        for ours, theirs in DINOV2_BLOCK_RENAMES:
            for leaf in ("weight", "bias"):
                yield f"blocks.{i}.{ours}.{leaf}", f"encoder.layer.{i}.{theirs}.{leaf}"
        yield f"blocks.{i}.ls1.gamma", f"encoder.layer.{i}.layer_scale1.lambda1"
        yield f"blocks.{i}.ls2.gamma", f"encoder.layer.{i}.layer_scale2.lambda1"


def to_dinov2(own: dict, depth: int, copies: bool = False) -> dict:
    """The trunk's state_dict (timm names) in transformers' Dinov2Model names; q, k and v are views of
    their thirds of ``qkv``, or copies (``copies``: safetensors refuses tensors that share memory)."""
    out = {theirs: own[ours] for ours, theirs in _renames(depth)}
    for i in range(depth):
        for leaf in ("weight", "bias"):
            thirds = own[f"blocks.{i}.attn.qkv.{leaf}"].chunk(3, dim=0)
            for part, third in zip(DINOV2_QKV, thirds):
                out[f"encoder.layer.{i}.attention.attention.{part}.{leaf}"] = third.clone() if copies else third
    return out


def from_dinov2(theirs: dict, depth: int) -> dict:
    """transformers' Dinov2Model names -> the trunk's timm names (``theirs`` already checked: every key
    present, none extra, so every key is used here)."""
    out = {ours: theirs[t] for ours, t in _renames(depth)}
    for i in range(depth):
        for leaf in ("weight", "bias"):
            parts = [theirs[f"encoder.layer.{i}.attention.attention.{p}.{leaf}"] for p in DINOV2_QKV]
            out[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat(parts, dim=0)
    return out


TIMM = Layout(
    "timm layout",
    "timm VisionTransformer state_dict, as the authors publish it (pytorch_model.bin / .safetensors)",
    published=lambda model: model.trunk.state_dict(),
    assign=lambda model, sd: model.trunk.load_state_dict(sd, strict=True),
)
TRIDENT_CONCH = Layout(
    "TRIDENT CONCHVisionTower layout",
    "CONCH v1.5 pytorch_model_vision.bin (trunk.*, attn_pool_contrast.*, ln_contrast.*), as TRIDENT loads it",
    published=lambda model: model.state_dict(),
    assign=lambda model, sd: model.load_state_dict(sd, strict=True),
)
HF_DINOV2 = Layout(
    "transformers Dinov2Model layout",
    "transformers Dinov2Model state_dict (model.safetensors), as Owkin publish Phikon-v2",
    published=lambda model: to_dinov2(model.trunk.state_dict(), model.trunk.cfg.depth),
    assign=lambda model, sd: model.trunk.load_state_dict(from_dinov2(sd, model.trunk.cfg.depth), strict=True),
    weights_of=lambda model: to_dinov2(model.trunk.state_dict(), model.trunk.cfg.depth, copies=True),
)
