"""Writes tests/golden/vit.json from the reference implementations, as each foundation model's authors build it.

    python3 -m venv /tmp/timmvenv && /tmp/timmvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm==1.0.31 safetensors
    /tmp/timmvenv/bin/pip install transformers einops einops-exts   # transformers 5.25.0, einops 0.8.2, einops-exts 0.0.4
    mkdir -p /tmp/ref/TRIDENT && git -C <TRIDENT clone> archive a91fa8490e0210ebbbe58452c3babe009e0ab7ca \
        trident/patch_encoder_models/model_zoo/conchv1_5 | tar -x -C /tmp/ref/TRIDENT
    PYTHONPATH=. /tmp/timmvenv/bin/python tests/golden/make_vit.py --trident /tmp/ref/TRIDENT
    PYTHONPATH=. /tmp/timmvenv/bin/python tests/golden/make_vit.py --only phikon   # one entry, the others kept

(timm imports torchvision, which does not import beside the CPU torch the project installs, so this
runs in a venv of its own; histosurv itself is not imported here.) The references:

* UNI, UNI2-h, Virchow2, H-optimus-0, Prov-GigaPath: timm's ``VisionTransformer`` (``MODELS``);
* CONCH v1.5: TRIDENT's own ``CONCHVisionTower`` (mahmoodlab/TRIDENT, model_zoo/conchv1_5/conchv1_5.py
  at ``TRIDENT_COMMIT``, checked out outside this project): its modified timm ViT re-interpolates the
  224 px position embedding to 448 px on every forward, and its attentional pooler is lucidrains/CoCa
  style (``to_q``/``to_kv``/``to_out``), not open_clip's ``AttentionalPooler`` (``attn.in_proj_*``);
* Phikon-v2: transformers' ``Dinov2Model`` with owkin/phikon-v2's config; the layout is what
  transformers writes and reads as the published file (its legacy ``attention.attention.query`` names:
  ``revert_weight_conversion``), and the features come from ``Dinov2Model.from_pretrained`` of a folder
  holding the seeded weights in that layout, so the key names are proven by transformers' own loader.
* Phikon: transformers' ``ViTModel`` with owkin/phikon's config, the same way: the published file is
  what ``ViTModel`` (``add_pooling_layer=True``, its default, as Owkin saved it) writes, pooler
  included; the features come from ``ViTModel.from_pretrained(folder, add_pooling_layer=False)``, as
  the model card and TRIDENT load it, which must use every key but the pooler's.

For each encoder: the timm model as its authors create it (arguments from their model cards and
TRIDENT's loaders, see ../shared/research/encoders.md), once at full size on the meta device, for the
key names and shapes a published checkpoint has, and once with 2 blocks at seeded weights
(tests/golden's seeded_state_dict, from key names), run on seeded images: its features are what
histosurv's plain-torch ViT must give with the same weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
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
TRIDENT_COMMIT = "a91fa8490e0210ebbbe58452c3babe009e0ab7ca"
CONCH_V1_5_IMAGE = 448  # TRIDENT's Conchv15InferenceEncoder._build(img_size=448)
# owkin/phikon-v2 config.json (the Dinov2Config fields that shape the network; the rest are defaults;
# image_size 224 as the model card's 224 px tiles and the 197-token ViT-L/16 imply, not re-read from the hub)
PHIKON_V2_CONFIG = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, patch_size=16,
                        image_size=224, layer_norm_eps=1e-6, layerscale_value=1.0, hidden_act="gelu", qkv_bias=True,
                        use_swiglu_ffn=False)

# owkin/phikon config.json (the ViTConfig fields that shape the network; layer_norm_eps 1e-6 since the hub's
# discussion #1, merged; see histosurv/export/models/encoders.py)
PHIKON_CONFIG = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, patch_size=16,
                     image_size=224, layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True)
PHIKON_POOLER = ["pooler.dense.bias", "pooler.dense.weight"]


def features(model, images: torch.Tensor, rule: str) -> torch.Tensor:
    tokens = model.forward_features(images)
    if rule == "cls+mean":
        return torch.cat([tokens[:, 0], tokens[:, model.num_prefix_tokens:].mean(dim=1)], dim=-1)
    return tokens[:, 0]


def seeded_images(size: int) -> torch.Tensor:
    return torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(SEED))


def layout_of(state_dict: dict) -> dict:
    return {k: list(v.shape) for k, v in state_dict.items()}


def conch_v1_5(trident: Path) -> dict:
    sys.path.insert(0, str(trident / "trident/patch_encoder_models/model_zoo/conchv1_5"))
    import conchv1_5  # noqa: PLC0415 - the reference checkout, outside this project

    full = conchv1_5.CONCHVisionTower()  # on the CPU: its constructor calls .item(), which meta tensors refuse
    layout = layout_of(full.state_dict())
    del full
    small = conchv1_5.CONCHVisionTower()
    # vit_large(init_values=1.0) with fewer blocks: the same class and arguments
    small.trunk = conchv1_5.VisionTransformer(patch_size=16, embed_dim=1024, depth=GOLDEN_DEPTH, num_heads=16, mlp_ratio=4,
                                             qkv_bias=True, init_values=1.0)
    small.eval().load_state_dict(seeded_state_dict(shapes_of(small.state_dict()), SEED), strict=True)
    with torch.no_grad():
        feats = small(seeded_images(CONCH_V1_5_IMAGE))  # interpolates the 14 x 14 embedding to 28 x 28 on the way
    return {"reference": f"mahmoodlab/TRIDENT@{TRIDENT_COMMIT} model_zoo/conchv1_5/conchv1_5.py CONCHVisionTower",
            "feature": "pool", "layout": layout, "image_size": CONCH_V1_5_IMAGE, "features": feats.tolist()}


def phikon_v2() -> dict:
    from safetensors.torch import save_file
    from transformers import Dinov2Config, Dinov2Model
    from transformers.core_model_loading import revert_weight_conversion

    with torch.device("meta"):
        full = Dinov2Model(Dinov2Config(**PHIKON_V2_CONFIG))
    layout = layout_of(revert_weight_conversion(full, full.state_dict()))
    config = Dinov2Config(**{**PHIKON_V2_CONFIG, "num_hidden_layers": GOLDEN_DEPTH})
    blank = Dinov2Model(config)
    published = seeded_state_dict(shapes_of(revert_weight_conversion(blank, blank.state_dict())), SEED)
    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)
        save_file(published, f"{folder}/model.safetensors", metadata={"format": "pt"})
        small, info = Dinov2Model.from_pretrained(folder, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, problems  # every published key used, none missing
    with torch.no_grad():
        feats = small.eval()(pixel_values=seeded_images(224)).last_hidden_state[:, 0]
    return {"reference": "transformers Dinov2Model.from_pretrained (owkin/phikon-v2 config), last_hidden_state[:, 0]",
            "config": PHIKON_V2_CONFIG, "feature": "cls", "layout": layout, "image_size": 224, "features": feats.tolist()}


def phikon() -> dict:
    from safetensors.torch import save_file
    from transformers import ViTConfig, ViTModel
    from transformers.core_model_loading import revert_weight_conversion

    with torch.device("meta"):
        full = ViTModel(ViTConfig(**PHIKON_CONFIG))  # add_pooling_layer=True: the published file's keys
    layout = layout_of(revert_weight_conversion(full, full.state_dict()))
    config = ViTConfig(**{**PHIKON_CONFIG, "num_hidden_layers": GOLDEN_DEPTH})
    blank = ViTModel(config)
    published = seeded_state_dict(shapes_of(revert_weight_conversion(blank, blank.state_dict())), SEED)
    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)
        save_file(published, f"{folder}/model.safetensors", metadata={"format": "pt"})
        small, info = ViTModel.from_pretrained(folder, add_pooling_layer=False, output_loading_info=True)
    problems = {k: sorted(v) for k, v in info.items() if v}
    assert problems == {"unexpected_keys": PHIKON_POOLER}, problems  # every published key used but the pooler's
    with torch.no_grad():
        feats = small.eval()(pixel_values=seeded_images(224)).last_hidden_state[:, 0]
    return {"reference": "transformers ViTModel.from_pretrained(add_pooling_layer=False) (owkin/phikon config), "
                         "last_hidden_state[:, 0]",
            "config": PHIKON_CONFIG, "feature": "cls", "layout": layout, "unused": PHIKON_POOLER, "image_size": 224,
            "features": feats.tolist()}


def timm_entry(name: str) -> dict:
    arch, kwargs, rule = MODELS[name]
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
    print(f"{name}: {arch}, {sum(v.numel() for v in full.state_dict().values()) / 1e6:.0f} M parameters, "
          f"feature {tuple(feats.shape)}")
    return {
        "arch": arch,
        "kwargs": {k: v if isinstance(v, (int, float, str, bool)) else getattr(v, "__name__", "SwiGLUPacked")
                   for k, v in kwargs.items()},
        "feature": rule,
        "layout": {k: list(v.shape) for k, v in full.state_dict().items()},
        "image_size": size,
        "features": feats.tolist(),
    }


def main() -> None:
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trident", type=Path, help=f"mahmoodlab/TRIDENT at {TRIDENT_COMMIT} (for conch_v1_5)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="recompute these entries and keep the others as "
                        "vit.json holds them: the same weights give features that move by float rounding (about 1e-6) "
                        "between machines and thread counts, so a new entry need not rewrite the others")
    args = parser.parse_args()
    makers = {**{name: lambda name=name: timm_entry(name) for name in MODELS},
              "conch_v1_5": lambda: conch_v1_5(args.trident), "phikon_v2": phikon_v2, "phikon": phikon}
    names = args.only or list(makers)
    if unknown := sorted(set(names) - set(makers)):
        parser.error(f"unknown entries {unknown}; known: {', '.join(makers)}")
    if "conch_v1_5" in names and args.trident is None:
        parser.error("conch_v1_5 needs --trident")
    out = {"timm": timm.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
           "depth": GOLDEN_DEPTH, "seed": SEED, "models": {}}
    if args.only:
        kept = json.loads((HERE / "vit.json").read_text())
        differ = {k: (kept[k], out[k]) for k in out if k != "models" and kept[k] != out[k]}
        assert not differ, f"vit.json was written with other versions or settings: {differ}"
        out = kept
    for name in names:
        entry = makers[name]()
        if name not in MODELS:
            print(f"{name}: {entry['reference']}, {sum(_numel(s) for s in entry['layout'].values()) / 1e6:.0f} M "
                  f"parameters, feature {len(entry['features'])} x {len(entry['features'][0])}")
        out["models"][name] = entry
    (HERE / "vit.json").write_text(json.dumps(out) + "\n")


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


if __name__ == "__main__":
    main()
