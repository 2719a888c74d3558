"""Attention heatmaps drawn over a real (synthetic, pyramidal TIFF) slide read through the slide readers."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from histosurv.data.synthetic_slide import write_synthetic_slide
from histosurv.errors import InputError
from histosurv.runtime.batch.heatmap import (
    COLORBAR_HEIGHT,
    attention_image,
    colormap,
    heatmap_thumbnail,
    rank_normalise,
    write_heatmap,
)
from histosurv.runtime.slides import open_slide

WIDTH, HEIGHT = 4096, 3072
PATCH = 512  # level-0 side of a patch
MAX_SIDE = 512  # thumbnail at downsample 8: a patch is 64 px
COORDS = np.array([[512, 512], [1024, 512], [1536, 512], [1024, 1024]])
ATTENTION = np.array([0.01, 0.02, 0.03, 0.94])  # the last patch dominates
ALPHA = 0.45


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    path = tmp_path_factory.mktemp("slide") / "slide.tif"
    write_synthetic_slide(path, WIDTH, HEIGHT)
    with open_slide(path) as slide:
        yield slide


def centre(coord, scale=MAX_SIDE / WIDTH):
    x, y = coord
    return int((y + PATCH / 2) * scale), int((x + PATCH / 2) * scale)  # (row, col)


def blend(pixel, colour, alpha=ALPHA):
    return np.round((1 - alpha) * pixel.astype(float) + alpha * colour).astype(np.uint8)


def test_png_shows_attention_over_thumbnail(reader, tmp_path):
    out = write_heatmap(tmp_path / "heat.png", reader, COORDS, ATTENTION, PATCH, max_side=MAX_SIDE, alpha=ALPHA)
    assert out == tmp_path / "heat.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heat.png"]  # no temporary file left
    with Image.open(out) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        png = np.asarray(im)
    thumb, scale = heatmap_thumbnail(reader, MAX_SIDE)
    assert scale == (1 / 8, 1 / 8)
    assert png.shape == (thumb.shape[0] + COLORBAR_HEIGHT, thumb.shape[1], 3)
    assert max(thumb.shape[:2]) <= MAX_SIDE

    high, low = colormap(1.0), colormap(0.0)
    top, bottom = centre(COORDS[3]), centre(COORDS[0])
    assert np.array_equal(png[top], blend(thumb[top], high))
    assert np.array_equal(png[bottom], blend(thumb[bottom], low))
    assert not np.array_equal(png[top], thumb[top])
    assert np.linalg.norm(png[top] - high) < np.linalg.norm(png[bottom] - high)

    far = (int(2800 / 8), int(3500 / 8))  # no patch near the bottom-right corner
    assert np.array_equal(png[far], thumb[far])
    assert np.array_equal(png[: thumb.shape[0]][0, 0], thumb[0, 0])

    bar = png[thumb.shape[0] :]
    assert np.all(bar == bar[:1])  # same colour down each column
    assert np.abs(bar[0, 0].astype(int) - low).max() <= 1 and np.abs(bar[0, -1].astype(int) - high).max() <= 1


def test_rank_normalisation_ignores_scale(reader):
    a = attention_image(reader, COORDS[:3], [1e-9, 2e-9, 1.0], PATCH, max_side=MAX_SIDE)
    b = attention_image(reader, COORDS[:3], [1, 2, 3], PATCH, max_side=MAX_SIDE)
    assert np.array_equal(a, b)
    np.testing.assert_allclose(rank_normalise(np.array([5.0, 1.0, 5.0, 0.0])), [5 / 6, 1 / 3, 5 / 6, 0])
    assert rank_normalise(np.array([0.3])).tolist() == [0.5]


def test_longer_side_fits_when_pyramid_does_not_divide(reader, tmp_path):
    # downsample 13.65 is served from level 1 reduced by 3 (341 px wide), then shrunk to fit
    out = write_heatmap(tmp_path / "small.png", reader, COORDS, ATTENTION, PATCH, max_side=300)
    with Image.open(out) as im:
        w, h = im.size
    assert max(w, h - COLORBAR_HEIGHT) <= 300 and w == 300


@pytest.mark.parametrize(
    "coords, attention, word",
    [
        (COORDS, [0.1, np.nan, 0.2, 0.3], "attention"),
        (COORDS, [0.1, np.inf, 0.2, 0.3], "attention"),
        (COORDS, [0.1, 0.2, 0.3], "attention"),
        (np.zeros((0, 2)), np.zeros(0), "empty"),
        (COORDS[:, :1], ATTENTION, "coords"),
        (COORDS, ATTENTION[:, None], "attention"),
    ],
)
def test_bad_input_is_refused(reader, tmp_path, coords, attention, word):
    with pytest.raises(InputError, match=word) as e:
        write_heatmap(tmp_path / "bad.png", reader, coords, attention, PATCH, max_side=MAX_SIDE)
    assert "attention" in str(e.value) or "coords" in str(e.value)
    assert list(tmp_path.iterdir()) == []
