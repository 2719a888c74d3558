"""Seeded survival training: per-architecture recipes, step-counted schedules, a held-out test split.

Patients, not slides, are the unit: splits are by patient, a patient's risk is the mean of its
slides' risks (AMMASurv section II.E), and the Cox loss compares patients within a batch. During
training each slide contributes a fresh random subset of ``patches_per_slide`` patches per step (as
the AMMASurv paper samples n patches per slide), which lets a batch be one dense tensor; validation
and test use every patch, one slide at a time, exactly as inference will.

The schedule is AdamW with a linear warm-up and a cosine decay to zero, counted in optimiser steps.
By default the model after the last epoch is kept (``stop="fixed"``, as the reference repositories
train a fixed number of epochs); ``stop="val_loss"`` keeps the epoch with the lowest smoothed
validation loss instead. Choosing the epoch by the c-index of a few dozen validation patients, as
this module once did, picked epochs 0, 2 and 7 of 30 on one cohort: that c-index is too noisy to
select on. K-fold cross-validation is :mod:`histosurv.export.cross_validation`.
"""

from __future__ import annotations

import copy
import math
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
from .models.clinical import clinical_spec_of

__all__ = [
    "TrainConfig",
    "Splits",
    "TrainResult",
    "split_patients",
    "train",
    "predict_patients",
    "seed_everything",
    "reads_patches",
    "evaluate",
    "inner_validation",
    "warmup_cosine",
    "STOPPING",
    "RECIPES",
    "recipe",
]


STOPPING = ("fixed", "val_loss")
CLINICAL_RIDGE = 0.05  # the penalty of the covariates' starting fit (standardised columns, l1_ratio 0.01: nearly ridge)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0  # fixes the split, the initialisation and the batches
    epochs: int = 20  # passes over the training patients (the schedule's length; see stop)
    lr: float = 2e-4  # peak AdamW learning rate
    weight_decay: float = 1e-2  # AdamW decoupled weight decay
    warmup: float = 0.1  # share of the optimiser steps over which the learning rate rises from 0 (then cosine decay to 0)
    batch_size: int = 32  # patients per forward pass: the Cox risk set
    accumulate: int = 1  # forward passes whose gradients make one optimiser step
    patches_per_slide: int = 64  # patches sampled per slide and step (all of them at evaluation)
    stop: str = "fixed"  # fixed: every epoch, keep the last; val_loss: keep the best epoch by smoothed validation loss
    patience: int = 5  # val_loss only: epochs without a better smoothed validation loss before stopping
    smoothing: float = 0.6  # val_loss only: weight of the past in the exponential moving average of the validation loss
    val_fraction: float = 0.15  # patients held out to choose the epoch (val_loss only)
    test_fraction: float = 0.2  # single split: patients held out and scored once, at the end
    alpha: float = 0.0  # discrete-time NLL only: weight of the uncensored term
    clinical_lr: float = 2e-2  # peak learning rate of the clinical covariates' linear term (models trained with covariates)
    clinical_init: bool = True  # start that term at a ridge Cox fit of the covariates alone (else at zero)
    clinical_balance: bool = True  # after training, scale that term down where a Cox fit of it beside the model's own log-hazard says so
    baseline: bool = True  # also fit coxnet on the same patients and report its c-index beside the model's

    def __post_init__(self):
        if self.stop not in STOPPING:
            raise ValueError(f"stop must be one of {STOPPING}, got {self.stop!r}")
        if not 0 < self.val_fraction < 1 or not 0 <= self.test_fraction < 1:
            raise ValueError("val_fraction must be in (0, 1) and test_fraction in [0, 1)")
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("validation and test together must leave at least 10% of patients for training")
        if self.batch_size < 2 or self.patches_per_slide < 1 or self.epochs < 1 or self.accumulate < 1:
            raise ValueError("batch_size must be >= 2; patches_per_slide, epochs and accumulate >= 1")
        if self.lr < 0 or self.clinical_lr < 0:
            raise ValueError("lr and clinical_lr must be >= 0")
        if not 0 <= self.warmup < 1 or not 0 <= self.smoothing < 1:
            raise ValueError("warmup and smoothing must be in [0, 1)")

    @property
    def uses_validation(self) -> bool:
        return self.stop == "val_loss"


# Per-architecture departures from TrainConfig's defaults, chosen by bench/learning.py (see the README's
# learning table). Every value is a count of epochs or a rate, never a function of the cohort's size.
RECIPES: dict[str, dict] = {
    "ammasurv": {},
    "abmil": {},
    "mcat": {},
    "porpoise": {},
    "early_fusion": {},
    "mome": {},
    "ghanet": {},
    "snn": {"batch_size": 256, "epochs": 50, "lr": 1e-3},
    "coxnet": {},
}


def recipe(architecture: str, **overrides) -> TrainConfig:
    """The architecture's recipe, with ``overrides`` (the flags a user gave) on top."""
    return TrainConfig(**{**RECIPES.get(architecture, {}), **overrides})


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
    """Random patient-level split, stratified by event status so each split has events. Without a
    validation-based stopping rule there is no validation split: those patients train."""
    rng = np.random.default_rng(cfg.seed)
    _, events = cohort.times_events(range(len(cohort.patients)))
    val_fraction = cfg.val_fraction if cfg.uses_validation else 0.0
    parts = {"train": [], "val": [], "test": []}
    for stratum in (np.flatnonzero(events), np.flatnonzero(~events)):
        stratum = rng.permutation(stratum)
        n_test = int(round(cfg.test_fraction * stratum.size))
        n_val = int(round(val_fraction * stratum.size))
        parts["test"] += stratum[:n_test].tolist()
        parts["val"] += stratum[n_test : n_test + n_val].tolist()
        parts["train"] += stratum[n_test + n_val :].tolist()
    splits = Splits(*(tuple(sorted(parts[k])) for k in ("train", "val", "test")))
    _check_splits(splits, events, cfg)
    return splits


def _check_splits(splits: Splits, events: np.ndarray, cfg: TrainConfig) -> None:
    needed = ("train",) + (("val",) if cfg.uses_validation else ()) + (("test",) if splits.test else ())
    for name in needed:
        idx = getattr(splits, name)
        if len(idx) < 2 or not events[list(idx)].any():
            raise ValueError(
                f"the {name} split has {len(idx)} patients and no events; the cohort is too small for these fractions"
            )


def inner_validation(cohort: Cohort, train_idx: Sequence[int], cfg: TrainConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(train, validation) carved from ``train_idx`` for the val_loss rule, stratified by event."""
    if not cfg.uses_validation:
        return tuple(sorted(train_idx)), ()
    rng = np.random.default_rng([cfg.seed, 7])
    idx = np.asarray(sorted(train_idx))
    _, events = cohort.times_events(idx)
    val = []
    for stratum in (idx[events], idx[~events]):
        val += rng.permutation(stratum)[: int(round(cfg.val_fraction * stratum.size))].tolist()
    return tuple(sorted(set(idx.tolist()) - set(val))), tuple(sorted(val))


def train(
    cohort: Cohort,
    architecture: str,
    model_config,
    cfg: TrainConfig = TrainConfig(),
    log: Callable[[str], None] = lambda _: None,
    splits: Splits | None = None,
) -> TrainResult:
    """Trains ``architecture`` on the training patients of ``splits`` (default: :func:`split_patients`)
    and scores its test patients once, at the end.

    With ``stop="fixed"`` the model after the last epoch is returned (the schedule decays the learning
    rate to zero, so the last epoch is the settled one); with ``"val_loss"`` the epoch with the lowest
    smoothed validation loss is."""
    started = time.perf_counter()
    seed_everything(cfg.seed)
    splits = splits or split_patients(cohort, cfg)
    if architecture == "coxnet":
        return _train_coxnet(cohort, model_config, cfg, splits, started, log)
    fit_idx = list(splits.train)
    model = build_model(architecture, model_config, clinical=cohort.covariate_spec(fit_idx))
    if reads_patches(model) and cohort.bags is None:
        raise ValueError(f"{architecture} reads patch features, and this cohort has none (a features folder is needed)")
    if clinical_spec_of(model) is not None and cfg.clinical_init:
        _start_clinical_term(model, cohort, fit_idx)
    mean, scale = _gene_scaler(cohort.genes[fit_idx])
    model.set_gene_scaler(torch.from_numpy(mean).float(), torch.from_numpy(scale).float())
    # standardised genes for models that learn from genes they do not take at inference (G-HANet)
    gene_targets = ((cohort.genes - mean) / scale).astype(np.float32)
    head = model.cfg.survival_head
    bins = None
    if head == "discrete":
        bins = fit_time_bins(*cohort.times_events(splits.train), n_bins=model.cfg.n_bins)
    optimizer = _optimizer(model, cfg)
    steps_per_epoch = math.ceil(_passes_per_epoch(len(splits.train), cfg.batch_size) / cfg.accumulate)
    scheduler = warmup_cosine(optimizer, steps_per_epoch * cfg.epochs, cfg.warmup)
    rng = np.random.default_rng(cfg.seed)
    result = TrainResult(model, architecture, model.cfg, cfg, splits, time_bins=bins)
    best_state, best, smoothed, waited = None, np.inf, None, 0
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        train_loss = _train_epoch(model, cohort, splits.train, cfg, optimizer, scheduler, rng, bins, gene_targets)
        row = dict(epoch=epoch, train_loss=train_loss, lr=optimizer.param_groups[0]["lr"])
        if splits.val:
            val_loss, val_c = evaluate(model, cohort, splits.val, bins, cfg.alpha)
            smoothed = val_loss if smoothed is None else cfg.smoothing * smoothed + (1 - cfg.smoothing) * val_loss
            row.update(val_loss=val_loss, val_loss_smoothed=smoothed, val_c_index=val_c)
        row["seconds"] = time.perf_counter() - t0
        result.history.append(row)
        log(f"epoch {epoch:3d}  train loss {train_loss:.4f}"
            + (f"  val loss {val_loss:.4f} (smoothed {smoothed:.4f})  val c-index {val_c:.4f}" if splits.val else ""))
        if not cfg.uses_validation:
            continue
        if smoothed < best:
            best, best_state, result.best_epoch, waited = smoothed, copy.deepcopy(model.state_dict()), epoch, 0
            result.val_c_index = val_c
        else:
            waited += 1
            if waited >= cfg.patience:
                log(f"early stop: no better smoothed validation loss for {cfg.patience} epochs")
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        result.best_epoch = len(result.history) - 1
        result.val_c_index = result.history[-1].get("val_c_index", float("nan"))
    model.eval()
    if clinical_spec_of(model) is not None and cfg.clinical_balance:
        _balance_clinical_term(model, cohort, fit_idx, log)
    _score_test(result, cohort)
    result.seconds = time.perf_counter() - started
    return result


@torch.inference_mode()
def _balance_clinical_term(model, cohort: Cohort, fit_idx, log) -> None:
    """Rescales the covariates' term against the rest of the model by a Cox fit of the two on the
    training patients: a deep model's logits can end training far less spread than its signal warrants,
    and a term on the log-hazard-ratio scale then outvotes it (ABMIL on a linear cohort: image part alone
    0.60, covariates alone 0.53, their sum 0.55). The model's own part, fitted on these very patients,
    looks better here than it will on new ones, so the balance leans towards it: never the covariates'
    way by more than they earn."""
    from .models.coxnet import fit_coxnet

    base = model.base
    clinical = cohort.clinical_values(clinical_spec_of(model))
    fit_idx = list(fit_idx)
    logits, _ = _patient_outputs(base, cohort, fit_idx)
    own = logits.mean(dim=1).double().numpy()  # a discrete head's bins move together: their mean is its log-hazard proxy
    term = model.clinical_term(torch.from_numpy(clinical[fit_idx]))[:, 0].double().numpy()
    if term.std() < 1e-8:
        return
    X = np.stack([own, term], axis=1)
    scale = X.std(axis=0)
    scale[scale < 1e-8] = 1.0
    coef = fit_coxnet((X - X.mean(axis=0)) / scale, *cohort.times_events(fit_idx), alpha=1e-3, l1_ratio=0.01)
    a, b = coef / scale
    if a <= 0:  # the model's own part is no help on its training patients: leave the term as trained
        return
    factor = float(np.clip(b / a, 0.0, 1.0))
    model.clinical_head.weight.mul_(factor)
    model.clinical_head.bias.mul_(factor)
    log(f"clinical covariates: their term scaled by {factor:.3f} against the model's own log-hazard")


def _score_test(result: TrainResult, cohort: Cohort) -> None:
    if result.splits.test:
        result.test_risks = predict_patients(result.model, cohort, result.splits.test)
        result.test_c_index = concordance_index(*cohort.times_events(result.splits.test), result.test_risks).c_index


def _train_coxnet(cohort: Cohort, model_config, cfg: TrainConfig, splits: Splits, started: float, log) -> TrainResult:
    """coxnet has no epochs: its penalty is chosen by inner cross-validation on the training patients."""
    from .models.coxnet import fit_coxnet_model

    if model_config.modality != "genes" and cohort.bags is None:
        raise ValueError("coxnet with modality image or both reads patch features, and this cohort has none")
    fit_idx = list(splits.train) + list(splits.val)
    model = fit_coxnet_model(cohort, fit_idx, model_config, seed=cfg.seed, clinical=cohort.covariate_spec(fit_idx))
    result = TrainResult(model, "coxnet", model.cfg, cfg, splits)
    how = "fixed" if model.inner_cv is None else f"chosen by {model.cfg.inner_folds}-fold inner cross-validation"
    log(f"coxnet: penalty {model.chosen_alpha:.4g} {how}")
    _score_test(result, cohort)
    result.seconds = time.perf_counter() - started
    return result


def _start_clinical_term(model, cohort: Cohort, fit_idx) -> None:
    """Starts the covariates' linear term at a ridge Cox fit of the covariates alone on the training
    patients: the deep model then learns what the covariates do not explain, instead of both starting
    from zero and the covariates' coefficients, on their small learning budget, never reaching their
    values (SNN on a cohort where age and stage carried the hazard: +0.038 c-index from zero, see
    tests/test_covariates.py)."""
    from .models.coxnet import fit_coxnet

    with torch.no_grad():
        encoded = model.clinical(torch.from_numpy(cohort.clinical_values(clinical_spec_of(model))[fit_idx])).double().numpy()
    mean, scale = encoded.mean(axis=0), encoded.std(axis=0)
    scale[scale < 1e-8] = 1.0
    coef = fit_coxnet((encoded - mean) / scale, *cohort.times_events(fit_idx), alpha=CLINICAL_RIDGE, l1_ratio=0.01)
    w = coef / scale
    with torch.no_grad():
        model.clinical_head.weight.copy_(torch.from_numpy(w).float()[None])
        model.clinical_head.bias.fill_(float(-(w * mean).sum()))


def _optimizer(model, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; a clinical covariates' linear term has its own learning rate (see models.clinical)."""
    clinical = [p for name, p in model.named_parameters() if name.startswith("clinical_head.")]
    rest = [p for name, p in model.named_parameters() if not name.startswith("clinical_head.")]
    groups = [{"params": rest}] + ([{"params": clinical, "lr": cfg.clinical_lr}] if clinical else [])
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def warmup_cosine(optimizer, total_steps: int, warmup: float):
    """Linear warm-up over the first ``warmup`` share of the steps, then cosine decay to zero. Counted in
    optimiser steps, so the same recipe means the same schedule whatever the batch size."""
    warm = max(1, int(round(warmup * total_steps))) if warmup > 0 else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _passes_per_epoch(n_train: int, batch_size: int) -> int:
    full, rest = divmod(n_train, batch_size)
    return full + (rest >= 2)  # a last batch of one patient has no Cox risk set and is skipped


def _gene_scaler(train_genes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = train_genes.mean(axis=0)
    scale = train_genes.std(axis=0)
    scale[scale < 1e-8] = 1.0  # a constant gene carries no information; keep it finite
    return mean, scale


def _train_epoch(model, cohort: Cohort, train_idx, cfg: TrainConfig, optimizer, scheduler, rng, bins, gene_targets) -> float:
    model.train()
    order = rng.permutation(np.asarray(train_idx))
    batches = [order[i : i + cfg.batch_size] for i in range(0, order.size, cfg.batch_size)]
    batches = [b for b in batches if b.size >= 2]
    clinical = cohort.clinical_values(clinical_spec_of(model))
    losses = []
    optimizer.zero_grad(set_to_none=True)
    for k, batch in enumerate(batches):
        loss = _batch_loss(model, cohort, batch, cfg, rng, bins, gene_targets, clinical)
        (loss / cfg.accumulate).backward()
        losses.append(loss.item())
        if (k + 1) % cfg.accumulate == 0 or k + 1 == len(batches):
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    return float(np.mean(losses)) if losses else float("nan")


def _batch_loss(model, cohort: Cohort, batch: np.ndarray, cfg: TrainConfig, rng, bins, gene_targets, clinical=None):
    auxiliary = None
    extra = {} if clinical is None else {"clinical": torch.from_numpy(clinical[batch])}
    if reads_patches(model):
        features, coords, genes, owners, n = _sample_batch(cohort, batch, cfg.patches_per_slide, rng)
        logits = _patient_logits(model, features, coords, genes, owners, n)
        if hasattr(model, "auxiliary_loss"):
            auxiliary = model.auxiliary_loss(features, torch.from_numpy(gene_targets[batch])[owners])
        if extra:  # the covariates are the patient's: added once to its mean slide logits
            logits = logits + model.clinical_term(extra["clinical"])
    else:
        logits = model(genes=torch.from_numpy(cohort.genes[batch]), **extra)
    loss = _loss(model.cfg.survival_head, logits, cohort, batch, bins, cfg.alpha)
    return loss if auxiliary is None else loss + auxiliary


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
    return _patient_outputs(model, cohort, idx)[1]


@torch.inference_mode()
def evaluate(model, cohort: Cohort, idx: Sequence[int], bins, alpha: float = 0.0) -> tuple[float, float]:
    """(loss, c-index) of ``idx`` with every patch, as one risk set: the loss of a few dozen patients moves
    far less from epoch to epoch than their c-index, which is why it, smoothed, picks the epoch."""
    logits, risks = _patient_outputs(model, cohort, idx)
    loss = _loss(model.cfg.survival_head, logits, cohort, np.asarray(idx), bins, alpha).item()
    return loss, concordance_index(*cohort.times_events(idx), risks).c_index


def _patient_outputs(model, cohort: Cohort, idx: Sequence[int]) -> tuple[torch.Tensor, np.ndarray]:
    """(P, K) patient logits (mean of the slides' logits, as training forms them) and (P,) risks (mean
    of the slides' risks, as inference forms them)."""
    model.eval()
    head = model.cfg.survival_head
    clinical = cohort.clinical_values(clinical_spec_of(model))
    if not reads_patches(model):
        extra = {} if clinical is None else {"clinical": torch.from_numpy(clinical[list(idx)])}
        logits = model(genes=torch.from_numpy(cohort.genes[list(idx)]), **extra)
        return logits, risk_from_logits(logits, head).numpy().astype(float)
    logits, risks = [], []
    for i in idx:
        p = cohort.patients[i]
        genes = torch.from_numpy(cohort.genes[i])[None]
        extra = {} if clinical is None else {"clinical": torch.from_numpy(clinical[i])[None]}
        slide_logits = []
        for slide_id in p.slide_ids:
            bag = cohort.bags.get(slide_id)
            slide_logits.append(model(torch.from_numpy(bag.features)[None], torch.from_numpy(bag.coords)[None], genes, **extra))
        slide_logits = torch.cat(slide_logits)
        logits.append(slide_logits.mean(0))
        risks.append(float(risk_from_logits(slide_logits, head).mean()))
    return torch.stack(logits), np.asarray(risks)
