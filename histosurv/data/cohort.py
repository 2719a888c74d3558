"""A cohort: patients with outcomes, their gene vectors, and their slides' feature bags."""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError
from .features import Bag, bag_path, read_bag
from .tables import GeneTable, Patient, patients_from_clinical, read_clinical

__all__ = ["BagStore", "Cohort", "load_cohort", "encoder_metadata", "case_files"]


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
) -> Cohort:
    """Reads the three inputs and cross-checks them before any training starts.

    ``genes`` selects and orders gene columns (default: every numeric column of the table). With
    ``check_bags`` every bag is opened once, so a bad file fails now, named, not hours later.
    Without ``features_dir`` the cohort is genes-only (for models that read no patches) and the
    clinical table may have one row per case and no ``slide_id``.
    """
    patients = patients_from_clinical(read_clinical(clinical, require_slides=features_dir is not None))
    table = GeneTable.read(gene_table)
    names = list(genes) if genes is not None else table.numeric_genes()
    if not names:
        raise InputError(f"{gene_table}: the gene table has no numeric gene columns")
    vectors = table.vectors([p.case_id for p in patients], names)
    if features_dir is None:
        return Cohort(patients, vectors, names, None)
    store = BagStore(features_dir)
    if check_bags:
        for p in patients:
            for s in p.slide_ids:
                store.get(s)
    return Cohort(patients, vectors, names, store)


def case_files(patients: Sequence[Patient], features_dir: str | os.PathLike) -> list[tuple[str, list[Path]]]:
    """(case_id, the case's h5 files) for each patient, as the runtime scores them."""
    return [(p.case_id, [bag_path(features_dir, s) for s in p.slide_ids]) for p in patients]


def encoder_metadata(store: BagStore | None, slide_ids: Sequence[str]) -> dict:
    """Patch-encoder facts the bags agree on (encoder, patch size, µm/px), for the manifest."""
    if store is None:
        return {}
    keys = ("encoder", "patch_size", "patch_level", "patch_size_level0", "mpp")
    agreed: dict = {}
    for i, s in enumerate(slide_ids):
        found = store.get(s).attrs
        attrs = {k: found[k] for k in keys if k in found}
        agreed = attrs if i == 0 else {k: v for k, v in agreed.items() if attrs.get(k) == v}
    agreed["feature_dim"] = store.feature_dim
    return agreed
