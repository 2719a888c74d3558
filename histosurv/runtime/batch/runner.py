"""A batch run: which slides are left, who scores them (this process or Ray), and the final tables."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import pandas as pd

from ... import __version__
from ..repository import ModelRepository, sha256_file
from .manifest import SlideRow, manifest_digest, read_manifest
from .progress import Progress
from .rundir import RunDirectory
from .scoring import ScoringConfig, SlideScorer, check_covariates, check_gene_table

__all__ = ["BatchResult", "run_identity", "score_archive"]


@dataclass
class BatchResult:
    slides: pd.DataFrame
    patients: pd.DataFrame
    scored_now: int
    skipped: int
    failed: int  # slides whose record is a failure, this run or before
    per_hour: float


def run_identity(rows: list[SlideRow], config: ScoringConfig) -> dict:
    """What the results depend on; a run folder is only ever resumed with the same."""
    repo = ModelRepository(config.repository)
    model = repo.version(config.model, config.version, verify=False)
    encoder = repo.version(config.encoder, config.encoder_version, verify=False)
    return {
        "manifest_sha256": manifest_digest(rows),
        "model": f"{config.model} v{config.version}",
        "model_files": model.info.files,
        "encoder": f"{config.encoder} v{encoder.version}",
        "encoder_files": encoder.info.files,
        "overrides": {"mpp": config.mpp, "allow_encoder_mismatch": config.allow_mismatch},
        "engine": config.engine,
        "encoder_engine": config.encoder_engine,
        "genes_sha256": sha256_file(config.genes) if config.genes else None,
        "covariates_sha256": sha256_file(config.covariates) if config.covariates else None,
        "slide_settings": _plain(asdict(config.slide)),
        "histosurv_version": __version__,
    }


def score_archive(
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    config: ScoringConfig,
    ray: str | None = None,
    workers: int | None = None,
    restart: bool = False,
    retry_failed: bool = False,
    heatmaps: bool = False,
    progress_stream=None,
    explain: bool = False,
    log=lambda _: None,
) -> BatchResult:
    """Scores every slide of ``manifest`` not yet committed in ``out``; ``ray`` (``"auto"`` or a
    cluster address) runs the slides on Ray Data instead of in this process. ``log`` gets the
    notes of the encoder choice (overrides in effect, facts that could not be checked) and of the
    clinical covariates (none given to a model that takes them) first. ``explain`` writes each slide's
    explanation as OUT/explanations/<slide_id>.json (local backend only: it costs a fusion pass per gene group)."""
    rows = read_manifest(manifest)
    config = config.pinned()
    check_gene_table(config)  # arguments first: nothing is written for a run that cannot start
    covariate_notes = check_covariates(config, [r.case_id for r in rows])  # a bad row fails now, before any slide
    run = RunDirectory(out)
    run.open(run_identity(rows, config), restart=restart)
    for note in [*config.choice().notes, *covariate_notes]:
        log(note)
        run.log("note", detail=note)
    done = run.done()
    todo = [r for r in rows if r.slide_id not in done or (retry_failed and done[r.slide_id]["status"] == "failed")]
    progress = Progress(len(rows), len(rows) - len(todo), progress_stream)
    heatmaps_dir = run.heatmaps if heatmaps else None
    backend = f"ray ({ray})" if ray else "local"
    run.log("run", detail=f"{len(todo)} slides to score, {len(rows) - len(todo)} done before, backend {backend}")
    if todo and ray:
        from .ray_backend import score_on_ray

        records = score_on_ray(todo, config, run, ray, workers, heatmaps_dir)
    elif todo:
        records = _score_here(todo, config, run, heatmaps_dir, run.root / "explanations" if explain else None)
    else:
        records = iter(())
    for record in records:
        run.commit(record)  # committed one by one as they come: a kill loses only slides in flight
        progress.update(record)
        if str(record.get("cache", "")).startswith("recomputed"):  # a damaged cache entry: said, not hidden
            run.log("cache", record["slide_id"], record["cache"])
            log(f"slide {record['slide_id']}: cached features {record['cache']}")
    slides, patients = run.write_tables(rows, survival_head(config))
    return BatchResult(slides, patients, progress.done, len(rows) - len(todo), int((slides["status"] == "failed").sum()),
                       progress.per_hour)


def survival_head(config: ScoringConfig):
    """The model version's survival head: the risk's unit, and its curves and groups where it has them."""
    return ModelRepository(config.repository).version(config.model, config.version, verify=False).info.survival


def _score_here(todo, config, run, heatmaps_dir, explanations_dir=None):
    scorer = SlideScorer(config, run.features, heatmaps_dir, explanations_dir)
    for row in todo:
        run.log("started", row.slide_id)
        yield scorer.score(row)


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
