"""Cancellation, deadlines and version changes while a slide is being encoded, made states rather than
races: the slide service's ``before_progress`` hook holds a slide in its worker thread after its first
encoded batch until the test releases it, so "the slide is still encoding" holds on any machine."""

from __future__ import annotations

import shutil
import threading
import time

import grpc
import pytest

tritonclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is a dev dependency")

from histosurv.runtime.pipeline import SlideConfig  # noqa: E402
from histosurv.runtime.server._proto import slide_service_pb2 as spb  # noqa: E402
from histosurv.runtime.server._proto import slide_service_pb2_grpc as spb_grpc  # noqa: E402
from histosurv.runtime.server.models import ModelStore  # noqa: E402
from histosurv.runtime.server.security import SlideRoots  # noqa: E402
from histosurv.runtime.server.slide_service import SlideServiceConfig  # noqa: E402

from .serving import RunningServer, value  # noqa: E402
from .test_model_control import add_version  # noqa: E402
from .test_slide_service import BATCH, _score, _server, _stub  # noqa: E402

AMMASURV = {"model": "ammasurv", "version": 1}


@pytest.fixture(scope="module")
def slide_root(cmu_svs, tmp_path_factory):
    root = tmp_path_factory.mktemp("slides")
    shutil.copy(cmu_svs, root / "cmu.svs")
    return root


@pytest.fixture(scope="module")
def case_genes(slide_repo):
    from histosurv.data.tables import GeneTable
    from histosurv.runtime.predict import FusionPredictor

    repo, cohort_dir, case = slide_repo
    return FusionPredictor.from_repository(repo, "ammasurv").genes_for(GeneTable.read(cohort_dir / "genes.csv"), case)


class Hold:
    """Holds a slide's worker after its first encoded batch until :meth:`release`; ``reached`` is set
    once it is held there."""

    def __init__(self):
        self.reached, self.released = threading.Event(), threading.Event()

    def __call__(self, done: int, total: int) -> None:
        if done > 0 and not self.released.is_set():
            self.reached.set()
            self.released.wait()

    def release(self) -> None:
        self.released.set()


def _until(condition, seconds: float = 60) -> None:
    """Waits for a state the server reaches on its own after the client has gone."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("the server never reached the expected state")
        time.sleep(0.02)


def _workers_idle(running) -> None:
    """Returns once every slide worker has finished what it was doing (one worker: max_active=1)."""
    running.server.slides._executor.submit(lambda: None).result(60)


def test_a_full_queue_answers_resource_exhausted_and_a_cancelled_slide_stops(slide_repo, slide_root, case_genes):
    genes = case_genes
    running = _server(slide_repo[0], slide_root, max_active=1, max_queued=0)
    hold = running.server.slides.before_progress = Hold()
    try:
        channel, stub = _stub(running)
        with channel:
            first = stub.ScoreSlide(spb.ScoreSlideRequest(slide_uri="cmu.svs", model_name="ammasurv", genes=genes))
            assert next(first).progress.stage == "admitted"
            tiled = next(first).progress
            assert tiled.stage == "tiled" and tiled.total > 2 * BATCH
            assert hold.reached.wait(60)  # the first slide holds the only slot, mid-encoding
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.ScoreSlide(spb.ScoreSlideRequest(slide_uri="cmu.svs", model_name="ammasurv", genes=genes), timeout=30))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "retry later" in caught.value.details()
            first.cancel()
        _until(lambda: value(running.scrape(), "nv_inference_request_failure", **AMMASURV, reason="CANCELED") == 1)
        hold.release()
        _workers_idle(running)
        # the cancelled slide stopped at its next batch: at most the batches in flight when it was held
        # (``featurize_slide``'s in_flight = 2) reached the encoder, never the whole slide
        encoded = value(running.scrape(), "nv_inference_count", model="resnet18_encoder", version=1)
        assert encoded <= 2 * BATCH < tiled.total
        metrics = running.scrape()
        assert value(metrics, "nv_inference_request_failure", **AMMASURV, reason="REJECTED") == 1
        assert value(metrics, "nv_inference_pending_request_count", **AMMASURV) == 0
    finally:
        hold.release()
        running.stop()


def test_a_deadline_stops_the_slide(slide_repo, slide_root, case_genes):
    genes = case_genes
    running = _server(slide_repo[0], slide_root, max_active=1)
    hold = running.server.slides.before_progress = Hold()
    try:
        # held mid-encoding, the slide cannot finish before its deadline however fast the machine
        with pytest.raises(grpc.RpcError) as caught:
            _score(running, genes, timeout=2)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        _until(lambda: value(running.scrape(), "nv_inference_request_failure", **AMMASURV, reason="CANCELED") == 1)
        hold.release()
        _workers_idle(running)
        assert value(running.scrape(), "nv_inference_count", model="resnet18_encoder", version=1) <= 2 * BATCH
        # the slot is free again: the next slide is admitted and scored
        assert _score(running, genes)[-1].result.n_patches > 0
    finally:
        hold.release()
        running.stop()


def test_a_running_slide_finishes_on_its_version_while_a_new_one_loads(slide_repo, cmu_svs, case_genes, tmp_path):
    repo = tmp_path / "model_repository"
    shutil.copytree(slide_repo[0], repo)
    store = ModelStore(repo)
    store.load_all()
    config = SlideServiceConfig(roots=SlideRoots([cmu_svs.parent]), slide=SlideConfig(batch_size=2))
    running = RunningServer(store, model_control="explicit", slides=config)
    hold = running.server.slides.before_progress = Hold()
    try:
        with grpc.insecure_channel(running.url) as channel:
            stub = spb_grpc.SlideServiceStub(channel)
            request = spb.ScoreSlideRequest(slide_uri=cmu_svs.name, model_name="ammasurv", genes=case_genes)
            first = stub.ScoreSlide(request, timeout=600)
            assert hold.reached.wait(120)  # the slide is being encoded on version 1, and stays so
            old_model = store.get("ammasurv")
            add_version(repo / "ammasurv", 2)
            with tritonclient.InferenceServerClient(running.url) as client:
                client.load_model("ammasurv")
                assert client.is_model_ready("ammasurv", "2") and not client.is_model_ready("ammasurv", "1")
            assert old_model.in_flight == 1  # replaced, yet still held by the running slide
            hold.release()
            old = [e for e in first][-1].result
            new = list(stub.ScoreSlide(request, timeout=600))[-1].result
        assert old.model_version == "1" and new.model_version == "2"
        assert old.risk == pytest.approx(new.risk, rel=1e-5)  # the same weights, copied
        assert old_model.in_flight == 0
    finally:
        hold.release()
        running.stop()
