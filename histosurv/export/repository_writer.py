"""``histosurv export``: a training run -> a new numeric version in a model repository.

The version folder is built in a temporary directory and renamed into place, then the manifest and
config.pbtxt are replaced atomically, so readers see either the old repository or the new one.
Versions of one model must share its tensor interface (Triton's config.pbtxt is per model); a run
with another interface is refused with the difference named. What is built comes from the artifact
registry (:mod:`.artifacts`); machine-specific artifacts are added later with :func:`add_engine`.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import __version__
from ..data.atomic import atomic_dir, write_text_atomic
from ..data.encoder_record import EncoderRecord
from ..data.typed_json import FieldError, from_json_dict, to_json_dict
from ..errors import InputError, RepositoryError
from ..runtime.manifest import (
    GeneSpec,
    ModelManifest,
    ReferenceWeights,
    SurvivalHead,
    TensorSpec,
    VersionInfo,
    risk_definition,
)
from ..runtime.manifest_v1 import upgrade_v1
from ..runtime.repository import MANIFEST, ModelRepository, ModelVersion, sha256_file
from ..runtime.triton_config import render_config_pbtxt
from .artifacts import ARTIFACTS, BuildContext, artifact, artifacts_for, default_artifacts
from .models.clinical import clinical_spec_of
from .run import load_run
from .survival_reference import reference_from_run

__all__ = [
    "export_run",
    "export_model",
    "add_engine",
    "tensor_specs",
    "REFERENCE_WEIGHTS",
    "prepare_version",
    "publish_version",
    "write_reference",
]

REFERENCE_WEIGHTS = "model.safetensors"


def tensor_specs(model: torch.nn.Module) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The DESIGN.md tensor interface of ``model``: features/coords/genes -> risk/attention."""
    cfg = model.cfg
    all_inputs = {
        "features": TensorSpec("features", "FP32", (-1, cfg.feature_dim)),
        "coords": TensorSpec("coords", "INT64", (-1, 2)),
        "genes": TensorSpec("genes", "FP32", (cfg.n_genes,)),
    }
    spec = clinical_spec_of(model)
    if spec is not None:
        all_inputs["clinical"] = TensorSpec("clinical", "FP32", (len(spec.covariates),))
    inputs = [all_inputs[n] for n in model.input_names]
    outputs = [TensorSpec("risk", "FP32", (1,))]
    if "features" in model.input_names:
        outputs.append(TensorSpec("attention", "FP32", (-1,)))
    reference = getattr(model, "survival_reference", None)
    if reference is not None and reference.has_curves:
        outputs.append(TensorSpec("survival", "FP32", (len(reference.times),)))
        outputs.append(TensorSpec("risk_group", "INT64", (1,)))
    return inputs, outputs


def export_run(
    run_dir: str | os.PathLike,
    repository: str | os.PathLike,
    name: str | None = None,
    version: int | None = None,
    log=lambda _: None,
    artifacts: tuple[str, ...] | None = None,
    options: dict | None = None,
    survival_times: tuple[float, ...] | None = None,
    risk_groups: str = "median",
) -> ModelVersion:
    """Exports the run's model as ``repository/name/<version>`` (default name: its architecture;
    version: one above the highest): every ``always`` artifact of the registry, plus ``artifacts``
    (default: the ``default`` ones). ``options`` go to the builders, e.g. ``{"device": "cpu"}`` for a
    CPU torch package on a GPU box (default: this machine's device). ``survival_times`` (months) and
    ``risk_groups`` ("median" or "tertiles") set the version's survival curves and risk groups, fitted on
    the run's training patients (survival_reference.py)."""
    model, run_config = load_run(run_dir)
    head, notes = reference_from_run(run_dir, _survival_head(model, run_config), survival_times, risk_groups)
    for note in notes:
        log(f"note: {note}")
    if head.has_curves:
        model.survival_reference = head
        log(f"survival: S(t) at {', '.join(f'{t:g}' for t in head.times)} months; risk groups "
            f"{'/'.join(head.groups)} cut at {', '.join(f'{c:+.4f}' for c in head.cutoffs)} ({head.fitted_on})")
    return export_model(model, run_config, repository, name, version, log, artifacts, run_dir=run_dir, options=options)


def export_model(
    model: torch.nn.Module,
    run_config: dict,
    repository: str | os.PathLike,
    name: str | None = None,
    version: int | None = None,
    log=lambda _: None,
    artifacts: tuple[str, ...] | None = None,
    run_dir: str | os.PathLike | None = None,
    options: dict | None = None,
) -> ModelVersion:
    """``export_run`` for a model in memory; ``run_config`` needs ``architecture``, ``model`` (its
    config) and ``genes`` (names), as a run's config.json has them."""
    chosen = default_artifacts("survival") if artifacts is None else tuple(artifacts)
    for unknown in set(chosen) - set(default_artifacts("survival")):
        artifact(unknown, "survival")  # names the known ones
    model = model.eval()
    name = name or run_config["architecture"]
    inputs, outputs = tensor_specs(model)
    model_dir, manifest, version = prepare_version(repository, name, inputs, outputs, version)
    engines, not_built = {}, {}
    unsupported = getattr(model, "unsupported_artifacts", {})
    with atomic_dir(model_dir / str(version)) as tmp:
        options = {k: v for k, v in (options or {}).items() if v is not None}
        context = BuildContext(tmp, options=options, log=log, _model=model)
        for entry in artifacts_for("survival"):
            if entry.when == "on_target" or (entry.when == "default" and entry.name not in chosen):
                continue
            if entry.name in unsupported:
                not_built[entry.name] = unsupported[entry.name]
                log(f"not building {entry.name}: {unsupported[entry.name]}")
                continue
            key, file = entry.target(options)
            engines[key] = entry.build(context, tmp / file)
        files = write_reference(tmp, model.state_dict())
    info = _version_info(model, run_config, run_dir, engines, files)
    info.not_built = not_built
    return publish_version(repository, manifest, version, info)


def add_engine(
    repository, name: str, engine: str, version: int | None = None, replace: bool = False, log=lambda _: None, **options
) -> tuple[ModelVersion, str]:
    """Builds artifact ``engine`` of the registry into an existing version, on the machine that will
    run it (a TensorRT plan from the opset-23 graph; a torch package for this machine's device; or any
    artifact the version lacks). Other files of the version are left as they are. Returns the version
    and the manifest key of the new engine."""
    _check_options(engine, options)  # before the repository is read: a wrong flag is named first
    repo = ModelRepository(repository)
    mv = repo.version(name, version)
    entry = artifact(engine, "encoder" if mv.is_encoder else "survival")
    why = mv.info.not_built.get(engine)
    if why:
        raise RepositoryError(f"{mv.path}: no {engine} artifact for {mv.info.architecture}: {why}")
    options = {k: v for k, v in options.items() if v is not None}
    foreign = sorted(k for k in options if k not in entry.options)
    if foreign:  # a flag another role's artifact of this name takes (--precision: encoders' torch, not survival's)
        takes = ", ".join(_flag(o) for o in entry.options) or "no options"
        raise InputError(f"{', '.join(_flag(k) for k in foreign)} do not apply to the {engine} artifact "
                         f"of {'a patch encoder' if mv.is_encoder else 'a survival model'} (it takes {takes})")
    key, file = entry.target(options)
    if key in mv.info.engines and not replace:
        raise RepositoryError(f"{mv.path / file} already exists (engine {key!r}); pass --replace to rebuild it")
    built = entry.build(BuildContext(mv.path, mv, options, log), mv.path / file)  # written atomically beside the others
    manifest = repo.manifest(name)
    info = manifest.versions[mv.version]
    info.engines[key] = built
    info.files[file] = sha256_file(mv.path / file)
    external = (built.details or {}).get("external_data")  # a graph over 1 GiB keeps its weights beside it
    if external:
        info.files[external] = sha256_file(mv.path / external)
    info.parity.pop(key, None)  # figures of a replaced artifact no longer hold
    return publish_version(repository, manifest, mv.version, info), key


def _flag(option: str) -> str:
    """The command line's flag for an artifact option (bias_correction, on by default, is turned off)."""
    return "--no-bias-correction" if option == "bias_correction" else "--" + option.replace("_", "-")


def _check_options(engine: str, options: dict) -> None:
    kinds = [a for a in ARTIFACTS if a.name == engine]
    if not kinds:
        artifact(engine, "survival")  # the error names the artifacts there are
    takes = {o for a in kinds for o in a.options}
    foreign = sorted(k for k, v in options.items() if v is not None and k not in takes)
    if foreign:
        flags = ", ".join(_flag(f) for f in foreign)
        owners = sorted({a.name for a in ARTIFACTS for f in foreign if f in a.options})
        goes = f"; they go with --add-engine {' or '.join(owners)}" if owners else ""
        listed = ", ".join(_flag(o) for o in sorted(takes)) or "no options"
        raise InputError(f"{flags} do not apply to {engine} (it takes {listed}){goes}")


def prepare_version(repository, name: str, inputs, outputs, version: int | None) -> tuple[Path, ModelManifest, int]:
    """(model folder, its manifest (new or checked against this interface), the version to write)."""
    model_dir = Path(repository) / name
    manifest = _existing_manifest(model_dir, name, inputs, outputs)
    version = _next_version(model_dir, manifest) if version is None else int(version)
    if version < 1:
        raise RepositoryError(f"version must be a positive integer, got {version}")
    if (model_dir / str(version)).exists():
        raise RepositoryError(f"{model_dir / str(version)} already exists; versions are immutable, export a new one")
    return model_dir, manifest, version


def write_reference(version_dir: Path, state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
    """Saves the reference weights ``verify`` compares engines against, then hashes every file of the
    (not yet published) version folder: the manifest's sha256 must cover exactly what is served."""
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(version_dir / REFERENCE_WEIGHTS))
    return {p.name: sha256_file(p) for p in sorted(version_dir.iterdir())}


def publish_version(repository, manifest: ModelManifest, version: int, info: VersionInfo) -> ModelVersion:
    """Records a version folder already in place in the manifest and config.pbtxt (each replaced atomically)."""
    model_dir = Path(repository) / manifest.name
    manifest.versions[version] = info
    manifest.save(model_dir / MANIFEST)
    write_text_atomic(model_dir / "config.pbtxt", render_config_pbtxt(manifest))
    return ModelRepository(repository).version(manifest.name, version)


def _existing_manifest(model_dir: Path, name: str, inputs, outputs) -> ModelManifest:
    if not (model_dir / MANIFEST).is_file():
        return ModelManifest(name, inputs, outputs)
    manifest = ModelManifest.load(model_dir / MANIFEST)
    if (manifest.inputs, manifest.outputs) != (inputs, outputs):
        raise RepositoryError(
            f"{model_dir}: this export's tensors {to_json_dict(inputs + outputs)} differ from the model's "
            f"{to_json_dict(manifest.inputs + manifest.outputs)}; export it under another model name"
        )
    return manifest


def _next_version(model_dir: Path, manifest: ModelManifest) -> int:
    # Count folders too: a folder left by an interrupted export must not be reused silently.
    on_disk = [int(p.name) for p in model_dir.iterdir() if p.name.isdigit()] if model_dir.is_dir() else []
    return max([0, *manifest.versions, *on_disk]) + 1


def _version_info(model, run_config: dict, run_dir, engines: dict, files: dict) -> VersionInfo:
    genes = None
    if "genes" in model.input_names:
        scaler = getattr(model, "genes", None)
        genes = GeneSpec(
            names=tuple(run_config["genes"]),
            mean=tuple(scaler.mean.tolist()) if scaler is not None else None,
            scale=tuple(scaler.scale.tolist()) if scaler is not None else None,
        )
    training = {"run": str(Path(run_dir).resolve()) if run_dir else None, "train": run_config.get("train", {})}
    if run_dir and (Path(run_dir) / "metrics.json").is_file():
        training["metrics"] = json.loads((Path(run_dir) / "metrics.json").read_text())
    return VersionInfo(
        architecture=run_config["architecture"],
        config=run_config["model"],
        engines=engines,
        files=files,
        reference=ReferenceWeights(REFERENCE_WEIGHTS, "safetensors state_dict"),
        trained_on=trained_on(run_config) if "features" in model.input_names else None,
        genes=genes,
        clinical=clinical_spec_of(model),
        survival=getattr(model, "survival_reference", None) or _survival_head(model, run_config),
        modalities=modalities_of(model),
        training=training,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        histosurv_version=__version__,
    )


def trained_on(run_config: dict) -> EncoderRecord | None:
    """The run's record of the encoder its bags came from (runs before records kept a dict of the
    attributes the bags agreed on, read as a partial record)."""
    if run_config.get("trained_on") is not None:
        try:
            return from_json_dict(EncoderRecord, run_config["trained_on"], "trained_on")
        except FieldError as e:
            raise InputError(f"run configuration: {e}") from e
    old = run_config.get("patch_encoder")
    if old:
        upgraded = upgrade_v1({"inputs": [], "versions": {"1": {"patch_encoder": old, "engines": {}}}})
        return from_json_dict(EncoderRecord, upgraded["versions"]["1"]["trained_on"], "patch_encoder")
    return None


def _survival_head(model, run_config: dict) -> SurvivalHead:
    kind = model.cfg.survival_head
    bins = run_config.get("time_bins")
    n_bins = getattr(model.cfg, "n_bins", None) if kind == "discrete" else None
    return SurvivalHead(
        kind=kind,
        n_bins=n_bins,
        time_bins=tuple(float(b) for b in bins) if bins else None,
        risk=risk_definition(kind, n_bins),
    )


def modalities_of(model) -> dict[str, str]:
    """What the model needs of each input, for the manifest and the runtime's checks."""
    optional = set(getattr(model, "optional_inputs", ()))
    found = {name: "optional" if name in optional else "required" for name in model.input_names}
    for name in ("features", "genes"):
        found.setdefault(name, "not used")
    return found
