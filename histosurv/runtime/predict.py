"""Risk for slides and patients from a model repository alone (no model source code, no torch)."""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from ..data.covariates import ClinicalSpec, check_wire_values, encode_table
from ..data.features import Bag, read_bag, validate_bag
from ..data.tables import GeneTable
from ..errors import InputError
from .encoder_match import check_bag
from .finite import check_input_range, check_outputs
from .engines import Engine, load_engine
from .repository import ModelRepository, ModelVersion
from .survival import group_label, patient_survival, risk_group, survival_columns

__all__ = ["FusionPredictor", "SlideRisk", "PatientRisk", "patient_risk", "survival_fields", "score_cases", "training_splits"]


@dataclass
class SlideRisk:
    risk: float
    n_patches: int
    attention: np.ndarray | None = None  # (N,), where the model exposes patch attention
    source: str = ""
    survival: np.ndarray | None = None  # (T,) S at the version's times, where the version has curves
    risk_group: int | None = None  # index into the version's group labels


@dataclass
class PatientRisk:
    case_id: str
    risk: float  # mean of the slide risks (AMMASurv section II.E)
    slides: list[SlideRisk] = field(default_factory=list)
    survival: np.ndarray | None = None  # from the patient's risk and slides (runtime/survival.py)
    risk_group: int | None = None  # from the patient's risk and the stored cut-offs


class FusionPredictor:
    """Runs a survival model version on feature bags and gene vectors, checking them first.

    Bags read from files are checked against the model's training bags (:meth:`check_file_bag`): made
    by another encoder or at another µm/px, they are refused unless ``allow_mismatch``. ``notes``
    collects what the user should read (overrides in effect, facts that could not be checked), once
    each; ``overrides`` what outputs must record. ``timings`` accumulates seconds per stage.
    """

    def __init__(self, version: ModelVersion, engine: Engine, allow_mismatch: bool = False):
        self.version, self.engine = version, engine
        self.specs = {t.name: t for t in version.inputs}
        self.allow_mismatch = allow_mismatch
        self.notes: dict[str, None] = {}  # ordered set
        self.overrides: dict[str, str] = {}
        self.timings: dict[str, float] = defaultdict(float)

    @classmethod
    def from_repository(
        cls,
        root: str | os.PathLike,
        model: str | None = None,
        version: int | None = None,
        engine: str = "auto",
        allow_mismatch: bool = False,
        **engine_options,
    ) -> "FusionPredictor":
        """Model ``model`` of the repository (default: its only survival model)."""
        repo = ModelRepository(root)
        mv = repo.version(model or repo.default_model(), version)
        if mv.is_encoder:
            raise InputError(f"model {mv.name!r} is a patch encoder, not a survival model")
        return cls(mv, load_engine(mv, engine, **engine_options), allow_mismatch)

    @property
    def gene_names(self) -> list[str]:
        return self.version.gene_names

    @property
    def feature_dim(self) -> int | None:
        return self.version.feature_dim

    def check_file_bag(self, bag: Bag) -> Bag:
        """``bag`` if its recorded encoder and µm/px are those of the training bags (see
        ``encoder_match.check_bag``); notes and overrides are collected."""
        notes, overrides = check_bag(bag, self.version, self.allow_mismatch)
        self.note(*notes)
        self.overrides.update(overrides)
        return bag

    def note(self, *notes: str) -> None:
        self.notes.update(dict.fromkeys(notes))

    def genes_for(self, table: GeneTable, case_id: str) -> np.ndarray | None:
        """The case's gene vector in the model's order, or None for a model that takes no genes."""
        if "genes" not in self.specs:
            return None
        return table.vectors([case_id], self.gene_names)[0]

    @property
    def clinical_spec(self) -> ClinicalSpec | None:
        """The clinical covariates the model takes (None: it takes none)."""
        return self.version.info.clinical if "clinical" in self.specs else None

    def clinical_for(self, table: pd.DataFrame | None, case_id: str, source: str = "clinical table") -> np.ndarray | None:
        """The case's covariates as wire values, from a clinical table (one row per case or per slide); None
        for a model that takes none. Covariate columns the table lacks are missing values (a note says so)."""
        spec = self.clinical_spec
        if spec is None:
            return None
        if table is None:
            self.note(f"model {self.version.name!r} takes clinical covariates ({', '.join(spec.names)}); none were "
                      "given, so it scores without them")
            return None
        absent = [n for n in spec.names if n not in table.columns]
        if absent:
            self.note(f"the clinical table has no {', '.join(absent)}: model {self.version.name!r} scores without "
                      f"{'it' if len(absent) == 1 else 'them'}")
            table = table.assign(**{n: np.nan for n in absent})
        return encode_table(spec, table, [case_id], table.attrs.get("source", source))[0]

    def check_clinical(self, clinical: np.ndarray | None) -> np.ndarray:
        """Wire values checked against the manifest's covariates; None is "no clinical data" (all NaN)."""
        spec = self.clinical_spec
        if clinical is None:
            return np.full(len(spec.covariates), np.nan, np.float32)
        return check_wire_values(spec, clinical)

    def slide(self, bag: Bag, genes: np.ndarray | None = None, clinical: np.ndarray | None = None) -> SlideRisk:
        inputs = self.inputs_for(bag, genes, clinical)
        t0 = time.perf_counter()
        out = check_outputs(self.engine.run(inputs), self.version.name)
        self.timings["fuse"] += time.perf_counter() - t0
        group = out.get("risk_group")
        return SlideRisk(float(out["risk"].reshape(-1)[0]), len(bag), out.get("attention"), bag.source,
                         out.get("survival"), None if group is None else int(group.reshape(-1)[0]))

    def patient(self, case_id: str, bags: Sequence[Bag], genes: np.ndarray | None = None,
                clinical: np.ndarray | None = None) -> PatientRisk:
        if not bags:
            raise InputError(f"case {case_id!r}: no slides to score")
        slides = [self.slide(b, genes, clinical) for b in bags]
        return patient_risk(self.version, case_id, slides)

    def inputs_for(self, bag: Bag, genes: np.ndarray | None, clinical: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The engine inputs for ``bag``, ``genes`` and ``clinical`` covariates (wire values), checked against
        the model's tensors (InputError names the one at fault)."""
        inputs = {}
        if "features" in self.specs:
            bag = validate_bag(bag, self.feature_dim)
            inputs["features"] = bag.features
            if "coords" in self.specs:
                inputs["coords"] = bag.coords
        if "genes" in self.specs:
            inputs["genes"] = self.check_genes(genes)
            check_input_range(self.version.info, inputs)
        if "clinical" in self.specs:
            inputs["clinical"] = self.check_clinical(clinical)
        for name, array in inputs.items():
            problem = self.specs[name].check(array)
            if problem:
                raise InputError(f"{bag.source}: {problem}")
            inputs[name] = np.ascontiguousarray(array, dtype=self.specs[name].dtype)
        return inputs

    @property
    def genes_optional(self) -> bool:
        """The model was trained to run without genes (its manifest says so); absent genes go in as NaN."""
        return "genes" in self.version.info.optional_inputs

    def check_genes(self, genes: np.ndarray | None) -> np.ndarray:
        if genes is None and self.genes_optional:
            return np.full(len(self.gene_names), np.nan, np.float32)
        if genes is None:
            raise InputError(
                f"model {self.version.name!r} needs 'genes' ({len(self.gene_names)} values in the manifest's order)"
            )
        genes = np.asarray(genes, dtype=np.float32).reshape(-1)
        if genes.size != len(self.gene_names):
            raise InputError(f"'genes' has {genes.size} values, model {self.version.name!r} expects {len(self.gene_names)}")
        bad = np.flatnonzero(~np.isfinite(genes))
        if bad.size:
            raise InputError(f"'genes' is not finite for {', '.join(self.gene_names[i] for i in bad[:5])}")
        return genes


def patient_risk(version: ModelVersion, case_id: str, slides: list[SlideRisk]) -> PatientRisk:
    """The patient's risk (mean of its slides'), with its S(t) and group where the version has them."""
    risk = float(np.mean([s.risk for s in slides]))
    if len(slides) == 1:  # the graph's own curve and group
        return PatientRisk(case_id, risk, slides, slides[0].survival, slides[0].risk_group)
    head = version.info.survival
    if head is None or not head.has_curves or any(s.survival is None for s in slides):
        return PatientRisk(case_id, risk, slides)
    return PatientRisk(case_id, risk, slides, patient_survival(head, risk, [s.survival for s in slides]),
                       risk_group(head, risk))


def survival_fields(version: ModelVersion, survival: np.ndarray | None, group: int | None) -> dict:
    """Table columns S(t) per reported time, risk_group (its label) and the label's index, for one row."""
    head = version.info.survival
    if head is None or not head.has_curves:
        return {}
    values = [np.nan] * len(head.times) if survival is None else [float(v) for v in np.asarray(survival).reshape(-1)]
    fields = dict(zip(survival_columns(head), values))
    fields["risk_group"] = "" if group is None else group_label(head, group)
    return fields


def training_splits(version: ModelVersion) -> tuple[dict[str, str] | None, str]:
    """(case_id -> the part it played in training the version: train / val / test, or None when unknown;
    why it is unknown). Read from the run folder the manifest names (``splits.csv``): a model refitted on
    every patient after cross-validation trained on all of them."""
    from pathlib import Path

    run = (version.info.training or {}).get("run")
    if not run:
        return None, "the manifest names no training run"
    path = Path(run) / "splits.csv"
    if not path.is_file():
        return None, f"its training run's {path} is not on this machine"
    try:
        splits = pd.read_csv(path, dtype={"case_id": str})
    except (OSError, ValueError, pd.errors.ParserError) as e:
        return None, f"{path} is unreadable ({e})"
    if "split" in splits:
        return dict(zip(splits["case_id"], splits["split"].astype(str))), ""
    if "fold" in splits:  # the refit of a cross-validation: every patient of the cohort trained it
        return dict.fromkeys(splits["case_id"], "train"), ""
    return None, f"{path} has neither a split nor a fold column"


def score_cases(
    predictor: FusionPredictor,
    cases: Sequence[tuple[str, Sequence[str | os.PathLike]]],
    genes: GeneTable | None,
    clinical: pd.DataFrame | None = None,
) -> list[PatientRisk]:
    """Scores (case_id, [h5 paths]) pairs; every gene vector and covariate is checked before any bag is
    read, so a table missing a gene, or a stage the model never saw, fails at once, not after hours of
    scoring. ``clinical``: the table the covariates come from (models trained with covariates)."""
    vectors, covariates = {}, {}
    for case_id, _ in cases:
        covariates[case_id] = predictor.clinical_for(clinical, case_id)
        if "genes" in predictor.specs:
            if genes is None and predictor.genes_optional:
                vectors[case_id] = None
            elif genes is None:
                raise InputError(f"model {predictor.version.name!r} needs a gene table (genes for case {case_id!r})")
            else:
                vectors[case_id] = predictor.genes_for(genes, case_id)
    results = []
    for case_id, paths in cases:
        t0 = time.perf_counter()
        bags = [predictor.check_file_bag(read_bag(p, predictor.feature_dim)) for p in paths]
        predictor.timings["read"] += time.perf_counter() - t0
        results.append(predictor.patient(case_id, bags, vectors.get(case_id), covariates[case_id]))
    return results
