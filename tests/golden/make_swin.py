"""Writes tests/golden/swin.json from the Swin code CTransPath is run with.

    /tmp/timmvenv/bin/pip download --no-deps timm_ctp==0.5.4 -d /tmp/ctp_dl
    /tmp/timmvenv/bin/pip install --no-deps --target /tmp/ctp_pkg /tmp/ctp_dl/timm_ctp-0.5.4.tar.gz
    PYTHONPATH=.:/tmp/ctp_pkg /tmp/timmvenv/bin/python tests/golden/make_swin.py

(the venv of make_vit.py: torch 2.14.1, torchvision 0.29.1, timm 1.0.31; histosurv is not imported.)

CTransPath (TransPath's ``ctran.py``, TRIDENT's ``model_zoo/ctranspath/ctran.py``) is
``timm_ctp.create_model('swin_tiny_patch4_window7_224', embed_layer=ConvStem, img_size=224)`` with
``model.head = nn.Identity()``; ``timm_ctp`` is the authors' fork of timm 0.5.4 (on PyPI), the layout of
the published ``ctranspath.pth``. ``ConvStem`` below is theirs as published: two (3x3 stride-2 conv
without bias, BatchNorm, ReLU) from 3 to dim/8 to dim/4 channels, a 1x1 conv with bias to dim, then
the LayerNorm timm passes as ``norm_layer``.

Recorded:
* ``layout``: every key and shape of the full-size model (the file histosurv must load strictly),
  ``derived``: which of them are buffers computed from the configuration, and their values' digests;
* ``features``: a copy with 2 blocks per stage (shifted and unshifted windows in every stage that
  shifts) at weights seeded from the key names (:func:`seeded_swin_state_dict`), in eval mode, on
  seeded normalised 224 px images, through ``forward_features`` (LayerNorm, average pool: 768-d);
* ``timm_layout``: the full-size keys of timm 1.0.31's Swin-T with the same stem (a re-saved CTransPath,
  e.g. for timm >= 0.9, is in this layout), and ``timm_features``: that model's features at the same
  weights, converted by timm's own ``checkpoint_filter_fn`` (old -> new layout).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.golden import HERE, seeded_tensor  # noqa: E402

SEED = 0
BATCH = 2
DEPTHS = (2, 2, 2, 2)
DERIVED = ("relative_position_index", "attn_mask")


def seeded_swin_state_dict(layout: dict[str, list[int]], seed: int = SEED) -> dict[str, torch.Tensor]:
    """Learned tensors drawn from the key names (tests.golden.seeded_tensor); the stem's BatchNorm as a
    trained one (gains near one, positive running variances). Derived buffers are not drawn: leave them
    to the model (the loader fills them)."""
    out = {}
    for key, shape in layout.items():
        if key.endswith(DERIVED):
            continue
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(1000, dtype=torch.long)
            continue
        t = seeded_tensor(key, shape, seed)
        if key.endswith("running_var"):
            t = 0.5 + 10.0 * t.abs()
        elif key.startswith("patch_embed.proj.") and key.endswith("weight") and len(shape) == 1:  # BatchNorm gain
            t = 1.0 + t
        out[key] = t
    return out


def seeded_images(batch: int = BATCH, seed: int = SEED) -> torch.Tensor:
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def _conv_stem(nhwc: bool):
    from torch import nn

    class ConvStem(nn.Module):
        def __init__(self, img_size=224, patch_size=4, in_chans=3, embed_dim=768, norm_layer=None, **_):
            super().__init__()
            pair = (lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v))  # timm 1.0 passes tuples
            self.img_size, self.patch_size = pair(img_size), pair(patch_size)
            assert self.patch_size == (4, 4) and embed_dim % 8 == 0
            self.grid_size = (self.img_size[0] // 4, self.img_size[1] // 4)
            self.num_patches = self.grid_size[0] * self.grid_size[1]
            stem, c_in, c_out = [], in_chans, embed_dim // 8
            for _ in range(2):
                stem += [nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
                c_in, c_out = c_out, c_out * 2
            stem.append(nn.Conv2d(c_in, embed_dim, kernel_size=1))
            self.proj = nn.Sequential(*stem)
            self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

        def forward(self, x):
            x = self.proj(x)
            x = x.permute(0, 2, 3, 1) if nhwc else x.flatten(2).transpose(1, 2)
            return self.norm(x)

    return ConvStem


def ctranspath(depths=None):
    """The authors' build; with ``depths``, timm_ctp's SwinTransformer with swin_tiny's other arguments
    (its registered function fixes the depths)."""
    import timm_ctp
    from timm_ctp.models.swin_transformer import SwinTransformer
    from torch import nn

    if depths is None:
        model = timm_ctp.create_model("swin_tiny_patch4_window7_224", embed_layer=_conv_stem(False), pretrained=False,
                                      img_size=224)
    else:
        model = SwinTransformer(img_size=224, patch_size=4, window_size=7, embed_dim=96, depths=depths,
                                num_heads=(3, 6, 12, 24), embed_layer=_conv_stem(False))
    model.head = nn.Identity()
    return model.eval()


def timm_swin(**kwargs):
    import timm

    return timm.create_model("swin_tiny_patch4_window7_224", embed_layer=_conv_stem(True), pretrained=False,
                             num_classes=0, **kwargs).eval()


def main() -> None:
    import timm
    import timm_ctp
    from timm.models.swin_transformer import checkpoint_filter_fn

    full = ctranspath().state_dict()
    layout = {k: list(v.shape) for k, v in full.items()}
    small = ctranspath(depths=DEPTHS)
    own = small.state_dict()
    weights = {**seeded_swin_state_dict({k: list(v.shape) for k, v in own.items()}),
               **{k: v for k, v in own.items() if k.endswith(DERIVED)}}
    small.load_state_dict(weights, strict=True)
    images = seeded_images()
    with torch.no_grad():
        feats = small.forward_features(images)
        new = timm_swin(depths=DEPTHS)
        new.load_state_dict(checkpoint_filter_fn({"model": weights}, new), strict=True)
        new_feats = new(images)
    out = {
        "timm_ctp": timm_ctp.__version__, "timm": timm.__version__, "torch": torch.__version__, "seed": SEED,
        "depths": list(DEPTHS), "layout": layout,
        "derived": {k: digest(v) for k, v in full.items() if k.endswith(DERIVED)},
        "features": [[float(f"{v:.9g}") for v in row] for row in feats.tolist()],
        "timm_layout": {k: list(v.shape) for k, v in timm_swin().state_dict().items()},
        "timm_features": [[float(f"{v:.9g}") for v in row] for row in new_feats.tolist()],
    }
    print(f"ctranspath: {len(layout)} keys ({len(out['derived'])} derived buffers), "
          f"{sum(v.numel() for k, v in full.items() if not k.endswith(DERIVED)) / 1e6:.1f} M learned; "
          f"features {tuple(feats.shape)} |f| max {feats.abs().max():.3g}; timm {timm.__version__} vs timm_ctp "
          f"max diff {(feats - new_feats).abs().max():.2e}")
    (HERE / "swin.json").write_text(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
