"""A batch run's folder: its identity, one committed result per slide, the feature cache, the tables.

    run.json              what the run scores with: manifest, model and encoder versions (their files'
                          sha256), gene and covariate tables, slide settings. A rerun with any of these
                          changed is refused, so results of two configurations are never mixed.
    results/<slide>.json  one per finished slide (scored or failed), written to a temporary file,
                          flushed to disk and renamed: a kill leaves either the whole record or none.
    features/<slide>.h5   CLAM-style features, reused by later runs with the same slide and encoder, and
                          only while they match the sha256 in <slide>.h5.sha256 (else recomputed, and said).
    heatmaps/<slide>.png  attention over the thumbnail, with --heatmaps.
    journal.log           one line per event (started, scored, failed, skipped), appended; for audits.
    slides.parquet, patients.parquet   built from the records at the end of every run, in manifest
                          order, with nothing run-dependent in them (timings stay in the records), so
                          a resumed run's tables equal an uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ...data.atomic import atomic_path
from ...errors import HistosurvError, InputError
from ..manifest import SurvivalHead
from ..survival import group_label, patient_survival, risk_group, survival_columns
from .manifest import SlideRow

__all__ = ["RunDirectory", "IdentityMismatch", "DiskFull", "disk_full", "is_disk_full", "stop_when_full"]

SLIDE_COLUMNS = ["slide_id", "case_id", "path", "status", "error", "risk", "n_patches", "slide_sha256", "model",
                 "model_version", "encoder", "encoder_engine"]


class IdentityMismatch(InputError):
    """The run folder holds results made with another manifest, model, encoder or settings."""


class DiskFull(HistosurvError, OSError):
    """The run folder's disk (or quota) is full. The run stops: a full disk is not a bad slide, and
    recording every later slide as failed would have to be undone by hand."""


_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC or EDQUOT, also as h5py reports them (an OSError or, from a file's close, a RuntimeError with
    the reason in its text)."""
    if isinstance(error, DiskFull):
        return True
    if not isinstance(error, (OSError, RuntimeError)):
        return False
    return getattr(error, "errno", None) in _FULL or any(os.strerror(code) in str(error) for code in _FULL)


@contextlib.contextmanager
def stop_when_full(path: str | os.PathLike, what: str):
    """Turns a full disk while writing ``what`` to ``path`` into :class:`DiskFull`, naming both and what to do."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if not is_disk_full(e) or isinstance(e, DiskFull):
            raise
        raise disk_full(path, what, e) from e


def disk_full(path: str | os.PathLike, what: str, error: Exception) -> DiskFull:
    return DiskFull(
        f"no space left on the disk of {path} while writing {what} ({error}); the run stopped, every slide "
        "committed before is intact. Free space (or raise the quota) and run the same command again: "
        "it resumes where it stopped"
    )


class RunDirectory:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.results = self.root / "results"
        self.features = self.root / "features"
        self.heatmaps = self.root / "heatmaps"

    # --- identity ------------------------------------------------------------------------------

    def open(self, identity: dict, restart: bool = False) -> None:
        """Starts a new run, or resumes the one already here if ``identity`` is the same."""
        path = self.root / "run.json"
        identity = json.loads(json.dumps(identity, default=_plain))  # as it reads back from run.json
        if path.exists() and not restart:
            recorded = json.loads(path.read_text())
            changed = [k for k in sorted(set(identity) | set(recorded)) if identity.get(k) != recorded.get(k)]
            if changed:
                details = "; ".join(f"{k}: was {_short(recorded.get(k))}, now {_short(identity.get(k))}" for k in changed)
                raise IdentityMismatch(
                    f"{self.root} holds a run made with other inputs ({details}). Score into another --out folder, "
                    "or pass --restart to discard its results (the slides' cached features in "
                    f"{self.features.name}/ are kept and reused where the slide and the encoder are the same)"
                )
        if restart:
            for folder in (self.results,):
                for f in folder.glob("*.json") if folder.exists() else ():
                    f.unlink()
        self.results.mkdir(parents=True, exist_ok=True)
        self.features.mkdir(exist_ok=True)
        self._remove_partial_files()
        if restart or not path.exists():
            with stop_when_full(path, "the run's identity"):
                _write_json(path, identity)

    def _remove_partial_files(self) -> None:
        """A killed run can leave the temporary file of a write it had not finished (the rename never
        came); such files are ours by name (see ``atomic_path``) and hold nothing committed."""
        for folder in (self.root, self.results, self.features, self.heatmaps):
            for tmp in folder.glob(".*.tmp") if folder.exists() else ():
                tmp.unlink(missing_ok=True)

    # --- per-slide records ---------------------------------------------------------------------

    def done(self) -> dict[str, dict]:
        """slide_id -> record, for every committed slide."""
        out = {}
        for f in self.results.glob("*.json"):
            try:
                record = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):  # cannot happen with rename commits; redo it if it does
                continue
            out[record["slide_id"]] = record
        return out

    def commit(self, record: dict) -> None:
        path = self.results / f"{record['slide_id']}.json"
        with stop_when_full(path, f"the record of slide {record['slide_id']!r}"):
            _write_json(path, record)
        self.log(record["status"], record["slide_id"], record.get("error", ""))

    def log(self, event: str, slide_id: str = "", detail: str = "") -> None:
        line = json.dumps({"time": round(time.time(), 3), "event": event, "slide_id": slide_id, "detail": detail})
        with stop_when_full(self.root / "journal.log", "the run's journal"), open(self.root / "journal.log", "a") as f:
            f.write(line + "\n")

    def feature_path(self, slide_id: str) -> Path:
        return self.features / f"{slide_id}.h5"

    # --- tables --------------------------------------------------------------------------------

    def write_tables(self, rows: list[SlideRow], head: SurvivalHead | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
        """slides.parquet and patients.parquet from the committed records, in manifest order; with the
        model's survival ``head``, the risk's unit and, where the version has them, S(t) and risk groups."""
        done = self.done()
        records = [done[r.slide_id] for r in rows if r.slide_id in done]
        slides = pd.DataFrame([{c: rec.get(c) for c in SLIDE_COLUMNS} for rec in records], columns=SLIDE_COLUMNS)
        slides["risk"] = slides["risk"].astype("float64")
        slides["n_patches"] = slides["n_patches"].astype("Int64")
        curves = head is not None and head.has_curves
        if curves:
            _insert_curves(slides, head, [rec.get("survival") for rec in records], [rec.get("risk_group") for rec in records])
        patients, patient_curves, patient_groups = [], [], []
        for case_id, group in slides.groupby("case_id", sort=False):
            ok = group[group["status"] == "scored"]
            # AMMASurv section II.E: a patient's risk is the mean of its slides' risks
            risk = float(ok["risk"].mean()) if len(ok) else np.nan
            patients.append({"case_id": case_id, "risk": risk, "n_slides": int(len(ok)), "n_failed": int(len(group) - len(ok))})
            if curves:
                slide_curves = [records[i].get("survival") for i in ok.index]
                usable = len(ok) and all(c is not None for c in slide_curves)
                patient_curves.append(patient_survival(head, risk, slide_curves) if usable else None)
                patient_groups.append(risk_group(head, risk) if len(ok) else None)
        patients = pd.DataFrame(patients, columns=["case_id", "risk", "n_slides", "n_failed"])
        if curves:
            _insert_curves(patients, head, patient_curves, patient_groups)
        if head is not None:  # the unit in the table itself: a Cox log-hazard and minus summed survival differ
            for table in (slides, patients):
                table.insert(int(table.columns.get_loc("risk")) + 1, "risk_scale", head.risk_scale)
        for name, table in (("slides.parquet", slides), ("patients.parquet", patients)):
            with stop_when_full(self.root / name, "the run's table"), atomic_path(self.root / name, suffix=".parquet") as tmp:
                table.to_parquet(tmp, index=False)
        return slides, patients


def _insert_curves(table: pd.DataFrame, head: SurvivalHead, curves: list, groups: list) -> None:
    """S(t) columns and the risk group's label after ``risk`` (NaN and None where a slide failed)."""
    at = int(table.columns.get_loc("risk")) + 1
    values = np.array([np.full(len(head.times), np.nan) if c is None else np.asarray(c, np.float64) for c in curves]
                      ).reshape(len(curves), len(head.times))
    for k, column in enumerate(survival_columns(head)):
        table.insert(at + k, column, values[:, k])
    table.insert(at + len(head.times), "risk_group",
                 pd.array([None if g is None else group_label(head, int(g)) for g in groups], dtype="string"))


def _write_json(path: Path, data: dict) -> None:
    with atomic_path(path, suffix=".json") as tmp:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True, default=_plain)
            f.flush()
            os.fsync(f.fileno())  # the rename must not reach the disk before the data


def _plain(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"cannot store {type(v).__name__} in a run record")


def _short(v) -> str:
    text = json.dumps(v, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."
