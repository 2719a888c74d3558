"""Slide to features: open -> tissue mask -> patch grid -> streamed patch batches -> encoder engine.

Everything here reads the model repository only (the encoder is a model of it, like the fusion
models), so a slide is scored on a box with no torch and no model source code. Each stage is timed;
reading and encoding overlap (see ``slides.stream``), so their sum exceeds the wall time, and
``wait`` is the part of reading that encoding did not hide.
"""

from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from .. import __version__
from ..data.encoder_record import ATTRIBUTE
from ..data.features import Bag
from ..errors import EmptySlideError, InputError, RepositoryError
from .cpu_budget import cpu_budget, encoder_batch_size
from .encoder_match import DEFAULT_MPP, EncoderChoice, candidates, choose_encoder
from .engines import Engine, load_engine
from .repository import ModelRepository, ModelVersion, sha256_file
from .slides import open_slide
from .slides.stream import PatchStream
from .slides.tiler import GridConfig, PatchGrid, plan_patch_grid
from .slides.tissue import TissueConfig, TissueMask, tissue_mask

__all__ = ["PatchEncoder", "SlideConfig", "SlideFeatures", "SlidePlan", "featurize_slide", "open_encoder", "plan_slide"]

STAGES = ("open", "mask", "grid", "read", "encode", "wait", "total")


class PatchEncoder:
    """A patch-encoder model version (``patches`` uint8 [-1, H, W, 3] -> ``features`` [-1, D]) and the
    µm/px its patches are cut at (the training bags' scale, chosen by ``encoder_match``); the features
    it makes carry its record at that scale, and the overrides they were made under."""

    def __init__(self, version: ModelVersion, engine: Engine, mpp: float | None = None, overrides: dict | None = None):
        if not version.is_encoder:
            raise RepositoryError(
                f"model {version.name!r} is not a patch encoder (it takes {[t.name for t in version.inputs]})"
            )
        self.version, self.engine = version, engine
        self.spec = version.manifest.input("patches")
        self.patch_size = version.patch_size
        self.feature_dim = int(version.feature_dim)
        self.mpp = float(mpp or version.encoder_record.mpp or DEFAULT_MPP)
        self.record = replace(version.encoder_record, mpp=self.mpp)
        self.overrides = dict(overrides or {})

    @classmethod
    def from_repository(
        cls, root: str | os.PathLike, name: str, version: int | None = None, engine: str = "auto", **options
    ) -> "PatchEncoder":
        """Encoder ``name`` at its own scale (no survival model to match: ``tile`` for a new cohort)."""
        mv = ModelRepository(root).version(name, version)
        return cls(mv, load_engine(mv, engine, **options))

    @classmethod
    def from_choice(cls, choice: EncoderChoice, engine: str = "auto", **options) -> "PatchEncoder":
        mv = choice.encoder
        mv.verify_files()
        return cls(mv, load_engine(mv, engine, **options), choice.mpp, choice.overrides)

    def encode(self, patches: np.ndarray) -> np.ndarray:
        problem = self.spec.check(patches)
        if problem:
            raise InputError(f"encoder {self.version.name!r}: {problem}")
        out = self.engine.run({"patches": np.ascontiguousarray(patches, dtype=np.uint8)})["features"]
        return np.asarray(out, dtype=np.float32)

    def describe(self) -> dict:
        """The bag attributes naming the encoder: its full record, and flat facts for people."""
        return {
            "encoder": self.version.name,
            "encoder_version": self.version.version,
            "encoder_architecture": self.version.info.architecture,
            ATTRIBUTE: self.record.to_json(),
            **{f"override_{k}": v for k, v in self.overrides.items()},
            **{f"encoder_{k}": v for k, v in self.engine.describe().items() if k != "providers"},
        }


def open_encoder(
    root: str | os.PathLike,
    model: ModelVersion | None = None,
    name: str | None = None,
    version: int | None = None,
    engine: str = "auto",
    mpp: float | None = None,
    allow_mismatch: bool = False,
    **engine_options,
) -> tuple[PatchEncoder, EncoderChoice]:
    """The patch encoder of repository ``root`` for ``model`` (see ``encoder_match.choose_encoder``),
    loaded, with the choice (its notes are for the user). The one lookup of ``tile``, ``predict`` and
    ``score``; the server makes the same choice among its loaded models."""
    repo = ModelRepository(root)
    choice = choose_encoder(candidates(repo, name, version), model, name, mpp, allow_mismatch, where=str(repo.root))
    return PatchEncoder.from_choice(choice, engine, **engine_options), choice


@dataclass(frozen=True)
class SlideConfig:
    tissue: TissueConfig = TissueConfig()
    grid: GridConfig = GridConfig()  # its patch_size and mpp are replaced by the encoder's
    batch_size: int | None = None  # patches per encoder call; None: the fastest for the encoder (cpu_budget)
    num_workers: int | None = None  # cuCIM decode workers; None: from the cores present (cpu_budget)
    prefetch: int = 2  # batches read ahead of the encoder
    reader: str = "auto"  # cucim | openslide | auto
    device: str = "cpu"  # where slides are decoded and masked: cpu | cuda
    slide_mpp: float | None = None  # for files that record no µm/px


@dataclass
class SlideFeatures:
    bag: Bag
    grid: PatchGrid
    mask: TissueMask
    slide: dict
    seconds: dict = field(default_factory=dict)

    @property
    def patches_per_second(self) -> float:
        return len(self.grid) / self.seconds["total"] if self.seconds.get("total") else 0.0

    def timing_line(self) -> str:
        s = self.seconds
        return (
            f"{len(self.grid)} patches in {s['total']:.2f} s ({self.patches_per_second:.1f} patches/s): open {s['open']:.2f} s, "
            f"mask {s['mask']:.2f} s, grid {s['grid']:.3f} s, read {s['read']:.2f} s (waited {s['wait']:.2f} s), "
            f"encode {s['encode']:.2f} s"
        )


def featurize_slide(
    path: str | os.PathLike,
    encoder: PatchEncoder,
    config: SlideConfig = SlideConfig(),
    progress: Callable[[int, int], None] | None = None,
    submit: Callable[[np.ndarray], "Pending"] | None = None,
    in_flight: int = 2,
    plan: "SlidePlan | None" = None,
) -> SlideFeatures:
    """Features and level-0 coordinates of every tissue patch of the slide at ``path``.

    ``progress(done, total)`` is called once the patch grid is planned (done = 0) and after every
    encoded batch; an exception it raises stops the work (the server cancels a slide this way).
    ``submit`` replaces the encoder call: it queues a batch and returns something with
    ``result()`` (and ``cancel()``) giving its features later; the server passes its dynamic
    batcher. Up to ``in_flight`` batches of this slide then wait for the encoder at once, so that
    a batcher serving several slides always has more than one batch of each to join. ``plan``, from
    :func:`plan_slide`, skips the tissue mask and patch grid (made elsewhere, on a CPU worker).

    Raises :class:`EmptySlideError` when no patch holds enough tissue: a bag with no patches has no
    risk, and a model given one would answer NaN."""
    path = Path(path)
    seconds = dict.fromkeys(STAGES, 0.0)
    t_start = time.perf_counter()
    with ThreadPoolExecutor(1) as hasher:
        with open_slide(path, config.reader, config.device) as reader:
            if plan is None:
                digest = hasher.submit(sha256_file, path)  # reads the file while the patches are decoded
                mask, grid = _plan(reader, path, encoder.patch_size, encoder.mpp, config, seconds, t_start)
            else:  # tiled elsewhere (a Ray CPU task): only the patches are read here
                digest = hasher.submit(lambda: plan.slide_sha256)
                mask, grid = plan.mask, plan.grid
                seconds.update(plan.seconds)
            if progress is not None:
                progress(0, len(grid))
            features = np.empty((len(grid), encoder.feature_dim), np.float32)
            pending: deque = deque()  # (first row, rows, pending features), oldest first

            def collect() -> None:
                index, n, result = pending.popleft()
                t0 = time.perf_counter()
                features[index : index + n] = result.result()
                seconds["encode"] += time.perf_counter() - t0
                if progress is not None:
                    progress(index + n, len(grid))

            try:
                workers = decode_workers(config, encoder)
                batch = config.batch_size or encoder_batch_size(encoder.engine.precision)
                with PatchStream(reader, grid, batch, workers, config.prefetch) as stream:
                    for batch in stream:
                        t0 = time.perf_counter()
                        if submit is None:
                            result = Ready(encoder.encode(batch.patches))
                        else:
                            result = submit(batch.patches)
                        seconds["encode"] += time.perf_counter() - t0
                        pending.append((batch.index, len(batch.coords), result))
                        while len(pending) >= (in_flight if submit is not None else 1):
                            collect()
                    while pending:
                        collect()
            finally:
                for _, _, result in pending:  # stopped early: nobody wants these features any more
                    getattr(result, "cancel", lambda: None)()
            seconds["read"], seconds["wait"] = stream.read_seconds, stream.wait_seconds
            slide_info = reader.describe()
        slide_sha256 = digest.result()
    seconds["total"] = time.perf_counter() - t_start
    attrs = {
        **grid.attrs(),
        **encoder.describe(),
        "slide": path.name,
        "slide_sha256": slide_sha256,
        "reader": slide_info["backend"],
        "tissue_threshold": mask.threshold,
        "tissue_config": str(asdict(config.tissue)),
        "histosurv_version": __version__,
    }
    bag = Bag(features, grid.coords.copy(), attrs, str(path))
    return SlideFeatures(bag, grid, mask, slide_info, seconds)


@dataclass
class SlidePlan:
    """Where a slide's tissue patches are, worked out before any patch is read: what a CPU worker
    hands to an encoder worker (a few KB, where the patches would be ~200 KB each)."""

    path: str
    grid: PatchGrid
    mask: TissueMask
    slide_sha256: str
    seconds: dict


def decode_workers(config: SlideConfig, encoder: PatchEncoder) -> int:
    """The slide's decode workers: as configured, else shared with the encoder by ``cpu_budget``."""
    if config.num_workers is not None:
        return config.num_workers
    on_gpu = str(getattr(encoder.engine, "device", "cpu")).startswith("cuda")
    return cpu_budget(encoder_on_gpu=on_gpu).decode_workers


def plan_slide(path: str | os.PathLike, patch_size: int, mpp: float, config: SlideConfig = SlideConfig()) -> SlidePlan:
    """Opens the slide, finds its tissue and lays the grid of ``patch_size`` px patches at ``mpp`` µm/px;
    raises EmptySlideError without tissue."""
    path = Path(path)
    seconds: dict = {}
    t_start = time.perf_counter()
    with open_slide(path, config.reader, config.device) as reader:
        mask, grid = _plan(reader, path, patch_size, mpp, config, seconds, t_start)
    return SlidePlan(str(path), grid, mask, sha256_file(path), seconds)


def _plan(reader, path: Path, patch_size: int, mpp: float, config: SlideConfig, seconds: dict, t_start: float):
    if config.slide_mpp is not None:
        reader.mpp = float(config.slide_mpp)
    seconds["open"] = time.perf_counter() - t_start
    mask = tissue_mask(reader, config.tissue, config.device)
    seconds["mask"] = mask.seconds
    t0 = time.perf_counter()
    grid = plan_patch_grid(reader, mask, replace(config.grid, patch_size=patch_size, mpp=mpp))
    seconds["grid"] = time.perf_counter() - t0
    if grid.candidates == 0:  # not a tissue problem: no window fits at all
        w0, h0 = reader.dimensions
        raise EmptySlideError(
            f"{path}: the slide is smaller than one patch: {w0} x {h0} px at {reader.mpp:.4g} µm/px, and a "
            f"{patch_size} px patch at {mpp:g} µm/px is {grid.size_level0} px a side at full resolution; "
            "an empty bag has no risk"
        )
    if len(grid) == 0:
        raise EmptySlideError(
            f"{path}: no tissue patches: none of the {grid.candidates} grid windows has "
            f"{config.grid.min_tissue:.0%} tissue (tissue mask covers {mask.tissue_fraction:.1%} of the slide, "
            f"saturation threshold {mask.threshold:.1f}); an empty bag has no risk"
        )
    return mask, grid


class Pending(Protocol):
    def result(self) -> np.ndarray: ...


class Ready:
    """Features already computed, in the shape of a pending result (the serial path)."""

    def __init__(self, features: np.ndarray):
        self._features = features

    def result(self) -> np.ndarray:
        return self._features
