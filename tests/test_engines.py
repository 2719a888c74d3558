"""Engines beyond ONNX Runtime FP32: the AOTInductor package, the FP16 graph, TensorRT plans, and the
rules that refuse an artifact built for another machine."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from histosurv.errors import InputError
from histosurv.export.onnx_export import SingleBag, example_inputs
from histosurv.export.tensorrt_build import bag_profiles
from histosurv.export.verify import reference_model, verify_version
from histosurv.runtime.engines import EngineUnavailable, load_engine, load_models
from histosurv.runtime.engines.base import usable_engine_keys
from histosurv.runtime.engines.tensorrt import plan_incompatibility
from histosurv.runtime.repository import MANIFEST, ModelRepository

UNTRACED = (1, 2, 17, 300)  # the graphs were traced at N = 37


def _run_both(mv, engine, n, scale_coords=1, offset=0):
    model = reference_model(mv)
    inputs = example_inputs(model, n=n, seed=n)
    inputs["coords"] = inputs["coords"] * scale_coords + offset
    with torch.inference_mode():
        risk, attention = SingleBag(model)(**inputs)[:2]  # then survival, risk_group
    out = engine.run({k: v.numpy() for k, v in inputs.items()})
    return (risk.item(), attention.numpy()), (float(out["risk"][0]), out["attention"])


def _rel(expected, got):
    (risk, attention), (risk_e, attention_e) = expected, got
    return abs(risk_e - risk) / max(abs(risk), 0.01), float(np.abs(attention_e - attention).max() / np.abs(attention).max())


@pytest.mark.parametrize("n", UNTRACED)
def test_compiled_torch_package_matches_pytorch_at_untraced_sizes(tiny_repo, n):
    mv = ModelRepository(tiny_repo).version("ammasurv")
    engine = load_engine(mv, "torch")
    assert engine.device == "cpu" and engine.describe()["backend"] == "torch"
    risk_rel, attention_rel = _rel(*_run_both(mv, engine, n))
    assert risk_rel <= 1e-5 and attention_rel <= 1e-5


def test_compiled_torch_package_runs_without_the_model_source(tiny_repo, tiny_cohort_dir):
    """model.pt2 is served by torch alone: histosurv.export (the model code) cannot be imported."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["histosurv.export"] = None
        from histosurv.data.tables import GeneTable
        from histosurv.runtime.predict import FusionPredictor, score_cases
        genes = GeneTable.read({str(tiny_cohort_dir / 'genes.csv')!r})
        cases = [("SYN0-0000", [{str(tiny_cohort_dir / 'features' / 'SYN0-0000-01.h5')!r}])]
        for engine in ("torch", "onnxruntime"):
            p = FusionPredictor.from_repository({str(tiny_repo)!r}, "ammasurv", engine=engine)
            print(p.engine.describe()["engine"], repr(score_cases(p, cases, genes)[0].risk))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    risks = dict(line.split() for line in out.stdout.strip().splitlines()[-2:])
    assert float(risks["torch"]) == pytest.approx(float(risks["onnxruntime"]), rel=1e-5)


def test_compiled_torch_package_calls_fused_attention_kernels(tiny_repo):
    entry = ModelRepository(tiny_repo).version("ammasurv").info.engines["torch"]
    # one flash-attention call per attention of the model: no N x N score matrix in the package
    assert entry.details["attention_kernels"] == {"_scaled_dot_product_flash_attention_for_cpu": 2}


def test_fp16_graph_keeps_coordinates_in_fp32_and_matches(tiny_repo):
    mv = ModelRepository(tiny_repo).version("ammasurv")
    graph = onnx.load(str(mv.engine_file("onnxruntime_fp16")))
    initializers = {t.name: t.data_type for t in graph.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in initializers.values()  # the weights really are FP16
    assert [i.type.tensor_type.elem_type for i in graph.graph.input][0] == onnx.TensorProto.FLOAT  # interface kept
    engine = load_engine(mv, "onnxruntime_fp16")
    assert engine.precision == "fp16"
    # level-0 coordinates past float16's largest value (65,504), as on any whole slide
    for n in (1, 17, 1000):
        risk_rel, attention_rel = _rel(*_run_both(mv, engine, n, scale_coords=7, offset=90_000))
        assert risk_rel <= 1e-2 and attention_rel <= 1e-2, (n, risk_rel, attention_rel)


def _coordinate_path_types(graph: onnx.ModelProto) -> set[int]:
    """Element types of every tensor on the path from ``coords`` to the Sin/Cos nodes' inputs."""
    from histosurv.export.fp16 import coordinate_nodes

    graph = onnx.shape_inference.infer_shapes(graph)
    types = {v.name: v.type.tensor_type.elem_type for v in graph.graph.value_info}
    on_path = coordinate_nodes(graph.graph)
    return {types[o] for n in graph.graph.node if n.name in on_path and n.op_type not in ("Sin", "Cos") for o in n.output}


def test_fp16_graph_computes_the_coordinate_embedding_in_fp32(tiny_repo):
    """Level-0 coordinates pass float16's largest value (65,504) and patch-unit angles in the hundreds
    are resolved to 0.25 at best in float16, so the FP16 graph must keep this path in float32 (a GPU
    provider computes what the graph says; ONNX Runtime's CPU kernels would hide the difference)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    mv = ModelRepository(tiny_repo).version("ammasurv")
    graph = onnx.load(str(mv.engine_file("onnxruntime_fp16")))
    assert _coordinate_path_types(graph) == {onnx.TensorProto.INT64, onnx.TensorProto.FLOAT}
    plain = convert_float_to_float16(onnx.load(str(mv.engine_file("onnxruntime"))), keep_io_types=True)
    for i, node in enumerate(plain.graph.node):
        node.name = node.name or f"n{i}"
    assert onnx.TensorProto.FLOAT16 in _coordinate_path_types(plain)  # what the check above guards against


def test_auto_picks_fp32_onnx_runtime_on_a_cpu_and_names_missing_engines(tiny_repo):
    mv = ModelRepository(tiny_repo).version("ammasurv")
    assert usable_engine_keys(mv) == ["onnxruntime", "torch"]  # the FP16 graph is for GPU providers
    assert load_engine(mv).key == "onnxruntime"
    with pytest.raises(EngineUnavailable, match="no tensorrt artifact in this version"):
        load_engine(mv, "tensorrt")
    with pytest.raises(EngineUnavailable, match="input to engine builds"):
        load_engine(mv, "onnx_opset23")


def _edit_manifest(model_dir, edit):
    path = model_dir / MANIFEST
    manifest = json.loads(path.read_text())
    edit(manifest["versions"]["1"])
    path.write_text(json.dumps(manifest))


def _retarget(entry: dict, device: str | None = None, **built_for) -> None:
    """Makes a manifest engine entry say it was built elsewhere."""
    if device:
        entry["device"] = device
    entry["built_for"].update(built_for)


def test_artifacts_built_for_another_machine_are_refused_by_name(tiny_repo, tmp_path):
    repo = tmp_path / "repo"
    for name in ("good", "gpu_only", "damaged"):
        shutil.copytree(tiny_repo / "ammasurv", repo / name)
    # a repository copied from another box: its compiled-torch package is for CUDA and another torch
    _edit_manifest(repo / "gpu_only", lambda v: _retarget(v["engines"]["torch"], device="cuda", torch="2.9.1"))
    mv = ModelRepository(repo).version("gpu_only")
    with pytest.raises(EngineUnavailable, match=r"gpu_only/1/model\.pt2: compiled with torch 2\.9\.1, this is torch"):
        load_engine(mv, "torch")
    _edit_manifest(repo / "gpu_only", lambda v: _retarget(v["engines"]["torch"], torch=torch.__version__))
    with pytest.raises(EngineUnavailable, match=r"model\.pt2: compiled for a CUDA GPU; this machine has none"):
        load_engine(ModelRepository(repo).version("gpu_only"), "torch")
    # with only that package left, auto says why nothing runs, naming the file
    _edit_manifest(repo / "gpu_only", lambda v: [v["engines"].pop(k) for k in ("onnxruntime", "onnxruntime_fp16")])
    onnx_graph = repo / "damaged" / "1" / "model.onnx"
    onnx_graph.write_bytes(onnx_graph.read_bytes()[:-1])

    loaded, failed = load_models(repo)
    assert sorted(loaded) == ["good"] and loaded["good"].key == "onnxruntime"
    assert "gpu_only/1/model.pt2: compiled for a CUDA GPU" in failed["gpu_only"]
    assert "damaged/1/model.onnx: sha256 does not match" in failed["damaged"]


def test_plan_compatibility_rules():
    from histosurv.runtime.manifest import BuiltFor, EngineEntry

    built_for = BuiltFor(tensorrt="10.14.1", compute_capability="9.0", gpu="NVIDIA H100 80GB HBM3")
    entry = EngineEntry("model.plan", "tensorrt", "fp16", device="cuda", built_for=built_for)
    assert plan_incompatibility(entry, "10.14.1", "NVIDIA H100 PCIe", "9.0") is None
    assert "no CUDA device" in plan_incompatibility(entry, "10.14.1", None, None)
    assert "built by TensorRT 10.14.1, this is TensorRT 10.15.0" in plan_incompatibility(entry, "10.15.0", "H100", "9.0")
    message = plan_incompatibility(entry, "10.14.1", "NVIDIA A100", "8.0")
    assert "compute capability 9.0 (NVIDIA H100 80GB HBM3), this GPU (NVIDIA A100) is 8.0" in message


def test_bag_profiles_cover_every_size_exactly_once():
    assert bag_profiles(65536) == [(1, 512, 1024), (1025, 2560, 4096), (4097, 10240, 16384), (16385, 40960, 65536)]
    assert bag_profiles(5000) == [(1, 512, 1024), (1025, 2560, 4096), (4097, 4548, 5000)]
    assert bag_profiles(300) == [(1, 150, 300)]
    for profiles in (bag_profiles(65536), bag_profiles(100_000, buckets=(7, 5000))):
        covered = [n for lo, _, hi in profiles for n in range(lo, hi + 1)]
        assert covered == list(range(1, profiles[-1][2] + 1))
    with pytest.raises(ValueError, match="max_bag"):
        bag_profiles(0)


def test_verify_skips_what_cannot_run_here_and_says_why(tiny_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo / "ammasurv", repo / "ammasurv")
    _edit_manifest(repo / "ammasurv", lambda v: _retarget(v["engines"]["torch"], device="cuda"))
    lines = []
    reports = verify_version(repo, "ammasurv", sizes=(17,), log=lines.append)
    # the opset-23 graph (TensorRT's input) is checked on ONNX Runtime's CPU provider
    assert sorted(r.engine for r in reports) == ["onnx_opset23", "onnxruntime", "onnxruntime_fp16"]
    assert any("torch" in line and "skipped" in line and "model.pt2: compiled for a CUDA GPU" in line for line in lines)


def test_add_engine_refuses_unknown_engines(tiny_repo):
    from histosurv.export.repository_writer import add_engine

    with pytest.raises(InputError, match="no artifact 'openvino' for a survival model; artifacts: onnxruntime, onnx_opset23"):
        add_engine(tiny_repo, "ammasurv", "openvino")
    with pytest.raises(InputError, match="--kernels do not apply to tensorrt \\(it takes --max-bag, --precision\\); they go with --add-engine torch"):
        add_engine(tiny_repo, "ammasurv", "tensorrt", kernels="triton")


# --- GPU only: these run where TensorRT or CUDA is present, and skip elsewhere -------------------


def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def _gpu_repo(tiny_run, tmp_path) -> Path:
    """The tiny model with the always-built graphs only: on a GPU box the CPU torch package tiny_repo
    also holds would cost a compile the GPU tests do not use."""
    from histosurv.export.repository_writer import export_run

    repo = tmp_path / "repo"
    export_run(tiny_run, repo, "ammasurv", artifacts=())
    return repo


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_tensorrt_plan_matches_pytorch_and_is_recorded(tiny_run, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is an optional extra, not installable here")
    _cuda()
    from histosurv.export.repository_writer import add_engine

    repo = _gpu_repo(tiny_run, tmp_path)
    mv, key = add_engine(repo, "ammasurv", "tensorrt", max_bag=4096)
    entry = mv.info.engines[key]
    assert entry.profiles == ((1, 512, 1024), (1025, 2560, 4096)) and entry.built_for.compute_capability
    reports = verify_version(repo, "ammasurv", sizes=(1, 17, 1000, 3000), engines=["tensorrt"])
    assert reports[0].passed and reports[0].tolerance == 1e-2
    with pytest.raises(InputError, match="outside this plan's profiles"):
        engine = load_engine(ModelRepository(repo).version("ammasurv"), "tensorrt")
        engine.run({k: v.numpy() for k, v in example_inputs(reference_model(mv), n=5000).items()})


@pytest.mark.gpu
def test_cuda_torch_package_matches_pytorch(tiny_run, tmp_path):
    _cuda()
    from histosurv.export.repository_writer import add_engine

    repo = _gpu_repo(tiny_run, tmp_path)
    mv, key = add_engine(repo, "ammasurv", "torch", device="cuda")
    assert key == "torch_cuda" and mv.info.engines[key].built_for.compute_capability
    reports = verify_version(repo, "ammasurv", sizes=(1, 17, 1000, 16384), engines=[key])
    assert reports[0].passed and reports[0].device.startswith("cuda")


def test_auto_takes_an_artifact_that_computes_on_the_gpu_first_on_a_gpu_box(tiny_repo, tmp_path, monkeypatch):
    """A GPU box whose ONNX Runtime is the CPU wheel: the CUDA torch package goes before ONNX Runtime."""
    from histosurv.runtime.engines import base
    from histosurv.runtime.engines.torch_engine import TorchEngine

    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo / "ammasurv", repo / "ammasurv")
    _edit_manifest(repo / "ammasurv", lambda v: _retarget(v["engines"]["torch"], device="cuda"))
    monkeypatch.setattr(TorchEngine, "incompatibility", classmethod(lambda cls, entry: None))  # as if built for this GPU
    mv = ModelRepository(repo).version("ammasurv")
    monkeypatch.setattr(base, "nvidia_device_present", lambda: False)
    assert usable_engine_keys(mv) == ["onnxruntime", "torch"]  # no GPU: ONNX Runtime first, by priority
    monkeypatch.setattr(base, "nvidia_device_present", lambda: True)
    assert usable_engine_keys(mv) == ["torch", "onnxruntime"]
