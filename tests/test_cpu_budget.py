"""How the cores are shared between the patch encoder and the slide decoder (runtime/cpu_budget.py).

The split itself is chosen from ``bench/cpu_budget.py``'s figures; what is tested here is that the
cores are counted as a container allows them, that a user's setting always wins, that the ONNX Runtime
session really gets what was chosen, and that the split never changes a feature.
"""

from __future__ import annotations

import numpy as np
import pytest

from histosurv.errors import InputError
from histosurv.runtime import cpu_budget as cb
from histosurv.runtime.cpu_budget import cpu_budget

from .conftest import run_cli


@pytest.mark.parametrize("v2, v1_quota, v1_period, expected", [
    ("200000 100000\n", None, None, 2.0),  # docker --cpus 2
    ("250000 100000\n", None, None, 2.5),
    ("max 100000\n", None, None, None),  # no quota
    (None, "150000\n", "100000\n", 1.5),  # cgroup v1
    (None, "-1\n", "100000\n", None),  # v1 without quota
    (None, None, None, None),  # neither mounted
    ("garbage\n", None, None, None),
])
def test_the_cgroup_quota_is_read_from_v2_then_v1(tmp_path, v2, v1_quota, v1_period, expected):
    paths = {"v2": tmp_path / "cpu.max", "v1_quota": tmp_path / "cfs_quota_us", "v1_period": tmp_path / "cfs_period_us"}
    for key, text in (("v2", v2), ("v1_quota", v1_quota), ("v1_period", v1_period)):
        if text is not None:
            paths[key].write_text(text)
    assert cb._cgroup_quota(paths["v2"], paths["v1_quota"], paths["v1_period"]) == expected


def test_usable_cores_are_the_affinity_mask_capped_by_the_quota(monkeypatch):
    monkeypatch.setattr(cb.os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(cb, "_cgroup_quota", lambda: 2.5)
    assert cb.usable_cores() == 3  # a 2.5-CPU container on a 64-core host: three threads, not 64
    monkeypatch.setattr(cb, "_cgroup_quota", lambda: None)
    assert cb.usable_cores() == 64
    monkeypatch.setattr(cb.os, "sched_getaffinity", lambda pid: {5})
    monkeypatch.setattr(cb, "_cgroup_quota", lambda: 0.2)
    assert cb.usable_cores() == 1


@pytest.mark.parametrize("cores, on_gpu, expected", [
    (1, False, (1, 2)),
    (2, False, (2, 2)),
    (8, False, (8, 2)),
    (64, False, (64, 16)),
    (2, True, (1, 1)),
    (16, True, (1, 15)),
])
def test_the_split_by_cores(monkeypatch, cores, on_gpu, expected):
    monkeypatch.delenv("HISTOSURV_THREADS", raising=False)
    budget = cpu_budget(encoder_on_gpu=on_gpu, cores=cores)
    assert (budget.encoder_threads, budget.decode_workers) == expected


def test_an_int8_encoder_is_fed_smaller_batches():
    assert (cb.encoder_batch_size("int8"), cb.encoder_batch_size("fp32"), cb.encoder_batch_size("fp16")) == (8, 32, 32)


def test_a_users_threads_and_workers_win(monkeypatch):
    monkeypatch.delenv("HISTOSURV_THREADS", raising=False)
    b = cpu_budget(threads=3, workers=5, cores=64)
    assert (b.encoder_threads, b.decode_workers) == (3, 5)
    monkeypatch.setenv("HISTOSURV_THREADS", "6")
    assert cpu_budget(cores=64).encoder_threads == 6
    assert cpu_budget(threads=2, cores=64).encoder_threads == 2  # the argument over the environment


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_a_bad_histosurv_threads_is_named(monkeypatch, value):
    monkeypatch.setenv("HISTOSURV_THREADS", value)
    with pytest.raises(InputError, match=f"HISTOSURV_THREADS must be a whole number of threads >= 1, got '{value}'"):
        cpu_budget(cores=2)


def test_zero_threads_or_workers_are_refused():
    with pytest.raises(InputError, match="--threads must be at least 1, got 0"):
        cpu_budget(threads=0)
    with pytest.raises(InputError, match="--workers must be at least 1, got -1"):
        cpu_budget(workers=-1)


@pytest.fixture(scope="module")
def encoder_repo(slide_repo):
    return slide_repo[0]


def test_the_onnx_runtime_session_gets_the_usable_cores_and_a_users_settings(encoder_repo, monkeypatch):
    from histosurv.runtime.pipeline import PatchEncoder

    monkeypatch.delenv("HISTOSURV_THREADS", raising=False)
    encoder = PatchEncoder.from_repository(encoder_repo, "resnet18_encoder", engine="onnxruntime")
    assert encoder.engine.session.get_session_options().intra_op_num_threads == cb.usable_cores()
    monkeypatch.setenv("HISTOSURV_THREADS", "1")
    encoder = PatchEncoder.from_repository(encoder_repo, "resnet18_encoder", engine="onnxruntime", spinning=False)
    options = encoder.engine.session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_the_split_never_changes_a_feature(encoder_repo, cmu_svs):
    from histosurv.runtime.pipeline import PatchEncoder, SlideConfig, featurize_slide

    encoder = PatchEncoder.from_repository(encoder_repo, "resnet18_encoder", engine="onnxruntime")
    chosen = featurize_slide(cmu_svs, encoder, SlideConfig())
    for workers, batch in ((1, 7), (3, 32)):
        other = featurize_slide(cmu_svs, encoder, SlideConfig(num_workers=workers, batch_size=batch))
        np.testing.assert_array_equal(other.bag.coords, chosen.bag.coords)
        # batch size changes ONNX Runtime's blocking, so the sums may round differently
        np.testing.assert_allclose(other.bag.features, chosen.bag.features, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("flag", ["--threads", "--workers", "--batch-size"])
def test_tile_refuses_zero_threads_or_workers_before_reading_anything(flag, tmp_path, cmu_svs, encoder_repo):
    out = run_cli("tile", cmu_svs, "--repo", encoder_repo, "--out", tmp_path / "x.h5", flag, "0")
    assert out.returncode == 2, out.stderr
    assert f"{flag} must be at least 1, got 0" in out.stderr
    assert not (tmp_path / "x.h5").exists()
