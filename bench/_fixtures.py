"""What the benchmarks measure on: the model repository, the synthetic cohort, synthetic slides.

bench/server.py and bench/batch.py serve and score the same repository (a repository built by one
fits the other, via ``--repo``), and bench/batch.py's archive takes its genes from the same cohort,
so all of it is built here, once. Every histosurv call that builds a fixture is in this module: when
one of those APIs changes, this is the file to update.

No torch at import: the load generators import this module, and histosurv's training and export
(which load torch) run only in :func:`build_repository`, in a child process of the script's own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

__all__ = [
    "MODEL", "ENCODER", "N_GENES", "COHORT", "SLIDE_TILE",
    "write_cohort", "build_repository", "ensure_repository", "open_model", "ensure_encoder", "tissue_slide",
]

MODEL = "ammasurv"
ENCODER = "resnet18_encoder"
N_GENES = 200
# The cohort the model is trained on; bench/batch.py scores its archive with the same genes.csv.
COHORT = dict(n_patients=60, n_genes=N_GENES, feature_dim=512, min_patches=8, max_patches=24)
SLIDE_TILE = 256  # px: the synthetic slides' tiles, and bench/slides.py's window


def _build_threads() -> int:
    # The build trains and exports on at most 2 threads: more would only take cores from other work.
    return min(2, os.cpu_count() or 1)


def write_cohort(directory: Path, encoder_record=None) -> Path:
    """The synthetic cohort (clinical.csv, genes.csv, features/) in ``directory``; returns the folder.
    With ``encoder_record`` its bags say they came from that encoder, so the model trained on them takes
    its features (ScoreSlide and ``histosurv score`` refuse any other encoder's)."""
    from histosurv.data.synth import SynthConfig, write_synthetic_cohort

    return write_synthetic_cohort(directory, SynthConfig(**COHORT), encoder_record=encoder_record)


def build_repository(repo: Path) -> dict:
    """Synthetic cohort -> 1 epoch of AMMASurv (default config) -> ONNX export, plus the ResNet18 encoder.
    Quality is irrelevant here: the benchmarks time serving and scoring, not the model. Loads torch:
    run it in a child process (:func:`ensure_repository` does)."""
    import torch

    from histosurv.data.cohort import load_cohort
    from histosurv.export.models.ammasurv import AMMASurvConfig
    from histosurv.export.repository_writer import export_run
    from histosurv.export.run import save_run
    from histosurv.export.training import TrainConfig, train
    from histosurv.runtime.repository import ModelRepository

    torch.set_num_threads(_build_threads())
    work = repo.parent / f".{repo.name}-build"
    shutil.rmtree(work, ignore_errors=True)
    seconds = {}
    t = time.perf_counter()
    name = ensure_encoder(repo, "resnet18")  # first: the model's bags are recorded as this encoder's
    encoder = ModelRepository(repo).version(name, verify=False)
    seconds["export_encoder"] = time.perf_counter() - t
    t = time.perf_counter()
    cohort_dir = write_cohort(work / "cohort", encoder.encoder_record)
    cohort = load_cohort(cohort_dir / "clinical.csv", cohort_dir / "genes.csv", cohort_dir / "features")
    result = train(cohort, MODEL, AMMASurvConfig(n_genes=N_GENES),
                   TrainConfig(seed=0, epochs=1, batch_size=16, patches_per_slide=8, baseline=False))
    seconds["train"] = time.perf_counter() - t
    t = time.perf_counter()
    run = save_run(work / "run", result, cohort)
    export_run(run, repo, MODEL, artifacts=())  # model.onnx and the opset-23 graph: the FP32 graph "auto" serves here
    seconds["export"] = time.perf_counter() - t
    shutil.rmtree(work, ignore_errors=True)
    model = getattr(result, "model", None)
    params = sum(p.numel() for p in model.parameters()) if isinstance(model, torch.nn.Module) else None
    return {"seconds": seconds, "params": params}


def ensure_repository(repo: Path, script: Path) -> dict:
    """Reuses ``repo`` if it holds the model and the encoder, else builds it by running ``script
    --build REPO`` (whose main prints :func:`build_repository`'s JSON), so torch never loads in the
    calling process. Facts for the header: whether it was built, and the build's seconds and params."""
    if (repo / MODEL).is_dir() and (repo / ENCODER).is_dir():
        print(f"reusing the model repository {repo}", flush=True)
        return {"built": False}
    print(f"building the model repository in {repo} (1 training epoch + ONNX export, about 30 s) ...", flush=True)
    proc = subprocess.run([sys.executable, str(script), "--build", str(repo)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(_build_threads())})
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"building the repository failed (exit status {proc.returncode})")
    return {"built": True, **json.loads(lines[-1])}


def open_model(repo: Path):
    """The fusion model's and the encoder's latest versions in ``repo`` (histosurv's ModelVersion), for
    the headers' model facts."""
    from histosurv.runtime.repository import ModelRepository

    return ModelRepository(repo).version(MODEL), ModelRepository(repo).version(ENCODER)


def ensure_encoder(repo: Path, name: str, log=lambda message: None) -> str:
    """Exports the patch encoder ``name`` (resnet18, resnet50_trunc) into ``repo`` unless a version of it
    is there already (exporting takes a while and gives the same graph); returns its model name."""
    from histosurv.export.encoder_export import export_encoder
    from histosurv.runtime.repository import ModelRepository

    model = f"{name}_encoder"
    if not (repo / model).is_dir() or not ModelRepository(repo).manifest(model).versions:
        log(f"exporting the {name} encoder into {repo} (once, not timed) ...")
        export_encoder(repo, name)
    return model


ENCODER_PACKAGES = {  # torch engine keys of an encoder -> the --add-engine torch options that build them
    "torch": {"device": "cpu"},
    "torch_cuda": {"device": "cuda"},
    "torch_cuda_fp16": {"device": "cuda", "precision": "fp16"},
}


def ensure_encoder_engine(repo: Path, model: str, key: str, log=lambda message: None) -> None:
    """Compiles the encoder's AOTInductor package ``key`` into its latest version unless it is there."""
    from histosurv.export.repository_writer import add_engine
    from histosurv.runtime.repository import ModelRepository

    if key in ModelRepository(repo).version(model).info.engines:
        return
    log(f"compiling the {model} package {key} (once, not timed) ...")
    add_engine(repo, model, "torch", **ENCODER_PACKAGES[key])


def tissue_slide(path: Path, width: int, height: int, *, quality: int = 90, seed: int = 0,
                 compression: str = "jpeg") -> float | None:
    """A synthetic pyramidal TIFF of tissue texture (256 px tiles, 0.25 µm/px at level 0; JPEG tiles, or
    deflate where imagecodecs is missing) at ``path``, written unless it is there already: the writer is
    deterministic and atomic, so a file under its final name is complete and identical. Returns the
    seconds spent writing, None if reused."""
    from histosurv.data.synthetic_slide import write_synthetic_slide

    if path.exists():
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    write_synthetic_slide(path, width, height, compression=compression, jpeg_quality=quality, pattern="tissue",
                          tile=SLIDE_TILE, seed=seed)
    return time.perf_counter() - t
