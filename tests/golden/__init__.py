"""Golden outputs of the reference repositories' model code.

Each ``<model>.json`` here was written once by ``make_<model>.py`` running the reference
repository's own model code (checked out outside this project, never committed) with weights and
inputs drawn from the seeded functions below. Only the reference state_dict's key names and shapes,
the seeds and the outputs are committed: the tests rebuild the same weights from the same seeds,
load them through histosurv's checkpoint mapping and compare forward passes.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch

HERE = Path(__file__).parent
TOLERANCE = 1e-5  # absolute, on logits and risks

__all__ = ["HERE", "TOLERANCE", "seeded_state_dict", "seeded_bag", "load_golden", "shapes_of"]


def seeded_tensor(name: str, shape, seed: int = 0) -> torch.Tensor:
    """A weight drawn from a generator seeded by the key name: the same on every machine and in any
    key order. Scaled like a default init so activations stay of order 1 through deep stacks."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) * 7919 + seed)
    shape = tuple(shape)
    if len(shape) >= 2:
        fan_in = 1
        for s in shape[1:]:
            fan_in *= s
        return torch.randn(shape, generator=g) / fan_in**0.5
    t = 0.1 * torch.randn(shape, generator=g)
    leaf = name.rsplit(".", 2)
    if name.endswith("weight") and len(leaf) > 1 and "norm" in name.lower():
        t = t + 1.0  # LayerNorm / RMSNorm gains near one
    return t


def shapes_of(state_dict: dict) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in state_dict.items() if v.is_floating_point()}


def seeded_state_dict(shapes: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: seeded_tensor(k, s, seed) for k, s in shapes.items()}


def seeded_bag(n: int, feature_dim: int, n_genes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) non-negative patch features (post-ReLU encoders) and (G,) standardised genes."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + n)
    features = torch.randn(n, feature_dim, generator=g).abs()
    genes = torch.randn(n_genes, generator=g)
    return features, genes


def load_golden(name: str) -> dict:
    return json.loads((HERE / f"{name}.json").read_text())
