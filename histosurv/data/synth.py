"""A synthetic cohort with a known signal in both modalities, written in the real input formats.

Each patient has two independent latent risk factors, one for each modality:

* image: the share of patches of an "aggressive" tissue type. Patch features are noisy copies of a
  few tissue prototypes (non-negative, like pooled ResNet activations), so a model has to find the
  aggressive patches and measure how much of the slide they cover;
* genes: a few signal genes move with the gene factor; the rest are correlated noise on a
  log-expression scale (so standardisation matters).

Survival times are exponential with log-hazard ``beta * (r_image + r_genes)``, censored by an
independent uniform follow-up. Each modality then explains half of the risk: a model that uses both
should beat either single-modality ablation, which is the claim the AMMASurv paper makes.

``biology_seed`` fixes the tissue prototypes and the gene loadings; ``seed`` draws the patients.
Cohorts with the same biology and different seeds are independent samples of one population, so a
large external cohort can measure a held-out c-index with little sampling noise.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .atomic import atomic_dir
from .encoder_record import EncoderRecord, WeightsIdentity
from .features import Bag, write_bag

__all__ = ["SynthConfig", "write_synthetic_cohort", "synthetic_encoder_record"]


@dataclass(frozen=True)
class SynthConfig:
    n_patients: int = 400  # patients in the cohort
    n_genes: int = 200  # gene columns of genes.csv
    n_signal_genes: int = 16  # genes that carry the gene risk factor
    feature_dim: int = 512  # width of the patch features
    n_tissue_types: int = 6  # patch prototypes; one of them is the aggressive tissue
    min_patches: int = 48  # fewest patches of a slide
    max_patches: int = 192  # most patches of a slide
    multi_slide_fraction: float = 0.2  # patients with a second slide
    beta: float = 1.0  # log hazard ratio per unit of each latent factor
    median_survival_months: float = 30.0  # of a patient with average risk
    max_follow_up_months: float = 120.0  # censoring draws follow-up uniformly up to this
    patch_size: int = 256  # level-0 pixels; coords are multiples of it
    seed: int = 0  # draws the patients
    biology_seed: int = 0  # fixes tissue prototypes and gene loadings


def synthetic_encoder_record(cfg: SynthConfig) -> EncoderRecord:
    """What made these features, as every bag records it: no encoder and no scale, so a model trained
    on them is refused any real encoder's features unless told to accept them."""
    return EncoderRecord(
        architecture="synthetic",
        feature_dim=cfg.feature_dim,
        patch_size=cfg.patch_size,
        feature="synthetic",
        weights=WeightsIdentity(None, "synthetic", f"tissue prototypes of biology seed {cfg.biology_seed}"),
    )


def write_synthetic_cohort(
    out_dir: str | os.PathLike,
    cfg: SynthConfig = SynthConfig(),
    overwrite: bool = False,
    encoder_record: EncoderRecord | None = None,
) -> Path:
    """Writes ``clinical.csv``, ``genes.csv``, ``features/<slide_id>.h5`` and ``truth.csv``.

    ``encoder_record`` makes the bags say they came from that encoder (its width must be
    ``cfg.feature_dim``): a model trained on them then takes that encoder's features without an
    override, which is how tests and benchmarks exercise the slide path without tiling a cohort."""
    if encoder_record is not None and encoder_record.feature_dim != cfg.feature_dim:
        raise ValueError(f"encoder_record is {encoder_record.feature_dim}-d, the cohort {cfg.feature_dim}-d")
    biology = _Biology(np.random.default_rng([cfg.biology_seed, 1]), cfg)
    rng = np.random.default_rng([cfg.seed, 2])
    r_img, r_gene = rng.standard_normal(cfg.n_patients), rng.standard_normal(cfg.n_patients)
    case_ids = [f"SYN{cfg.seed}-{i:04d}" for i in range(cfg.n_patients)]
    times, censorship = _survival(rng, cfg, r_img + r_gene)
    genes = biology.gene_table(rng, r_gene)

    record = (encoder_record or synthetic_encoder_record(cfg)).to_json()
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / "features").mkdir()
        rows = []
        for i, case_id in enumerate(case_ids):
            n_slides = 2 if rng.random() < cfg.multi_slide_fraction else 1
            mix = _tissue_mix(rng, cfg, r_img[i])
            for s in range(n_slides):
                slide_id = f"{case_id}-{s + 1:02d}.svs"
                bag = _slide_bag(rng, cfg, biology.prototypes, mix)
                bag.attrs.update(
                    encoder=encoder_record.name if encoder_record else "synthetic", patch_size=cfg.patch_size,
                    patch_level=0, patch_size_level0=cfg.patch_size, encoder_record=record,
                )
                write_bag(tmp / "features" / f"{case_id}-{s + 1:02d}.h5", bag)
                rows.append((case_id, slide_id, times[i], censorship[i]))
        pd.DataFrame(rows, columns=["case_id", "slide_id", "survival_months", "censorship"]).to_csv(
            tmp / "clinical.csv", index=False
        )
        genes.insert(0, "case_id", case_ids)
        genes.to_csv(tmp / "genes.csv", index=False, float_format="%.5f")
        truth = pd.DataFrame({"case_id": case_ids, "r_image": r_img, "r_genes": r_gene})
        truth.to_csv(tmp / "truth.csv", index=False)
        (tmp / "synth_config.json").write_text(pd.Series(asdict(cfg)).to_json(indent=1))
    return Path(out_dir)


def _survival(rng, cfg: SynthConfig, latent: np.ndarray):
    rate = np.log(2) / cfg.median_survival_months
    event_time = rng.exponential(1.0 / (rate * np.exp(cfg.beta * latent)))
    follow_up = rng.uniform(0.2, 1.0, latent.shape) * cfg.max_follow_up_months
    observed = np.minimum(event_time, follow_up)
    censored = (event_time > follow_up).astype(int)
    return np.round(observed, 2), censored


class _Biology:
    """What every patient of the population shares: tissue prototypes and how genes are regulated."""

    def __init__(self, rng, cfg: SynthConfig):
        g = cfg.n_genes
        self.cfg = cfg
        self.prototypes = np.abs(rng.normal(0.0, 1.0, (cfg.n_tissue_types, cfg.feature_dim))).astype(np.float32)
        self.loadings = rng.normal(0, 0.6, (5, g))  # five shared expression programmes
        self.signal = rng.choice(g, cfg.n_signal_genes, replace=False)
        self.weights = rng.choice([-1.0, 1.0], cfg.n_signal_genes) * rng.uniform(0.8, 1.2, cfg.n_signal_genes)
        self.level, self.spread = rng.uniform(2, 10, g), rng.uniform(0.5, 2.5, g)  # log2-TPM-like scale

    def gene_table(self, rng, r_gene: np.ndarray) -> pd.DataFrame:
        n, g = r_gene.size, self.cfg.n_genes
        z = rng.standard_normal((n, 5)) @ self.loadings + rng.normal(0, 0.8, (n, g))
        z[:, self.signal] = np.outer(r_gene, self.weights) + rng.normal(0, 0.4, (n, self.signal.size))
        names = [f"GENE{j:04d}" for j in range(g)]
        return pd.DataFrame(self.level + self.spread * z, columns=names)


def _tissue_mix(rng, cfg: SynthConfig, r_img: float) -> np.ndarray:
    aggressive = 1.0 / (1.0 + np.exp(-(1.2 * r_img - 1.2)))  # 5-75 % of the tissue
    rest = rng.dirichlet(np.full(cfg.n_tissue_types - 1, 2.0)) * (1 - aggressive)
    return np.concatenate([[aggressive], rest])


def _slide_bag(rng, cfg: SynthConfig, prototypes: np.ndarray, mix: np.ndarray) -> Bag:
    n = int(rng.integers(cfg.min_patches, cfg.max_patches + 1))
    kinds = rng.choice(len(mix), n, p=mix)
    noise = rng.normal(0.0, 0.5, (n, cfg.feature_dim)).astype(np.float32)
    features = np.maximum(prototypes[kinds] + noise, 0.0)
    # Tissue as a compact blob of grid cells, patches in raster order like a tiler emits them.
    side = int(np.ceil(np.sqrt(n * 1.6)))
    cells = np.argwhere(np.ones((side, side), bool))
    centre = (side - 1) / 2
    cells = cells[np.argsort(((cells - centre) ** 2).sum(1) + rng.random(len(cells)) * 0.1)][:n]
    cells = cells[np.lexsort((cells[:, 1], cells[:, 0]))]
    coords = (cells[:, ::-1] * cfg.patch_size).astype(np.int64)  # (x, y) of each patch
    return Bag(features, coords, {})
