"""INT8 patch encoders: ONNX Runtime's static quantisation, calibrated on the pipeline's own tissue patches,
kept only where accuracy gates measured at export say the features still mean what they meant.

The artifact (``onnxruntime_int8``, ``model.int8.onnx``) is made from the version's FP32 graph:

* calibration patches are cut from the slides given (``--calibration``) by the slide path itself (tissue
  mask, patch grid at the encoder's µm/px and patch size, the same reads and resizes as ``tile``), spread
  over the slides; a quarter of them (``HOLD_OUT``) is held back and never calibrates;
* QDQ format, weights INT8 per channel, activations UINT8 per tensor (min/max over the calibration
  patches); the preprocessing (uint8 -> normalised float, a ViT's resize) stays FP32. On x86 CPUs without
  VNNI, ONNX Runtime's U8S8 kernels can saturate (``vpmaddubsw`` adds two u8 x s8 products in 16 bits), and
  its documentation recommends 7-bit weights (``reduce_range``) there; with VNNI (or AMX) 8 bits are exact;
* each INT8 layer's weights are then rounded by GPTQ, so that the layer's output on the calibration
  patches stays close rather than each weight (:mod:`.gptq`; ``weight_rounding="nearest"``,
  ``--weight-rounding nearest``: to the nearest step), and its bias takes out the mean shift its rounded
  weights still cause (:mod:`.bias_correction`; ``bias_correction=False``, ``--no-bias-correction``: not);
* gates, measured on the held-back patches: the smallest per-patch cosine of INT8 vs FP32 features
  (``MIN_COSINE``; the 1st percentile and mean are reported too), and the effect on a survival model
  trained on FP32 features (:func:`downstream_effect`: risk rank correlation ``MIN_SPEARMAN`` and the
  change of the c-index). A missed gate refuses the artifact (:class:`QuantizationGateError`) unless
  ``force``, which keeps it and records that it was forced; ``engine="auto"`` picks an INT8 artifact only
  where its record says the gates passed.

The figures live in the artifact's ``details["gate"]``; ``histosurv verify`` adds its usual parity entry.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..data.atomic import atomic_path
from .bias_correction import bias_correction_record, correct_biases
from .gptq import WEIGHT_ROUNDINGS, round_weights, weight_rounding_record
from ..errors import HistosurvError, InputError
from ..runtime.manifest import EngineEntry
from ..runtime.slides.tiler import GridConfig

__all__ = [
    "INT8_KEY", "INT8_FILE", "MIN_COSINE", "MIN_SPEARMAN", "DEFAULT_CALIBRATION_PATCHES", "HOLD_OUT",
    "QuantizationGateError", "cpu_int8_isa", "quantization_settings", "calibration_patches", "quantize_encoder",
    "measure_gates", "downstream_effect", "build_int8_encoder",
]

INT8_KEY, INT8_FILE = "onnxruntime_int8", "model.int8.onnx"
MIN_COSINE = 0.99  # every held-back patch's INT8 features at least this close to FP32's
MIN_SPEARMAN = 0.99  # rank correlation of a FP32-trained model's risks on INT8 vs FP32 features
DEFAULT_CALIBRATION_PATCHES = 512
HOLD_OUT = 0.25  # of the calibration patches: held back for the gates, never calibrated on
CALIBRATION_BATCH = 16  # patches per calibration run, at most (see calibration_batch)
CALIBRATION_MEMORY_SHARE = 0.6  # of the memory available, for calibrating
CALIBRATION_FLOOR = 6.5  # calibration's memory at batch 1, in multiples of the graph's weights (ViT-L: 7.9 GB)
TRAIN_PATIENTS = 256  # calibration patches the downstream model is trained on (their FP32 features)
DIRECTIONS = 8  # random log-hazard directions the downstream figures are averaged over
RIDGE = 1e-6  # coxnet's l1_ratio: (0, 1], so 'ridge' is an all but zero L1 share
MATMUL_OR_CONV = ("Conv", "MatMul", "Gemm")
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")


class QuantizationGateError(HistosurvError, RuntimeError):
    """The INT8 graph's features or risks differ from FP32's by more than the gates allow."""


def cpu_int8_isa() -> str:
    """The x86 instructions ONNX Runtime's INT8 kernels use here: 'amx', 'avx512_vnni', 'avx_vnni', or
    'avx2'/'avx512' (no VNNI: U8S8 products can saturate); 'other' off x86."""
    try:
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return "other"
    for isa in ("amx_int8", "avx512_vnni", "avx_vnni"):
        if isa in flags:
            return isa.removesuffix("_int8")
    return "avx512" if "avx512bw" in flags else "avx2" if "avx2" in flags else "other"


def quantization_settings(isa: str | None = None) -> dict:
    """The quantisation recipe for this CPU (a plain dict: it is recorded in the manifest)."""
    isa = isa or cpu_int8_isa()
    saturates = isa in ("avx2", "avx512")
    return {
        "format": "QDQ",
        "weights": "int8, per channel" + (", 7-bit range (reduce_range: no VNNI here)" if saturates else ""),
        "activations": "uint8, per tensor",
        # MinMax: on ResNet50-trunc, Percentile (99.99) gave a lower risk rank correlation (0.983 vs 0.990)
        # and took 3.5x as long
        "calibration_method": "MinMax",
        "reduce_range": saturates,
        "cpu_isa": isa,
    }


# --- calibration patches: cut by the slide path itself ------------------------------------------------


def slide_files(source: str | os.PathLike | list) -> list[Path]:
    """The slides of ``source``: a slide file, a folder of them (not recursive), or a list of either."""
    if isinstance(source, (list, tuple)):
        return [p for s in source for p in slide_files(s)]
    path = Path(source)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputError(f"--calibration {path}: no such slide file or folder")
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)
    if not found:
        raise InputError(f"--calibration {path}: no slides in the folder (looked for {', '.join(SLIDE_SUFFIXES)})")
    return found


def calibration_patches(
    source, patch_size: int, mpp: float, count: int = DEFAULT_CALIBRATION_PATCHES, seed: int = 0, log=lambda _: None
) -> tuple[np.ndarray, list[str]]:
    """Up to ``count`` uint8 tissue patches [n, patch_size, patch_size, 3] at ``mpp`` µm/px, an even share
    from each slide of ``source`` (a random sample of its tissue grid), read as ``tile`` reads them; and
    the slides' names. Shuffled with ``seed``."""
    from ..runtime.pipeline import SlideConfig, plan_slide
    from ..runtime.slides import open_slide
    from ..runtime.slides.stream import PatchStream

    if count < 8:
        raise InputError(f"--calibration-patches must be at least 8, got {count}")
    slides, rng = slide_files(source), np.random.default_rng(seed)
    shares = [count // len(slides) + (i < count % len(slides)) for i in range(len(slides))]
    parts = []
    for path, share in zip(slides, shares):
        plan = plan_slide(path, patch_size, mpp, SlideConfig())
        with open_slide(path) as reader:
            grid = _shifted_grids(plan, reader) if len(plan.grid) < share else plan.grid
            pick = np.sort(rng.choice(len(grid), size=min(share, len(grid)), replace=False))
            grid = replace(grid, coords=grid.coords[pick], tissue=grid.tissue[pick])
            with PatchStream(reader, grid, batch_size=32) as stream:
                parts += [batch.patches for batch in stream]
        log(f"  {len(pick)} tissue patches from {path.name} ({len(plan.grid)} on the tiling grid, level {grid.level})")
    patches = np.concatenate(parts)
    return patches[rng.permutation(len(patches))], [p.name for p in slides]


def _shifted_grids(plan, reader):
    """The tiling grid and the same grid shifted by half a patch in x, y and both: a small slide (the
    demo's has 34 tissue patches at 20x) then gives about four times as many distinct tissue patches."""
    grid, mask = plan.grid, plan.mask
    step, ds = grid.size_level0, reader.level_downsamples[grid.level]
    (w0, h0), (lw, lh) = reader.dimensions, reader.level_dimensions[grid.level]
    xs = np.arange(0, w0 - step + 1, step // 2, dtype=np.int64)
    ys = np.arange(0, h0 - step + 1, step // 2, dtype=np.int64)
    xs = xs[np.floor(xs / ds).astype(np.int64) + grid.read_size <= lw]
    ys = ys[np.floor(ys / ds).astype(np.int64) + grid.read_size <= lh]
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1)
    tissue = mask.fraction_in(coords, step)
    keep = tissue >= GridConfig().min_tissue
    return replace(grid, coords=coords[keep], tissue=tissue[keep])


# --- quantisation ---------------------------------------------------------------------------------------


def quantize_encoder(source: Path, path: Path, patches: np.ndarray, settings: dict, exclude=(), only=None,
                     ranges: Path | None = None, bias_correction: bool = True, weight_rounding: str = "gptq") -> dict:
    """model.int8.onnx at ``path`` from the FP32 graph ``source``, activation ranges from ``patches``;
    ``exclude`` ops left FP32, or ``only`` these quantised. ``ranges``: a file the calibrated ranges are
    kept in (written by the first call, reused by the next: the fallback re-quantises in a second, where
    calibrating again would take minutes). ``bias_correction``: each INT8 layer's bias takes out the mean
    shift of its rounded weights, measured on ``patches`` (:mod:`.bias_correction`). ``weight_rounding``:
    "gptq" (:mod:`.gptq`, on ``patches``) or "nearest". Returns what was
    quantised (op counts) for the record."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    from .fp16 import preprocessing_nodes

    batch = calibration_batch(source)

    class Batches(CalibrationDataReader):
        def __init__(self):
            # whole batches only: the histogram calibrators stack batches and fail on a short last one
            self._it = iter(range(0, len(patches) - batch + 1, batch))

        def get_next(self):
            start = next(self._it, None)
            return None if start is None else {"patches": patches[start : start + batch]}

    graph = onnx.load(str(source), load_external_data=False).graph
    keep_fp32 = sorted(preprocessing_nodes(graph))
    with atomic_path(path, suffix=".onnx") as tmp, _quiet_root_logger():
        quantize_static(
            str(source), str(tmp), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
            reduce_range=settings["reduce_range"], activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=getattr(CalibrationMethod, settings["calibration_method"]),
            nodes_to_exclude=keep_fp32 + list(exclude), nodes_to_quantize=list(only) if only else None,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True, "CalibPercentile": 99.99},
            calibration_cache_path=None if ranges is None else str(ranges),
        )
        if weight_rounding == "gptq":
            round_weights(source, tmp, patches)
        if bias_correction:  # after GPTQ: the mean shift of the weights as they end up
            correct_biases(source, tmp, patches)
        onnx.checker.check_model(str(tmp))
    return {**structure_of(path), "fp32_preprocessing_nodes": len(keep_fp32)}


def structure_of(path: Path) -> dict:
    """How many of a QDQ graph's Conv/MatMul/Gemm ops take dequantised INT8 inputs, and how many not."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    quantized = model.graph
    dq_inputs = {n.output[0] for n in quantized.node if n.op_type == "DequantizeLinear"}
    ops: dict[str, int] = {}
    for n in quantized.node:
        # both operands dequantised: ONNX Runtime runs it in INT8 (an op left FP32 may still be fed a
        # dequantised activation by a quantised neighbour, but its weights stay float)
        if n.op_type in MATMUL_OR_CONV and all(i in dq_inputs for i in n.input[:2]):
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
    left = sum(1 for n in quantized.node if n.op_type in MATMUL_OR_CONV) - sum(ops.values())
    rounded = weight_rounding_record(model)
    corrected = bias_correction_record(model)
    if corrected is not None:  # the op names are in the graph's metadata; the record keeps the counts
        corrected = {**corrected, "ops": len(corrected["ops"])}
    if rounded is not None:
        rounded = {**rounded, "ops": len(rounded["ops"])}
    return {"quantized_ops": ops, "float_matmul_or_conv_ops": left, "weight_rounding": rounded,
            "bias_correction": corrected}


def calibration_batch(source: Path, available: int | None = None) -> int:
    """Patches per calibration run: ``CALIBRATION_BATCH`` where memory allows, fewer for large graphs.

    ONNX Runtime calibrates on a copy of the graph with a ReduceMin and a ReduceMax on every tensor, and
    its peak memory grows with the batch, not with the number of patches. Measured on UNI (ViT-L, 1.2 GB
    of weights, 48 or 64 patches): batch 16 peaked at 24.2 GB (the OOM killer's, on this 24 GB box),
    batch 4 at 9.2 GB, batch 1 at 7.9 GB; so about (6.5 + batch) x the weights. MinMax ranges are the
    minimum and maximum over every patch whatever the batches, so the graph made is the same."""
    weights = sum(f.stat().st_size for f in (source, source.with_name(source.name + ".data")) if f.is_file())
    if available is None:
        available = _available_memory()
    fits = int(CALIBRATION_MEMORY_SHARE * available / max(weights, 1) - CALIBRATION_FLOOR)
    return max(1, min(CALIBRATION_BATCH, fits))


def _available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 << 30  # unknown: assume a 16 GB box


def quantizable_ops(source: Path) -> list[str]:
    """The names of the FP32 graph's nodes that static quantisation gives INT8 inputs or outputs (ONNX
    Runtime's registries: Conv and MatMul, and the Add, Relu, MaxPool ... whose inputs and outputs it
    quantises too; the preprocessing's never), in graph order."""
    import onnx
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    from .fp16 import preprocessing_nodes

    graph = onnx.load(str(source), load_external_data=False).graph
    keep = preprocessing_nodes(graph)
    quantised = set(QDQRegistry) | set(QLinearOpsRegistry)  # what quantize_static quantises when not told
    return [n.name for n in graph.node if n.op_type in quantised and n.name not in keep]


@contextlib.contextmanager
def _quiet_root_logger():
    """ONNX Runtime's quantiser logs a 'consider pre-processing' warning on the root logger: the graph is
    already optimised by the exporter, and shape inference is done by quantize_static itself."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


# --- gates ----------------------------------------------------------------------------------------------


def features_of(path: Path, patches: np.ndarray, batch: int = 32) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(["features"], {"patches": patches[i : i + batch]})[0]
                           for i in range(0, len(patches), batch)])


def downstream_effect(train: np.ndarray, fp32: np.ndarray, int8: np.ndarray, seed: int = 0, components: int = 8) -> dict:
    """What INT8 features do to a survival model trained on FP32 features, on a synthetic cohort made of
    the patches themselves (no cohort with real survival data has bags from this encoder here): each
    patient is one tissue patch, the strictest case (a bag's mean or attention pooling averages the
    per-patch differences down).

    Training patients: the calibration patches' FP32 features (``train``); test patients: the held-back
    patches (``fp32`` and ``int8``, the same patches). Survival times come from a Cox model whose
    log-hazard is a random direction over the top ``components`` principal components of the training
    features (unit spread, about 30% censored), ``DIRECTIONS`` of them (one direction on 40-odd patients
    is a noisy figure). For each, a ridge Cox model is fitted on the training patients; on
    the test patients it scores the FP32 and the INT8 features: Spearman's rank correlation of the two
    risk vectors, and Harrell's c-index of each against the synthetic times; the gate takes the mean."""
    if len(train) < 2 * components or len(fp32) < 8:
        raise InputError(f"too few patches for the downstream gate ({len(train)} calibration, {len(fp32)} held back): "
                         "give more calibration patches")
    rng = np.random.default_rng(seed)
    # centred, not standardised: a fusion model's first Linear sees the features as they are, and dividing by
    # each dimension's spread would blow up the near-constant dimensions' rounding into the risk
    mean = train.mean(0, dtype=np.float64)
    z_train, z32, z8 = (v.astype(np.float64) - mean for v in (train, fp32, int8))
    _, _, vt = np.linalg.svd(z_train - z_train.mean(0), full_matrices=False)
    basis = vt[:components].T  # (D, k): the training features' main directions
    scale = (z_train @ basis).std(0) + 1e-9
    x_train, x32, x8 = (z @ basis / scale for z in (z_train, z32, z8))
    runs = [_one_direction(x_train, x32, x8, rng) for _ in range(DIRECTIONS)]
    mean = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
    return {
        "spearman": mean["spearman"],
        "spearman_min": float(min(r["spearman"] for r in runs)),
        "c_index_fp32": mean["c_index_fp32"],
        "c_index_int8": mean["c_index_int8"],
        "c_index_change": mean["c_index_int8"] - mean["c_index_fp32"],
        "c_index_change_max_abs": float(max(abs(r["c_index_int8"] - r["c_index_fp32"]) for r in runs)),
        "risk_max_abs_diff": float(max(r["risk_max_abs_diff"] for r in runs)),
        "patients": {"train": int(len(train)), "test": int(len(fp32)), "each": "one tissue patch"},
        "model": f"ridge Cox (alpha 0.05) on the top {basis.shape[1]} principal components of the calibration "
                 f"patches' centred FP32 features; synthetic Cox survival times along a random direction of them; "
                 f"figures are means over {DIRECTIONS} directions",
    }


def _one_direction(x_train: np.ndarray, x32: np.ndarray, x8: np.ndarray, rng: np.random.Generator) -> dict:
    from ..data.concordance import concordance_index
    from .models.coxnet import fit_coxnet

    w = rng.normal(size=x_train.shape[1])
    w /= np.linalg.norm(w)
    lh_mean, lh_std = float((x_train @ w).mean()), float((x_train @ w).std()) + 1e-9

    def cohort(x):
        log_hazard = np.clip((x @ w - lh_mean) / lh_std, -6, 6)  # unit spread
        time_ = rng.exponential(np.exp(-log_hazard))
        censor = rng.exponential(np.quantile(time_, 0.5) * 2.5, size=len(time_))
        return np.minimum(time_, censor), time_ <= censor

    t_train, e_train = cohort(x_train)
    t_test, e_test = cohort(x32)
    beta = fit_coxnet(x_train, t_train, e_train, alpha=0.05, l1_ratio=RIDGE)
    r32, r8 = x32 @ beta, x8 @ beta
    return {
        "spearman": _spearman(r32, r8),
        "c_index_fp32": float(concordance_index(t_test, e_test, r32).c_index),
        "c_index_int8": float(concordance_index(t_test, e_test, r8).c_index),
        "risk_max_abs_diff": float(np.abs(r8 - r32).max()),
    }


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))  # risks are continuous: no ties to average
    return float(np.corrcoef(ra, rb)[0, 1])


def measure_gates(fp32_path: Path, int8_path: Path, held_out: np.ndarray, calibrated: np.ndarray,
                  min_cosine: float = MIN_COSINE, min_spearman: float = MIN_SPEARMAN, seed: int = 0) -> dict:
    """The gate figures of ``int8_path`` against ``fp32_path`` on ``held_out`` patches (the downstream
    model is trained on the FP32 features of ``calibrated``), and whether they pass."""
    t0 = time.perf_counter()
    reference = features_of(fp32_path, held_out), features_of(fp32_path, calibrated[:TRAIN_PATIENTS])
    figures = judge(reference, features_of(int8_path, held_out), min_cosine, min_spearman, seed)
    figures["seconds"] = round(time.perf_counter() - t0, 2)
    return figures


def judge(reference: tuple[np.ndarray, np.ndarray], f8: np.ndarray, min_cosine: float = MIN_COSINE,
          min_spearman: float = MIN_SPEARMAN, seed: int = 0) -> dict:
    """The gates on features ``f8`` of the patches whose FP32 features are ``reference[0]``;
    ``reference[1]``: FP32 features of the patches the downstream model is trained on."""
    from .encoder_export import cosine_per_patch

    f32, train = reference
    cosine = cosine_per_patch(f8, f32)
    finite = bool(np.isfinite(cosine).all())
    downstream = downstream_effect(train, f32, f8, seed) if finite else {"spearman": float("nan")}
    figures = {
        "held_out_patches": int(len(f32)),
        "cosine_min": float(np.min(cosine)),
        "cosine_p1": float(np.percentile(cosine, 1)) if finite else float("nan"),
        "cosine_mean": float(np.mean(cosine)),
        "features_rel_max": float(np.abs(f8 - f32).max() / max(float(np.abs(f32).max()), 1e-12)),
        "downstream": downstream,
        "thresholds": {"cosine_min": min_cosine, "spearman": min_spearman},
    }
    failed = []
    if not figures["cosine_min"] >= min_cosine:  # NaN fails
        failed.append(f"smallest per-patch cosine {figures['cosine_min']:.4f} < {min_cosine}")
    if not downstream["spearman"] >= min_spearman:
        failed.append(f"risk rank correlation {downstream['spearman']:.4f} < {min_spearman}")
    figures["passed"], figures["failed"] = not failed, failed
    return figures


# --- the artifact ---------------------------------------------------------------------------------------


def build_int8_encoder(version, path: Path, calibration=None, calibration_patches_count: int | None = None,
                       force: bool = False, min_cosine: float = MIN_COSINE, min_spearman: float = MIN_SPEARMAN,
                       fp32_fallback: float | None = None, bias_correction: bool = True,
                       weight_rounding: str = WEIGHT_ROUNDINGS[0], seed: int = 0,
                       log=lambda _: None) -> EngineEntry:
    """The INT8 artifact of encoder ``version`` at ``path``: calibrate, quantise, measure the gates; where
    the all-INT8 graph misses them, keep its most sensitive ops FP32 (at most ``fp32_fallback`` of them,
    :mod:`.int8_fallback`) and measure again; a missed gate removes the file and raises
    :class:`QuantizationGateError` unless ``force``."""
    from .int8_fallback import MAX_FP32_SHARE
    from .int8_fallback import fp32_fallback as search_fallback

    if calibration is None:
        raise InputError("an INT8 encoder is calibrated on tissue patches of real slides: give --calibration "
                         "SLIDE_OR_FOLDER")
    share = MAX_FP32_SHARE if fp32_fallback is None else fp32_fallback
    if not 0 <= share <= 1:
        raise InputError(f"--fp32-fallback is a share of the quantised ops, 0 to 1, not {share}")
    if weight_rounding not in WEIGHT_ROUNDINGS:
        raise InputError(f"--weight-rounding is one of {', '.join(WEIGHT_ROUNDINGS)}, not {weight_rounding!r}")
    source = version.path / version.info.engines["onnxruntime"].file if "onnxruntime" in version.info.engines else None
    if source is None or not source.is_file():
        raise InputError(f"{version.path}: no FP32 ONNX graph (model.onnx) to quantise")
    count = calibration_patches_count or DEFAULT_CALIBRATION_PATCHES
    record = version.encoder_record
    log(f"cutting up to {count} calibration patches ({record.patch_size} px at {record.mpp:g} µm/px) from {calibration} ...")
    patches, slides = calibration_patches(calibration, record.patch_size, record.mpp, count, seed, log)
    held = max(8, int(round(len(patches) * HOLD_OUT)))
    if len(patches) - held < 8:
        raise InputError(f"only {len(patches)} tissue patches in {calibration}: at least {held + 8} are needed "
                         f"({held} held back for the gates)")
    calibrate, held_out = patches[held:], patches[:held]
    settings = quantization_settings()
    log(f"quantising ({settings['format']}, {settings['weights']}, activations {settings['activations']}, "
        f"{len(calibrate)} calibration patches{', GPTQ-rounded' if weight_rounding == 'gptq' else ''}"
        f"{', bias-corrected' if bias_correction else ''}; "
        f"CPU {settings['cpu_isa']}) ...")
    with tempfile.TemporaryDirectory(prefix="histosurv-int8-") as tmp:
        ranges = Path(tmp) / "ranges.json"
        t0 = time.perf_counter()
        structure = quantize_encoder(source, path, calibrate, settings, ranges=ranges, bias_correction=bias_correction,
                                     weight_rounding=weight_rounding)
        seconds = time.perf_counter() - t0
        log(f"measuring the gates on {len(held_out)} held-back patches ...")
        gate = measure_gates(source, path, held_out, calibrate, min_cosine, min_spearman, seed)
        log(_gate_line(gate))
        fallback = None
        if not gate["passed"]:
            fallback = search_fallback(source, path, calibrate, settings, ranges, share, min_cosine, min_spearman,
                                       seed, log, bias_correction, weight_rounding)
        if fallback is not None:
            all_int8 = {k: gate[k] for k in ("cosine_min", "cosine_p1", "passed", "failed")}
            all_int8["spearman"] = gate["downstream"]["spearman"]
            fallback["all_int8"] = all_int8
            structure.update(structure_of(path))  # the search leaves its last graph at path
            log(f"measuring the gates on {len(held_out)} held-back patches, {len(fallback['fp32_ops'])} ops FP32 ...")
            gate = measure_gates(source, path, held_out, calibrate, min_cosine, min_spearman, seed)
            log(_gate_line(gate))
    gate["forced"] = bool(force and not gate["passed"])
    if force and not gate["passed"]:
        log("  kept anyway (--force)")
    if not gate["passed"] and not force:
        path.unlink(missing_ok=True)
        tried = ""
        if fallback is not None:
            tried = (f"; with the {len(fallback['fp32_ops'])} most sensitive of {fallback['of_ops']} ops in FP32 "
                     f"(--fp32-fallback {share:g}) as well")
        raise QuantizationGateError(
            f"{path.name}: INT8 gate failed ({'; '.join(gate['failed'])}){tried}; the artifact is refused. "
            "Calibrate on more or other slides, allow more FP32 ops with --fp32-fallback, or keep it anyway with "
            "--force (recorded in the manifest)"
        )
    details = {
        **settings, **structure,
        "calibration": {"slides": slides, "patches": int(len(calibrate)), "seed": seed,
                        "patch_size": record.patch_size, "mpp": record.mpp},
        "quantize_seconds": round(seconds, 1),
        "gate": gate,
        "fp32_fallback": fallback if fallback is not None else {"fp32_ops": [], "max_share": share, "searched": False},
        "for": "ONNX Runtime CPU",
    }
    return EngineEntry(path.name, "onnxruntime", "int8", device="cpu", details=_json_safe(details))


def _gate_line(gate: dict) -> str:
    d = gate["downstream"]
    c = (f", c-index {d['c_index_fp32']:.4f} -> {d['c_index_int8']:.4f} ({d['c_index_change']:+.4f})"
         if "c_index_change" in d else "")
    verdict = "passed" if gate["passed"] else "FAILED"
    return (f"  per-patch cosine min {gate['cosine_min']:.5f}, 1st percentile {gate['cosine_p1']:.5f}, mean "
            f"{gate['cosine_mean']:.5f}; risk Spearman {d['spearman']:.5f}{c}: {verdict}")


def _json_safe(value):
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
