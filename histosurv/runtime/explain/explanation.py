"""One bag's explanation: gene attributions, top patches, and what could not be given and why."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...data.atomic import atomic_path, write_text_atomic
from ...errors import InputError
from ..finite import check_outputs
from .genes import MAX_GROUPS, GeneAttributions, explain_genes, refuse_without_genes
from .patches import DEFAULT_CROP, DEFAULT_K, TopPatch, top_patches

__all__ = ["Explanation", "explain_bag", "write_explanation", "TORCH_INTERNALS"]

# what the torch side (histosurv.export.attribution) adds beyond the graph's one attention vector
TORCH_INTERNALS = {"mcat": "per-gene-group co-attention maps", "mome": "router choices (the expert of each layer)"}


@dataclass
class Explanation:
    model: str  # "name vN"
    source: str  # the bag's file or slide
    risk: float
    gene_attributions: list[GeneAttributions] = field(default_factory=list)  # one per method
    top_patches: list[TopPatch] = field(default_factory=list)
    internals: dict | None = None  # architecture-specific, from the torch model (histosurv.export.attribution)
    unavailable: dict[str, str] = field(default_factory=dict)  # part -> why it is not given

    def to_dict(self) -> dict:
        return {
            "model": self.model, "source": self.source, "risk": self.risk,
            "gene_attributions": [g.to_dict() for g in self.gene_attributions],
            "top_patches": [p.to_dict() for p in self.top_patches],
            **({"internals": self.internals} if self.internals is not None else {}),
            "unavailable": dict(self.unavailable),
        }


def explain_bag(predictor, bag, genes: np.ndarray | None = None, clinical: np.ndarray | None = None,
                attention: np.ndarray | None = None, genes_required: bool = False, k: int = DEFAULT_K,
                slide=None, crop_size: int | None = DEFAULT_CROP, max_groups: int = MAX_GROUPS,
                occlusion: bool = True) -> Explanation:
    """Occlusion gene attributions and the ``k`` most attended patches of ``bag`` on ``predictor``'s engine.

    A part the model cannot give (no genes; no patch attention) is listed in ``unavailable`` with the
    reason; with ``genes_required`` (the user asked for gene attributions by name) a model without genes is
    an InputError instead. ``attention``: the bag's attention from the scoring pass (else one more pass).
    ``slide``: read the top patches' crops from it (the bag records their side in level-0 pixels).
    ``occlusion=False`` leaves the gene attributions to the caller (integrated gradients on the torch side).
    MCAT's and MoME's internals need the torch model: ``unavailable`` says so until a caller fills them.
    """
    version = predictor.version
    if genes_required:
        refuse_without_genes(version)
    inputs = predictor.inputs_for(bag, genes, clinical)
    out = None
    if attention is None and version.manifest.output("attention") is not None:
        out = check_outputs(predictor.engine.run(inputs), version.name)
        attention = out.get("attention")
    result = Explanation(version.label, bag.source, float("nan"))
    try:
        if occlusion:
            result.gene_attributions.append(explain_genes(predictor, inputs, version, max_groups))
    except InputError as e:
        if genes_required:
            raise
        result.unavailable["gene_attributions"] = str(e)
    if version.info.architecture in TORCH_INTERNALS:
        result.unavailable["internals"] = (
            f"{version.info.architecture}'s {TORCH_INTERNALS[version.info.architecture]} need the PyTorch model: "
            "histosurv predict --explain with torch installed (pip install 'histosurv[train]') gives them"
        )
    if result.gene_attributions:
        result.risk = result.gene_attributions[0].risk
    else:  # no occlusion pass gave it
        out = out or check_outputs(predictor.engine.run(inputs), version.name)
        result.risk = float(np.asarray(out["risk"]).reshape(-1)[0])
    if attention is None:
        what = "takes no image features" if "features" not in predictor.specs else "exposes no patch attention"
        result.unavailable["top_patches"] = f"model {version.label!r} ({version.info.architecture}) {what}"
    else:
        size = bag.attrs.get("patch_size_level0") if slide is not None else None
        result.top_patches = top_patches(attention, bag.coords, k, slide, int(size) if size else None, crop_size)
    return result


def write_explanation(explanation: Explanation, path: str | os.PathLike, crops_dir: str | os.PathLike | None = None) -> Path:
    """Writes the explanation's JSON at ``path`` and, with ``crops_dir``, each top patch's crop as
    ``<crops_dir>/<stem>_top<rank>.png`` (each file atomically); the JSON names the crop files."""
    path = Path(path)
    d = explanation.to_dict()
    if crops_dir is not None:
        from PIL import Image

        for patch, row in zip(explanation.top_patches, d["top_patches"]):
            if patch.crop is None:
                continue
            dest = Path(crops_dir) / f"{path.stem}_top{patch.rank}.png"
            with atomic_path(dest, suffix=".png") as tmp:
                Image.fromarray(patch.crop).save(tmp, format="PNG")
            row["crop"] = str(dest)
    write_text_atomic(path, json.dumps(d, indent=1) + "\n")
    return path
