"""Batch scoring on Ray Data: tiling on CPU tasks, then an encoder actor pool, then a fusion actor.

1. Ray tasks on CPU workers open each slide, find its tissue and lay the patch grid (``plan_slide``);
   the plan (grid, mask, sha256: a few KB) travels on, not the patches (~200 KB each at 256 px).
2. Encoder actors hold a patch-encoder engine (one actor per GPU where the cluster has GPUs), read the
   planned patches on their decode threads while encoding, and write the features into the run's
   cache folder.
3. A fusion actor scores the features from there.

Ray Data streams the slides with backpressure, so a cluster never holds more than a few slides in
flight, and the driver commits each record as it arrives, exactly as the local backend does: a
killed run resumes the same way, and both backends give the same records. The run folder must be on
storage every node sees (the usual place for a slide archive and its results).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import time
from dataclasses import asdict, replace

from ...errors import InputError
from ..cpu_budget import env_threads
from .manifest import SlideRow
from .rundir import DiskFull, is_disk_full
from .scoring import ScoringConfig, SlideScorer, failure

__all__ = ["score_on_ray", "connect"]


def connect(address: str, num_cpus: int | None = None):
    """``auto``: the cluster this machine belongs to if there is one, else a local Ray started here;
    ``local``: always a local one; anything else: that cluster's address."""
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray: pip install 'histosurv[ray]'") from None
    if ray.is_initialized():
        return ray
    options = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    if address == "local":
        ray.init(num_cpus=num_cpus, **options)
    elif address == "auto":
        try:
            ray.init(address="auto", **options)
        except (ConnectionError, RuntimeError):  # no cluster running: start one on this machine
            ray.init(num_cpus=num_cpus, **options)
    else:
        ray.init(address=address, **options)
    return ray


def score_on_ray(todo: list[SlideRow], config: ScoringConfig, run, address: str, workers: int | None, heatmaps_dir):
    ray = connect(address)
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    workers = workers or max(1, gpus)
    cpus = float(resources.get("CPU", 1))
    # Tiling tasks get half a CPU at a time and the fusion actor (one small engine call per slide) none
    # reserved; the encoder actors share the rest, so every stage can always be scheduled.
    per_worker = max(0.25, (cpus - 0.5) / workers)
    settings = json.dumps(_config_dict(config))
    env = {"HISTOSURV_THREADS": str(env_threads() or max(1, math.ceil(per_worker)))}  # --threads wins
    items = [{**row.to_dict(), "record": "", "plan": b""} for row in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        _plan, fn_kwargs={"settings": settings}, batch_size=1, compute=ray.data.TaskPoolStrategy(), num_cpus=0.5,
        runtime_env={"env_vars": env},
    )
    ds = ds.map_batches(
        _Featurize, fn_constructor_args=(settings, str(run.features)), batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=per_worker, num_gpus=1 if gpus else 0,
        runtime_env={"env_vars": env},
    )
    ds = ds.map_batches(
        _Fuse, fn_constructor_args=(settings, str(run.features), str(heatmaps_dir) if heatmaps_dir else None), batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0,
        runtime_env={"env_vars": {"HISTOSURV_THREADS": "1"}},
    )
    # One slide per batch and no prefetching: a record reaches the driver (and is committed) as soon as
    # its slide is scored, not when the next one is.
    for batch in ds.iter_batches(batch_size=1, prefetch_batches=0, batch_format="numpy"):
        record = json.loads(str(batch["record"][0]))
        if record["status"] == DISK_FULL:  # the driver stops the run, as the local backend does
            raise DiskFull(record["error"])
        yield record


DISK_FULL = "disk_full"


def _disk_full(error: Exception) -> dict:
    """A worker's full disk travels to the driver as a record it never commits (see rundir.DiskFull)."""
    return {"status": DISK_FULL, "error": str(error)}


def _config_dict(config: ScoringConfig) -> dict:
    return asdict(config)


def _config_from(settings: str) -> ScoringConfig:
    from ..pipeline import SlideConfig
    from ..slides.tiler import GridConfig
    from ..slides.tissue import TissueConfig

    values = json.loads(settings)
    slide = values.pop("slide")
    slide = SlideConfig(**{**slide, "tissue": TissueConfig(**slide["tissue"]), "grid": GridConfig(**slide["grid"])})
    return ScoringConfig(**values, slide=slide)


def _row(batch, i: int = 0) -> SlideRow:
    return SlideRow(str(batch["slide_id"][i]), str(batch["case_id"][i]), str(batch["path"][i]))


def _out(batch, record: dict, plan: bytes = b"") -> dict:
    return {**{k: [v[0]] for k, v in batch.items() if k not in ("record", "plan")}, "record": [json.dumps(record)], "plan": [plan]}


def _plan(batch, settings: str):
    """Tiling, in a CPU task: it needs the encoder's patch size and scale, not its engine."""
    from ..pipeline import plan_slide

    row = _row(batch)
    started = time.perf_counter()
    try:
        config = _config_from(settings)
        choice = config.choice()
        # Ray hides the GPUs from a task that asked for none (CUDA_VISIBLE_DEVICES=""): with --device cuda
        # the mask is found on the CPU here, and the GPU decodes in the encoder actors
        on_cpu = replace(config.slide, device="cpu")
        plan = plan_slide(row.path, choice.encoder.patch_size, choice.mpp, on_cpu)
        # pickled between histosurv's own workers only; nothing a client sent
        planned = {"status": "planned", "tile_seconds": time.perf_counter() - started, "tiler": os.getpid()}
        return _out(batch, planned, pickle.dumps(plan))
    except Exception as e:
        return _out(batch, {**failure(e), "tile_seconds": time.perf_counter() - started})


class _Featurize:
    def __init__(self, settings: str, features_dir: str):
        self.scorer = SlideScorer(_config_from(settings), features_dir)

    def __call__(self, batch):
        row = _row(batch)
        started = time.perf_counter()
        planned = json.loads(str(batch["record"][0]))
        record = self.scorer.base_record(row)
        if planned["status"] == "failed":
            record.update(planned)
            record["seconds"] = {"total": round(planned["tile_seconds"], 4)}
            record.pop("tile_seconds")
            return _out(batch, record)
        try:
            _, seconds, cache = self.scorer.featurize(row, pickle.loads(batch["plan"][0]))
            record.update(status="featurized", seconds={k: round(v, 4) for k, v in seconds.items()}, worker=os.getpid(),
                          tiler=planned["tiler"], cache=cache)
        except Exception as e:  # recorded, as the local backend does
            record.update(_disk_full(e) if is_disk_full(e) else failure(e))
        # wall time of tiling and of this actor; the fusion actor adds its own, so 'total' means what it
        # means locally
        record.setdefault("seconds", {})["total"] = round(planned["tile_seconds"] + time.perf_counter() - started, 4)
        return _out(batch, record)


class _Fuse:
    def __init__(self, settings: str, features_dir: str, heatmaps_dir: str | None):
        self.scorer = SlideScorer(_config_from(settings), features_dir, heatmaps_dir)

    def __call__(self, batch):
        from ...data.features import read_bag

        row = _row(batch)
        started = time.perf_counter()
        record = json.loads(str(batch["record"][0]))
        if record["status"] == "featurized":
            try:
                bag = read_bag(self.scorer.features_dir / f"{row.slide_id}.h5", self.scorer.encoder.feature_dim)
                seconds = record["seconds"]
                record.update(self.scorer.fuse(row, bag))
                record["seconds"] = {**seconds, **record["seconds"], "total": seconds.get("total", 0.0)}
            except Exception as e:
                record.update(_disk_full(e) if is_disk_full(e) else failure(e))
        seconds = record.setdefault("seconds", {})
        seconds["total"] = round(seconds.get("total", 0.0) + time.perf_counter() - started, 4)
        return _out(batch, record)
