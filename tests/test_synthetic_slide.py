"""The synthetic pyramidal slides: every reader must see the pyramid, the µm/px and exactly the pixels
the writer says it wrote."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from histosurv.data import synthetic_slide as synth
from histosurv.data.synthetic_slide import (
    Ellipse,
    TissueShape,
    describe_synthetic_slide,
    write_blank_slide,
    write_synthetic_slide,
)

READERS = ("cucim", "openslide", "tiffslide")
W, H = 2048, 1536  # levels 2048x1536, 512x384, 128x96, 32x24: full, partial and single-tile levels


@pytest.fixture(scope="module")
def jpeg_slide(tmp_path_factory):
    return write_synthetic_slide(tmp_path_factory.mktemp("slides") / "tissue.tif", W, H, compression="jpeg")


@pytest.fixture(scope="module")
def coords_slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("slides") / "coords.tif"
    return write_synthetic_slide(path, W, H, compression="deflate", pattern="coordinates")


class Reader:
    """The three libraries behind one (location, size, level) -> uint8 RGB call, OpenSlide's argument order."""

    def __init__(self, name: str, path):
        self.name = name
        if name == "cucim":
            self.slide = pytest.importorskip("cucim").CuImage(str(path))
            res = self.slide.resolutions
            self.dimensions, self.downsamples = res["level_dimensions"], res["level_downsamples"]
            spacing, units = self.slide.spacing(), self.slide.spacing_units()
            assert units[:2] == ["micrometer", "micrometer"]
            self.mpp = (spacing[0], spacing[1])
        else:
            module = pytest.importorskip(name)
            self.slide = module.OpenSlide(str(path)) if name == "openslide" else module.TiffSlide(str(path))
            self.dimensions, self.downsamples = self.slide.level_dimensions, self.slide.level_downsamples
            props = self.slide.properties
            self.mpp = (float(props[f"{name}.mpp-x"]), float(props[f"{name}.mpp-y"]))  # a string in OpenSlide

    def read(self, location, size, level) -> np.ndarray:
        if self.name == "cucim":
            return np.asarray(self.slide.read_region(location, size, level))
        if self.name == "tiffslide":
            return self.slide.read_region(location, level, size, as_array=True)
        return np.asarray(self.slide.read_region(location, level, size).convert("RGB"))


@pytest.mark.parametrize("reader", READERS)
def test_every_reader_sees_all_levels_and_the_mpp(jpeg_slide, reader):
    r = Reader(reader, jpeg_slide.path)
    assert [tuple(d) for d in r.dimensions] == list(jpeg_slide.level_dimensions)
    assert list(r.downsamples) == pytest.approx(jpeg_slide.downsamples)
    assert r.mpp == pytest.approx((0.25, 0.25))


def test_each_level_carries_its_own_resolution_in_the_main_ifd_chain(jpeg_slide):
    with tifffile.TiffFile(jpeg_slide.path) as tif:
        assert len(tif.pages) == jpeg_slide.level_count  # pages, not SubIFDs
        for level, page in enumerate(tif.pages):
            assert page.is_tiled and page.subfiletype == (0 if level == 0 else 1)
            assert page.photometric == tifffile.PHOTOMETRIC.YCBCR  # what the JPEG tiles really hold
            assert 1e4 / page.resolution[0] == pytest.approx(jpeg_slide.level_mpp(level))


@pytest.mark.parametrize("reader", READERS)
def test_jpeg_tiles_decode_identically_in_every_reader_at_every_level(jpeg_slide, reader):
    r = Reader(reader, jpeg_slide.path)
    t = jpeg_slide.tile
    with tifffile.TiffFile(jpeg_slide.path) as tif:
        for level, page in enumerate(tif.pages):
            d, (lw, lh) = jpeg_slide.downsamples[level], jpeg_slide.level_dimensions[level]
            across = -(-lw // t)
            for index, (offset, count) in enumerate(zip(page.dataoffsets, page.databytecounts)):
                tif.filehandle.seek(offset)
                data = tif.filehandle.read(count)  # before touching page.decode: its first use seeks the file
                raw = page.decode(data, index)[0][0]  # (1, t, t, 3) -> (t, t, 3)
                col, row = (index % across) * t, (index // across) * t
                w, h = min(t, lw - col), min(t, lh - row)  # edge tiles: only the part inside the level
                got = r.read((col * d, row * d), (w, h), level)
                np.testing.assert_array_equal(got, raw[:h, :w], err_msg=f"level {level} tile {index}")
                # The colours are the intended ones, up to JPEG's loss (a wrong photometric is far off).
                wanted = jpeg_slide.expected_region((col * d, row * d), (w, h), level)
                assert np.abs(got.astype(int) - wanted).mean() < 12


@pytest.mark.parametrize("reader", READERS)
def test_coordinates_pattern_reads_back_exactly_at_every_level(coords_slide, reader):
    r = Reader(reader, coords_slide.path)
    rng = np.random.default_rng(0)
    for level, d in enumerate(coords_slide.downsamples):
        lw, lh = coords_slide.level_dimensions[level]
        for _ in range(12):
            w, h = int(rng.integers(1, min(lw, 300) + 1)), int(rng.integers(1, min(lh, 300) + 1))
            col, row = int(rng.integers(0, lw - w + 1)), int(rng.integers(0, lh - h + 1))
            # OpenSlide interpolates when a location falls between a reduced level's pixels.
            dx, dy = (0, 0) if reader == "openslide" else (int(rng.integers(0, d)), int(rng.integers(0, d)))
            location = (col * d + dx, row * d + dy)
            got = r.read(location, (w, h), level)
            np.testing.assert_array_equal(got, coords_slide.expected_region(location, (w, h), level),
                                          err_msg=f"level {level} at {location} size {(w, h)}")


@pytest.mark.parametrize("compression", ["lzw", None])
def test_other_lossless_compressions(tmp_path, compression):
    cucim = pytest.importorskip("cucim")
    slide = write_synthetic_slide(tmp_path / "c.tif", 600, 500, compression=compression, pattern="coordinates",
                                  downsamples=(1, 4))
    image = cucim.CuImage(str(slide.path))
    for level in (0, 1):
        np.testing.assert_array_equal(np.asarray(image.read_region((8, 12), (100, 90), level)),
                                      slide.expected_region((8, 12), (100, 90), level))


def test_a_one_pixel_shift_changes_the_coordinates_pattern_at_every_level(coords_slide):
    for level, d in enumerate(coords_slide.downsamples):
        window = coords_slide.expected_region((0, 0), (8, 8), level)
        assert not np.array_equal(window, coords_slide.expected_region((d, 0), (8, 8), level))
        assert not np.array_equal(window, coords_slide.expected_region((0, d), (8, 8), level))


def test_expected_region_refuses_windows_outside_the_level(coords_slide):
    with pytest.raises(ValueError, match="not inside"):
        coords_slide.expected_region((W - 10, 0), (20, 20), 0)
    with pytest.raises(ValueError, match="not inside"):
        coords_slide.expected_region((0, 0), (33, 24), 3)


def saturation(rgb: np.ndarray) -> np.ndarray:
    high, low = rgb.max(-1).astype(float), rgb.min(-1).astype(float)
    return np.where(high > 0, 255 * (high - low) / np.maximum(high, 1), 0)


def test_tissue_mask_matches_the_written_pixels(jpeg_slide):
    level = 2  # 16x: 128 x 96
    lw, lh = jpeg_slide.level_dimensions[level]
    image = Reader("tiffslide", jpeg_slide.path).read((0, 0), (lw, lh), level)
    mask = jpeg_slide.tissue_mask(16)
    assert mask.shape == (lh, lw)
    sat = saturation(image)
    assert np.mean((sat > 40) == mask) > 0.99  # JPEG blurs a few pixels at the tissue's edge
    assert np.median(sat[~mask]) < 5  # glass: near white, low saturation
    assert 0.2 < jpeg_slide.tissue_fraction() < 0.5
    assert jpeg_slide.tissue_fraction() == pytest.approx(mask.mean(), abs=0.01)
    assert jpeg_slide.tissue_mask(32).shape == (48, 64)  # any downsample, not only the levels'


def test_tissue_shape_with_a_hole():
    ring = TissueShape(ellipses=(Ellipse(50, 50, 40, 40),), holes=(Ellipse(50, 50, 10, 10),))
    x = np.array([[50.0, 75.0, 95.0]])
    assert ring.contains(x, np.array([[50.0]])).tolist() == [[False, True, False]]


def test_blank_slide_has_no_tissue(tmp_path):
    slide = write_blank_slide(tmp_path / "blank.tif", 1024, 768)
    assert not slide.tissue_mask(8).any() and slide.tissue_fraction() == 0.0
    with tifffile.TiffFile(slide.path) as tif:
        lowest = tif.pages[-1].asarray()
    assert saturation(lowest).max() < 10


def test_describe_gives_what_write_wrote_and_the_writer_is_deterministic(tmp_path):
    a = write_synthetic_slide(tmp_path / "a.tif", 700, 500, downsamples=(1, 4), seed=3)
    b = write_synthetic_slide(tmp_path / "b.tif", 700, 500, downsamples=(1, 4), seed=3)
    assert a.path.read_bytes() == b.path.read_bytes()
    assert describe_synthetic_slide(a.path, 700, 500, downsamples=(1, 4), seed=3) == a
    described = describe_synthetic_slide(tmp_path / "c.tif", 70, 50)
    assert described.level_dimensions[-1] == (2, 1) and not described.path.exists()  # nothing written


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synth, "_render", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_synthetic_slide(tmp_path / "s.tif", 512, 512)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [
    {"downsamples": (2, 4)}, {"downsamples": (1, 4, 4)}, {"tile": 100}, {"pattern": "checkers"},
    {"compression": "webp"}, {"mpp": 0}, {"jpeg_quality": 0},
    {"pattern": "coordinates", "tissue": TissueShape(ellipses=(Ellipse(1, 1, 1, 1),))},
])
def test_bad_arguments_are_refused(tmp_path, bad):
    with pytest.raises(ValueError):
        write_synthetic_slide(tmp_path / "s.tif", 512, 512, **bad)
    assert not (tmp_path / "s.tif").exists()
