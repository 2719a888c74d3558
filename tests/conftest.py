"""Shared fixtures: a tiny synthetic cohort, a tiny trained run and its exported repository.

They are built once per session through the same code paths users run (synth -> train -> export),
with dimensions small enough that the whole suite stays fast on two cores.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from histosurv.data.cohort import load_cohort
from histosurv.data.synth import SynthConfig, write_synthetic_cohort
from histosurv.export.models.ammasurv import AMMASurvConfig
from histosurv.export.encoder_export import export_encoder
from histosurv.export.repository_writer import export_run
from histosurv.export.run import save_run
from histosurv.export.training import TrainConfig, train



def _threads_per_process() -> int:
    """`make test` runs the suite in pytest-xdist workers that share the cores: each gets its part (torch,
    ONNX Runtime and every CLI it starts), or each would take them all and they would fight."""
    from histosurv.runtime.cpu_budget import usable_cores

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, min(2, usable_cores() // max(1, workers)))


THREADS = _threads_per_process()
torch.set_num_threads(THREADS)
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("HISTOSURV_THREADS", str(THREADS))
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

TINY_SYNTH = SynthConfig(n_patients=60, n_genes=24, n_signal_genes=4, feature_dim=32, min_patches=8, max_patches=24)


def tiny_model_config(**overrides) -> AMMASurvConfig:
    values = dict(n_genes=24, feature_dim=32, pos_dim=8, gene_groups=4, depth=2, heads=4, head_hidden=16)
    values.update(overrides)
    return AMMASurvConfig(**values)


TINY_TRAIN = TrainConfig(seed=0, epochs=2, batch_size=16, patches_per_slide=8, baseline=False)


@pytest.fixture(scope="session")
def tiny_cohort_dir(tmp_path_factory) -> Path:
    return write_synthetic_cohort(tmp_path_factory.mktemp("cohort") / "tiny", TINY_SYNTH)


@pytest.fixture(scope="session")
def tiny_cohort(tiny_cohort_dir):
    d = tiny_cohort_dir
    return load_cohort(d / "clinical.csv", d / "genes.csv", d / "features")


@pytest.fixture(scope="session")
def tiny_run(tiny_cohort, tmp_path_factory) -> Path:
    result = train(tiny_cohort, "ammasurv", tiny_model_config(), TINY_TRAIN)
    return save_run(tmp_path_factory.mktemp("runs") / "tiny", result, tiny_cohort)


@pytest.fixture(scope="session")
def tiny_repo(tiny_run, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("repo") / "model_repository"
    # the CPU package on every machine: on a GPU box the default would be model.cuda.pt2 instead
    export_run(tiny_run, repo, "ammasurv", options={"device": "cpu"})
    return repo


@pytest.fixture(scope="session")
def slide_repo(tmp_path_factory):
    """A repository with the ResNet18 encoder and a small AMMASurv trained on synthetic bags recorded as
    its 512-d features (tiling a cohort would take minutes; the slide path is tested on real slides),
    so slides are scored without any override."""
    root = tmp_path_factory.mktemp("slide_repo")
    repo = root / "model_repository"
    encoder = export_encoder(repo, "resnet18")
    cohort_config = dataclasses.replace(TINY_SYNTH, feature_dim=512)
    cohort_dir = write_synthetic_cohort(root / "cohort", cohort_config, encoder_record=encoder.encoder_record)
    cohort = load_cohort(cohort_dir / "clinical.csv", cohort_dir / "genes.csv", cohort_dir / "features")
    result = train(cohort, "ammasurv", tiny_model_config(feature_dim=512), dataclasses.replace(TINY_TRAIN, epochs=1))
    run = save_run(root / "run", result, cohort)
    export_run(run, repo, "ammasurv", artifacts=())
    return repo, cohort_dir, cohort.patients[0].case_id


def run_cli(*args: str, cwd: Path | None = None, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """Runs the installed console entry point in a fresh interpreter, as a user would."""
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run(
        [sys.executable, "-m", "histosurv", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )


@pytest.fixture(scope="session")
def cmu_svs() -> Path:
    """The real Aperio slide the demo uses, fetched once into the user's cache (see data/demo_slide.py)."""
    from histosurv.data.demo_slide import demo_slide

    return demo_slide()


# The files that take minutes, longest first. `make test`'s workers take files in collection order, so
# these start first and the short files fill in beside them, instead of one long file running alone
# on one core at the end (it did: 10 of the suite's 30 minutes).
LONG_FIRST = ("test_paper_claim.py", "test_learning.py", "test_encoder_slides.py", "test_zoo.py", "test_zoo_cli.py",
              "test_vit.py", "test_mome.py", "test_encoders.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FIRST)))  # stable: the rest keep their order
