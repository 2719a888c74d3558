"""Gene groups for the MCAT family when the gene table comes without signatures.

MCAT, MoME and SurvPath tokenise genes by functional signature (six groups for the TCGA studies:
tumour suppressors, oncogenes, protein kinases, cell differentiation, transcription, cytokines and
growth). A plain gene table carries no such labels, so the rule is: the genes, in the table's (or the
gene list's) order, cut into ``groups`` contiguous groups of near-equal size, the larger groups first.
Six groups keep the reference's token count; fewer genes than groups give one gene per group. A user
with signatures orders the gene list by signature and passes ``--omic-sizes``.
"""

from __future__ import annotations

__all__ = ["DEFAULT_GROUPS", "default_groups"]

DEFAULT_GROUPS = 6  # MCAT's six signature groups


def default_groups(n_genes: int, groups: int = DEFAULT_GROUPS) -> tuple[int, ...]:
    if n_genes < 1:
        raise ValueError(f"cannot group {n_genes} genes")
    groups = min(groups, n_genes)
    base, extra = divmod(n_genes, groups)
    return tuple(base + (i < extra) for i in range(groups))
