"""A synthetic cohort with a known signal in both modalities, written in the real input formats.

Each patient has two independent latent risk factors, one for each modality. In the default
``share`` family:

* image: the share of patches of an "aggressive" tissue type. Patch features are noisy copies of a
  few tissue prototypes (non-negative, like pooled ResNet activations), so a model has to find the
  aggressive patches and measure how much of the slide they cover;
* genes: a few signal genes move with the gene factor; the rest are correlated noise on a
  log-expression scale (so standardisation matters).

Survival times are exponential with log-hazard ``beta * (r_image + r_genes)``, censored by an
independent uniform follow-up. Each modality then explains half of the risk: a model that uses both
should beat either single-modality ablation, which is the claim the AMMASurv paper makes.

Signal families (``signal``)
----------------------------
Each family plants a different kind of risk, so that a benchmark can tell what a model can and cannot
see. ``truth.csv`` holds, per case, ``r_image``, ``r_genes``, ``log_hazard`` (exactly the log-hazard
the survival times were drawn with) and ``aggressive_share`` (the realised share of patches of tissue
type 0). Every family other than ``share`` multiplies its log-hazard by a family scale chosen so that
the oracle c-index (``log_hazard`` against the outcomes) is about 0.74 in the population at
``beta=1`` (0.70-0.79 in a cohort of 300-400 patients); ``share`` keeps its historical scale (about
0.78). About 25-35 % of patients are censored in every family.

* ``linear``: the log-hazard is linear in what a linear Cox model on mean-pooled features and genes
  is given. Every patch of a patient carries a small shift along one fixed direction ``w`` (a
  patient-level programme); ``r_image`` is the projection of the patient's mean patch feature (all
  patches of all its slides) on ``w``, standardised with constants of the population, and
  ``r_genes`` a fixed linear combination of the standardised signal genes. Mean pooling plus a linear
  Cox model reaches the oracle here; it is the sanity baseline that every model should match.
* ``share``: as above. Mean pooling sees the aggressive share only diluted among the other tissue
  types' variation; an attention model can find the aggressive patches and do better. Both parts are
  latent factors that the data measure with noise.
* ``contrast``: the image part is as in ``share``; the gene part is the difference of two genes'
  standardised expression. Both genes carry a strong shared programme that cancels in the
  difference, so each alone is nearly uninformative (correlation about 0.25 with the gene risk). A
  linear model on both genes sees it; univariate gene screening, or averaging co-expressed genes
  into a signature, does not. ``r_genes`` is computed from the written expression values.
* ``interaction``: log-hazard ``s * (0.5 r_image + 0.5 r_genes + r_image * r_genes)``, so two thirds
  of its variance is the product term that no additive (in particular no linear) model can fit. The
  image factor is the share of the aggressive type. Its patches are drawn around one of two centres,
  one above and one below a benign "twin" prototype ``B`` in every dimension, placed so that an
  aggressive patch's expected (clipped, noisy) feature equals a ``B`` patch's exactly; and the
  aggressive share only trades off against ``B``'s. The expected mean-pooled feature therefore does
  not move with the image factor at all: mean pooling sees neither the image half nor the product,
  while a model that classifies single patches can measure the share.
* ``spatial``: every slide has the same share (25 %) of aggressive patches; the image risk is how
  they are laid out. A fraction ``sigmoid(2 r_image)`` of them forms one contiguous cluster (the
  patches nearest a random tissue cell, by the bag's ``coords``), the rest are scattered at random.
  Mean pooling cannot see it at all: the mean feature has the same distribution whatever the
  layout, and so does any permutation-invariant pooling (attention MIL included) that ignores
  coords. Only a model that uses patch positions can recover the image half of the risk.

With ``clinical=True``, ``clinical.csv`` gains ``age`` (years), ``sex`` (``F``/``M``, no effect on
the hazard: a negative control) and ``stage`` (``I``-``IV``), and the log-hazard gains
``0.02 * (age - 63)`` plus a stage effect (``I`` 0, ``II`` 0.3, ``III`` 0.6, ``IV`` 1.0, centred),
reported as ``r_clinical`` in ``truth.csv``. These are drawn from their own random stream, so the
genes and features are those of the same cohort without them.

``biology_seed`` fixes the tissue prototypes and the gene loadings; ``seed`` draws the patients.
Cohorts with the same biology and different seeds are independent samples of one population, so a
large external cohort can measure a held-out c-index with little sampling noise. The default
(``signal="share"``, ``clinical=False``) writes the same clinical, gene and feature files as before
the families existed.
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

__all__ = ["SIGNALS", "SynthConfig", "write_synthetic_cohort", "synthetic_encoder_record"]

SIGNALS = ("linear", "share", "contrast", "interaction", "spatial")
# Multiplies beta in each family so that the oracle c-index is about 0.73-0.78 (share: historical).
_SCALE = {"linear": 0.8, "share": 1.0, "contrast": 0.8, "interaction": 1.1, "spatial": 0.8}
SPATIAL_SHARE = 0.25  # share of aggressive patches in every slide of the spatial family
STAGES = ("I", "II", "III", "IV")
_STAGE_P = np.array([0.2, 0.3, 0.3, 0.2])
_STAGE_LOG_HR = np.array([0.0, 0.3, 0.6, 1.0])
_AGE_LOG_HR, _AGE_MEAN = 0.02, 63.0


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
    beta: float = 1.0  # log hazard ratio per unit of each latent factor (times a per-family scale)
    median_survival_months: float = 30.0  # of a patient with average risk
    max_follow_up_months: float = 120.0  # censoring draws follow-up uniformly up to this
    patch_size: int = 256  # level-0 pixels; coords are multiples of it
    seed: int = 0  # draws the patients
    biology_seed: int = 0  # fixes tissue prototypes and gene loadings
    signal: str = "share"  # planted signal family: linear, share, contrast, interaction or spatial
    clinical: bool = False  # add age, sex and stage columns to clinical.csv (age and stage raise the hazard)

    def __post_init__(self):
        if self.signal not in SIGNALS:
            raise ValueError(f"unknown signal family {self.signal!r}; the families are: {', '.join(SIGNALS)}")
        if self.n_patients < 1:
            raise ValueError(f"n_patients must be at least 1, got {self.n_patients}")
        if not 1 <= self.n_signal_genes <= self.n_genes:
            raise ValueError(f"n_signal_genes must be 1..n_genes ({self.n_genes}), got {self.n_signal_genes}")
        if self.signal == "contrast" and self.n_signal_genes < 2:
            raise ValueError("the contrast family needs n_signal_genes >= 2 (the two genes whose difference is the risk)")
        if self.n_tissue_types < 2:
            raise ValueError(f"n_tissue_types must be at least 2 (aggressive and benign), got {self.n_tissue_types}")
        if not 1 <= self.min_patches <= self.max_patches:
            raise ValueError(f"need 1 <= min_patches <= max_patches, got {self.min_patches} and {self.max_patches}")
        if self.signal == "spatial" and self.min_patches < 8:
            raise ValueError(f"the spatial family needs min_patches >= 8 to lay out a cluster, got {self.min_patches}")
        if not 0.0 <= self.multi_slide_fraction <= 1.0:
            raise ValueError(f"multi_slide_fraction must be within 0..1, got {self.multi_slide_fraction}")


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
    n = cfg.n_patients
    biology = _Biology(np.random.default_rng([cfg.biology_seed, 1]), cfg)
    family = _Family(cfg, biology)
    rng = np.random.default_rng([cfg.seed, 2])
    r_img, r_gene = rng.standard_normal(n), rng.standard_normal(n)
    case_ids = [f"SYN{cfg.seed}-{i:04d}" for i in range(n)]
    clinical = _clinical(np.random.default_rng([cfg.seed, 3]), n) if cfg.clinical else None
    if cfg.signal == "share":  # the historical draw order: outcomes before genes and slides
        log_hazard = cfg.beta * (r_img + r_gene)
        if clinical is not None:
            log_hazard = log_hazard + clinical["r_clinical"].to_numpy()
        times, censorship = _survival(rng, cfg, log_hazard)
        genes = biology.gene_table(rng, r_gene)
    else:
        genes, r_gene = family.gene_table(rng, r_gene)

    record = (encoder_record or synthetic_encoder_record(cfg)).to_json()
    mean_features = np.zeros((n, cfg.feature_dim)) if cfg.signal == "linear" else None
    aggressive = np.zeros(n)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / "features").mkdir()
        slides = []
        for i, case_id in enumerate(case_ids):
            n_slides = 2 if rng.random() < cfg.multi_slide_fraction else 1
            patches = 0
            for s in range(n_slides):
                slide_id = f"{case_id}-{s + 1:02d}.svs"
                bag, kinds = family.slide_bag(rng, r_img[i], first=s == 0)
                bag.attrs.update(
                    encoder=encoder_record.name if encoder_record else "synthetic", patch_size=cfg.patch_size,
                    patch_level=0, patch_size_level0=cfg.patch_size, encoder_record=record,
                )
                write_bag(tmp / "features" / f"{case_id}-{s + 1:02d}.h5", bag)
                slides.append((i, case_id, slide_id))
                patches += len(kinds)
                aggressive[i] += np.count_nonzero(kinds == 0)
                if mean_features is not None:
                    mean_features[i] += bag.features.sum(0, dtype=np.float64)
            aggressive[i] /= patches
            if mean_features is not None:
                mean_features[i] /= patches
        if cfg.signal != "share":  # the outcomes follow from what was drawn
            if mean_features is not None:
                r_img = family.linear_image_risk(mean_features)
            log_hazard = family.log_hazard(r_img, r_gene)
            if clinical is not None:
                log_hazard = log_hazard + clinical["r_clinical"].to_numpy()
            times, censorship = _survival(rng, cfg, log_hazard)

        rows = pd.DataFrame(
            [(c, s, times[i], censorship[i]) for i, c, s in slides],
            columns=["case_id", "slide_id", "survival_months", "censorship"],
        )
        if clinical is not None:
            at = [i for i, _, _ in slides]
            for col in ("age", "sex", "stage"):
                rows[col] = clinical[col].to_numpy()[at]
        rows.to_csv(tmp / "clinical.csv", index=False)
        genes.insert(0, "case_id", case_ids)
        genes.to_csv(tmp / "genes.csv", index=False, float_format="%.5f")
        truth = pd.DataFrame({"case_id": case_ids, "r_image": r_img, "r_genes": r_gene, "log_hazard": log_hazard,
                              "aggressive_share": aggressive})
        if clinical is not None:
            truth["r_clinical"] = clinical["r_clinical"].to_numpy()
        truth.to_csv(tmp / "truth.csv", index=False)
        (tmp / "synth_config.json").write_text(pd.Series(asdict(cfg)).to_json(indent=1))
    return Path(out_dir)


def _survival(rng, cfg: SynthConfig, log_hazard: np.ndarray):
    rate = np.log(2) / cfg.median_survival_months
    event_time = rng.exponential(1.0 / (rate * np.exp(log_hazard)))
    follow_up = rng.uniform(0.2, 1.0, log_hazard.shape) * cfg.max_follow_up_months
    observed = np.minimum(event_time, follow_up)
    censored = (event_time > follow_up).astype(int)
    return np.round(observed, 2), censored


def _clinical(rng, n: int) -> pd.DataFrame:
    """Age, sex and stage per patient, and their (centred) share of the log-hazard."""
    age = np.clip(np.round(rng.normal(_AGE_MEAN, 10.0, n)), 25, 90).astype(int)
    sex = np.where(rng.random(n) < 0.5, "F", "M")
    stage = rng.choice(len(STAGES), n, p=_STAGE_P)
    effect = _AGE_LOG_HR * (age - _AGE_MEAN) + _STAGE_LOG_HR[stage] - _STAGE_P @ _STAGE_LOG_HR
    return pd.DataFrame({"age": age, "sex": sex, "stage": np.asarray(STAGES)[stage], "r_clinical": effect})


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


class _Family:
    """How one signal family turns the latent factors into genes, slides and a log-hazard.

    Its own population constants come from a random stream of their own, so the shared biology (and
    with it the ``share`` family) is unchanged by them."""

    _CONTRAST_SHARED, _CONTRAST_SIGNAL, _CONTRAST_NOISE = 2.0, 0.5, 0.2
    _LINEAR_SHIFT = 1.0  # length of the patient-level shift along w, per unit of the latent factor

    def __init__(self, cfg: SynthConfig, biology: _Biology):
        self.cfg, self.biology = cfg, biology
        self.scale = cfg.beta * _SCALE[cfg.signal]
        rng = np.random.default_rng([cfg.biology_seed, 3])
        if cfg.signal == "linear":
            w = rng.standard_normal(cfg.feature_dim)
            self.w = w / np.linalg.norm(w)
            # Standardise w . mean feature with constants of the population (a reference sample).
            ref_rng = np.random.default_rng([cfg.biology_seed, 4])
            proj = []
            for z in ref_rng.standard_normal(512):
                n_slides = 2 if ref_rng.random() < cfg.multi_slide_fraction else 1
                bags = [self.slide_bag(ref_rng, z, first=s == 0)[0].features for s in range(n_slides)]
                proj.append(float(np.concatenate(bags).mean(0, dtype=np.float64) @ self.w))
            self.w_mean, self.w_sd = float(np.mean(proj)), float(np.std(proj))
            # Genes: sum_j c_j * y_j over the signal genes, y_j the gene standardised in the population.
            sd = np.sqrt(biology.weights**2 + 0.4**2)
            self.c = biology.weights / sd
            self.c_sd = float(np.sqrt((self.c @ (biology.weights / sd)) ** 2 + 0.4**2 * np.sum(self.c**2 / sd**2)))
            self.gene_sd = sd
        elif cfg.signal == "interaction":
            # The aggressive patches are drawn around two centres, one above the benign twin's
            # prototype b in each dimension and one below it, placed so that the mean of a clipped
            # noisy patch is exactly that of a type-b patch: mean pooling cannot tell them apart.
            b = biology.prototypes[1].astype(np.float64)
            up = 1.8 * b
            down = _clipped_mean_inverse(2 * _clipped_mean(b) - _clipped_mean(up))
            first = rng.random(cfg.feature_dim) < 0.5
            self.prototypes = biology.prototypes.copy()
            self.prototypes[0] = np.where(first, up, down)
            self.twin = np.where(first, down, up).astype(np.float32)

    # genes -------------------------------------------------------------------------------------
    def gene_table(self, rng, r_gene: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
        """The gene table and the gene risk: latent for share-like families, read off the values for
        linear and contrast."""
        bio = self.biology
        if self.cfg.signal == "contrast":
            n, g = r_gene.size, self.cfg.n_genes
            z = rng.standard_normal((n, 5)) @ bio.loadings + rng.normal(0, 0.8, (n, g))
            shared = rng.standard_normal(n)
            noise = rng.normal(0, self._CONTRAST_NOISE, (n, 2))
            a, b = bio.signal[:2]
            z[:, a] = self._CONTRAST_SHARED * shared + self._CONTRAST_SIGNAL * r_gene + noise[:, 0]
            z[:, b] = self._CONTRAST_SHARED * shared - self._CONTRAST_SIGNAL * r_gene + noise[:, 1]
            # Both genes have the same population sd, so the contrast of standardised values is
            # proportional to z_a - z_b; scaled to unit variance.
            r = (z[:, a] - z[:, b]) / np.sqrt((2 * self._CONTRAST_SIGNAL) ** 2 + 2 * self._CONTRAST_NOISE**2)
            names = [f"GENE{j:04d}" for j in range(g)]
            return pd.DataFrame(bio.level + bio.spread * z, columns=names), r
        genes = bio.gene_table(rng, r_gene)
        if self.cfg.signal == "linear":
            sig = bio.signal
            z = (genes.to_numpy()[:, sig] - bio.level[sig]) / bio.spread[sig]
            return genes, (z / self.gene_sd) @ self.c / self.c_sd
        return genes, r_gene

    # slides ------------------------------------------------------------------------------------
    def slide_bag(self, rng, r_img: float, first: bool = True) -> tuple[Bag, np.ndarray]:
        cfg, bio = self.cfg, self.biology
        if cfg.signal in ("share", "contrast"):
            if first:
                self._mix = _tissue_mix(rng, cfg, r_img)
            return _slide_bag(rng, cfg, bio.prototypes, self._mix)
        if cfg.signal == "linear":
            if first:
                self._mix = rng.dirichlet(np.full(cfg.n_tissue_types, 2.0))
            shift = (self._LINEAR_SHIFT * r_img * self.w).astype(np.float32)
            return _slide_bag(rng, cfg, bio.prototypes, self._mix, shift=shift)
        if cfg.signal == "interaction":
            if first:
                self._mix = _twin_mix(rng, cfg, r_img)
            return _slide_bag(rng, cfg, self.prototypes, self._mix, twin=self.twin)
        if first:
            self._mix = rng.dirichlet(np.full(cfg.n_tissue_types - 1, 2.0))
        return _spatial_bag(rng, cfg, bio.prototypes, self._mix, 1.0 / (1.0 + np.exp(-2.0 * r_img)))

    # risk --------------------------------------------------------------------------------------
    def linear_image_risk(self, mean_features: np.ndarray) -> np.ndarray:
        return (mean_features @ self.w - self.w_mean) / self.w_sd

    def log_hazard(self, r_img: np.ndarray, r_gene: np.ndarray) -> np.ndarray:
        if self.cfg.signal == "interaction":
            return self.scale * (0.5 * r_img + 0.5 * r_gene + r_img * r_gene)
        return self.scale * (r_img + r_gene)


_PATCH_NOISE = 0.5  # sd of the Gaussian noise on every patch feature, before the clip at 0


def _clipped_mean(m: np.ndarray) -> np.ndarray:
    """E[max(m + noise, 0)] for the patch noise: what a feature averages to over many patches."""
    from scipy.stats import norm

    u = m / _PATCH_NOISE
    return m * norm.cdf(u) + _PATCH_NOISE * norm.pdf(u)


def _clipped_mean_inverse(target: np.ndarray) -> np.ndarray:
    """The centre m whose clipped mean is ``target`` (> 0), by bisection (the mean rises with m)."""
    lo, hi = np.full(target.shape, -10.0), np.maximum(target, 0.0) + 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        below = _clipped_mean(mid) < target
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return (lo + hi) / 2


def _tissue_mix(rng, cfg: SynthConfig, r_img: float) -> np.ndarray:
    aggressive = 1.0 / (1.0 + np.exp(-(1.2 * r_img - 1.2)))  # 5-75 % of the tissue
    rest = rng.dirichlet(np.full(cfg.n_tissue_types - 1, 2.0)) * (1 - aggressive)
    return np.concatenate([[aggressive], rest])


def _twin_mix(rng, cfg: SynthConfig, r_img: float) -> np.ndarray:
    """Interaction: the aggressive share (5-70 %) trades off against its benign twin's (type 1), so
    the two together always cover the same share and the mean feature hardly moves."""
    aggressive = 0.05 + 0.65 / (1.0 + np.exp(-1.5 * r_img))
    if cfg.n_tissue_types == 2:
        return np.array([aggressive, 1.0 - aggressive])
    rest = rng.dirichlet(np.full(cfg.n_tissue_types - 2, 2.0)) * 0.25
    return np.concatenate([[aggressive, 0.75 - aggressive], rest])


def _slide_bag(rng, cfg: SynthConfig, prototypes: np.ndarray, mix: np.ndarray, shift=None, twin=None):
    """A bag and the tissue type of each patch. ``shift`` is added to every patch (linear family);
    with ``twin``, half the type-0 patches are drawn around it instead (interaction family)."""
    n = int(rng.integers(cfg.min_patches, cfg.max_patches + 1))
    kinds = rng.choice(len(mix), n, p=mix)
    noise = rng.normal(0.0, _PATCH_NOISE, (n, cfg.feature_dim)).astype(np.float32)
    centres = prototypes[kinds]
    if twin is not None:
        centres = np.where(((kinds == 0) & (rng.random(n) < 0.5))[:, None], twin, centres)
    if shift is not None:
        centres = centres + shift
    features = np.maximum(centres + noise, 0.0)
    return Bag(features, _blob_coords(rng, cfg, n), {}), kinds


def _blob_coords(rng, cfg: SynthConfig, n: int) -> np.ndarray:
    """Tissue as a compact blob of grid cells, patches in raster order like a tiler emits them."""
    side = int(np.ceil(np.sqrt(n * 1.6)))
    cells = np.argwhere(np.ones((side, side), bool))
    centre = (side - 1) / 2
    cells = cells[np.argsort(((cells - centre) ** 2).sum(1) + rng.random(len(cells)) * 0.1)][:n]
    cells = cells[np.lexsort((cells[:, 1], cells[:, 0]))]
    return (cells[:, ::-1] * cfg.patch_size).astype(np.int64)  # (x, y) of each patch


def _spatial_bag(rng, cfg: SynthConfig, prototypes: np.ndarray, benign_mix: np.ndarray, clustered: float):
    """A quarter of the patches are aggressive (type 0); ``clustered`` of them form one contiguous
    cluster around a random tissue cell, the rest are scattered over the remaining cells."""
    n = int(rng.integers(cfg.min_patches, cfg.max_patches + 1))
    coords = _blob_coords(rng, cfg, n)
    n_aggressive = max(1, int(round(SPATIAL_SHARE * n)))
    n_cluster = int(round(clustered * n_aggressive))
    seed = coords[rng.integers(n)]
    distance = ((coords - seed) ** 2).sum(1) / cfg.patch_size**2 + rng.random(n) * 0.1
    order = np.argsort(distance)
    scattered = rng.choice(order[n_cluster:], n_aggressive - n_cluster, replace=False)
    kinds = 1 + rng.choice(len(benign_mix), n, p=benign_mix)
    kinds[order[:n_cluster]] = 0
    kinds[scattered] = 0
    noise = rng.normal(0.0, _PATCH_NOISE, (n, cfg.feature_dim)).astype(np.float32)
    features = np.maximum(prototypes[kinds] + noise, 0.0)
    return Bag(features, coords, {}), kinds
