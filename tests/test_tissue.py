"""Tissue masks, patch grids and patch streaming on images whose tissue is known."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from histosurv.errors import InputError, SlideError
from histosurv.runtime.slides import open_slide
from histosurv.runtime.slides.stream import PatchStream, resize_patches
from histosurv.runtime.slides.tiler import GridConfig, PatchGrid, choose_level, plan_patch_grid
from histosurv.runtime.slides.tissue import TissueConfig, TissueMask, gpu_available, mask_from_rgb, tissue_mask


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def drawn_tissue(h=300, w=400, seed=0):
    """A pink-purple ellipse with a hole and a small separate speck on noisy glass: (rgb, true mask)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    body = ((xx - 170) / 120.0) ** 2 + ((yy - 150) / 90.0) ** 2 <= 1
    hole = ((xx - 150) / 18.0) ** 2 + ((yy - 140) / 14.0) ** 2 <= 1  # big enough to stay a hole
    speck = ((xx - 360) / 3.0) ** 2 + ((yy - 40) / 3.0) ** 2 <= 1  # dust: must be dropped
    tissue = body & ~hole
    rgb = np.clip(235 + rng.normal(0, 3, (h, w, 3)), 0, 255)  # glass: grey-white, low saturation
    stain = np.stack([200 + 30 * rng.random((h, w)), 90 + 60 * rng.random((h, w)), 170 + 40 * rng.random((h, w))], -1)
    rgb[tissue | speck] = stain[tissue | speck]
    return rgb.astype(np.uint8), tissue


def test_mask_finds_drawn_tissue_drops_specks_keeps_holes():
    rgb, truth = drawn_tissue()
    mask, threshold = mask_from_rgb(rgb, TissueConfig(), mpp=16.0)  # 16 µm/px: a 32x view of a 20x slide
    assert 8 <= threshold <= 25
    assert iou(mask, truth) >= 0.95
    assert not mask[35:46, 355:366].any(), "a dust speck smaller than the minimum area survived"
    assert not mask[140, 150], "a hole larger than the minimum hole area was filled"


def test_fixed_threshold_and_bad_config():
    rgb, truth = drawn_tissue()
    mask, threshold = mask_from_rgb(rgb, TissueConfig(threshold=8), mpp=16.0)
    assert threshold == 8 and iou(mask, truth) >= 0.95
    with pytest.raises(InputError, match="'otsu' or a number"):
        TissueConfig(threshold="triangle")
    with pytest.raises(InputError, match="odd"):
        TissueConfig(median=4)


def test_blank_glass_has_no_tissue():
    rng = np.random.default_rng(3)
    glass = np.clip(238 + rng.normal(0, 2.5, (200, 300, 3)), 0, 255).astype(np.uint8)
    mask, threshold = mask_from_rgb(glass, TissueConfig(), mpp=16.0)
    assert not mask.any(), f"noise on glass became tissue at threshold {threshold}"


def test_real_slide_mask(cmu_svs):
    with open_slide(cmu_svs) as slide:
        mask = tissue_mask(slide)
    assert mask.downsample == 32 and mask.mask.shape == (2967 // 32, 2220 // 32)
    # the CMU region: a band of skin down the middle, glass to its left and right
    assert 0.3 < mask.tissue_fraction < 0.45
    assert not mask.mask[:, :15].any() and mask.mask[60:80, 30:40].all()


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs cupy, cucim and a CUDA GPU")
def test_gpu_mask_agrees_with_cpu(cmu_svs):
    rgb, _ = drawn_tissue(600, 800)
    cpu, _ = mask_from_rgb(rgb, TissueConfig(), mpp=16.0)
    gpu, _ = mask_from_rgb(rgb, TissueConfig(), mpp=16.0, device="cuda")
    assert iou(cpu, gpu) >= 0.99
    with open_slide(cmu_svs) as slide:
        assert iou(tissue_mask(slide).mask, tissue_mask(slide, device="cuda").mask) >= 0.99


def test_fraction_in_counts_mask_pixels_under_each_square():
    mask = np.zeros((10, 10), bool)
    mask[:5, :5] = True
    tm = TissueMask(mask, downsample=4.0, threshold=10, device="cpu")
    fractions = tm.fraction_in(np.array([[0, 0], [20, 0], [10, 10], [36, 36]]), 20)
    # (10, 10)-(30, 30) covers mask pixels 2..7 on each axis, tissue 2..4: 9 of 36
    assert fractions.tolist() == [1.0, 0.0, 0.25, 0.0]


# -- grid -----------------------------------------------------------------------------------------


class FakePyramid:
    """Just the geometry a grid needs, to try many scanners' pyramids quickly."""

    path = "fake.svs"

    def __init__(self, dims, downsamples, mpp):
        self.level_downsamples = tuple(downsamples)
        self.level_dimensions = tuple((int(dims[0] // d), int(dims[1] // d)) for d in downsamples)
        self.mpp = mpp

    level_count = property(lambda self: len(self.level_downsamples))
    dimensions = property(lambda self: self.level_dimensions[0])

    def level_mpp(self, level):
        return self.mpp * self.level_downsamples[level]


@pytest.mark.parametrize(
    "mpp,downsamples,want_level,want_read",
    [
        (0.25, (1, 4, 16), 0, 512),  # 40x without a 2x level: read 512, reduce to 256
        (0.25, (1, 2, 8), 1, 256),  # 40x with a 2x level: read it as is
        (0.499, (1,), 0, 256),  # 0.499 is 20x within tolerance
        (0.5, (1, 4), 0, 256),
        (0.2527, (1, 4.0003, 16.001), 0, 507),  # odd scanner: resize, never read a too-coarse level
        (0.121, (1, 2, 4, 8), 2, 264),
    ],
)
def test_choose_level(mpp, downsamples, want_level, want_read):
    assert choose_level(FakePyramid((40000, 30000), downsamples, mpp), GridConfig()) == (want_level, want_read)


def test_no_upsampling_and_no_mpp():
    with pytest.raises(SlideError, match="coarser than the 0.5"):
        choose_level(FakePyramid((4000, 3000), (1,), 1.0), GridConfig())
    with pytest.raises(SlideError, match="no µm per pixel"):
        choose_level(FakePyramid((4000, 3000), (1,), None), GridConfig())


def test_grid_geometry_and_order():
    slide = FakePyramid((5000, 3000), (1, 4, 16), 0.25)
    mask = TissueMask(np.ones((3000 // 32, 5000 // 32), bool), 32.0, 10, "cpu")
    grid = plan_patch_grid(slide, mask)
    assert (grid.level, grid.read_size, grid.size_level0) == (0, 512, 512)
    assert len(grid) == (5000 // 512) * (3000 // 512) == grid.candidates
    assert (grid.coords % 512 == 0).all() and (grid.coords + 512 <= [5000, 3000]).all()
    order = np.lexsort((grid.coords[:, 0], grid.coords[:, 1]))
    assert (order == np.arange(len(grid))).all(), "not row-major"
    assert grid.mpp == 0.5


def test_grid_keeps_patches_by_tissue_fraction():
    slide = FakePyramid((4096, 4096), (1,), 0.5)
    mask = np.zeros((128, 128), bool)
    mask[:, :40] = True  # tissue on level-0 x < 1280: 5 patch columns, the 6th holds 0 tissue
    mask[:, 40:44] = True  # 4 of the 6th column's 8 mask columns: 50% tissue
    grid = plan_patch_grid(slide, TissueMask(mask, 32.0, 10, "cpu"), GridConfig(min_tissue=0.5))
    assert sorted(set(grid.coords[:, 0].tolist())) == [0, 256, 512, 768, 1024, 1280]
    grid = plan_patch_grid(slide, TissueMask(mask, 32.0, 10, "cpu"), GridConfig(min_tissue=0.75))
    assert max(grid.coords[:, 0]) == 1024


# -- streaming ------------------------------------------------------------------------------------


def test_stream_yields_every_patch_in_order_and_resizes(cmu_svs):
    with open_slide(cmu_svs) as slide:
        mask = tissue_mask(slide)
        grid = plan_patch_grid(slide, mask, GridConfig(patch_size=128, mpp=1.0))
        assert grid.read_size == 257 and len(grid) > 10  # 128 px at 1.0 µm = 257 px at 0.499 µm
        with PatchStream(slide, grid, batch_size=7, num_workers=2, prefetch=2) as stream:
            batches = list(stream)
        assert [b.index for b in batches] == list(range(0, len(grid), 7))
        patches = np.concatenate([b.patches for b in batches])
        assert patches.shape == (len(grid), 128, 128, 3)
        for i in (0, len(grid) // 2, len(grid) - 1):
            x, y = grid.coords[i]
            window = slide.read_region((int(x), int(y)), (257, 257), 0)
            assert np.array_equal(patches[i], resize_patches(window[None], 128)[0])


def test_stream_stops_its_reader_when_the_consumer_stops(cmu_svs):
    with open_slide(cmu_svs) as slide:
        grid = plan_patch_grid(slide, tissue_mask(slide), GridConfig(patch_size=64, mpp=0.5, min_tissue=0))
        stream = PatchStream(slide, grid, batch_size=4, prefetch=1)
        with stream:
            next(iter(stream))
        assert not stream._thread.is_alive()
        assert threading.active_count() < 50


def test_stream_raises_the_readers_error():
    class Broken:
        path = "broken.svs"

        def read_regions(self, *a, **k):
            yield np.zeros((2, 8, 8, 3), np.uint8)
            raise SlideError("broken.svs: reading pixels failed")

    grid = PatchGrid(np.zeros((4, 2), np.int64), np.ones(4), 0, 8, 8, 8, 0.5)
    with PatchStream(Broken(), grid, batch_size=2) as stream, pytest.raises(SlideError, match="reading pixels failed"):
        list(stream)


def test_resize_area_average():
    patch = np.zeros((1, 4, 4, 3), np.uint8)
    patch[0, :2, :2] = 200
    assert resize_patches(patch, 2)[0, :, :, 0].tolist() == [[200, 0], [0, 0]]
    odd = resize_patches(np.full((2, 300, 300, 3), 77, np.uint8), 256)
    assert odd.shape == (2, 256, 256, 3) and (odd == 77).all()


# -- synthetic slides whose tissue and pixels are known -------------------------------------------


@pytest.fixture(scope="module")
def tissue_slide(tmp_path_factory):
    from histosurv.data.synthetic_slide import write_synthetic_slide

    return write_synthetic_slide(tmp_path_factory.mktemp("synthetic") / "tissue.tiff", 8192, 6144, mpp=0.5)


@pytest.fixture(scope="module")
def coordinate_slide(tmp_path_factory):
    from histosurv.data.synthetic_slide import write_synthetic_slide

    return write_synthetic_slide(
        tmp_path_factory.mktemp("synthetic") / "coords.tiff", 4096, 3072, mpp=0.25, downsamples=(1, 4, 16),
        compression="deflate", pattern="coordinates",
    )


@pytest.mark.parametrize("backend", ["cucim", "openslide"])
def test_mask_and_grid_find_the_known_tissue(tissue_slide, backend):
    with open_slide(tissue_slide.path, backend) as slide:
        mask = tissue_mask(slide)
        assert slide.level_downsamples[mask_level := slide.best_level_for_downsample(32)] == 16  # read from 16x
        grid = plan_patch_grid(slide, mask, GridConfig(min_tissue=0))
    truth = tissue_slide.tissue_mask(mask.downsample)[: mask.mask.shape[0], : mask.mask.shape[1]]
    assert iou(mask.mask, truth) >= 0.95, f"mask IoU {iou(mask.mask, truth):.4f} (level {mask_level})"
    # a patch is tissue when the true tissue (on a fine 8x grid) covers half of it
    true_fraction = TissueMask(tissue_slide.tissue_mask(8), 8.0, 0, "cpu").fraction_in(grid.coords, grid.size_level0)
    found, true = grid.tissue >= 0.5, true_fraction >= 0.5
    assert true.sum() > 200
    assert iou(found, true) >= 0.95, f"patch IoU {iou(found, true):.4f}"


@pytest.mark.parametrize("backend", ["cucim", "openslide"])
@pytest.mark.parametrize(
    "patch_size,mpp,level,read_size",
    [(128, 0.25, 0, 128), (128, 1.0, 1, 128), (64, 4.0, 2, 64), (128, 0.5, 0, 256), (96, 2.0, 1, 192)],
)
def test_patches_hold_the_pixels_at_their_coordinates_at_every_level(
    coordinate_slide, backend, patch_size, mpp, level, read_size
):
    everything = TissueMask(np.ones((3072 // 16, 4096 // 16), bool), 16.0, 0, "cpu")
    with open_slide(coordinate_slide.path, backend) as slide:
        grid = plan_patch_grid(slide, everything, GridConfig(patch_size=patch_size, mpp=mpp, min_tissue=0))
        assert (grid.level, grid.read_size) == (level, read_size)
        assert grid.mpp == pytest.approx(mpp)
        with PatchStream(slide, grid, batch_size=16) as stream:
            patches = np.concatenate([b.patches for b in stream])
    assert len(patches) == len(grid) == (4096 // grid.size_level0) * (3072 // grid.size_level0)
    for i in range(0, len(grid), max(1, len(grid) // 40)):
        x, y = (int(v) for v in grid.coords[i])
        expected = coordinate_slide.expected_region((x, y), (read_size, read_size), level)
        assert np.array_equal(patches[i], resize_patches(expected[None], patch_size)[0]), f"patch at {(x, y)}"


def test_stream_reads_ahead_at_most_prefetch_batches():
    """Memory is bounded by the queue, not by the slide: a slow consumer never has more than
    ``prefetch`` batches waiting plus the one being read."""
    import time

    state = {"produced": 0, "consumed": 0, "ahead": 0}

    class CountingReader:
        path = "counting.svs"

        def read_regions(self, coords, size, level, batch_size, num_workers):
            for start in range(0, len(coords), batch_size):
                state["produced"] += 1
                state["ahead"] = max(state["ahead"], state["produced"] - state["consumed"])
                yield np.zeros((len(coords[start : start + batch_size]), 8, 8, 3), np.uint8)

    grid = PatchGrid(np.zeros((400, 2), np.int64), np.ones(400), 0, 8, 8, 8, 0.5)
    with PatchStream(CountingReader(), grid, batch_size=4, prefetch=3) as stream:
        for _ in stream:
            time.sleep(0.002)  # the encoder is the slow side
            state["consumed"] += 1
    assert state["consumed"] == 100
    assert state["ahead"] <= 3 + 2  # queued + the one being put + the one being consumed
