"""A patch encoder's engines beyond model.onnx: the FP16 graph (its FP32 islands), the opset-23 graph
(standard Attention, for TensorRT), the AOTInductor package of a ViT, and `verify`'s figures per
engine and batch, which must be able to fail.

The ViTs are 2-block copies of UNI (GELU, 256 px patches resized to 224) and H-optimus-0 (SwiGLU,
4 registers, native 224 px), registered as encoder families of their own for this module (the
registry is how an encoder is added, so export, verify and add_engine rebuild them like any other),
with weights seeded from their key names and loaded from a file.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import save_file

from histosurv.cli import main
from histosurv.export.encoder_export import export_encoder
from histosurv.export.fp16 import NORMALIZATION_OPS, preprocessing_nodes, to_fp16
from histosurv.export.models.encoders import ENCODERS, build_vit
from histosurv.export.verify import ENCODER_BATCHES, ENCODER_COSINE, verify_version
from histosurv.runtime.engines import EngineUnavailable, load_engine
from histosurv.runtime.engines.base import usable_engine_keys
from histosurv.runtime.pipeline import PatchEncoder
from histosurv.errors import InputError
from histosurv.runtime.repository import MANIFEST, ModelRepository, sha256_file

from .golden import seeded_state_dict, shapes_of

DEPTH = 2
SMALL = {"uni_2blocks": "uni", "h_optimus_0_2blocks": "h_optimus_0"}  # GELU + resize; SwiGLU + registers
FLOAT, FLOAT16, UINT8 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.UINT8


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """name -> its seeded weights file, while the 2-block families are registered."""
    folder = tmp_path_factory.mktemp("weights")
    files = {}
    with pytest.MonkeyPatch.context() as mp:
        for name, base in SMALL.items():
            build = functools.partial(build_vit, base, depth=DEPTH)
            mp.setitem(ENCODERS, name, dataclasses.replace(ENCODERS[base], name=name, build=build))
            files[name] = folder / f"{name}.safetensors"
            save_file(seeded_state_dict(shapes_of(build().trunk.state_dict())), str(files[name]))
        yield files


@pytest.fixture(scope="module", params=sorted(SMALL))
def exported(request, families, tmp_path_factory):
    repo = tmp_path_factory.mktemp("encoder_engines")
    mv = export_encoder(repo, request.param, weights=families[request.param])
    return mv, repo


def _types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor of the graph: inputs, outputs, initializers and intermediates."""
    inferred = onnx.shape_inference.infer_shapes(model)
    values = [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return types


def test_every_encoder_version_has_the_fp16_and_opset23_graphs(exported):
    mv, _ = exported
    assert sorted(mv.info.engines) == ["onnx_opset23", "onnxruntime", "onnxruntime_fp16"]
    fp16, standard = mv.info.engines["onnxruntime_fp16"], mv.info.engines["onnx_opset23"]
    assert (fp16.file, fp16.backend, fp16.precision) == ("model.fp16.onnx", "onnxruntime", "fp16")
    assert (standard.file, standard.backend, standard.precision) == ("model.opset23.onnx", None, "fp32")
    assert {"model.fp16.onnx", "model.opset23.onnx"} <= set(mv.info.files)  # checksummed like model.onnx


def test_fp16_graph_keeps_preprocessing_norms_and_residual_stream_in_fp32(exported):
    mv, _ = exported
    graph = onnx.load(str(mv.engine_file("onnxruntime_fp16")))
    types = _types(graph)
    nodes = graph.graph.node
    assert types["patches"] == UINT8 and types["features"] == FLOAT  # the interface of every engine
    matmul_weights = [types[n.input[1]] for n in nodes if n.op_type == "MatMul" and n.input[1] in types]
    assert matmul_weights and set(matmul_weights) == {FLOAT16}  # the network really computes in FP16
    attention = [n for n in nodes if n.op_type == "MultiHeadAttention"]
    assert len(attention) == DEPTH and all(types[i] == FLOAT16 for n in attention for i in n.input if i)
    # every LayerNorm in FP32: 1 + 2 per block (the last one is the final norm); its inputs and weights
    # FP32, and its outputs read by FP32 nodes or cast to FP16 (ONNX cannot infer a contrib op's outputs)
    norms = [n for n in nodes if n.op_type in NORMALIZATION_OPS]
    assert len(norms) == 1 + 2 * DEPTH
    consumers = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    from_norm = {o for n in norms for o in n.output}
    for node in norms:
        assert {types.get(t) for t in node.input if t and t not in from_norm} == {FLOAT}, node.name
        for out in node.output:
            for reader in consumers.get(out, []):
                to = {a.name: a.i for a in reader.attribute}.get("to")
                assert reader.op_type in (*NORMALIZATION_OPS, "Gather", "Identity") or (reader.op_type, to) == ("Cast", FLOAT16)
    # the residual stream: each SkipLayerNormalization's sum output is the next one's skip input, no cast between
    skips = [n for n in nodes if n.op_type == "SkipLayerNormalization"]
    assert len(skips) == 2 * DEPTH
    for first, second in zip(skips, skips[1:]):
        assert first.output[3] == second.input[1]
    # the preprocessing in FP32, cast to FP16 only after mean/std, right before the patch embedding
    prep = [n for n in nodes if n.name in preprocessing_nodes(graph.graph)]
    assert [n.op_type for n in prep if n.op_type not in ("Shape", "Concat")][:2] == ["Transpose", "Cast"]
    *pixels, to_fp16_cast = prep
    assert all(types[o] in (FLOAT, onnx.TensorProto.INT64, UINT8) for n in pixels for o in n.output)
    resize = [n for n in nodes if n.op_type == "Resize"]
    assert len(resize) == (1 if ENCODERS[mv.info.architecture].preprocessing.resize else 0)
    assert all(n.name in {p.name for p in pixels} for n in resize)
    conv = next(n for n in nodes if n.op_type == "Conv")
    assert (to_fp16_cast.op_type, to_fp16_cast.output[0], pixels[-1].op_type) == ("Cast", conv.input[0], "Div")  # .../std
    assert types[conv.input[0]] == FLOAT16 and types[conv.input[1]] == FLOAT16
    details = mv.info.engines["onnxruntime_fp16"].details
    assert details["residual_stream"] == "fp32" and details["fp32_nodes"]["SkipLayerNormalization"] == 2 * DEPTH


def test_opset23_graph_has_one_standard_attention_per_block_and_a_constant_position_embedding(exported):
    mv, _ = exported
    entry = mv.info.engines["onnx_opset23"]
    graph = onnx.load(str(mv.engine_file("onnx_opset23")))
    ops = entry.details["ops"]
    assert {o.domain: o.version for o in graph.opset_import}[""] == 23 == entry.details["opset"]
    assert ops["ai.onnx::Attention"] == DEPTH and ops["ai.onnx::LayerNormalization"] == 1 + 2 * DEPTH
    assert not any(op.startswith("com.microsoft") for op in ops)  # nothing only ONNX Runtime knows
    # the one Resize (if any) is the preprocessing's antialiased image resize: nothing resizes pos_embed
    resize = [n for n in graph.graph.node if n.op_type == "Resize"]
    assert len(resize) == (1 if ENCODERS[mv.info.architecture].preprocessing.resize else 0)
    assert {n.name for n in resize} <= preprocessing_nodes(graph.graph)
    assert all(a.i == 1 for n in resize for a in n.attribute if a.name == "antialias")
    with pytest.raises(EngineUnavailable, match="input to engine builds"):
        load_engine(mv, "onnx_opset23")


def test_verify_measures_every_engine_at_each_batch(exported):
    mv, repo = exported
    reports = {r.engine: r for r in verify_version(repo, mv.name)}
    assert sorted(reports) == ["onnx_opset23", "onnxruntime", "onnxruntime_fp16"]
    for key, report in reports.items():
        assert report.passed, (key, report.rows)
        assert [row["n"] for row in report.rows] == list(ENCODER_BATCHES) == [1, 4, 16]
        assert all(row["passed"] and np.isfinite(row["features_rel"]) for row in report.rows)
    for key in ("onnxruntime", "onnx_opset23"):  # FP32: within 1e-4 relative (opset 23 on ORT's CPU provider)
        assert reports[key].tolerance == 1e-4 and reports[key].max_features_rel <= 1e-4
        assert reports[key].min_cosine is None and reports[key].min_features_cosine > 0.999999
    fp16 = reports["onnxruntime_fp16"]
    assert fp16.min_cosine == ENCODER_COSINE == 0.999 and fp16.min_features_cosine >= 0.9999
    assert 1e-5 < fp16.max_features_rel <= 1e-2  # really FP16 weights, and still close
    parity = ModelRepository(repo).version(mv.name).info.parity
    assert parity["onnxruntime_fp16"]["passed"] and parity["onnxruntime_fp16"]["min_features_cosine"] >= 0.9999
    assert [sorted(row) for row in parity["onnxruntime_fp16"]["rows"]][0] == sorted(
        ["n", "features_abs", "features_rel", "features_cosine_min", "ms_torch", "ms_engine", "passed"])


def test_auto_serves_the_fp32_graph_on_a_cpu_and_the_fp16_graph_by_name(exported):
    mv, repo = exported
    assert usable_engine_keys(mv) == ["onnxruntime"]  # FP16 is for GPU providers; opset 23 is no engine
    encoder = PatchEncoder.from_repository(repo, mv.name)
    assert encoder.engine.key == "onnxruntime"
    fp16 = PatchEncoder.from_repository(repo, mv.name, engine="onnxruntime_fp16")
    assert fp16.engine.precision == "fp16"
    from histosurv.export.encoder_export import example_patches

    patches = example_patches(3, mv.patch_size, seed=9).numpy()
    got, want = fp16.encode(patches), encoder.encode(patches)
    assert got.dtype == np.float32 and got.shape == want.shape


def test_verify_cli_reports_each_batch_as_json_and_text(exported, capsys):
    mv, repo = exported
    if mv.info.architecture != "uni_2blocks":
        pytest.skip("the CLI's output once is enough")
    assert main(["verify", "--repo", str(repo), "--model", mv.name, "--json", "--no-write", "--sizes", "1,4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["passed"] and sorted(r["engine"] for r in out["reports"]) == ["onnx_opset23", "onnxruntime", "onnxruntime_fp16"]
    for report in out["reports"]:
        assert [(row["n"], row["passed"]) for row in report["rows"]] == [(1, True), (4, True)]
        assert all(0.999 <= row["features_cosine_min"] <= 1 + 1e-9 and row["features_rel"] >= 0 for row in report["rows"])
    assert main(["verify", "--repo", str(repo), "--model", mv.name, "--engine", "onnxruntime_fp16", "--sizes", "2", "--no-write"]) == 0
    text = capsys.readouterr().out
    assert "onnxruntime_fp16 batch=   2  features max rel diff " in text and " min cosine 0.99" in text and "  pass" in text
    assert "PASS onnxruntime_fp16 on cpu" in text and "cosine >= 0.999 per patch" in text


def test_an_fp16_graph_with_its_layernorms_in_fp16_fails_verify(families, tmp_path, capsys):
    """Block 0 adds 4e4 to one channel in each branch, so the residual stream reaches 8e4 there, past
    float16's 65,504 (large ViTs have such outlier channels). Our FP16 graph keeps the residual stream
    in FP32 and passes; the same graph with its (Skip)LayerNormalizations converted to FP16 stores
    that sum as inf, and verify must fail it."""
    from safetensors.torch import load_file

    name = "uni_2blocks"
    weights = load_file(str(families[name]))
    for branch in ("attn.proj.bias", "mlp.fc2.bias"):
        weights[f"blocks.0.{branch}"][7] = 4e4
    for gamma in ("ls1.gamma", "ls2.gamma"):
        weights[f"blocks.0.{gamma}"][7] = 1.0
    save_file(weights, str(tmp_path / "outlier.safetensors"))
    repo = tmp_path / "repo"
    mv = export_encoder(repo, name, weights=tmp_path / "outlier.safetensors", artifacts=("onnxruntime_fp16",))
    with torch.inference_mode():
        residual = ENCODERS[name].build()
        ENCODERS[name].load_weights(residual, weights, "outlier")
        tokens = residual.trunk.blocks[0](residual.trunk.patch_embed(residual.preprocess(torch.zeros(1, 256, 256, 3, dtype=torch.uint8))))
    assert float(tokens[..., 7].abs().max()) > 65504  # what float16 cannot hold
    (ours,) = verify_version(repo, mv.name, engines=["onnxruntime_fp16"], sizes=(1, 4))
    assert ours.passed and ours.min_features_cosine >= ENCODER_COSINE

    # the same graph with only the preprocessing kept in FP32: LayerNorms and residual stream in FP16
    source = onnx.load(str(mv.path / "model.onnx"))
    naive = to_fp16(source, preprocessing_nodes(source.graph))
    onnx.save(naive, str(mv.path / "model.fp16.onnx"))
    manifest_path = repo / mv.name / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["versions"]["1"]["files"]["model.fp16.onnx"] = sha256_file(mv.path / "model.fp16.onnx")
    manifest_path.write_text(json.dumps(manifest))
    (broken,) = verify_version(repo, mv.name, engines=["onnxruntime_fp16"], sizes=(1, 4))
    assert not broken.passed and not any(row["passed"] for row in broken.rows)
    assert np.isnan(broken.min_features_cosine) and broken.to_dict()["min_features_cosine"] is None  # JSON null
    assert main(["verify", "--repo", str(repo), "--model", mv.name, "--engine", "onnxruntime_fp16", "--sizes", "1"]) == 1
    assert "FAIL onnxruntime_fp16" in capsys.readouterr().out


def test_a_vit_compiled_with_aotinductor_matches_pytorch_at_each_batch(families, tmp_path):
    """export_encoder_pt2 on a ViT (it was written for the ResNets): compiled for the CPU (about a
    minute), every attention a fused SDPA kernel, loaded by the torch engine, within 1e-4 at 1, 4, 16."""
    from histosurv.export.repository_writer import add_engine

    repo = tmp_path / "repo"
    name = "uni_2blocks"
    export_encoder(repo, name, weights=families[name], artifacts=())
    mv, key = add_engine(repo, f"{name}_encoder", "torch", device="cpu")
    entry = mv.info.engines[key]
    assert (key, entry.file, entry.precision, entry.device) == ("torch", "model.pt2", "fp32", "cpu")
    assert sum(entry.details["attention_kernels"].values()) == DEPTH  # no decomposed N x N attention
    (report,) = verify_version(repo, mv.name, engines=["torch"])
    assert report.passed and report.device == "cpu"
    assert [row["n"] for row in report.rows] == [1, 4, 16] and report.max_features_rel <= 1e-4
    assert load_engine(mv).key == "onnxruntime"  # the package is served by name only, on a CPU


def test_a_bf16_cpu_package_keeps_the_features_and_is_served_by_name_only(families, tmp_path):
    """--precision bf16 on a CPU: the network in bfloat16 after an FP32 preprocessing (about twice FP32's
    speed where the CPU has AVX512-BF16; bench/encoders.py), held to cosine >= 0.999 per patch."""
    from histosurv.export.repository_writer import add_engine

    repo = tmp_path / "repo"
    name = "h_optimus_0_2blocks"  # SwiGLU, registers and its own mean/std
    export_encoder(repo, name, weights=families[name], artifacts=())
    mv, key = add_engine(repo, f"{name}_encoder", "torch", device="cpu", precision="bf16")
    entry = mv.info.engines[key]
    assert (key, entry.file, entry.precision, entry.device) == ("torch_bf16", "model.bf16.pt2", "bf16", "cpu")
    assert sum(entry.details["attention_kernels"].values()) == DEPTH
    (report,) = verify_version(repo, mv.name, engines=["torch_bf16"])
    assert report.passed and report.min_cosine == 0.999 and 0.999 <= report.min_features_cosine < 1.0
    assert 0 < report.max_features_rel <= 5e-2  # computed in bf16, not silently in FP32
    assert load_engine(mv).key == "onnxruntime"  # lower precision only when asked for
    with pytest.raises(InputError, match="cpu computes in fp32 or bf16"):
        add_engine(repo, f"{name}_encoder", "torch", device="cpu", precision="fp16")
