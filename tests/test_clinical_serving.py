"""Clinical covariates through the serving and batch doors: ScoreSlide and StreamFeatures take them by
name and give the risk the predictor gives, DescribeModel lists them, KServe ModelInfer checks the
'clinical' tensor, and ``histosurv score --covariates`` scores an archive with them; every bad value is
refused by name.

One small repository serves the module: the ResNet18 encoder, and two tiny ABMIL models trained on
synthetic bags recorded as its features (so the real slide is scored without overrides), ``clin``
with age, sex and stage and ``plain`` without covariates.
"""

from __future__ import annotations

import json
import shutil

import grpc
import numpy as np
import pandas as pd
import pytest

from histosurv.cli import main as cli_main
from histosurv.data.cohort import load_cohort
from histosurv.data.covariates import CovariateRequest, encode_row
from histosurv.data.features import Bag
from histosurv.data.synth import SynthConfig, write_synthetic_cohort
from histosurv.export.encoder_export import export_encoder
from histosurv.export.models.abmil import ABMILConfig
from histosurv.export.repository_writer import export_run
from histosurv.export.run import save_run
from histosurv.export.training import TrainConfig, train
from histosurv.runtime.pipeline import PatchEncoder, SlideConfig, featurize_slide
from histosurv.runtime.predict import FusionPredictor
from histosurv.runtime.repository import ModelRepository, sha256_file
from histosurv.runtime.server._proto import slide_service_pb2 as spb
from histosurv.runtime.server._proto import slide_service_pb2_grpc as spb_grpc
from histosurv.runtime.server.models import ExecutionConfig, ModelStore
from histosurv.runtime.server.security import SlideRoots
from histosurv.runtime.server.slide_service import SlideServiceConfig

from .conftest import run_cli
from .serving import RunningServer

BATCH = 16  # patches per encoder run, the same everywhere, so every path encodes the same batches
CASE_A = {"age": "63", "sex": "F", "stage": "III"}
CASE_B = {"age": "45", "sex": "M", "stage": "I"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("clinical_serving")
    repo = root / "model_repository"
    encoder = export_encoder(repo, "resnet18", artifacts=())
    synth = SynthConfig(n_patients=60, n_genes=8, n_signal_genes=2, feature_dim=512, min_patches=8, max_patches=16,
                        clinical=True)
    cohort_dir = write_synthetic_cohort(root / "cohort", synth, encoder_record=encoder.encoder_record)
    for name, covariates in (("clin", CovariateRequest(("age", "sex", "stage"))), ("plain", None)):
        cohort = load_cohort(cohort_dir / "clinical.csv", cohort_dir / "genes.csv", cohort_dir / "features",
                             covariates=covariates)
        result = train(cohort, "abmil", ABMILConfig(feature_dim=512, hidden_dim=16, attention_dim=8),
                       TrainConfig(seed=0, epochs=2, batch_size=16, patches_per_slide=8, baseline=False))
        export_run(save_run(root / f"run-{name}", result, cohort), repo, name, artifacts=())
    return repo


@pytest.fixture(scope="module")
def slides(cmu_svs, tmp_path_factory):
    """A slide root with two copies of the real SVS, a manifest of them for two cases, and their covariates."""
    root = tmp_path_factory.mktemp("clinical_slides")
    for i in range(2):
        shutil.copy(cmu_svs, root / f"slide-{i}.svs")
    pd.DataFrame({"path": ["slide-0.svs", "slide-1.svs"], "slide_id": ["S0", "S1"], "case_id": ["A", "B"]}).to_csv(
        root / "manifest.csv", index=False)
    pd.DataFrame([{"case_id": "A", **CASE_A}, {"case_id": "B", **CASE_B}]).to_csv(root / "covariates.csv", index=False)
    return root


@pytest.fixture(scope="module")
def bag(repo, slides):
    """The slide's features as predict makes them."""
    encoder = PatchEncoder.from_repository(repo, "resnet18_encoder")
    return featurize_slide(slides / "slide-0.svs", encoder, SlideConfig(batch_size=BATCH)).bag


@pytest.fixture(scope="module")
def predictor(repo):
    return FusionPredictor.from_repository(repo, "clin")


@pytest.fixture(scope="module")
def server(repo, slides):
    # batching off: each slide's batches reach the encoder as predict's do, so the features are the same bits
    store = ModelStore(repo, execution=ExecutionConfig(batching=False))
    store.load_all()
    running = RunningServer(store, slides=SlideServiceConfig(roots=SlideRoots([slides]), slide=SlideConfig(batch_size=BATCH)))
    yield running
    running.stop()


def _stub(server):
    channel = grpc.insecure_channel(server.url)
    return channel, spb_grpc.SlideServiceStub(channel)


def _expected(predictor, bag, values: dict | None) -> float:
    clinical = None if values is None else encode_row(predictor.clinical_spec, values)
    return predictor.patient("A", [bag], None, clinical).risk


def _stream(features, model="clin", clinical=None, rows=50):
    """Header, then the rows; the covariates ride on the first row chunk (any chunk may carry them)."""
    yield spb.FeatureChunk(model_name=model, datatype="FP32", feature_dim=features.shape[1])
    for start in range(0, len(features), rows):
        chunk = spb.FeatureChunk(features=features[start : start + rows].tobytes())
        if start == 0 and clinical:
            chunk.clinical.update(clinical)
        yield chunk


def _features(n=120, seed=0):
    return np.abs(np.random.default_rng(seed).standard_normal((n, 512))).astype(np.float32)


# --- ScoreSlide and StreamFeatures ----------------------------------------------------------------


def test_score_slide_with_covariates_gives_the_predictors_risk(server, predictor, bag):
    channel, stub = _stub(server)
    with channel:
        scored = list(stub.ScoreSlide(spb.ScoreSlideRequest(slide_uri="slide-0.svs", model_name="clin", clinical=CASE_A),
                                      timeout=300))[-1].result
        bare = list(stub.ScoreSlide(spb.ScoreSlideRequest(slide_uri="slide-0.svs", model_name="clin"), timeout=300))[-1].result
    assert scored.n_patches == bare.n_patches == len(bag)
    assert scored.risk == pytest.approx(_expected(predictor, bag, CASE_A), rel=1e-5, abs=1e-6)
    # an empty map is "no clinical data": all NaN, as predict without --covariate, and the result says so
    assert bare.risk == pytest.approx(_expected(predictor, bag, None), rel=1e-5, abs=1e-6)
    assert abs(scored.risk - bare.risk) > 1e-4
    assert not scored.notes and any("none were sent" in n for n in bare.notes)


def test_stream_features_with_covariates_gives_the_predictors_risk(server, predictor):
    features = _features()
    channel, stub = _stub(server)
    with channel:
        scored = stub.StreamFeatures(_stream(features, clinical=CASE_B), timeout=60)
        partial = stub.StreamFeatures(_stream(features, clinical={"age": "45"}), timeout=60)
        bare = stub.StreamFeatures(_stream(features), timeout=60)
    whole = Bag(features, np.zeros((len(features), 2), np.int64))
    assert scored.risk == pytest.approx(_expected(predictor, whole, CASE_B), rel=1e-5, abs=1e-6)
    # a covariate not sent is a missing value (sex and stage NaN here)
    assert partial.risk == pytest.approx(_expected(predictor, whole, {"age": "45"}), rel=1e-5, abs=1e-6)
    assert bare.risk == pytest.approx(_expected(predictor, whole, None), rel=1e-5, abs=1e-6)
    assert abs(scored.risk - bare.risk) > 1e-4


BAD_COVARIATES = [
    ("clin", {"grade": "2"}, "model 'clin' reads no clinical covariate 'grade'; its covariates are age (numeric)"),
    ("clin", {"stage": "V"}, "clinical covariate 'stage' is 'V', a value the model never saw at training "
                             "(it knows 'I', 'II', 'III', 'IV')"),
    ("clin", {"age": "sixty"}, "clinical covariate 'age' must be a number, got 'sixty'"),
    ("plain", {"age": "63"}, "model 'plain' takes no clinical covariates; the request sends age"),
]


@pytest.mark.parametrize("model, clinical, message", BAD_COVARIATES, ids=["unknown", "unseen", "not a number", "takes none"])
def test_bad_covariates_are_refused_by_name_and_the_server_keeps_serving(server, model, clinical, message):
    channel, stub = _stub(server)
    with channel:
        with pytest.raises(grpc.RpcError) as slide:
            list(stub.ScoreSlide(spb.ScoreSlideRequest(slide_uri="slide-0.svs", model_name=model, clinical=clinical),
                                 timeout=60))
        with pytest.raises(grpc.RpcError) as stream:
            stub.StreamFeatures(_stream(_features(20), model=model, clinical=clinical), timeout=60)
        for caught in (slide, stream):
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in caught.value.details()
        assert stub.StreamFeatures(_stream(_features(20), clinical=CASE_A), timeout=60).n_patches == 20


def test_kserve_checks_the_clinical_tensor(server, predictor):
    tritonclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is a dev dependency")
    from tritonclient.utils import InferenceServerException

    features = _features(20)

    def inputs(clinical, bag_features=features):
        tensors = []
        for name, array in (("features", bag_features), ("clinical", np.asarray(clinical, np.float32))):
            tensor = tritonclient.InferInput(name, list(array.shape), "FP32")
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        return tensors

    with tritonclient.InferenceServerClient(server.url) as client:
        # the wire values a client builds from DescribeModel: age raw, sex F = 0, stage III = 2
        risk = client.infer("clin", inputs([63, 0, 2])).as_numpy("risk").reshape(-1)[0]
        assert risk == pytest.approx(_expected(predictor, Bag(features, np.zeros((20, 2), np.int64)), CASE_A), rel=1e-5, abs=1e-6)
        with pytest.raises(InferenceServerException, match=r"clinical covariate 'stage' must be a category index 0\.\.3") as caught:
            client.infer("clin", inputs([63, 0, 7]))
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert client.is_server_live()
        # NaN is the protocol's "missing" for a covariate (here the sex), not a bad value
        missing_sex = client.infer("clin", inputs([63, np.nan, 2])).as_numpy("risk").reshape(-1)[0]
        bag = Bag(features, np.zeros((20, 2), np.int64))
        assert missing_sex == pytest.approx(_expected(predictor, bag, {"age": "63", "stage": "III"}), rel=1e-5, abs=1e-6)
        assert abs(missing_sex - risk) > 1e-6
        with pytest.raises(InferenceServerException, match="input 'features' contains NaN values"):
            client.infer("clin", inputs([63, 0, 2], np.where(np.arange(20)[:, None] == 3, np.nan, features).astype(np.float32)))
        with pytest.raises(InferenceServerException, match="input 'clinical' contains infinite values"):
            client.infer("clin", inputs([np.inf, 0, 2]))


def test_describe_model_lists_the_covariates(server, repo):
    spec = ModelRepository(repo).version("clin").info.clinical
    channel, stub = _stub(server)
    with channel:
        described = stub.DescribeModel(spb.DescribeModelRequest(model_name="clin"), timeout=30)
        plain = stub.DescribeModel(spb.DescribeModelRequest(model_name="plain"), timeout=30)
    assert [(c.name, c.kind) for c in described.clinical] == [("age", "numeric"), ("sex", "categorical"), ("stage", "categorical")]
    age, sex, stage = described.clinical
    assert (age.mean, age.scale) == pytest.approx((spec.covariates[0].mean, spec.covariates[0].scale)) and not age.categories
    assert list(sex.categories) == ["F", "M"] and list(stage.categories) == ["I", "II", "III", "IV"]
    assert not stage.HasField("mean") and not stage.HasField("scale")  # unset, not 0
    assert described.modalities["clinical"] == "optional"
    assert not plain.clinical and "clinical" not in plain.modalities


# --- histosurv score -------------------------------------------------------------------------------


def _score_args(repo, slides, out, *extra):
    return ["score", str(slides / "manifest.csv"), "--repo", str(repo), "--model", "clin", "--out", str(out),
            "--batch-size", str(BATCH), *map(str, extra)]


def test_score_with_covariates_gives_predicts_risks(repo, slides, predictor, bag, tmp_path):
    out = tmp_path / "run"
    done = run_cli(*_score_args(repo, slides, out, "--covariates", slides / "covariates.csv"))
    assert done.returncode == 0, done.stderr
    assert "scores without" not in done.stderr
    risks = pd.read_parquet(out / "slides.parquet").set_index("slide_id")["risk"]
    # the two copies of one slide differ only in their cases' covariates
    assert risks["S0"] == pytest.approx(_expected(predictor, bag, CASE_A), rel=1e-5, abs=1e-6)
    assert risks["S1"] == pytest.approx(_expected(predictor, bag, CASE_B), rel=1e-5, abs=1e-6)
    assert abs(risks["S0"] - risks["S1"]) > 1e-4
    predicted = run_cli("predict", "--repo", repo, "--model", "clin", "--case-id", "A", "--slide", slides / "slide-0.svs",
                        "--batch-size", BATCH, *[f"--covariate={k}={v}" for k, v in CASE_A.items()])
    assert predicted.returncode == 0, predicted.stderr
    assert risks["S0"] == pytest.approx(json.loads(predicted.stdout)["risk"], rel=1e-5, abs=1e-6)
    assert json.loads((out / "run.json").read_text())["covariates_sha256"] == sha256_file(slides / "covariates.csv")

    # resumed with another table: a changed configuration, refused, not mixed
    changed = tmp_path / "changed.csv"
    pd.DataFrame([{"case_id": "A", **CASE_A}, {"case_id": "B", **CASE_B, "stage": "II"}]).to_csv(changed, index=False)
    again = run_cli(*_score_args(repo, slides, out, "--covariates", changed))
    assert again.returncode == 2 and "covariates_sha256" in again.stderr and "--restart" in again.stderr


def test_score_without_covariates_notes_it_once(repo, slides, predictor, bag, tmp_path, capsys):
    assert cli_main(_score_args(repo, slides, tmp_path / "run")) == 0
    err = capsys.readouterr().err
    assert err.count("no --covariates table was given, so every slide is scored without them") == 1
    risks = pd.read_parquet(tmp_path / "run" / "slides.parquet")["risk"]
    assert risks.to_numpy() == pytest.approx([_expected(predictor, bag, None)] * 2, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(
    "model, rows, message",
    [
        ("plain", [{"case_id": "A", **CASE_A}], "model 'plain' v1 takes no clinical covariates"),
        ("clin", [{"case_id": "A", **CASE_A}, {"case_id": "B", **CASE_B, "stage": "V"}],
         "case 'B': clinical covariate 'stage' is 'V', a value the model never saw"),
        ("clin", [{"case_id": "A", **CASE_A}, {"case_id": "B", **CASE_B, "age": "old"}],
         "case 'B': clinical covariate 'age' must be a number, got 'old'"),
        ("clin", [{"case_id": "A", **CASE_A}], "no row for case 'B'"),
        ("clin", [{"case_id": "A", "grade": 2}], "the table has no column for any covariate of model 'clin'"),
    ],
    ids=["model takes none", "unseen category", "not a number", "case missing", "no covariate column"],
)
def test_score_refuses_bad_covariates_before_any_slide(repo, slides, tmp_path, capsys, model, rows, message):
    table = tmp_path / "covariates.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    args = _score_args(repo, slides, tmp_path / "run", "--covariates", table)
    args[args.index("clin")] = model
    assert cli_main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before the run folder, let alone a slide
