"""One slide of a batch run, from file to committed record: features (cached), risk, heatmap.

A model trained with clinical covariates reads them from the ``--covariates`` table (case_id and a
column per covariate); every case's are encoded by :func:`check_covariates` before any slide is read,
so a stage the model never saw fails the run at once, not a slide at a time.

Every failure a slide can have (missing file, not a slide, no tissue, no gene row, an engine error)
becomes a ``failed`` record with the reason, and the run goes on: in an archive of thousands of
slides some are always broken, and one of them must not cost the others.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ...data.atomic import write_text_atomic
from ...data.covariates import encode_table
from ...data.features import Bag, read_bag, write_bag
from ...data.tables import GeneTable, read_clinical
from ...errors import HistosurvError, InputError
from ...data.encoder_record import record_from_attrs
from ..encoder_match import EncoderChoice, candidates, choose_encoder
from ..pipeline import SlideConfig, featurize_slide, open_encoder
from ..predict import FusionPredictor
from ..repository import ModelRepository, sha256_file
from .manifest import SlideRow
from .rundir import DiskFull, disk_full, is_disk_full, stop_when_full

__all__ = ["ScoringConfig", "SlideScorer", "check_covariates", "check_gene_table", "read_covariates", "cache_problem",
           "write_cached"]

CHECKSUM_SUFFIX = ".sha256"


@dataclass(frozen=True)
class ScoringConfig:
    repository: str
    model: str | None = None  # None: the repository's only survival model
    version: int | None = None  # None: the highest, fixed when the run starts
    encoder: str | None = None  # None: the encoder the model's training bags were made with
    encoder_version: int | None = None  # None: the highest, fixed when the run starts
    engine: str = "auto"
    encoder_engine: str = "auto"
    genes: str | None = None  # gene table CSV
    covariates: str | None = None  # clinical covariates CSV (case_id + a column per covariate)
    slide: SlideConfig = SlideConfig()
    mpp: float | None = None  # override: cut patches at this µm/px instead of the training bags'
    allow_mismatch: bool = False  # override: accept an encoder other than the training one

    def pinned(self) -> "ScoringConfig":
        """The same settings with the model, the encoder and their versions fixed, as recorded in
        run.json (a resumed run must not pick up a version exported meanwhile)."""
        repo = ModelRepository(self.repository)
        model = self.model or repo.default_model()
        version = self.version if self.version is not None else repo.manifest(model).latest
        choice = replace(self, model=model, version=version).choice()
        return replace(
            self, model=model, version=version, encoder=choice.encoder.name, encoder_version=choice.encoder.version
        )

    def choice(self) -> EncoderChoice:
        """The encoder and scale this configuration scores with (its notes are for the user)."""
        repo = ModelRepository(self.repository)
        mv = repo.version(self.model or repo.default_model(), self.version, verify=False)
        found = candidates(repo, self.encoder, self.encoder_version)
        return choose_encoder(found, mv, self.encoder, self.mpp, self.allow_mismatch, where=str(repo.root))


class SlideScorer:
    """Holds the engines (built once, in a process or a Ray actor) and scores slides one by one."""

    def __init__(self, config: ScoringConfig, features_dir: str | os.PathLike, heatmaps_dir: str | os.PathLike | None = None,
                 explanations_dir: str | os.PathLike | None = None):
        self.config = config = config if config.version is not None and config.encoder_version else config.pinned()
        self.predictor = FusionPredictor.from_repository(
            config.repository, config.model, config.version, config.engine, allow_mismatch=config.allow_mismatch
        )
        self.encoder, _ = open_encoder(
            config.repository, self.predictor.version, config.encoder, config.encoder_version, config.encoder_engine,
            mpp=config.mpp, allow_mismatch=config.allow_mismatch,
        )
        self.genes = GeneTable.read(config.genes) if config.genes else None
        if "genes" in self.predictor.specs and self.genes is None and not self.predictor.genes_optional:
            raise InputError(f"model {config.model!r} needs a gene table (--genes)")
        if self.genes is not None and "genes" in self.predictor.specs:
            self.genes.vectors([], self.predictor.gene_names)  # a gene missing from the table fails now, not per slide
        self.covariates, _ = read_covariates(config.covariates, self.predictor)  # the notes are the driver's to print
        self.features_dir = Path(features_dir)
        self.heatmaps_dir = Path(heatmaps_dir) if heatmaps_dir else None
        self.explanations_dir = Path(explanations_dir) if explanations_dir else None

    def featurize(self, row: SlideRow, plan=None) -> tuple[Bag, dict, str]:
        """The slide's features: from the run's cache when they were made from this very file, else
        computed (from ``plan`` where the tiling was done elsewhere) and cached. The third value says
        which: ``hit``, ``computed``, or ``recomputed: <why the cached file was not used>``."""
        cached = self.features_dir / f"{row.slide_id}.h5"
        seconds: dict = {}
        cache = "computed"
        if cached.exists() and Path(row.path).is_file():
            t0 = time.perf_counter()
            problem = cache_problem(cached)
            if problem is None:
                bag = read_bag(cached, self.encoder.feature_dim)
                if bag.attrs.get("slide_sha256") == sha256_file(row.path) and self._made_here(bag):
                    return bag, {"cache": time.perf_counter() - t0}, "hit"
            else:
                cache = f"recomputed: {problem}"
        result = featurize_slide(row.path, self.encoder, self.config.slide, plan=plan)
        with stop_when_full(cached, f"the features of slide {row.slide_id!r}"):
            write_cached(cached, result.bag)
        seconds.update(result.seconds)
        return result.bag, seconds, cache

    def _made_here(self, bag: Bag) -> bool:
        """Whether a cached bag was made by this run's encoder (record and scale), so it can be reused."""
        record, complete = record_from_attrs(bag.attrs, bag.dim, bag.source)
        comparison = self.encoder.record.compare(record)
        return complete and comparison.same and not comparison.unknown and self.encoder.record.same_scale(record.mpp) is True

    def fuse(self, row: SlideRow, bag: Bag) -> dict:
        genes = self.predictor.genes_for(self.genes, row.case_id) if self.genes is not None else None
        clinical = self.predictor.clinical_for(self.covariates, row.case_id, str(self.config.covariates))
        t0 = time.perf_counter()
        risk = self.predictor.slide(bag, genes, clinical)
        fuse_s = time.perf_counter() - t0
        record = {
            "status": "scored",
            "error": "",
            "risk": float(risk.risk),
            "n_patches": int(risk.n_patches),
            **({} if risk.survival is None else {"survival": [float(v) for v in np.asarray(risk.survival).reshape(-1)],
                                                  "risk_group": risk.risk_group}),
            "slide_sha256": str(bag.attrs.get("slide_sha256", "")),
            "seconds": {"fuse": round(fuse_s, 4)},
        }
        if self.heatmaps_dir is not None and risk.attention is not None:
            record["heatmap"] = str(self._heatmap(row, bag, np.asarray(risk.attention)))
        if self.explanations_dir is not None:
            record["explanation"] = str(self._explain(row, bag, genes, clinical, risk.attention))
        return record

    def _explain(self, row: SlideRow, bag: Bag, genes, clinical, attention) -> Path:
        """OUT/explanations/<slide_id>.json: occlusion gene attributions and the top patches (coordinates;
        no crops in a batch run), or why a part is not given (see ``runtime.explain``)."""
        from ..explain import explain_bag, write_explanation

        explanation = explain_bag(self.predictor, bag, genes, clinical, attention)
        return write_explanation(explanation, self.explanations_dir / f"{row.slide_id}.json")

    def score(self, row: SlideRow) -> dict:
        """The slide's record, ``scored`` or ``failed``; never raises for a bad slide."""
        started = time.perf_counter()
        record = self.base_record(row)
        try:
            bag, seconds, cache = self.featurize(row)
            record.update(self.fuse(row, bag), cache=cache)
            record["seconds"].update({k: round(v, 4) for k, v in seconds.items()})
        except Exception as e:  # a bad slide is data; the run goes on (see the module docstring)
            if isinstance(e, DiskFull):  # ... but a full disk is not a bad slide: the run stops (see rundir.DiskFull)
                raise
            if is_disk_full(e):  # a heatmap's or an explanation's write
                raise disk_full(self.features_dir.parent, f"the outputs of slide {row.slide_id!r}", e) from e
            record.update(failure(e))
        record.setdefault("seconds", {})["total"] = round(time.perf_counter() - started, 4)
        return record

    def base_record(self, row: SlideRow) -> dict:
        record = {
            **row.to_dict(),
            "model": self.config.model,
            "model_version": int(self.config.version),
            "encoder": f"{self.encoder.version.name} v{self.encoder.version.version}",
            "encoder_engine": self.encoder.engine.key,  # INT8 or FP32: what auto chose on this box
            "mpp": self.encoder.mpp,
        }
        if self.encoder.overrides:
            record["overrides"] = dict(self.encoder.overrides)
        return record

    def _heatmap(self, row: SlideRow, bag: Bag, attention: np.ndarray) -> Path:
        from ..slides import open_slide
        from .heatmap import write_heatmap

        with open_slide(row.path, self.config.slide.reader) as reader:
            return write_heatmap(
                self.heatmaps_dir / f"{row.slide_id}.png", reader, bag.coords, attention, int(bag.attrs["patch_size_level0"])
            )


def read_covariates(path: str | os.PathLike | None, predictor: FusionPredictor) -> tuple[pd.DataFrame | None, list[str]]:
    """The ``--covariates`` table with a column for every covariate of the model (one the table lacks is
    a missing value), and the notes for the user; (None, notes) without a table or covariates."""
    spec, name = predictor.clinical_spec, predictor.version.name
    if path is None:
        if spec is None:
            return None, []
        return None, [f"model '{name}' takes clinical covariates ({', '.join(spec.names)}); no --covariates table "
                      "was given, so every slide is scored without them"]
    if spec is None:
        raise InputError(f"--covariates {path}: model '{name}' v{predictor.version.version} takes no clinical covariates")
    table = read_clinical(path, require_outcome=False, require_slides=False)
    absent = [n for n in spec.names if n not in table.columns]
    if len(absent) == len(spec.names):  # the wrong file, surely: it would score every slide without covariates
        raise InputError(
            f"--covariates {path}: the table has no column for any covariate of model '{name}' "
            f"({', '.join(spec.names)}); its columns are {', '.join(map(str, table.columns))}"
        )
    notes = []
    if absent:
        notes.append(f"--covariates {path} has no column {', '.join(map(repr, absent))}: model '{name}' scores "
                     f"without {'it' if len(absent) == 1 else 'them'}")
        table = table.assign(**{n: np.nan for n in absent})
    table.attrs["source"] = str(path)
    return table, notes


def check_gene_table(config: ScoringConfig) -> None:
    """The gene table the model needs, given and holding its genes: checked before the run folder is
    written, so a forgotten --genes is not recorded as the run's configuration."""
    version = ModelRepository(config.repository).version(config.model, config.version, verify=False)
    predictor = FusionPredictor(version, engine=None)  # for the model's gene record only: nothing is run
    if "genes" not in predictor.specs:
        return
    if config.genes is None:
        if not predictor.genes_optional:
            raise InputError(f"model {version.name!r} needs a gene table (--genes)")
        return
    GeneTable.read(config.genes).vectors([], predictor.gene_names)


def check_covariates(config: ScoringConfig, case_ids: Sequence[str]) -> list[str]:
    """Encodes the covariates of every case before any slide is read (InputError names the case, the
    covariate and the value at fault); returns the notes for the user (no table, columns it lacks).
    ``config`` must be pinned."""
    version = ModelRepository(config.repository).version(config.model, config.version, verify=False)
    predictor = FusionPredictor(version, engine=None)  # for the model's covariate record only: nothing is run
    table, notes = read_covariates(config.covariates, predictor)
    if table is not None:
        encode_table(predictor.clinical_spec, table, list(dict.fromkeys(case_ids)), str(config.covariates))
    return notes


def write_cached(path: Path, bag: Bag) -> None:
    """The features file, then its sha256 beside it (``<slide>.h5.sha256``): a file without one (killed
    between the two renames, or cached by an older histosurv) is recomputed, never trusted."""
    _reserve(path.parent, bag.features.nbytes + bag.coords.nbytes + HDF5_MARGIN)
    write_bag(path, bag)
    write_text_atomic(path.with_name(path.name + CHECKSUM_SUFFIX), sha256_file(path) + "\n")


HDF5_MARGIN = 256 * 1024  # bytes: HDF5's own structures, attributes and chunk index beside the arrays


def _reserve(folder: Path, nbytes: int) -> None:
    """Raises ENOSPC before HDF5 writes if ``nbytes`` do not fit. HDF5 reports a full disk when the file
    closes, as a RuntimeError, and its library is then left in a state that crashes the interpreter at
    exit (seen with h5py 3 on a full tmpfs); this check fails cleanly instead. A disk that fills between
    the check and the write, or a user quota (statvfs does not see it), can still reach that path."""
    stat = os.statvfs(folder)
    free = stat.f_bavail * stat.f_frsize
    if free < nbytes:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: {free} bytes free in {folder}, the features need "
                      f"about {nbytes}")


def cache_problem(path: Path) -> str | None:
    """Why the cached features file cannot be reused (truncated, altered, no checksum), or None."""
    sidecar = path.with_name(path.name + CHECKSUM_SUFFIX)
    try:
        expected = sidecar.read_text().strip()
    except OSError:
        return f"{path.name} has no checksum ({sidecar.name})"
    actual = sha256_file(path)
    if actual != expected:
        return (f"{path.name} does not match its checksum ({path.stat().st_size} bytes, sha256 {actual[:12]}..., "
                f"expected {expected[:12]}...): truncated or altered on disk")
    return None


def failure(error: Exception) -> dict:
    reason = str(error) if isinstance(error, HistosurvError) else f"{type(error).__name__}: {error}"
    return {"status": "failed", "error": reason, "error_type": type(error).__name__, "risk": None, "n_patches": None}
