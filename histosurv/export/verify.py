"""``histosurv verify``: every engine of a model version against the PyTorch model, measured.

The PyTorch model is rebuilt from the manifest's architecture and the version's reference weights
(the same state_dict the engines were exported from), then both run on the same random bags at
several sizes. Risk agreement is reported as

    relative difference = |risk_engine - risk_torch| / max(|risk_torch|, floor)

(the floor keeps a risk that happens to be near 0 from turning rounding into a huge ratio; risks are
log-hazards of order 1). The floor is 0.01 for FP32 engines and 0.1 for FP16 and BF16 ones, whose
rounding of a log-hazard summed over thousands of patches is of order 1e-4 in absolute terms whatever
the risk: a risk of 0.01 would turn that into a 1e-2 "relative" failure of an engine that is fine. Attention maps are compared as max |difference| / max |torch|.
Patch encoders are compared on their features, at batch sizes 1, 4 and 16 of uint8 patches, every
engine against the same eager features: the largest relative difference (max |difference| / max |torch|)
and the smallest cosine similarity of a patch's features with PyTorch's. FP32 engines pass within 1e-4
relative; FP16 engines pass with a cosine of at least 0.999 for every patch and within 1e-2 relative
(a feature vector that points the same way is what downstream models need; the relative bound is the
one every FP16 engine is held to). A non-finite feature fails. The figures, per engine and batch, the
providers used and pass/fail are written into the manifest.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np
import torch

from ..runtime.engines import load_engine
from ..runtime.engines.base import why_unusable
from ..runtime.repository import MANIFEST, ModelRepository, ModelVersion
from .artifacts import artifact_of_key
from .models import build_model
from .onnx_export import SingleBag, example_inputs
from .run import load_weights

__all__ = ["DEFAULT_SIZES", "ENCODER_BATCHES", "ENCODER_COSINE", "TOLERANCES", "ParityReport", "verify_version", "RISK_FLOOR"]

DEFAULT_SIZES = (1, 17, 1000, 16384)
ENCODER_BATCHES = (1, 4, 16)
RISK_FLOOR = 0.01
RISK_FLOORS = {"fp32": RISK_FLOOR, "fp16": 0.1, "bf16": 0.1, "int8": 0.1}  # per the precision an engine computes in
TOLERANCES = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2, "int8": 0.1}  # relative, per the precision an engine computes in
ENCODER_COSINE = 0.999  # FP16 encoder engines: the smallest cosine similarity allowed for any patch's features
# INT8 encoder engines, as their export gate (export/quantize.py MIN_COSINE), here on verify's example patches
ENCODER_COSINES = {"fp16": ENCODER_COSINE, "bf16": ENCODER_COSINE, "int8": 0.99}


@dataclass
class ParityReport:
    engine: str
    device: str
    providers: list[str]
    tolerance: float
    rows: list[dict] = field(default_factory=list)
    min_cosine: float | None = None  # FP16 encoder engines: every patch's features at least this close to PyTorch's
    risk_floor: float = RISK_FLOOR  # survival models: the smallest |risk| a difference is divided by

    @property
    def min_features_cosine(self) -> float | None:
        """The smallest per-patch cosine over the rows (NaN if a feature was not finite; None: not an encoder)."""
        values = [r["features_cosine_min"] for r in self.rows if "features_cosine_min" in r]
        if not values:
            return None
        return math.nan if any(math.isnan(v) for v in values) else min(values)

    @property
    def max_attention_rel(self) -> float:
        return max((r.get("attention_rel", 0.0) for r in self.rows), default=0.0)

    @property
    def max_features_rel(self) -> float:
        values = [r.get("features_rel", 0.0) for r in self.rows]
        return math.nan if any(math.isnan(v) for v in values) else max(values, default=0.0)

    @property
    def max_survival_abs(self) -> float:
        return max((r.get("survival_abs", 0.0) for r in self.rows), default=0.0)

    @property
    def max_risk_rel(self) -> float:
        return max((r.get("risk_rel", 0.0) for r in self.rows), default=0.0)

    @property
    def passed(self) -> bool:
        if any("passed" in r for r in self.rows):  # judged per row (patch encoders)
            return bool(self.rows) and all(r.get("passed") is True for r in self.rows)
        worst = max(self.max_risk_rel, self.max_attention_rel, self.max_features_rel, self.max_survival_abs)
        groups_agree = all(r.get("risk_group_agrees", True) for r in self.rows)
        return bool(self.rows) and worst <= self.tolerance and groups_agree

    def judge(self, row: dict) -> dict:
        """Marks an encoder row passed or not: within the relative tolerance, and (FP16) every patch's
        cosine at least ``min_cosine``; NaN fails both."""
        ok = row["features_rel"] <= self.tolerance
        if self.min_cosine is not None:
            ok = ok and row["features_cosine_min"] >= self.min_cosine
        row["passed"] = bool(ok)
        return row

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            max_risk_rel=self.max_risk_rel,
            max_attention_rel=self.max_attention_rel,
            max_survival_abs=self.max_survival_abs,
            max_features_rel=self.max_features_rel,
            min_features_cosine=self.min_features_cosine,
            passed=self.passed,
            measured=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        return _finite_or_none(d)


def _finite_or_none(value):
    """NaN and infinities as None (JSON null): the manifest and ``verify --json`` stay strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


def reference_model(mv: ModelVersion) -> torch.nn.Module:
    clinical = mv.info.clinical
    model = build_model(mv.info.architecture, mv.info.config, clinical=clinical)
    load_weights(model, mv.path / mv.info.reference.file)
    if mv.info.survival is not None and mv.info.survival.has_curves:
        model.survival_reference = mv.info.survival  # the graph's survival and risk_group come from it
    return model.eval()


def verify_version(
    repository: str | os.PathLike,
    name: str,
    version: int | None = None,
    sizes=DEFAULT_SIZES,
    tolerance: float | None = None,
    engines: list[str] | None = None,
    write: bool = True,
    log=lambda _: None,
) -> list[ParityReport]:
    repo = ModelRepository(repository)
    mv = repo.version(name, version)
    is_encoder = mv.is_encoder
    if is_encoder:
        from .encoder_export import encoder_from_version

        model, compare = encoder_from_version(mv), _compare_encoder
        sizes = ENCODER_BATCHES if tuple(sizes) == DEFAULT_SIZES else sizes
    else:
        model, compare = reference_model(mv), _compare
    reports = []
    eager: dict = {}  # an encoder's PyTorch features by batch, shared by its engines
    for engine_name in engines or _checkable(mv):
        skip = _skip_reason(mv, engine_name)
        if skip:
            log(f"{engine_name:16s} skipped: {skip}")
            continue
        engine, checked_sizes = _load_checked(mv, engine_name, sizes)
        limit = tolerance if tolerance is not None else TOLERANCES[engine.precision]
        report = ParityReport(engine_name, engine.device, getattr(engine, "providers", []), limit,
                              risk_floor=RISK_FLOORS.get(engine.precision, RISK_FLOOR))
        if is_encoder and engine.precision in ENCODER_COSINES:
            report.min_cosine = ENCODER_COSINES[engine.precision]
        for n in checked_sizes:
            if is_encoder:
                row = report.judge(_compare_encoder(model, engine, n, eager))
                report.rows.append(row)
                log(f"{engine_name:16s} batch={n:4d}  features max rel diff {row['features_rel']:.2e}  "
                    f"min cosine {row['features_cosine_min']:.7f}  {'pass' if row['passed'] else 'FAIL'}")
                continue
            report.rows.append(compare(model, engine, n, report.risk_floor))
            row = report.rows[-1]
            log(
                f"{engine_name:16s} N={n:6d}  risk torch {row['risk_torch']:+.6f} engine {row['risk_engine']:+.6f}  "
                f"rel diff {row['risk_rel']:.2e}  attention rel diff {row.get('attention_rel', 0):.2e}"
                + (f"  S(t) abs diff {row['survival_abs']:.2e}  group {row['risk_group_engine']}"
                   f"{'' if row['risk_group_agrees'] else ' DIFFERS'}" if "survival_abs" in row else "")
            )
        reports.append(report)
    if write:
        manifest = repo.manifest(name)
        for r in reports:
            manifest.versions[mv.version].parity[r.engine] = r.to_dict()
        manifest.save(mv.path.parent / MANIFEST)
    return reports


def _checkable(mv: ModelVersion) -> list[str]:
    """The version's artifacts that the registry says how to check, in the manifest's order."""
    return [key for key in mv.info.engines if _checked_with(mv, key)]


def _checked_with(mv: ModelVersion, key: str) -> str | None:
    entry = artifact_of_key(key, "encoder" if mv.is_encoder else "survival")
    if entry is None:  # an artifact of a newer histosurv: check what can be served
        return "engine" if mv.info.engines[key].servable else None
    return entry.checked_with


def _load_checked(mv: ModelVersion, key: str, sizes) -> tuple[object, tuple[int, ...]]:
    """The engine that checks artifact ``key`` and the sizes it is checked at: as served, or (a graph
    that is only an input to other builds) on ONNX Runtime's CPU provider at the small sizes its N x N
    attention scores allow."""
    if key not in mv.info.engines or _checked_with(mv, key) == "engine":
        return load_engine(mv, key), tuple(sizes)
    from ..runtime.engines.ort import OnnxRuntimeEngine

    entry = artifact_of_key(key, "encoder" if mv.is_encoder else "survival")
    small = tuple(n for n in sizes if entry.max_checked_bag is None or n <= entry.max_checked_bag)
    return OnnxRuntimeEngine(mv, key=key, providers=["CPUExecutionProvider"]), small or (1, 17)


def _skip_reason(mv: ModelVersion, key: str) -> str | None:
    """Why an artifact present in the version cannot be checked on this machine (None: it can).
    Artifacts named explicitly but absent are left to load_engine, which names what is there."""
    if key not in mv.info.engines or _checked_with(mv, key) != "engine":
        return None
    return why_unusable(mv, key)


def _compare(model: torch.nn.Module, engine, n: int, floor: float = RISK_FLOOR) -> dict:
    inputs = example_inputs(model, n=n, seed=n)
    t0 = time.perf_counter()
    wrapper = SingleBag(model)
    with torch.inference_mode():
        # the exported graph's own signature: risk[, attention][, survival, risk_group]
        expected = dict(zip(wrapper.output_names(), wrapper(**inputs)))
    t1 = time.perf_counter()
    risk = expected["risk"].item()
    attention = expected["attention"].numpy() if "attention" in expected else None
    out = engine.run({k: v.numpy() for k, v in inputs.items()})
    t2 = time.perf_counter()
    got = float(out["risk"].reshape(-1)[0])
    row = {
        "n": n,
        "risk_torch": risk,
        "risk_engine": got,
        "risk_abs": abs(got - risk),
        "risk_rel": abs(got - risk) / max(abs(risk), floor),
        "ms_torch": round((t1 - t0) * 1e3, 2),
        "ms_engine": round((t2 - t1) * 1e3, 2),
    }
    if attention is not None:
        row["attention_rel"] = float(np.abs(out["attention"] - attention).max() / np.abs(attention).max())
    if "survival" in expected:
        # S is a probability: compared absolutely. The group may differ only where the risk lies on a cut-off
        # within the engines' own risk difference.
        row["survival_abs"] = float(np.abs(out["survival"].astype(np.float64) - expected["survival"].numpy()).max())
        row["risk_group_torch"], row["risk_group_engine"] = int(expected["risk_group"][0]), int(out["risk_group"].reshape(-1)[0])
        margin = float(np.abs(wrapper.cutoffs.numpy() - risk).min())
        row["risk_group_agrees"] = row["risk_group_torch"] == row["risk_group_engine"] or margin <= 2 * row["risk_abs"] + 1e-6
    return row


def _compare_encoder(model: torch.nn.Module, engine, batch: int, eager: dict | None = None) -> dict:
    from .encoder_export import cosine_per_patch, example_patches

    patch_size = engine.version.patch_size
    t0 = time.perf_counter()
    if eager is not None and batch in eager:
        patches, expected, ms_torch = eager[batch]
    else:
        patches = example_patches(batch, patch_size, seed=batch)
        with torch.inference_mode():
            expected = model(patches).numpy()
        ms_torch = round((time.perf_counter() - t0) * 1e3, 2)
        if eager is not None:
            eager[batch] = (patches, expected, ms_torch)
    t1 = time.perf_counter()
    got = engine.run({"patches": patches.numpy()})["features"]
    t2 = time.perf_counter()
    if got.shape != expected.shape:
        raise ValueError(f"{engine.path}: features of shape {got.shape} at batch {batch}, PyTorch's are {expected.shape}")
    diff = np.abs(got.astype(np.float64) - expected)
    finite = bool(np.isfinite(got).all())
    return {
        "n": batch,
        "features_abs": float(diff.max()) if finite else math.nan,
        "features_rel": float(diff.max() / max(float(np.abs(expected).max()), 1e-12)) if finite else math.nan,
        "features_cosine_min": float(np.min(cosine_per_patch(got, expected))),  # NaN if any is
        "ms_torch": ms_torch,
        "ms_engine": round((t2 - t1) * 1e3, 2),
    }
