"""INT8 patch encoders (issue 24): built from the FP32 graph, calibrated on tissue patches of the real SVS
cut by the slide path, gated at export, and served by auto only where the gates passed.

The encoder is ResNet18 at 64 px patches (same graph, a sixteenth of the pixels: the demo slide then has
~500 tissue patches and the whole build takes seconds)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from histosurv.data.cohort import load_cohort
from histosurv.data.features import read_bag
from histosurv.data.synth import write_synthetic_cohort
from histosurv.export.quantize import INT8_FILE, INT8_KEY, QuantizationGateError, quantizable_ops
from histosurv.export.repository_writer import add_engine, export_run
from histosurv.export.run import save_run
from histosurv.export.training import train
from histosurv.runtime.engines import load_engine
from histosurv.runtime.engines.base import nvidia_device_present, why_unusable
from histosurv.runtime.repository import ModelRepository

from .conftest import TINY_SYNTH, TINY_TRAIN, run_cli, tiny_model_config

ENCODER = "resnet18_encoder"
PATCH = "64"

pytestmark = pytest.mark.skipif(nvidia_device_present(), reason="auto prefers a GPU engine over the CPU's INT8 graph")


@pytest.fixture(scope="session")
def fp32_repo(tmp_path_factory):
    """The ResNet18 encoder at 64 px, FP32 graph only, and an AMMASurv trained on bags recorded as its features."""
    from histosurv.export.encoder_export import export_encoder

    root = tmp_path_factory.mktemp("int8")
    repo = root / "repo"
    encoder = export_encoder(repo, "resnet18", patch_size=int(PATCH), artifacts=())
    cohort_dir = write_synthetic_cohort(root / "cohort", dataclasses.replace(TINY_SYNTH, feature_dim=512),
                                        encoder_record=encoder.encoder_record)
    cohort = load_cohort(cohort_dir / "clinical.csv", cohort_dir / "genes.csv", cohort_dir / "features")
    result = train(cohort, "ammasurv", tiny_model_config(feature_dim=512), dataclasses.replace(TINY_TRAIN, epochs=1))
    export_run(save_run(root / "run", result, cohort), repo, "ammasurv", artifacts=())
    return repo, cohort_dir, cohort.patients[0].case_id


@pytest.fixture(scope="session")
def int8_repo(fp32_repo, cmu_svs, tmp_path_factory):
    """The same, with the INT8 graph built by the CLI, as a user builds it."""
    repo = tmp_path_factory.mktemp("int8_built") / "repo"
    shutil.copytree(fp32_repo[0], repo)
    out = run_cli("export", "--repo", repo, "--name", ENCODER, "--add-engine", INT8_KEY, "--calibration", cmu_svs.parent,
                  "--calibration-patches", "256")
    assert out.returncode == 0, out.stderr
    assert "risk Spearman" in out.stdout and "passed" in out.stdout
    return repo, *fp32_repo[1:]


def _copy(repo, tmp_path):
    shutil.copytree(repo, tmp_path / "repo")
    return tmp_path / "repo"


def test_gate_figures_are_in_the_manifest_and_verify_checks_the_artifact(int8_repo, cmu_svs):
    repo = int8_repo[0]
    mv = ModelRepository(repo).version(ENCODER)
    entry = mv.info.engines[INT8_KEY]
    assert entry.file == INT8_FILE and entry.precision == "int8" and INT8_FILE in mv.info.files
    gate = entry.details["gate"]
    assert gate["passed"] is True and gate["forced"] is False and gate["held_out_patches"] == 64
    assert 0.99 <= gate["cosine_min"] <= gate["cosine_p1"] <= gate["cosine_mean"] < 1.0
    down = gate["downstream"]
    assert down["spearman"] >= 0.99 and down["patients"]["test"] == 64
    assert abs(down["c_index_change"] - (down["c_index_int8"] - down["c_index_fp32"])) < 1e-12
    assert entry.details["calibration"]["slides"] == [cmu_svs.name] and entry.details["calibration"]["patches"] == 192
    assert entry.details["quantized_ops"]["Conv"] == 20 and entry.details["float_matmul_or_conv_ops"] == 0
    corrected = entry.details["bias_correction"]  # on by default: every INT8 convolution's bias corrected
    assert corrected["ops"] == 20 and corrected["skipped"] == [] and corrected["rounds"] == 2
    rounded = entry.details["weight_rounding"]  # GPTQ by default: every INT8 convolution's weights
    assert rounded["ops"] == 20 and rounded["skipped"] == [] and rounded["output_error_gptq"] < rounded["output_error_nearest"]
    out = run_cli("verify", "--repo", repo, "--model", ENCODER, "--engine", INT8_KEY)
    assert out.returncode == 0, out.stderr
    parity = ModelRepository(repo).version(ENCODER).info.parity[INT8_KEY]
    assert parity["passed"] is True and parity["min_cosine"] == 0.99 and parity["min_features_cosine"] >= 0.99


def test_auto_picks_a_passed_int8_graph_and_tile_records_it(int8_repo, cmu_svs, tmp_path):
    repo = int8_repo[0]
    assert load_engine(ModelRepository(repo).version(ENCODER), "auto").key == INT8_KEY
    fp32 = run_cli("tile", cmu_svs, "--repo", repo, "--encoder", ENCODER, "--encoder-engine", "onnxruntime",
                   "--out", tmp_path / "fp32.h5")
    auto = run_cli("tile", cmu_svs, "--repo", repo, "--encoder", ENCODER, "--out", tmp_path / "int8.h5")
    assert fp32.returncode == 0 and auto.returncode == 0, fp32.stderr + auto.stderr
    a, b = read_bag(tmp_path / "fp32.h5"), read_bag(tmp_path / "int8.h5")
    assert a.attrs["encoder_engine"] == "onnxruntime" and b.attrs["encoder_engine"] == INT8_KEY
    assert (a.coords == b.coords).all() and len(a.features) > 100
    cosine = (a.features * b.features).sum(1) / (
        (a.features ** 2).sum(1) ** 0.5 * (b.features ** 2).sum(1) ** 0.5)
    assert cosine.min() > 0.99 and not (a.features == b.features).all()


def test_a_missed_gate_refuses_the_artifact(fp32_repo, cmu_svs, tmp_path):
    repo = _copy(fp32_repo[0], tmp_path)
    before = (repo / ENCODER / "histosurv.json").read_text()
    # the fallback runs first (48 calibration patches are enough to judge on) and cannot reach 1.01 either
    with pytest.raises(QuantizationGateError, match=r"smallest per-patch cosine 0\.9\d+ < 1\.01\); with the \d+ "
                       r"most sensitive of \d+ ops in FP32 \(--fp32-fallback 0\.5\) as well.*--force"):
        # nearest rounding: the refusal is what is tested, and GPTQ in each of the search's tries (every one,
        # up to half the ops) would add minutes
        add_engine(repo, ENCODER, INT8_KEY, calibration=cmu_svs, calibration_patches=64, min_cosine=1.01,
                   weight_rounding="nearest")
    assert not (repo / ENCODER / "1" / INT8_FILE).exists()
    assert (repo / ENCODER / "histosurv.json").read_text() == before


def test_force_keeps_a_failed_artifact_which_only_a_named_engine_serves(fp32_repo, cmu_svs, tmp_path):
    repo, cohort_dir, case = fp32_repo
    repo = _copy(repo, tmp_path)
    add_engine(repo, ENCODER, INT8_KEY, calibration=cmu_svs, calibration_patches=64, min_spearman=1.01, force=True,
               fp32_fallback=0, bias_correction=False, weight_rounding="nearest")
    mv = ModelRepository(repo).version(ENCODER)
    gate = mv.info.engines[INT8_KEY].details["gate"]
    assert mv.info.engines[INT8_KEY].details["fp32_fallback"] == {"fp32_ops": [], "max_share": 0, "searched": False}
    assert mv.info.engines[INT8_KEY].details["bias_correction"] is None
    assert mv.info.engines[INT8_KEY].details["weight_rounding"] is None
    assert gate["passed"] is False and gate["forced"] is True and "risk rank correlation" in gate["failed"][0]
    assert load_engine(mv, "auto").key == "onnxruntime"
    assert "accuracy gates failed at export" in why_unusable(mv, INT8_KEY, for_auto=True)
    args = ("predict", "--repo", repo, "--model", "ammasurv", "--case-id", case, "--genes", cohort_dir / "genes.csv",
            "--slide", cmu_svs)
    named = run_cli(*args, "--encoder-engine", INT8_KEY)
    assert named.returncode == 0, named.stderr
    assert json.loads(named.stdout[: named.stdout.rindex("}") + 1])["encoder_engine"] == INT8_KEY


def test_cli_refuses_int8_without_calibration_and_misplaced_flags(tmp_path, capsys):
    from histosurv.cli import main

    assert main(["export", "--repo", str(tmp_path / "r"), "--encoder", "resnet18", "--int8"]) == 2
    assert "--int8 needs --calibration" in capsys.readouterr().err and not (tmp_path / "r").exists()
    assert main(["export", "--repo", str(tmp_path / "r"), "--encoder", "resnet18", "--calibration", str(tmp_path)]) == 2
    assert "--calibration goes with --encoder --int8" in capsys.readouterr().err
    assert main(["export", "--repo", str(tmp_path / "r"), "--encoder", "resnet18", "--fp32-fallback", "0.2"]) == 2
    assert "--fp32-fallback goes with --encoder --int8" in capsys.readouterr().err
    assert main(["export", "--repo", str(tmp_path / "r"), "--encoder", "resnet18", "--no-bias-correction"]) == 2
    assert "--no-bias-correction goes with --encoder --int8" in capsys.readouterr().err
    assert main(["export", "--repo", str(tmp_path / "r"), "--name", "x", "--add-engine", "tensorrt",
                 "--no-bias-correction"]) == 2
    assert "--no-bias-correction do not apply to tensorrt" in capsys.readouterr().err
    assert main(["export", "--repo", str(tmp_path / "r"), "--encoder", "resnet18", "--weight-rounding", "nearest"]) == 2
    assert "--weight-rounding goes with --encoder --int8" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse names the choices
        main(["export", "--repo", str(tmp_path / "r"), "--encoder", "resnet18", "--int8", "--weight-rounding", "up"])
    assert "invalid choice: 'up' (choose from gptq, nearest)" in capsys.readouterr().err.replace("'gptq', 'nearest'", "gptq, nearest")


def test_a_missed_gate_is_met_by_keeping_the_most_sensitive_ops_fp32(fp32_repo, int8_repo, cmu_svs, tmp_path):
    """A cosine gate at 40% of the all-INT8 graph's distance from 1: the fallback keeps the ops that hurt
    most in FP32 (about half of them here), the held-back patches then pass, and the graph has exactly the
    recorded convolutions float."""
    import onnx

    all_int8 = ModelRepository(int8_repo[0]).version(ENCODER).info.engines[INT8_KEY].details["gate"]["cosine_min"]
    strict = 1 - (1 - all_int8) * 0.4
    repo = _copy(fp32_repo[0], tmp_path)
    add_engine(repo, ENCODER, INT8_KEY, calibration=cmu_svs, calibration_patches=256, min_cosine=strict, fp32_fallback=1.0)
    details = ModelRepository(repo).version(ENCODER).info.engines[INT8_KEY].details
    gate, fallback = details["gate"], details["fp32_fallback"]
    assert fallback["all_int8"]["passed"] is False and fallback["all_int8"]["cosine_min"] < strict
    assert gate["passed"] and gate["cosine_min"] >= strict and gate["held_out_patches"] == 64
    kept = fallback["fp32_ops"]
    source = repo / ENCODER / "1" / "model.onnx"
    assert fallback["passed"] and 0 < len(kept) < fallback["of_ops"] == len(quantizable_ops(source))
    assert fallback["trail"][-1]["fp32_ops"] == len(kept) and fallback["trail"][-1]["passed"]
    assert all(not t["passed"] for t in fallback["trail"][:-1])
    graph = onnx.load(str(repo / ENCODER / "1" / INT8_FILE)).graph
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    float_convs = {n.name for n in graph.node if n.op_type == "Conv" and n.input[1] not in dequantized}
    kept_convs = {n.name for n in onnx.load(str(source)).graph.node if n.op_type == "Conv"} & set(kept)
    assert float_convs == kept_convs and details["float_matmul_or_conv_ops"] == len(kept_convs)
    assert load_engine(ModelRepository(repo).version(ENCODER), "auto").key == INT8_KEY


def test_score_and_serve_run_the_int8_encoder_auto_picks_and_give_predicts_risk(int8_repo, cmu_svs, tmp_path):
    """The same slide through `predict --slide`, `score` and ScoreSlide on a loopback server, each with
    the encoder auto picks (INT8 here): one risk, and each output names the INT8 engine."""
    import grpc
    import pandas as pd

    from histosurv.data.tables import GeneTable
    from histosurv.runtime.predict import FusionPredictor
    from histosurv.runtime.server._proto import slide_service_pb2 as spb
    from histosurv.runtime.server._proto import slide_service_pb2_grpc as spb_grpc
    from histosurv.runtime.server.models import ModelStore
    from histosurv.runtime.server.slide_service import SlideRoots, SlideServiceConfig

    from .serving import RunningServer

    repo, cohort_dir, case = int8_repo
    predicted = run_cli("predict", "--repo", repo, "--model", "ammasurv", "--case-id", case,
                        "--genes", cohort_dir / "genes.csv", "--slide", cmu_svs)
    assert predicted.returncode == 0, predicted.stderr
    predicted = json.loads(predicted.stdout[: predicted.stdout.rindex("}") + 1])
    assert predicted["encoder_engine"] == INT8_KEY

    pd.DataFrame([{"path": str(cmu_svs), "slide_id": "S0", "case_id": case}]).to_csv(tmp_path / "slides.csv", index=False)
    scored = run_cli("score", tmp_path / "slides.csv", "--repo", repo, "--out", tmp_path / "run",
                     "--genes", cohort_dir / "genes.csv")
    assert scored.returncode == 0, scored.stderr
    slides = pd.read_parquet(tmp_path / "run" / "slides.parquet")
    assert list(slides["status"]) == ["scored"] and list(slides["encoder_engine"]) == [INT8_KEY]
    assert slides["risk"][0] == pytest.approx(predicted["risk"], abs=1e-5)

    store = ModelStore(repo)
    store.load_all()
    genes = FusionPredictor.from_repository(repo, "ammasurv").genes_for(GeneTable.read(cohort_dir / "genes.csv"), case)
    server = RunningServer(store, slides=SlideServiceConfig(roots=SlideRoots([cmu_svs.parent])))
    try:
        with grpc.insecure_channel(server.url) as channel:
            events = list(spb_grpc.SlideServiceStub(channel).ScoreSlide(
                spb.ScoreSlideRequest(slide_uri=cmu_svs.name, model_name="ammasurv", genes=genes), timeout=600))
    finally:
        server.stop()
    result = events[-1].result
    assert result.encoder_engine == INT8_KEY and result.n_patches == predicted["slides"][0]["n_patches"]
    assert result.risk == pytest.approx(predicted["risk"], abs=1e-5)


def test_calibration_batches_shrink_for_large_graphs_and_do_not_change_the_graph(fp32_repo, cmu_svs, tmp_path, monkeypatch):
    """Calibration's memory grows with its batch (UNI: 24 GB at 16, 9 GB at 4), so large graphs calibrate
    in smaller batches; MinMax ranges are over every patch whatever the batches: the same INT8 graph."""
    from histosurv.export import quantize

    source = fp32_repo[0] / ENCODER / "1" / "model.onnx"
    weights = source.stat().st_size
    assert quantize.calibration_batch(source, available=64 << 30) == 16
    # (6.5 + batch) x the weights within 60% of what is available
    assert quantize.calibration_batch(source, available=int(weights * (6.5 + 4) / 0.6) + 1) == 4
    assert quantize.calibration_batch(source, available=weights) == 1
    patches, _ = quantize.calibration_patches(cmu_svs, 64, 0.5, 48)
    settings = quantize.quantization_settings()
    graphs = {}
    for batch in (16, 4):
        monkeypatch.setattr(quantize, "calibration_batch", lambda _source, b=batch: b)
        quantize.quantize_encoder(source, tmp_path / f"b{batch}.onnx", patches, settings, weight_rounding="nearest")
        graphs[batch] = (tmp_path / f"b{batch}.onnx").read_bytes()
    assert graphs[16] == graphs[4]
