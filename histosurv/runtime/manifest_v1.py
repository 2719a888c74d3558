"""Reading schema-1 manifests: their untyped version entries, rewritten in schema 2's shape.

Schema 1 kept an encoder's facts in ``config`` (patch size, width, normalisation, the weights file's
sha256 or seed) and a survival model's ``patch_encoder`` as the attributes its bags happened to agree
on (the encoder's model name, patch size, µm/px). What it did not record stays unknown here (an
encoder's cutting scale and tensor digest, the architecture behind a model's bags); the runtime warns
about unknown fields rather than refusing, so repositories exported before keep serving.
"""

from __future__ import annotations

__all__ = ["SCHEMA_V1", "upgrade_v1"]

SCHEMA_V1 = "histosurv.manifest/1"

# what tied a schema-1 artifact to a machine, by backend
_TIES = {"torch": ("torch", "compute_capability"), "tensorrt": ("tensorrt", "compute_capability", "gpu")}


def upgrade_v1(d: dict) -> dict:
    """A schema-1 manifest dict in schema 2's shape (the caller type-checks the result)."""
    is_encoder = any(t.get("name") == "patches" for t in d.get("inputs", []))
    versions = {}
    for key, info in d.get("versions", {}).items():
        if not isinstance(info, dict):
            versions[key] = info  # reported as damaged by the type check
            continue
        versions[key] = _version(info, is_encoder)
    return {**d, "versions": versions}


def _version(info: dict, is_encoder: bool) -> dict:
    info = dict(info)
    old_encoder = info.pop("patch_encoder", {}) or {}
    old_genes = info.pop("genes", {}) or {}
    head = info.pop("survival_head", "none")
    info["engines"] = {k: _engine(k, e) for k, e in (info.get("engines") or {}).items()}
    if is_encoder:
        info["encoder"] = _encoder_record(info["architecture"], info.get("config", {}))
    elif old_encoder:
        info["trained_on"] = _bags_record(old_encoder)
    if old_genes.get("names"):
        info["genes"] = {
            "names": old_genes["names"],
            "mean": old_genes.get("mean"),
            "scale": old_genes.get("scale"),
            "standardised_in_graph": bool(old_genes.get("standardised_in_graph", True)),
        }
    if head != "none":
        n_bins = info.get("config", {}).get("n_bins") if head == "discrete" else None
        info["survival"] = {"kind": head, "n_bins": n_bins}
    info.setdefault("reference", {"file": "model.safetensors", "format": "safetensors state_dict"})
    return info


def _engine(key: str, entry: dict) -> dict:
    entry = dict(entry)
    build_input = entry.pop("build_input", False)
    backend = None if build_input else entry.pop("backend", key)
    entry.pop("backend", None)
    # an ONNX entry's "torch" is the exporter's release (kept in details); a package's ties it to torch
    ties = {name: entry.pop(name, None) for name in _TIES.get(backend or "", ())}
    device = entry.pop("device", None) or ("cuda" if backend == "tensorrt" else "any")
    return {
        "file": entry.pop("file"),
        "backend": backend,
        "precision": entry.pop("precision", "fp32"),
        "device": device,
        "built_for": {k: (str(v) if v is not None else None) for k, v in ties.items()},
        "kernels": entry.pop("kernels", None),
        "profiles": entry.pop("profiles", []),
        "details": entry,
    }


def _encoder_record(architecture: str, config: dict) -> dict:
    weights = config.get("weights", {})
    norm = config.get("normalisation", {})
    source = "file" if weights.get("sha256") else "seeded"
    detail = f"{weights.get('file')} (file sha256 {weights['sha256'][:12]})" if source == "file" else f"seed {weights.get('seed')}"
    return {
        "architecture": architecture,
        "feature_dim": config.get("feature_dim"),
        "patch_size": config.get("patch_size"),
        "mpp": None,  # schema 1 did not record the scale an encoder's patches are cut at
        "input_size": config.get("patch_size"),
        "preprocessing": {"mean": norm["mean"], "std": norm["std"]} if "mean" in norm else None,
        "feature": "pooled",
        # schema 1 hashed the weights file, not the tensors: that digest is not comparable
        "weights": {"sha256": None, "source": source, "detail": detail},
    }


def _bags_record(old: dict) -> dict:
    synthetic = old.get("encoder") == "synthetic"
    return {
        "architecture": "synthetic" if synthetic else None,
        "feature_dim": old.get("feature_dim"),
        "patch_size": old.get("patch_size"),
        "mpp": old.get("mpp"),
        "name": "" if synthetic else str(old.get("encoder", "")),
    }
