"""Seeded survival training with a held-out test split and early stopping on a separate validation split.

Patients, not slides, are the unit: splits are by patient, a patient's risk is the mean of its
slides' risks (AMMASurv section II.E), and the Cox loss compares patients within a batch. During
training each slide contributes a fresh random subset of ``patches_per_slide`` patches per step (as
the AMMASurv paper samples n patches per slide), which lets a batch be one dense tensor; validation
and test use every patch, one slide at a time, exactly as inference will.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ..data.cohort import Cohort
from .concordance import concordance_index
from .losses import assign_time_bins, cox_ph_loss, fit_time_bins, nll_discrete_loss
from .models import build_model, risk_from_logits

__all__ = [
    "TrainConfig",
    "Splits",
    "TrainResult",
    "split_patients",
    "train",
    "predict_patients",
    "seed_everything",
    "reads_patches",
]


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0  # fixes the split, the initialisation and the batches
    max_epochs: int = 30  # passes over the training patients at most
    patience: int = 6  # epochs without a better validation c-index before stopping
    lr: float = 2e-4  # Adam learning rate
    weight_decay: float = 1e-5  # Adam weight decay
    batch_size: int = 32  # patients per step: the Cox risk set
    patches_per_slide: int = 64  # patches sampled per slide and step (all of them at evaluation)
    val_fraction: float = 0.15  # patients held out to choose the epoch
    test_fraction: float = 0.2  # patients held out and scored once, at the end
    alpha: float = 0.0  # discrete-time NLL only: weight of the uncensored term

    def __post_init__(self):
        if not 0 < self.val_fraction < 1 or not 0 <= self.test_fraction < 1:
            raise ValueError("val_fraction must be in (0, 1) and test_fraction in [0, 1)")
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("validation and test together must leave at least 10% of patients for training")
        if self.batch_size < 2 or self.patches_per_slide < 1 or self.max_epochs < 1:
            raise ValueError("batch_size must be >= 2, patches_per_slide and max_epochs >= 1")


@dataclass(frozen=True)
class Splits:
    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]

    def name_of(self) -> dict[int, str]:
        return {i: name for name in ("train", "val", "test") for i in getattr(self, name)}


@dataclass
class TrainResult:
    model: torch.nn.Module
    architecture: str
    model_config: object
    train_config: TrainConfig
    splits: Splits
    history: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    val_c_index: float = float("nan")
    test_c_index: float = float("nan")
    test_risks: np.ndarray | None = None
    time_bins: np.ndarray | None = None
    seconds: float = 0.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def split_patients(cohort: Cohort, cfg: TrainConfig) -> Splits:
    """Random patient-level split, stratified by event status so each split has events."""
    rng = np.random.default_rng(cfg.seed)
    _, events = cohort.times_events(range(len(cohort.patients)))
    parts = {"train": [], "val": [], "test": []}
    for stratum in (np.flatnonzero(events), np.flatnonzero(~events)):
        stratum = rng.permutation(stratum)
        n_test = int(round(cfg.test_fraction * stratum.size))
        n_val = int(round(cfg.val_fraction * stratum.size))
        parts["test"] += stratum[:n_test].tolist()
        parts["val"] += stratum[n_test : n_test + n_val].tolist()
        parts["train"] += stratum[n_test + n_val :].tolist()
    splits = Splits(*(tuple(sorted(parts[k])) for k in ("train", "val", "test")))
    for name in ("train", "val") + (("test",) if cfg.test_fraction else ()):
        idx = getattr(splits, name)
        if len(idx) < 2 or not events[list(idx)].any():
            raise ValueError(
                f"the {name} split has {len(idx)} patients and no events; the cohort is too small for these fractions"
            )
    return splits


def train(
    cohort: Cohort,
    architecture: str,
    model_config,
    cfg: TrainConfig = TrainConfig(),
    log: Callable[[str], None] = lambda _: None,
) -> TrainResult:
    """Trains ``architecture`` on ``cohort``; returns the model at its best validation epoch."""
    started = time.perf_counter()
    seed_everything(cfg.seed)
    splits = split_patients(cohort, cfg)
    model = build_model(architecture, model_config)
    if reads_patches(model) and cohort.bags is None:
        raise ValueError(f"{architecture} reads patch features, and this cohort has none (a features folder is needed)")
    mean, scale = _gene_scaler(cohort.genes[list(splits.train)])
    model.set_gene_scaler(torch.from_numpy(mean).float(), torch.from_numpy(scale).float())
    # standardised genes for models that learn from genes they do not take at inference (G-HANet)
    gene_targets = ((cohort.genes - mean) / scale).astype(np.float32)
    head = model.cfg.survival_head
    bins = None
    if head == "discrete":
        bins = fit_time_bins(*cohort.times_events(splits.train), n_bins=model.cfg.n_bins)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    result = TrainResult(model, architecture, model.cfg, cfg, splits, time_bins=bins)
    best_state, best, waited = None, -np.inf, 0
    for epoch in range(cfg.max_epochs):
        t0 = time.perf_counter()
        train_loss = _train_epoch(model, cohort, splits.train, cfg, optimizer, rng, bins, gene_targets)
        val_risk = predict_patients(model, cohort, splits.val)
        val_c = concordance_index(*cohort.times_events(splits.val), val_risk).c_index
        result.history.append(
            dict(epoch=epoch, train_loss=train_loss, val_c_index=val_c, seconds=time.perf_counter() - t0)
        )
        log(f"epoch {epoch:3d}  train loss {train_loss:.4f}  val c-index {val_c:.4f}")
        if val_c > best:
            best, best_state, result.best_epoch, waited = val_c, copy.deepcopy(model.state_dict()), epoch, 0
        else:
            waited += 1
            if waited >= cfg.patience:
                log(f"early stop: no better validation c-index for {cfg.patience} epochs")
                break
    model.load_state_dict(best_state)
    model.eval()
    result.val_c_index = best
    if splits.test:
        result.test_risks = predict_patients(model, cohort, splits.test)
        result.test_c_index = concordance_index(*cohort.times_events(splits.test), result.test_risks).c_index
    result.seconds = time.perf_counter() - started
    return result


def _gene_scaler(train_genes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = train_genes.mean(axis=0)
    scale = train_genes.std(axis=0)
    scale[scale < 1e-8] = 1.0  # a constant gene carries no information; keep it finite
    return mean, scale


def _train_epoch(model, cohort: Cohort, train_idx, cfg: TrainConfig, optimizer, rng, bins, gene_targets) -> float:
    model.train()
    order = rng.permutation(np.asarray(train_idx))
    losses = []
    for start in range(0, order.size, cfg.batch_size):
        batch = order[start : start + cfg.batch_size]
        if batch.size < 2:
            continue
        auxiliary = None
        if reads_patches(model):
            features, coords, genes, owners, n = _sample_batch(cohort, batch, cfg.patches_per_slide, rng)
            logits = _patient_logits(model, features, coords, genes, owners, n)
            if hasattr(model, "auxiliary_loss"):
                auxiliary = model.auxiliary_loss(features, torch.from_numpy(gene_targets[batch])[owners])
        else:
            logits = model(genes=torch.from_numpy(cohort.genes[batch]))
        loss = _loss(model.cfg.survival_head, logits, cohort, batch, bins, cfg.alpha)
        if auxiliary is not None:
            loss = loss + auxiliary
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return float(np.mean(losses)) if losses else float("nan")


def _sample_batch(cohort: Cohort, batch: np.ndarray, patches_per_slide: int, rng):
    """Dense (S, n, D) tensors for all slides of the batch, n patches drawn from each slide."""
    owners, bags = [], []
    for pos, i in enumerate(batch):
        for slide_id in cohort.patients[i].slide_ids:
            owners.append(pos)
            bags.append(cohort.bags.get(slide_id))
    n = min(patches_per_slide, min(len(b) for b in bags))
    picks = [np.sort(rng.choice(len(b), n, replace=False)) for b in bags]
    features = torch.from_numpy(np.stack([b.features[p] for b, p in zip(bags, picks)]))
    coords = torch.from_numpy(np.stack([b.coords[p] for b, p in zip(bags, picks)]))
    owners = torch.tensor(owners)
    genes = torch.from_numpy(cohort.genes[batch])[owners]  # (S, G): each slide carries its patient's genes
    return features, coords, genes, owners, len(batch)


def _patient_logits(model, features, coords, genes, owners, n_patients):
    logits = model(features, coords, genes)  # (S, K)
    total = logits.new_zeros(n_patients, logits.shape[1]).index_add(0, owners, logits)
    counts = torch.bincount(owners, minlength=n_patients).to(logits.dtype)
    return total / counts[:, None]  # (P, K): mean over each patient's slides


def _loss(head: str, logits, cohort: Cohort, batch, bins, alpha: float):
    t, e = cohort.times_events(batch)
    if head == "cox":
        return cox_ph_loss(logits[:, 0], torch.from_numpy(t), torch.from_numpy(e))
    y = torch.from_numpy(assign_time_bins(t, bins))
    return nll_discrete_loss(logits, y, torch.from_numpy((~e).astype(np.float32)), alpha=alpha)


def reads_patches(model) -> bool:
    return "features" in model.input_names


@torch.inference_mode()
def predict_patients(model, cohort: Cohort, idx: Sequence[int]) -> np.ndarray:
    """Patient risks with every patch of every slide, in eval mode: mean of the slide risks
    (genes-only models: one risk per patient from its gene vector)."""
    model.eval()
    head = model.cfg.survival_head
    if not reads_patches(model):
        return risk_from_logits(model(genes=torch.from_numpy(cohort.genes[list(idx)])), head).numpy().astype(float)
    risks = []
    for i in idx:
        p = cohort.patients[i]
        genes = torch.from_numpy(cohort.genes[i])[None]
        slide_risks = []
        for slide_id in p.slide_ids:
            bag = cohort.bags.get(slide_id)
            logits = model(torch.from_numpy(bag.features)[None], torch.from_numpy(bag.coords)[None], genes)
            slide_risks.append(risk_from_logits(logits, head).item())
        risks.append(float(np.mean(slide_risks)))
    return np.asarray(risks)
