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
* ``HF_VIT`` (Phikon): owkin/phikon's ``model.safetensors`` / ``pytorch_model.bin`` in transformers'
  ``ViTModel`` names (``encoder.layer.{i}.attention.attention.query``, ``layernorm_before``,
  ``intermediate.dense``, ...; transformers 5.x renames them in memory and back on save, as for
  DINOv2: conversion_mapping.py, "ViTModel"), mapped by :data:`VIT_RENAMES` plus the same ``qkv``
  concatenation. ``ViTModel`` is built with a pooler by default (``add_pooling_layer=True``), so its
  saved files carry ``pooler.dense.*``; owkin/phikon's do (346 MB, as the files listing shows: the
  198 trunk tensors of a ViT-B/16 are 343.2 MB in float32, the pooler's 768 x 768 + 768 adds 2.4 MB).
  The model card and TRIDENT load it with ``add_pooling_layer=False`` and take
  ``last_hidden_state[:, 0]``, so the pooler is never used: a file with both pooler keys or with
  neither is accepted (one of the two is refused), the pooler is checked for shape and dropped, and
  the version's reference file holds the 198 keys ``ViTModel(add_pooling_layer=False)`` saves.

Loading is :func:`load_published`: wrappers removed (:func:`~.encoder_weights.unwrap`), then the file
must have exactly the authors' keys and shapes, checked under the authors' names (a missing, extra or
mis-shaped key is an InputError naming the file and the key; keys the layout lists as ``unused`` may
be present, all together, and are dropped after the same check), then it is loaded strictly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .encoder_weights import check_layout, unwrap
from .vit import ViTEncoder

__all__ = ["Layout", "TIMM", "TRIDENT_CONCH", "HF_DINOV2", "HF_VIT", "DINOV2_RENAMES", "VIT_RENAMES", "load_published",
           "to_dinov2", "from_dinov2", "to_hf_vit", "from_hf_vit"]


@dataclass(frozen=True)
class Layout:
    description: str  # in messages: "<encoder> weights (<description>)"
    format: str  # what the family accepts, for messages and the manifest
    published: Callable[[ViTEncoder], dict]  # the model's weights under the authors' key names (may share memory)
    assign: Callable[[ViTEncoder, dict], None]  # a checked file in the authors' names -> the model, strictly
    weights_of: Callable[[ViTEncoder], dict] | None = None  # as published, fit to save; None: ``published``
    # keys a published file may also carry (all or none) that the feature never uses: name -> a tensor
    # of the expected shape (meta); checked like the rest, then dropped
    unused: Callable[[ViTEncoder], dict] | None = None

    def reference(self, model: ViTEncoder) -> dict:
        """The model's weights in the authors' layout, as the version's reference file stores them."""
        return (self.weights_of or self.published)(model)


def load_published(layout: Layout, model: ViTEncoder, state_dict, source: str) -> None:
    state_dict = unwrap(state_dict, source)
    unused = layout.unused(model) if layout.unused else {}
    # one unused key present makes all of them expected, so a half-saved head is named, not ignored
    expected = {**layout.published(model), **(unused if unused.keys() & state_dict.keys() else {})}
    check_layout(expected, state_dict, source, f"{model.name} weights ({layout.description})")
    layout.assign(model, {k: v for k, v in state_dict.items() if k not in unused})


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


# transformers' ViTModel (owkin/phikon): DINOv2's names without the mask token, and its own block names
VIT_RENAMES = tuple(pair for pair in DINOV2_RENAMES if pair[0] != "mask_token")
VIT_BLOCK_RENAMES = (
    ("norm1", "layernorm_before"),
    ("attn.proj", "attention.output.dense"),
    ("norm2", "layernorm_after"),
    ("mlp.fc1", "intermediate.dense"),
    ("mlp.fc2", "output.dense"),
)


def _renames(depth: int, top=DINOV2_RENAMES, block=DINOV2_BLOCK_RENAMES, layer_scale: bool = True):
    yield from top
    for i in range(depth):
        for ours, theirs in block:
            for leaf in ("weight", "bias"):
                yield f"blocks.{i}.{ours}.{leaf}", f"encoder.layer.{i}.{theirs}.{leaf}"
        if layer_scale:
            yield f"blocks.{i}.ls1.gamma", f"encoder.layer.{i}.layer_scale1.lambda1"
            yield f"blocks.{i}.ls2.gamma", f"encoder.layer.{i}.layer_scale2.lambda1"


def _to_hf(own: dict, renames, depth: int, copies: bool) -> dict:
    out = {theirs: own[ours] for ours, theirs in renames}
    for i in range(depth):
        for leaf in ("weight", "bias"):
            thirds = own[f"blocks.{i}.attn.qkv.{leaf}"].chunk(3, dim=0)
            for part, third in zip(DINOV2_QKV, thirds):
                out[f"encoder.layer.{i}.attention.attention.{part}.{leaf}"] = third.clone() if copies else third
    return out


def _from_hf(theirs: dict, renames, depth: int) -> dict:
    out = {ours: theirs[t] for ours, t in renames}
    for i in range(depth):
        for leaf in ("weight", "bias"):
            parts = [theirs[f"encoder.layer.{i}.attention.attention.{p}.{leaf}"] for p in DINOV2_QKV]
            out[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat(parts, dim=0)
    return out


def to_dinov2(own: dict, depth: int, copies: bool = False) -> dict:
    """The trunk's state_dict (timm names) in transformers' Dinov2Model names; q, k and v are views of
    their thirds of ``qkv``, or copies (``copies``: safetensors refuses tensors that share memory)."""
    return _to_hf(own, _renames(depth), depth, copies)


def from_dinov2(theirs: dict, depth: int) -> dict:
    """transformers' Dinov2Model names -> the trunk's timm names (``theirs`` already checked: every key
    present, none extra, so every key is used here)."""
    return _from_hf(theirs, _renames(depth), depth)


def to_hf_vit(own: dict, depth: int, copies: bool = False) -> dict:
    """The trunk's state_dict (timm names) in transformers' ViTModel names (no pooler), as
    :func:`to_dinov2`."""
    return _to_hf(own, _renames(depth, VIT_RENAMES, VIT_BLOCK_RENAMES, layer_scale=False), depth, copies)


def from_hf_vit(theirs: dict, depth: int) -> dict:
    """transformers' ViTModel names (pooler already dropped) -> the trunk's timm names."""
    return _from_hf(theirs, _renames(depth, VIT_RENAMES, VIT_BLOCK_RENAMES, layer_scale=False), depth)


def _vit_pooler(model: ViTEncoder) -> dict:
    """ViTModel's pooler (dense, then tanh, on the class token), as ``add_pooling_layer=True`` saves it."""
    dim = model.trunk.cfg.dim
    return {"pooler.dense.weight": torch.empty(dim, dim, device="meta"), "pooler.dense.bias": torch.empty(dim, device="meta")}


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
HF_VIT = Layout(
    "transformers ViTModel layout",
    "transformers ViTModel state_dict (model.safetensors / pytorch_model.bin), as Owkin publish Phikon; "
    "pooler.dense.* accepted and unused",
    published=lambda model: to_hf_vit(model.trunk.state_dict(), model.trunk.cfg.depth),
    assign=lambda model, sd: model.trunk.load_state_dict(from_hf_vit(sd, model.trunk.cfg.depth), strict=True),
    weights_of=lambda model: to_hf_vit(model.trunk.state_dict(), model.trunk.cfg.depth, copies=True),
    unused=_vit_pooler,
)
