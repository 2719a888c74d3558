"""Explanations of a prediction, engine-agnostic: gene attributions by occlusion and the top patches.

Public API (a report generator renders these; every result has a plain-JSON ``to_dict``):

* ``explain_genes(predictor_or_engine, inputs, version=None) -> GeneAttributions``: occlusion by gene
  group on any engine (ONNX Runtime, TensorRT, torch); signed, per group (and per gene where groups are
  single genes), with the baseline (training mean) and the grouping stated, and the passes and seconds
  it cost. ``inputs`` are engine inputs (``FusionPredictor.inputs_for(bag, genes, clinical)``).
* ``top_patches(attention, coords, k, slide=None, patch_size=None) -> list[TopPatch]``: the most
  attended patches; with a slide, each carries its crop as a uint8 (S, S, 3) array.
* ``explain_bag(predictor, bag, genes, clinical, attention, ...) -> Explanation``: both for one bag, and
  what the model cannot give with the reason (an image-only model has no gene attributions; a genes-only
  model no top patches). ``write_explanation`` writes it as JSON (and the crops as PNG).

Integrated gradients and what MCAT's co-attention and MoME's router hold need the PyTorch model: they
are in ``histosurv.export.attribution`` (the runtime never imports the export side).
"""

from .explanation import Explanation, explain_bag, write_explanation
from .genes import GeneAttributions, GroupAttribution, baseline_genes, explain_genes, gene_groups
from .patches import TopPatch, top_patches

__all__ = ["Explanation", "explain_bag", "write_explanation", "GeneAttributions", "GroupAttribution",
           "baseline_genes", "explain_genes", "gene_groups", "TopPatch", "top_patches"]
