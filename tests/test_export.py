"""Export to the model repository and ONNX Runtime parity with PyTorch."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from histosurv.errors import InputError, RepositoryError
from histosurv.export.models import build_model
from histosurv.export.models.ammasurv import AMMASurvConfig
from histosurv.export.onnx_export import SingleBag, example_inputs, export_onnx
from histosurv.export.repository_writer import export_run
from histosurv.export.verify import verify_version
from histosurv.runtime.manifest import ModelManifest, risk_definition
from histosurv.runtime.repository import ModelRepository, sha256_file

from .conftest import tiny_model_config

SIZES = (1, 17, 1000, 5000)


def test_repository_layout_and_manifest(tiny_repo, tiny_cohort):
    model_dir = tiny_repo / "ammasurv"
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "config.pbtxt", "histosurv.json"]
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == [
        "model.fp16.onnx", "model.onnx", "model.opset23.onnx", "model.pt2", "model.safetensors"
    ]
    manifest = json.loads((model_dir / "histosurv.json").read_text())
    v1 = manifest["versions"]["1"]
    assert [t["name"] for t in manifest["inputs"]] == ["features", "coords", "genes"]
    assert manifest["inputs"][0] == {"name": "features", "datatype": "FP32", "shape": [-1, 32]}
    assert [t["name"] for t in manifest["outputs"]] == ["risk", "attention", "survival", "risk_group"]
    assert manifest["outputs"][2:] == [{"name": "survival", "datatype": "FP32", "shape": [4]},
                                       {"name": "risk_group", "datatype": "INT64", "shape": [1]}]
    assert v1["genes"]["names"] == tiny_cohort.gene_names and len(v1["genes"]["mean"]) == 24
    # hyper-parameters the paper leaves open are recorded
    assert {"heads", "depth", "gene_groups", "pos_dim"} <= set(v1["config"])
    for name, digest in v1["files"].items():
        assert sha256_file(model_dir / "1" / name) == digest
    engines = v1["engines"]
    assert engines["onnxruntime"]["details"]["ops"]["com.microsoft::MultiHeadAttention"] == 2
    assert engines["onnx_opset23"]["details"]["ops"]["ai.onnx::Attention"] == 2
    assert engines["onnxruntime_fp16"]["details"]["ops"]["com.microsoft::MultiHeadAttention"] == 2
    assert engines["torch"]["device"] == "cpu" and sum(engines["torch"]["details"]["attention_kernels"].values()) == 2
    assert engines["torch"]["built_for"]["torch"] == torch.__version__  # a package runs only on its torch release
    assert (engines["onnxruntime"]["backend"], engines["onnx_opset23"]["backend"]) == ("onnxruntime", None)
    assert (engines["onnxruntime_fp16"]["precision"], engines["onnxruntime"]["device"]) == ("fp16", "any")
    # the encoder the training bags were made with, copied from their h5 attributes
    assert v1["trained_on"]["architecture"] == "synthetic" and v1["trained_on"]["feature_dim"] == 32
    survival = v1["survival"]
    assert {k: survival[k] for k in ("kind", "n_bins", "time_bins", "risk")} == {
        "kind": "cox", "n_bins": None, "time_bins": None, "risk": risk_definition("cox")}
    # fitted at export on the run's training patients: the tiny cohort's follow-up reaches past 60 months
    assert survival["times"] == [12.0, 24.0, 36.0, 60.0] and len(survival["baseline_hazard"]) == 4
    assert survival["groups"] == ["low", "high"] and len(survival["cutoffs"]) == 1


def test_opset23_graph_for_tensorrt_matches_pytorch_at_untraced_sizes(tiny_repo):
    """TensorRT cannot run here, so the standard-Attention graph is checked on ONNX Runtime's CPU
    kernel (which holds the N x N scores: fine at these sizes) at sizes other than the traced one."""
    import onnxruntime as ort

    from histosurv.export.verify import reference_model

    mv = ModelRepository(tiny_repo).version("ammasurv")
    model = SingleBag(reference_model(mv)).eval()
    session = ort.InferenceSession(str(mv.path / "model.opset23.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 2, 17, 300):
        inputs = example_inputs(model.model, n=n, seed=n)
        with torch.inference_mode():
            risk, attention = model(**inputs)[:2]
        got_risk, got_attention = session.run(["risk", "attention"], {k: v.numpy() for k, v in inputs.items()})
        assert got_attention.shape == (n,)
        assert abs(got_risk[0] - risk.item()) <= 1e-4 * max(abs(risk.item()), 0.01)
        np.testing.assert_allclose(got_attention, attention.numpy(), rtol=0, atol=1e-4 * attention.abs().max().item())


def test_config_pbtxt_is_tritons(tiny_repo, tiny_cohort):
    """Parsed by protobuf's text format into tritonclient's own ModelConfig, as Triton parses it."""
    pytest.importorskip("tritonclient.grpc")
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse((tiny_repo / "ammasurv" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert (config.name, config.platform, config.max_batch_size) == ("ammasurv", "onnxruntime_onnx", 0)
    assert [(t.name, list(t.dims)) for t in config.input] == [("features", [-1, 32]), ("coords", [-1, 2]), ("genes", [24])]
    assert [t.name for t in config.output] == ["risk", "attention", "survival", "risk_group"]
    assert model_config_pb2.DataType.Name(config.output[3].data_type) == "TYPE_INT64"
    assert model_config_pb2.DataType.Name(config.input[1].data_type) == "TYPE_INT64"
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert json.loads(params["histosurv.gene_names"]) == tiny_cohort.gene_names
    assert json.loads(params["histosurv.trained_on"])["architecture"] == "synthetic"
    assert params["histosurv.kind"] == "survival_model"


@pytest.mark.parametrize(
    "overrides", [dict(), dict(pos_dim=0), dict(survival_head="discrete"), dict(modality="image"), dict(modality="genes")]
)
def test_onnx_runtime_matches_pytorch_at_every_bag_size(overrides, tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)
    model = build_model("ammasurv", tiny_model_config(**overrides)).eval()
    export_onnx(model, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    wrapper = SingleBag(model)
    for n in SIZES:
        inputs = example_inputs(model, n=n, seed=n)
        with torch.no_grad():
            expected = [t.numpy() for t in wrapper(**inputs)]
        got = session.run(None, {k: v.numpy() for k, v in inputs.items()})
        assert [o.name for o in session.get_outputs()] == wrapper.output_names()
        np.testing.assert_allclose(got[0], expected[0], rtol=1e-4, atol=1e-6)
        if len(got) > 1:
            assert got[1].shape == (n,)
            np.testing.assert_allclose(got[1], expected[1], rtol=1e-4, atol=1e-7)


def test_paper_sized_model_matches_at_every_bag_size(tmp_path):
    """d1 = 512 ResNet18 features, d_pos = 32, 8 heads: the configuration the demo ships."""
    import onnxruntime as ort

    torch.manual_seed(0)
    model = build_model("ammasurv", AMMASurvConfig(n_genes=200)).eval()
    export_onnx(model, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for n in SIZES:
        inputs = example_inputs(model, n=n, seed=n)
        with torch.no_grad():
            risk = SingleBag(model)(**inputs)[0].item()
        got = session.run(["risk"], {k: v.numpy() for k, v in inputs.items()})[0][0]
        assert abs(got - risk) / max(abs(risk), 0.01) <= 1e-4, (n, got, risk)


def test_graph_has_fused_attention_and_no_bag_by_bag_value(tmp_path):
    model = build_model("ammasurv", tiny_model_config()).eval()
    export_onnx(model, tmp_path / "m.onnx")
    graph = onnx.load(tmp_path / "m.onnx").graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MultiHeadAttention") == model.cfg.depth
    assert ops.count("Softmax") == 1  # the class-token row that gives the `attention` output
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(graph.value_info) + list(graph.output) + list(graph.input)}
    for node in graph.node:
        # The exporter annotates every value; the fused contrib ops added afterwards are not, but their
        # outputs have the shape of their first input (the query for MultiHeadAttention).
        if node.op_type in ("MultiHeadAttention", "SkipLayerNormalization"):
            for o in node.output:
                shapes.setdefault(o, shapes[node.input[0]])
    produced = [o for n in graph.node for o in n.output if o]
    assert all(o in shapes for o in produced), "every intermediate value carries a shape"
    bag_sized = {o: s for o, s in shapes.items() if sum(isinstance(d, str) and "N" in d for d in s) >= 2}
    assert bag_sized == {}, f"values with two bag-sized dimensions: {bag_sized}"


def test_verify_records_parity_in_the_manifest(tiny_repo):
    reports = {r.engine: r for r in verify_version(tiny_repo, "ammasurv", sizes=SIZES)}
    assert sorted(reports) == ["onnx_opset23", "onnxruntime", "onnxruntime_fp16", "torch"]
    assert reports["onnxruntime"].providers == ["CPUExecutionProvider"]
    assert [row["n"] for row in reports["onnxruntime"].rows] == list(SIZES)
    # TensorRT's input graph holds N x N scores on ONNX Runtime's CPU kernel: checked at small bags only
    assert [row["n"] for row in reports["onnx_opset23"].rows] == [n for n in SIZES if n <= 300]
    # each engine is held to the tolerance of the precision it computes in
    assert {e: r.tolerance for e, r in reports.items()} == {
        "onnx_opset23": 1e-4, "onnxruntime": 1e-4, "onnxruntime_fp16": 1e-2, "torch": 1e-4
    }
    assert all(r.passed for r in reports.values())
    assert reports["onnxruntime"].risk_floor == 0.01 and reports["onnxruntime_fp16"].risk_floor == 0.1
    parity = ModelManifest.load(tiny_repo / "ammasurv" / "histosurv.json").versions[1].parity
    for engine, report in reports.items():
        assert parity[engine]["passed"] and parity[engine]["max_risk_rel"] == report.max_risk_rel


def test_new_export_is_a_new_version_and_old_ones_stay(tiny_run, tmp_path):
    repo = tmp_path / "repo"
    export_run(tiny_run, repo, "m", artifacts=())
    first = (repo / "m" / "1" / "model.onnx").read_bytes()
    mv = export_run(tiny_run, repo, "m", artifacts=())
    assert mv.version == 2 and (repo / "m" / "1" / "model.onnx").read_bytes() == first
    assert ModelRepository(repo).version("m").version == 2
    assert ModelRepository(repo).version("m", 1).version == 1
    with pytest.raises(RepositoryError, match="immutable"):
        export_run(tiny_run, repo, "m", version=1, artifacts=())


def test_a_run_with_another_interface_is_refused(tiny_run, tiny_cohort, tmp_path):
    from histosurv.export.run import save_run
    from histosurv.export.training import train

    from .conftest import TINY_TRAIN

    repo = tmp_path / "repo"
    export_run(tiny_run, repo, "m", artifacts=())
    image_only = train(tiny_cohort, "ammasurv", tiny_model_config(modality="image"), TINY_TRAIN)
    other = save_run(tmp_path / "image_run", image_only, tiny_cohort)
    with pytest.raises(RepositoryError, match="another model name"):
        export_run(other, repo, "m", artifacts=())
    assert sorted(p.name for p in (repo / "m").iterdir()) == ["1", "config.pbtxt", "histosurv.json"]


def test_changed_or_missing_files_are_refused(tiny_repo, tmp_path):
    repo = tmp_path / "copy"
    shutil.copytree(tiny_repo, repo)
    onnx_path = repo / "ammasurv" / "1" / "model.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes()[:-10])
    with pytest.raises(RepositoryError, match="sha256 does not match"):
        ModelRepository(repo).version("ammasurv")
    onnx_path.unlink()
    with pytest.raises(RepositoryError, match="missing"):
        ModelRepository(repo).version("ammasurv")
    with pytest.raises(RepositoryError, match="no model 'nope'"):
        ModelRepository(repo).version("nope")
    with pytest.raises(RepositoryError, match="no version 7"):
        ModelRepository(repo).version("ammasurv", 7)


def test_a_tensorrt_plan_needs_the_opset23_graph_and_says_how_to_add_it(slide_repo):
    """--artifacts none (or artifacts=()) leaves TensorRT's input out; building a plan then names the fix
    instead of failing inside TensorRT's parser on a missing file."""
    from histosurv.export.artifacts import BuildContext, artifact

    mv = ModelRepository(slide_repo[0]).version("ammasurv")
    assert "onnx_opset23" not in mv.info.engines
    with pytest.raises(InputError, match="exported without: add it first with --add-engine onnx_opset23"):
        artifact("tensorrt", "survival").build(BuildContext(mv.path, mv, {}, lambda _: None), mv.path / "model.plan")
    assert not (mv.path / "model.plan").exists()
