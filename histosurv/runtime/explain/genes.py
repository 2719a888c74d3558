"""Gene attributions by occlusion, on any engine: how much each group of genes moves the risk.

The attribution of group g is ``risk(x) - risk(x with group g at the baseline)``: positive means the
group's values raise the risk (worse prognosis), negative that they lower it, in the unit of the served
risk (the manifest's survival head). A gene's baseline is its training mean (the manifest's
``GeneSpec.mean``; 0 in the standardised space the model sees), so "group g at the baseline" reads as
"an average training patient's values for these genes, everything else this patient's".

Occlusion is not additive: with interactions the group values need not sum to ``risk(x) - risk(all genes
at the baseline)``; both are reported (``sum_of_groups``, ``full_minus_baseline``) so a reader sees how far
apart they are. Integrated gradients (``histosurv.export.attribution``, torch) is additive.

Groups: the model's own gene tokens where its config records them (MCAT and MoME ``omic_sizes``; AMMASurv
``gene_groups`` tokens of ceil(G / m) consecutive genes), else consecutive chunks of the manifest's gene
order, at most ``max_groups`` of them (one gene each when G <= ``max_groups``). ``grouping`` states which.

Passes: serving graphs take one bag with an unbatched ``genes`` [G] (DESIGN.md tensor names), so a batch
of occluded gene vectors cannot go through one call. The explanation runs 2 + groups passes of the same
engine (this patient, all genes at the baseline, one per group), reusing the same feature, coordinate and
covariate arrays; its cost is (2 + groups) x one fuse, reported in ``passes`` and ``seconds``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ...errors import InputError
from ..finite import check_outputs

__all__ = ["GeneAttributions", "GroupAttribution", "GeneGroups", "gene_groups", "baseline_genes", "explain_genes",
           "MAX_GROUPS"]

MAX_GROUPS = 32  # occlusion passes are whole fuses: 32 + 2 of them for a model with no gene tokens


@dataclass
class GroupAttribution:
    name: str
    genes: list[str]
    attribution: float  # risk(x) - risk(this group at the baseline); > 0: these values raise the risk
    risk_at_baseline: float | None = None  # occlusion: the risk with this group at the baseline


@dataclass
class GeneAttributions:
    """Signed gene attributions of one bag; ``to_dict`` is plain JSON."""

    method: str  # "occlusion" or "integrated_gradients"
    model: str  # "name vN"
    engine: str  # the engine key, or "torch (reference weights)"
    baseline: str  # what a gene was replaced with, in words
    grouping: str  # where the groups come from, in words
    risk: float  # f(x), this patient
    baseline_risk: float  # f(baseline): every gene at the baseline
    groups: list[GroupAttribution]
    genes: dict[str, float] | None  # per gene: single-gene groups, or integrated gradients; else None
    passes: int  # forward passes run (integrated gradients: forward + backward per step)
    seconds: float
    risk_definition: str = ""
    completeness_gap: float | None = None  # integrated gradients: sum(attributions) - (risk - baseline_risk)
    steps: int | None = None  # integrated gradients: Riemann steps along the path
    notes: list[str] = field(default_factory=list)

    @property
    def full_minus_baseline(self) -> float:
        return self.risk - self.baseline_risk

    @property
    def sum_of_groups(self) -> float:
        return float(sum(g.attribution for g in self.groups))

    def ranked(self) -> list[GroupAttribution]:
        """Groups by the size of their effect, largest first."""
        return sorted(self.groups, key=lambda g: -abs(g.attribution))

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(full_minus_baseline=self.full_minus_baseline, sum_of_groups=self.sum_of_groups)
        return d


@dataclass(frozen=True)
class GeneGroups:
    names: list[str]
    members: list[list[int]]  # gene indices per group, in the manifest's order
    source: str  # in words

    @property
    def singletons(self) -> bool:
        return all(len(m) == 1 for m in self.members)


def gene_groups(version, max_groups: int = MAX_GROUPS) -> GeneGroups:
    """The groups occlusion replaces together (see the module docstring for the rule)."""
    names, config = version.info.gene_names, version.info.config or {}
    n = len(names)
    if config.get("omic_sizes"):
        sizes = [int(s) for s in config["omic_sizes"]]
        source = f"the model's gene tokens (omic_sizes {', '.join(map(str, sizes))})"
    elif config.get("gene_groups"):
        size = math.ceil(n / int(config["gene_groups"]))
        sizes = _chunks(n, size)
        source = f"the model's gene tokens (gene_groups {config['gene_groups']}: {size} consecutive genes each)"
    else:
        size = math.ceil(n / max_groups)
        sizes = _chunks(n, size)
        source = ("each gene on its own" if size == 1 else
                  f"consecutive chunks of {size} genes in the manifest's order (the model records no gene groups)")
    if sum(sizes) != n:
        raise InputError(f"model {version.label!r}: its gene groups cover {sum(sizes)} genes, its gene list has {n}")
    starts = np.cumsum([0, *sizes])
    members = [list(range(a, b)) for a, b in zip(starts[:-1], starts[1:])]
    labels = [names[m[0]] if len(m) == 1 else f"group {i + 1} ({names[m[0]]}..{names[m[-1]]})" for i, m in enumerate(members)]
    return GeneGroups(labels, members, source)


def _chunks(n: int, size: int) -> list[int]:
    return [min(size, n - start) for start in range(0, n, size)]


def baseline_genes(version) -> tuple[np.ndarray, str]:
    """The baseline gene vector in wire values (what callers send) and its description."""
    spec = version.info.genes
    n = len(version.info.gene_names)
    if spec is not None and not spec.standardised_in_graph:
        return np.zeros(n, np.float32), "0 for every gene: the training mean of the standardised values callers send"
    if spec is None or spec.mean is None:
        return np.zeros(n, np.float32), "0 for every gene (the manifest records no training mean)"
    return (np.asarray(spec.mean, np.float32),
            "each gene at its training mean (the manifest's gene scaler; 0 in the standardised space the model sees)")


def refuse_without_genes(version) -> None:
    """InputError saying why a model has no gene attributions."""
    if not version.takes("genes"):
        raise InputError(
            f"model {version.label!r} ({version.info.architecture}) takes no genes, so there are no gene attributions "
            "to give; its explanation is the patch attention (top patches)"
        )


def explain_genes(predictor_or_engine, inputs: dict[str, np.ndarray], version=None,
                  max_groups: int = MAX_GROUPS) -> GeneAttributions:
    """Occlusion attributions of ``inputs`` (engine inputs, as ``FusionPredictor.inputs_for`` makes them) on
    a ``FusionPredictor`` or an ``Engine``; ``version`` defaults to theirs. InputError for a model that takes
    no genes, or a patient whose genes are missing (all NaN)."""
    engine = getattr(predictor_or_engine, "engine", predictor_or_engine)
    version = version or predictor_or_engine.version
    refuse_without_genes(version)
    genes = np.asarray(inputs.get("genes"), np.float32).reshape(-1) if inputs.get("genes") is not None else None
    if genes is None or np.isnan(genes).all():
        raise InputError(f"model {version.label!r} scored this case without genes: there are no gene values to attribute")
    baseline, described = baseline_genes(version)
    groups = gene_groups(version, max_groups)
    started = time.perf_counter()

    def risk(vector: np.ndarray) -> float:
        out = check_outputs(engine.run({**inputs, "genes": np.ascontiguousarray(vector, np.float32)}), version.name)
        return float(np.asarray(out["risk"]).reshape(-1)[0])

    full, at_baseline = risk(genes), risk(baseline)
    rows = []
    for name, members in zip(groups.names, groups.members):
        occluded = genes.copy()
        occluded[members] = baseline[members]
        without = risk(occluded)
        rows.append(GroupAttribution(name, [version.info.gene_names[i] for i in members], full - without, without))
    per_gene = {r.genes[0]: r.attribution for r in rows} if groups.singletons else None
    survival = version.info.survival
    return GeneAttributions(
        method="occlusion", model=version.label, engine=getattr(engine, "key", type(engine).__name__),
        baseline=described, grouping=groups.source, risk=full, baseline_risk=at_baseline, groups=rows, genes=per_gene,
        passes=2 + len(rows), seconds=round(time.perf_counter() - started, 4),
        risk_definition=survival.risk_definition if survival is not None else "",
    )
