"""Slide readers on a real Aperio SVS and on damaged files: pixels, metadata, edges, batches, errors."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from histosurv.errors import MissingInputError, SlideError
from histosurv.runtime.slides import open_slide
from histosurv.runtime.slides.reader import READERS
from histosurv.runtime.slides.tissue import gpu_available

BACKENDS = ["cucim", "openslide"]


def raw_tiles(path, page_index=0):
    """Every tile of one TIFF page decoded straight from its bytes: ((x, y), (w, h), pixels)."""
    with tifffile.TiffFile(path) as tif:
        page, fh = tif.pages[page_index], tif.filehandle
        across = -(-page.imagewidth // page.tilewidth)
        # both read the file when first used, so take them before seeking to the tiles
        tables, decode = page.jpegtables, page.decode
        for i, (offset, count) in enumerate(zip(page.dataoffsets, page.databytecounts)):
            fh.seek(offset)
            tile, _, _ = decode(fh.read(count), i, jpegtables=tables)
            row, col = divmod(i, across)
            x, y = col * page.tilewidth, row * page.tilelength
            w, h = min(page.tilewidth, page.imagewidth - x), min(page.tilelength, page.imagelength - y)
            yield (x, y), (w, h), tile[0, :h, :w, :3]


@pytest.mark.parametrize("backend", BACKENDS)
def test_svs_pixels_equal_a_direct_tile_decode(cmu_svs, backend):
    compared = 0
    with open_slide(cmu_svs, backend) as slide:
        for location, size, expected in raw_tiles(cmu_svs):
            got = slide.read_region(location, size, 0)
            assert np.array_equal(got, expected), f"tile at {location} differs by {np.abs(got.astype(int) - expected).max()}"
            compared += 1
    assert compared == 130  # 10 x 13 tiles of 240 px, edge tiles included


@pytest.mark.parametrize("backend", BACKENDS)
def test_svs_metadata(cmu_svs, backend):
    with open_slide(cmu_svs, backend) as slide:
        assert slide.backend == backend
        assert slide.dimensions == (2220, 2967)
        assert slide.level_count == 1 and slide.level_downsamples == (1.0,)
        assert slide.mpp == pytest.approx(0.499)
        assert slide.magnification == 20
        assert slide.associated_image_names() == ["label", "macro", "thumbnail"]
        with tifffile.TiffFile(cmu_svs) as tif:
            label_shape = tif.pages[2].shape  # Aperio order: level 0, thumbnail, label, macro
        assert slide.associated_image("label").shape == label_shape
        with pytest.raises(SlideError, match="no associated image 'overview'"):
            slide.associated_image("overview")


def test_auto_picks_cucim_for_svs(cmu_svs):
    with open_slide(cmu_svs) as slide:
        assert slide.backend == "cucim"


def test_reads_past_the_edge_are_white_for_every_backend(cmu_svs):
    windows = {}
    for backend in BACKENDS:
        with open_slide(cmu_svs, backend) as slide:
            inside = slide.read_region((2100, 2900), (120, 67), 0)
            window = slide.read_region((2100, 2900), (300, 200), 0)
            assert np.array_equal(window[:67, :120], inside)
            assert (window[67:] == 255).all() and (window[:, 120:] == 255).all()
            assert (slide.read_region((5000, 5000), (16, 16), 0) == 255).all()
            windows[backend] = slide.read_region((-50, -30), (100, 100), 0)
            assert (windows[backend][:30] == 255).all() and (windows[backend][:, :50] == 255).all()
    assert np.array_equal(windows["cucim"], windows["openslide"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_size,workers", [(1, 1), (5, 2), (16, 2)])
def test_batched_reads_equal_single_reads(cmu_svs, backend, batch_size, workers):
    # cuCIM's batched iterator decodes into reused buffers; a reader that keeps views returns stale pixels
    rng = np.random.default_rng(0)
    locations = np.stack([rng.integers(0, 2220 - 224, 23), rng.integers(0, 2967 - 224, 23)], axis=1)
    with open_slide(cmu_svs, backend) as slide:
        batches = list(slide.read_regions(locations, (224, 224), 0, batch_size=batch_size, num_workers=workers))
        assert [len(b) for b in batches] == [len(locations[i : i + batch_size]) for i in range(0, 23, batch_size)]
        got = np.concatenate(batches)
        for (x, y), patch in zip(locations, got):
            assert np.array_equal(patch, slide.read_region((int(x), int(y)), (224, 224), 0))


def test_batched_reads_refuse_windows_outside_the_slide(cmu_svs):
    with open_slide(cmu_svs) as slide, pytest.raises(SlideError, match="not inside level 0"):
        list(slide.read_regions([(0, 0), (2200, 0), (0, 240)], (256, 256), 0))  # the middle one


def test_thumbnail_is_the_block_mean_of_level_0(cmu_svs):
    with open_slide(cmu_svs) as slide:
        thumb, downsample = slide.thumbnail(16, chunk=512)  # small chunks: chunk seams are exercised
        full = slide.read_region((0, 0), slide.dimensions, 0)
    assert downsample == 16 and thumb.shape == (2967 // 16, 2220 // 16, 3)
    h, w = thumb.shape[:2]
    expected = np.round(full[: h * 16, : w * 16].reshape(h, 16, w, 16, 3).mean(axis=(1, 3))).astype(np.uint8)
    assert np.array_equal(thumb, expected)


def test_level_and_size_are_checked(cmu_svs):
    with open_slide(cmu_svs) as slide:
        with pytest.raises(SlideError, match="level 2 does not exist"):
            slide.read_region((0, 0), (10, 10), 2)
        with pytest.raises(SlideError, match="size must be positive"):
            slide.read_region((0, 0), (0, 10), 0)


# -- files that are not (whole) slides -----------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(MissingInputError, match="slide file not found"):
        open_slide(tmp_path / "nope.svs")


def test_folder_is_not_a_slide(tmp_path):
    with pytest.raises(SlideError, match="not a file"):
        open_slide(tmp_path)


def test_text_file_is_not_a_slide(tmp_path):
    path = tmp_path / "notes.svs"
    path.write_text("patient 12, slide 3\n" * 50)
    with pytest.raises(SlideError, match="not a slide any installed reader can open"):
        open_slide(path)


def test_png_renamed_svs_is_not_a_slide(tmp_path):
    from PIL import Image

    path = tmp_path / "photo.svs"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(path, format="PNG")
    with pytest.raises(SlideError, match="not a slide"):
        open_slide(path)


def test_unknown_backend(cmu_svs):
    with pytest.raises(SlideError, match="unknown slide reader 'pillow'"):
        open_slide(cmu_svs, "pillow")


def test_truncated_svs_fails_at_open(cmu_svs, tmp_path):
    cut = tmp_path / "cut.svs"
    cut.write_bytes(cmu_svs.read_bytes()[: 1_000_000])  # Aperio keeps its index after the pixels
    with pytest.raises(SlideError, match="cut.svs"):
        with open_slide(cut) as slide:
            slide.read_region((0, 0), slide.dimensions, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_tiff_fails_at_the_first_missing_tile(tmp_path, backend):
    rng = np.random.default_rng(1)
    whole = tmp_path / "whole.tiff"
    image = rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    tifffile.imwrite(whole, image, tile=(256, 256), photometric="rgb", compression="jpeg",
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    cut = tmp_path / "cut.tiff"
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(SlideError, match="cut.tiff") as caught:
        with open_slide(cut, backend) as slide:
            slide.read_region((0, 0), (1024, 1024), 0)
    assert "damaged or truncated" in str(caught.value) or "cannot open" in str(caught.value)


def test_backends_registered():
    assert {"cucim", "openslide"} <= set(READERS)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs cupy, cucim and a CUDA GPU")
def test_gpu_decode_matches_the_cpu_decode(cmu_svs):
    """nvJPEG's IDCT is not libjpeg-turbo's, so GPU pixels may differ by a few levels, never by more:
    single windows and the batched path, tile-aligned and not, against cuCIM's CPU decode."""
    locations = [(x, y) for x in (0, 240, 1001) for y in (0, 480, 2500)]
    with open_slide(cmu_svs, "cucim") as cpu, open_slide(cmu_svs, "cucim", device="cuda") as gpu:
        assert gpu.describe()["device"].startswith("cuda")
        singles = [(cpu.read_region(loc, (224, 224)), gpu.read_region(loc, (224, 224))) for loc in locations]
        batched = zip(np.concatenate(list(cpu.read_regions(locations, (224, 224), batch_size=4, num_workers=2))),
                      np.concatenate(list(gpu.read_regions(locations, (224, 224), batch_size=4, num_workers=2))))
        for want, got in [*singles, *batched]:
            assert got.shape == want.shape == (224, 224, 3) and got.dtype == np.uint8
            diff = np.abs(got.astype(np.int16) - want)
            assert diff.mean() <= 1.0 and np.percentile(diff, 99.9) <= 16, (diff.mean(), diff.max())


def test_gpu_requests_without_a_gpu_are_clear_errors(cmu_svs):
    from histosurv.runtime.slides.tissue import TissueConfig, gpu_available, mask_from_rgb

    if gpu_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SlideError, match="cupy|GPU"):
        open_slide(cmu_svs, "cucim", device="cuda")
    with pytest.raises(SlideError, match="OpenSlide decodes on the CPU only"):
        open_slide(cmu_svs, "openslide", device="cuda")
    with pytest.raises(SlideError, match="GPU tissue mask needs cupy"):
        mask_from_rgb(np.zeros((8, 8, 3), np.uint8), TissueConfig(), mpp=16.0, device="cuda")
