"""A cohort: patients with outcomes, their gene vectors, and their slides' feature bags."""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..errors import InputError
from .encoder_record import EncoderRecord, record_from_attrs
from .features import Bag, bag_path, read_bag
from .covariates import ClinicalSpec, CovariateRequest, encode_table, fit_covariates
from .tables import ClinicalColumns, GeneTable, Patient, patients_from_clinical, read_clinical

__all__ = ["BagStore", "Cohort", "load_cohort", "training_encoder", "case_files"]


class BagStore:
    """Reads slide bags on demand, keeping recently used ones while they fit in ``cache_bytes``."""

    def __init__(self, features_dir: str | os.PathLike, feature_dim: int | None = None, cache_bytes: int = 2 << 30):
        self.features_dir, self.feature_dim, self.cache_bytes = Path(features_dir), feature_dim, cache_bytes
        self._cache: OrderedDict[str, Bag] = OrderedDict()
        self._size = 0

    def path(self, slide_id: str) -> Path:
        return bag_path(self.features_dir, slide_id)

    def get(self, slide_id: str) -> Bag:
        if slide_id in self._cache:
            self._cache.move_to_end(slide_id)
            return self._cache[slide_id]
        bag = read_bag(self.path(slide_id), self.feature_dim)
        if self.feature_dim is None:
            self.feature_dim = bag.dim
        self._cache[slide_id] = bag
        self._size += bag.features.nbytes + bag.coords.nbytes
        while self._size > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._size -= old.features.nbytes + old.coords.nbytes
        return bag


@dataclass
class Cohort:
    patients: list[Patient]
    genes: np.ndarray  # (P, G) float32, rows in patients order
    gene_names: list[str]
    bags: BagStore | None  # None: a genes-only cohort
    # the encoder every bag was made with (see training_encoder), and what could not be checked
    encoder: EncoderRecord | None = None
    encoder_notes: list[str] = field(default_factory=list)
    # the clinical covariates asked for at training, and the clinical table's first row per patient
    covariates: CovariateRequest | None = None
    table: pd.DataFrame | None = None

    def covariate_spec(self, train_idx: Sequence[int]) -> ClinicalSpec | None:
        """The covariates' encoding fitted on the patients ``train_idx`` (None without covariates)."""
        if self.covariates is None:
            return None
        return fit_covariates(self.table, self.covariates, list(train_idx))

    def clinical_values(self, spec: ClinicalSpec | None) -> np.ndarray | None:
        """(P, C) float32 wire values of every patient for ``spec`` (None without covariates)."""
        if spec is None:
            return None
        return encode_table(spec, self.table, [p.case_id for p in self.patients])

    @property
    def feature_dim(self) -> int | None:
        return None if self.bags is None else int(self.bags.feature_dim)

    def times_events(self, idx: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        t = np.array([self.patients[i].time for i in idx], dtype=np.float64)
        e = np.array([self.patients[i].event for i in idx], dtype=bool)
        return t, e


def load_cohort(
    clinical: str | os.PathLike,
    gene_table: str | os.PathLike,
    features_dir: str | os.PathLike | None,
    genes: Sequence[str] | None = None,
    check_bags: bool = True,
    columns: ClinicalColumns | None = None,
    covariates: CovariateRequest | None = None,
) -> Cohort:
    """Reads the three inputs and cross-checks them before any training starts.

    ``genes`` selects and orders gene columns (default: every numeric column of the table). With
    ``check_bags`` every bag is opened once, so a bad file, or bags made by different encoders, fail
    now, named, not hours later.
    Without ``features_dir`` the cohort is genes-only (for models that read no patches) and the
    clinical table may have one row per case and no ``slide_id``.
    ``columns`` names the clinical table's columns where they are not the MCAT ones (see ``ClinicalColumns``).
    ``covariates`` names clinical columns the model takes as a third input (checked here, encoded per
    training split by :meth:`Cohort.covariate_spec`).
    """
    frame = read_clinical(clinical, require_slides=features_dir is not None, columns=columns)
    patients = patients_from_clinical(frame)
    per_patient = frame.drop_duplicates("case_id").reset_index(drop=True)
    if covariates is not None:
        fit_covariates(per_patient, covariates, range(len(per_patient)), source=str(clinical))  # names a bad column now
        _check_constant_per_case(frame, covariates, clinical)
    table = GeneTable.read(gene_table)
    names = list(genes) if genes is not None else table.numeric_genes()
    if not names:
        raise InputError(f"{gene_table}: the gene table has no numeric gene columns")
    vectors = table.vectors([p.case_id for p in patients], names)
    extra = dict(covariates=covariates, table=per_patient)
    if features_dir is None:
        return Cohort(patients, vectors, names, None, **extra)
    store = BagStore(features_dir)
    if not check_bags:
        return Cohort(patients, vectors, names, store, **extra)
    encoder, notes = training_encoder(store, [s for p in patients for s in p.slide_ids])
    return Cohort(patients, vectors, names, store, encoder, notes, **extra)


def _check_constant_per_case(frame: pd.DataFrame, covariates: CovariateRequest, path) -> None:
    """A patient's covariates are the patient's: two slides of one case may not disagree on them."""
    per_case = frame.groupby("case_id")[list(covariates.names)].nunique(dropna=True)
    varying = per_case[(per_case > 1).any(axis=1)]
    if len(varying):
        case = varying.index[0]
        column = varying.columns[(varying.iloc[0] > 1).to_numpy()][0]
        raise InputError(f"{path}: case {case!r} has different values of covariate {column!r} on different slides")


def case_files(patients: Sequence[Patient], features_dir: str | os.PathLike) -> list[tuple[str, list[Path]]]:
    """(case_id, the case's h5 files) for each patient, as the runtime scores them."""
    return [(p.case_id, [bag_path(features_dir, s) for s in p.slide_ids]) for p in patients]


def training_encoder(store: BagStore | None, slide_ids: Sequence[str]) -> tuple[EncoderRecord | None, list[str]]:
    """(the record of the encoder the training bags were made with, notes for the user).

    The record is copied into the model's manifest, so that the runtime can refuse features from any
    other encoder or scale. Bags made by different encoders (or at different µm/px) cannot train one
    model: that is an error naming two of them. Bags that record no encoder (CLAM's, or histosurv's
    before records) give a partial record of the facts they agree on, with a note."""
    if store is None:
        return None, []
    first_full = first_partial = None
    partial: list[EncoderRecord] = []
    for slide_id in slide_ids:
        bag = store.get(slide_id)
        record, complete = record_from_attrs(bag.attrs, bag.dim, bag.source)
        if not complete:
            partial.append(record)
            first_partial = first_partial or (bag.source, record)
            continue
        if first_full is None:
            first_full = (bag.source, record)
            continue
        problems = list(first_full[1].compare(record).differences)
        if first_full[1].same_scale(record.mpp) is False:
            problems.append(f"µm/px: {first_full[1].mpp:g} vs {record.mpp:g}")
        if problems:
            raise InputError(
                f"{first_full[0]} and {bag.source} were made differently ({'; '.join(problems)}); one model trains "
                "on the features of one encoder at one scale: re-tile the slides with one encoder"
            )
    if first_full is not None:
        notes = [f"{len(partial)} of {len(slide_ids)} bags record no encoder; trusting they match the others"] if partial else []
        return first_full[1], notes
    agreed = _agreed(partial)
    return agreed, [
        f"the training bags record no encoder (CLAM or older files, e.g. {first_partial[0]}); the model will record only "
        f"{agreed.describe()}, and the runtime can check only that"
    ]


def _agreed(records: list[EncoderRecord]) -> EncoderRecord:
    """The first record with every field the others disagree on set to unknown."""
    first = records[0]
    values = {}
    for name in ("architecture", "feature_dim", "patch_size", "mpp", "name"):
        seen = {getattr(r, name) for r in records}
        values[name] = getattr(first, name) if len(seen) == 1 else (None if name != "name" else "")
    return replace(first, **values)
