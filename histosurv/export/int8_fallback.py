"""When the all-INT8 encoder misses its gates: keep its most sensitive ops in FP32, as few as pass.

This is the op-wise fallback of accuracy-aware quantisation tools (Intel Neural Compressor's tuning,
NNCF's accuracy control): quantisation error is not spread evenly, a few ops (often the last stage's
convolutions, whose outputs are the features) carry most of it, and leaving those in FP32 keeps most of
INT8's speed.

1. Sensitivity: each quantisable op (Conv, MatMul, Gemm; consecutive ops in groups where a graph has
   more than ``MAX_GROUPS``) is quantised alone, with the ranges already calibrated, and scored by the
   signal-to-noise ratio of the features it gives against FP32's, the signal being what differs between
   patches (features centred over the patches: a shared offset carries no information about a patient,
   and untrained encoders give features that are nearly all offset).
2. Search: the most sensitive 1, 2, 4, ... groups are kept FP32, up to ``max_share`` of the ops, and
   the gates are measured each time on the *calibration* patches, cross-fitted (each quarter judged by a
   downstream model trained on the other three); the first that passes is kept.
3. The caller then measures the gates once more on the held-back patches, which the search never saw,
   and keeps or refuses the graph on those figures alone.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from .quantize import MIN_COSINE, MIN_SPEARMAN, TRAIN_PATIENTS, features_of, judge, quantizable_ops, quantize_encoder

__all__ = ["MAX_FP32_SHARE", "MAX_GROUPS", "SENSITIVITY_PATCHES", "fp32_fallback", "rank_by_sensitivity"]

MAX_FP32_SHARE = 0.5  # default: past half the ops in FP32 an INT8 graph has lost most of its point
MAX_GROUPS = 48  # ops are ranked in at most this many groups: each costs one quantisation
SENSITIVITY_PATCHES = 16
MIN_TUNING = 10  # patches per fold the search judges on (the downstream gate needs 8)
TUNING_FOLDS = 4
# the search asks for this share of the way from each threshold to 1 more than the gate does: the
# figures it chooses by are estimates, and a graph that only just passes them fails the held-back
# patches about half the time (ResNet50-trunc at seeded weights: 0.9914 on the calibration patches,
# 0.9882 on the held-back ones)
TUNING_MARGIN = 0.25


def rank_by_sensitivity(source: Path, patches: np.ndarray, settings: dict, ranges: Path, ops: list[str],
                        workdir: Path) -> list[tuple[float, list[str]]]:
    """``ops`` in groups, most harmful first: (centred feature SNR in dB with only that group quantised,
    the group's op names)."""
    groups = _groups(ops)
    reference = features_of(source, patches)
    signal = float(((reference - reference.mean(0)) ** 2).sum())
    trial = workdir / "one.onnx"
    scored = []
    for group in groups:
        # nearest rounding, uncorrected: the ranking asks whose rounding hurts most, and GPTQ or a correction
        # would cost a pass of the graph over the patches for every group
        quantize_encoder(source, trial, patches, settings, only=group, ranges=ranges, bias_correction=False,
                         weight_rounding="nearest")
        noise = float(((features_of(trial, patches) - reference) ** 2).sum())
        scored.append((10 * np.log10(signal / noise) if noise > 0 else float("inf"), group))
    trial.unlink(missing_ok=True)
    return sorted(scored, key=lambda s: s[0])


def _groups(ops: list[str]) -> list[list[str]]:
    size = -(-len(ops) // MAX_GROUPS)  # consecutive ops: a ViT's groups then stay within a block or two
    return [ops[i : i + size] for i in range(0, len(ops), size)]


def fp32_fallback(source: Path, path: Path, calibrate: np.ndarray, settings: dict, ranges: Path,
                  max_share: float = MAX_FP32_SHARE, min_cosine: float = MIN_COSINE,
                  min_spearman: float = MIN_SPEARMAN, seed: int = 0, log=lambda _: None,
                  bias_correction: bool = True, weight_rounding: str = "gptq") -> dict | None:
    """Search for the fewest sensitive ops to keep FP32 (see the module's text); the graph that passed on
    the calibration patches is left at ``path``. Returns the record, with ``passed`` False (and the last
    graph tried at ``path``) where even ``max_share`` of the ops in FP32 did not pass; None where the
    search cannot run (no share allowed, or too few calibration patches to judge on)."""
    ops = quantizable_ops(source)
    cap = int(max_share * len(ops))
    if cap < 1:
        return None
    if len(calibrate) < TUNING_FOLDS * MIN_TUNING:
        log(f"  no FP32 fallback: {len(calibrate)} calibration patches are too few to tune on (give more)")
        return None
    t0 = time.perf_counter()
    log(f"  the all-INT8 graph missed a gate: ranking its {len(ops)} quantised ops by sensitivity ...")
    with tempfile.TemporaryDirectory(prefix="histosurv-int8-") as tmp:
        ranked = rank_by_sensitivity(source, calibrate[:SENSITIVITY_PATCHES], settings, ranges, ops, Path(tmp))
    reference = features_of(source, calibrate)
    trail, figures, kept = [], None, []
    for groups in _steps(ranked, cap):
        kept = [op for _, group in ranked[:groups] for op in group]
        quantize_encoder(source, path, calibrate, settings, exclude=kept, ranges=ranges, bias_correction=bias_correction,
                         weight_rounding=weight_rounding)
        figures = _cross_fitted(reference, features_of(path, calibrate), min_cosine, min_spearman, seed)
        trail.append({"fp32_ops": len(kept), **figures})
        log(f"    {len(kept)} ops FP32: calibration patches' cosine min {figures['cosine_min']:.5f}, risk Spearman "
            f"{figures['spearman']:.4f}{', passed' if figures['passed'] else ''}")
        if figures["passed"]:
            break
    return {
        "passed": bool(figures and figures["passed"]),
        "fp32_ops": kept,
        "of_ops": len(ops),
        "max_share": max_share,
        "trail": trail,
        "most_sensitive": [{"ops": group, "snr_db": round(snr, 2)} for snr, group in ranked[:8]],
        "method": f"each of {len(ranked)} op groups quantised alone, ranked by the centred feature SNR on "
                  f"{min(SENSITIVITY_PATCHES, len(calibrate))} calibration patches; the most sensitive 1, 2, 4, ... "
                  f"groups kept FP32 until the gates, {TUNING_MARGIN:g} of the way from each threshold to 1 stricter, pass on the {len(calibrate)} calibration patches, "
                  f"{TUNING_FOLDS}-fold (the downstream model trained on the other folds' FP32 features each time); "
                  "the gate's own held-back patches are not used",
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _cross_fitted(f32: np.ndarray, f8: np.ndarray, min_cosine: float, min_spearman: float, seed: int) -> dict:
    """The gates on every calibration patch: each fold judged by a downstream model trained on the others
    (a quarter of 100-odd patches alone gives a rank correlation too noisy to choose by)."""
    folds = np.array_split(np.arange(len(f32)), TUNING_FOLDS)
    runs = []
    for fold in folds:
        rest = np.setdiff1d(np.arange(len(f32)), fold)[:TRAIN_PATIENTS]
        runs.append(judge((f32[fold], f32[rest]), f8[fold], min_cosine, min_spearman, seed))
    cosine = min(r["cosine_min"] for r in runs)
    spearman = float(np.mean([r["downstream"]["spearman"] for r in runs]))
    aim = [t + TUNING_MARGIN * (1 - t) if t < 1 else t for t in (min_cosine, min_spearman)]
    return {"cosine_min": cosine, "spearman": spearman, "aimed_at": aim,
            "passed": bool(cosine >= aim[0] and spearman >= aim[1])}


def _steps(ranked: list[tuple[float, list[str]]], cap: int):
    """Group counts 1, 2, 4, ... while their ops number at most ``cap``, and the most that fit last."""
    sizes = np.cumsum([len(group) for _, group in ranked])
    fits = int(np.searchsorted(sizes, cap, side="right"))  # groups whose ops together are <= cap
    count = 1
    while count < fits:
        yield count
        count *= 2
    if fits:
        yield fits
