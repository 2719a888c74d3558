"""``histosurv.v1.SlideService``: a whole slide scored in one call, and bags streamed in chunks.

ScoreSlide runs the same pipeline as ``histosurv predict --slide`` (tissue mask, patch grid, read-ahead
patch stream, encoder, fusion model) inside the server, so it returns the same risk: the encoder and
the µm/px are chosen among the loaded models by the same rule (``encoder_match``), and a request
that would feed a model another encoder's features, or patches at another scale, than its training
bags is refused (FAILED_PRECONDITION) unless it asks for the override, which the result records. The
encoder runs through its model's dynamic batcher, which joins batches of concurrent slides.
Clinical covariates come as text by name (``clinical``) and are encoded with the model's record of
them, as ``histosurv predict --covariate`` encodes them. DescribeModel returns a model's serving facts
as typed records. At most ``max_active`` slides are read at once and ``max_queued`` more may wait; beyond that a request gets
RESOURCE_EXHAUSTED at once. A client that cancels, or whose deadline passes, stops its slide at the
next patch batch, and its queued patches are dropped before they are encoded.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Mapping

import grpc
import numpy as np

from ...data.covariates import encode_row
from ...data.features import Bag
from ...errors import InputError, MissingInputError
from ..encoder_match import EncoderChoice, choose_encoder
from ..explain import explain_bag, top_patches
from ..explain.patches import DEFAULT_CROP
from ..finite import check_outputs
from ..metrics import ServerMetrics
from ..pipeline import PatchEncoder, Ready, SlideConfig, featurize_slide
from ..predict import FusionPredictor
from ..survival import group_label
from . import access_log
from .describe import describe_model
from .explanation import MAX_CROPS, explanation_message
from ._proto import slide_service_pb2 as spb
from ._proto import slide_service_pb2_grpc as spb_grpc
from .kserve import failure_status
from .models import LoadedModel, ModelNotFound, ModelStore
from .scheduler import QueueFull
from .security import SlideRoots

__all__ = ["SlideService", "SlideServiceConfig"]

DATATYPES = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2")}


@dataclass
class SlideServiceConfig:
    roots: SlideRoots = field(default_factory=lambda: SlideRoots([]))
    slide: SlideConfig = SlideConfig()
    max_active: int = 2  # slides read and encoded at once
    max_queued: int = 16  # slides waiting for a slot
    top_k: int = 10
    max_bag: int = 1 << 20  # patches a streamed bag may have
    patch_mpp: float | None = None  # server-wide override: cut every slide at this µm/px (recorded in results)


class SlideCancelled(Exception):
    """Raised in a slide's worker thread once its client has gone."""


class SlideService(spb_grpc.SlideServiceServicer):
    def __init__(self, store: ModelStore, config: SlideServiceConfig, metrics: ServerMetrics):
        self.store, self.config, self.metrics = store, config, metrics
        self._slots = asyncio.Semaphore(config.max_active)
        self._waiting = 0
        self._executor = ThreadPoolExecutor(config.max_active, thread_name_prefix="slide")
        # tests: called as before_progress(done, total) in a slide's worker thread before each progress
        # event (done = 0: tiled; then after each encoded batch), e.g. to hold a slide mid-encoding
        self.before_progress = None

    # --- ScoreSlide ----------------------------------------------------------------------------

    async def ScoreSlide(self, request, context):
        received = time.perf_counter_ns()
        if not request.model_name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "model_name is empty")
        with ExitStack() as held:
            model = await self._lease(held, request.model_name, request.model_version, context)
            fusion = FusionPredictor(model.version, model.engine)
            cancelled = threading.Event()
            path = None
            try:
                path = self.config.roots.resolve(request.slide_uri)
                genes = self._genes(fusion, request.genes)
                clinical, clinical_notes = _clinical(fusion, request.clinical)
                encoder_model, choice = self._encoder(held, model, request)
                admitted = await self._admit(model)
                try:
                    yield _progress("admitted", 0, 0)
                    async for event in self._featurize(path, encoder_model, choice, request, cancelled):
                        if isinstance(event, spb.ScoreSlideEvent):
                            yield event
                        else:
                            slide = event
                finally:
                    self._slots.release()
                yield _progress("fuse", 0, 1)
                result = await self._fuse(model, fusion, slide.bag, genes, clinical, request.top_k, request.id)
                if request.explain:
                    yield _progress("explain", 0, 1)
                    await self._explain(model, fusion, slide.bag, genes, clinical, result, path)
            except asyncio.CancelledError:
                cancelled.set()
                model.stats.failed("CANCELED", time.perf_counter_ns() - received)
                raise
            except Exception as e:
                cancelled.set()
                code, reason, message = failure_status(e, model.name)
                if reason is not None:
                    model.stats.failed(reason, time.perf_counter_ns() - received)
                # a reader's error names the file it opened: the client hears its own uri, not the server's paths
                await context.abort(code, self.config.roots.redact(message, request.slide_uri, path))
            finished = time.perf_counter_ns()
            seconds = {**slide.seconds, "fuse": result.run_ns / 1e9, "queue": (admitted + result.queue_ns) / 1e9}
            seconds["total"] = (finished - received) / 1e9
            access_log.note(patches=len(slide.bag), queue_ns=admitted + result.queue_ns,
                            compute_ns=int(slide.seconds["total"] * 1e9) + result.run_ns)
            self._record(model, "ScoreSlide", received, finished, admitted + result.queue_ns, slide.seconds["total"], result)
            self.metrics.observe_stages(model.name, seconds)
            self.metrics.slide_patches.labels(model.name).observe(len(slide.bag))
            response = result.response
            response.stage_seconds.update(seconds)
            response.slide_sha256 = slide.bag.attrs.get("slide_sha256", "")
            response.encoder = encoder_model.version.label
            response.encoder_engine = encoder_model.engine.key
            response.patch_mpp = choice.mpp
            response.overrides.update(choice.overrides)
            response.notes.extend([*choice.notes, *clinical_notes])
            yield spb.ScoreSlideEvent(result=response)

    async def _featurize(self, path, encoder_model: LoadedModel, choice: EncoderChoice, request, cancelled: threading.Event):
        """Yields progress events while the slide is featurized in a worker thread, then its features."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        encoder = PatchEncoder(encoder_model.version, encoder_model.engine, choice.mpp, choice.overrides)
        submit = self._submit_function(encoder_model, encoder, cancelled)
        config = self.config.slide
        if request.slide_mpp:
            config = replace(config, slide_mpp=float(request.slide_mpp))

        def progress(done: int, total: int) -> None:
            if self.before_progress is not None:
                self.before_progress(done, total)
            if cancelled.is_set():
                raise SlideCancelled()
            stage = "tiled" if done == 0 else "encode"
            loop.call_soon_threadsafe(events.put_nowait, (stage, done, total))

        work = loop.run_in_executor(self._executor, featurize_slide, path, encoder, config, progress, submit)
        getter = None
        try:
            while True:
                getter = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({work, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield _progress(*getter.result())
                else:
                    getter.cancel()
                if work in done:
                    while not events.empty():
                        yield _progress(*events.get_nowait())
                    yield work.result()
                    return
        except BaseException:
            cancelled.set()  # the worker stops at its next batch
            raise
        finally:
            if getter is not None and not getter.done():
                getter.cancel()  # a cancelled slide must not leave its progress reader pending

    def _submit_function(self, encoder_model: LoadedModel, encoder: PatchEncoder, cancelled: threading.Event):
        """How the slide's batches reach the encoder: through its dynamic batcher, or (batching off)
        straight to the engine, each slide on its own."""
        batcher = encoder_model.batcher
        stats = encoder_model.stats
        observe = self.metrics.encoder_batch.labels(encoder_model.name).observe

        def direct(patches: np.ndarray):
            started = time.perf_counter_ns()
            features = encoder.encode(patches)
            ran = time.perf_counter_ns() - started
            stats.executed(ran, ran, inferences=len(patches))
            observe(len(patches))
            return Ready(features)

        def batched(patches: np.ndarray):
            problem = encoder.spec.check(patches)
            if problem:
                raise InputError(f"encoder {encoder_model.name!r}: {problem}")
            return _Queued(batcher.submit(np.ascontiguousarray(patches, dtype=np.uint8)), cancelled)

        return direct if batcher is None else batched

    # --- StreamFeatures ------------------------------------------------------------------------

    async def StreamFeatures(self, request_iterator, context):
        received = time.perf_counter_ns()
        with ExitStack() as held:
            model = fusion = None
            rows, coords, genes, clinical = [], [], None, None
            header = None
            n_rows = 0
            async for chunk in request_iterator:
                if header is None:
                    header = chunk
                    if not chunk.model_name:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first chunk must name the model (model_name)")
                    access_log.note(request_id=chunk.id)
                    model = await self._lease(held, chunk.model_name, chunk.model_version, context)
                    fusion = FusionPredictor(model.version, model.engine)
                    problem = _check_header(chunk, fusion)
                    if problem:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
                    dtype, dim = DATATYPES[chunk.datatype or "FP32"], int(chunk.feature_dim)
                elif chunk.model_name and chunk.model_name != header.model_name:
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"chunk names model '{chunk.model_name}' but the stream is for '{header.model_name}'",
                    )
                if chunk.features:
                    if len(chunk.features) % (dim * dtype.itemsize):
                        await context.abort(
                            grpc.StatusCode.INVALID_ARGUMENT,
                            f"'features' chunk of {len(chunk.features)} bytes is not whole rows of {dim} "
                            f"{header.datatype or 'FP32'} values ({dim * dtype.itemsize} bytes each)",
                        )
                    block = np.frombuffer(chunk.features, dtype).reshape(-1, dim)
                    n_rows += len(block)
                    if n_rows > self.config.max_bag:
                        await context.abort(
                            grpc.StatusCode.INVALID_ARGUMENT, f"bag has more than {self.config.max_bag} patches (the server's limit)"
                        )
                    rows.append(block)
                    access_log.note(patches=n_rows)
                if chunk.coords:
                    if len(chunk.coords) % 16:
                        await context.abort(
                            grpc.StatusCode.INVALID_ARGUMENT,
                            f"'coords' chunk of {len(chunk.coords)} bytes is not whole (x, y) INT64 pairs (16 bytes each)",
                        )
                    coords.append(np.frombuffer(chunk.coords, "<i8").reshape(-1, 2))
                if chunk.genes:
                    genes = np.asarray(chunk.genes, np.float32)
                if chunk.clinical and clinical is None:
                    clinical = dict(chunk.clinical)
            if header is None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the stream carried no chunks")
            try:
                features = np.concatenate(rows) if rows else np.zeros((0, dim), np.float32)
                if coords:
                    positions = np.concatenate(coords)
                elif "coords" in fusion.specs:
                    raise InputError(f"model '{model.name}' uses patch positions: send 'coords' with the features")
                else:
                    positions = np.zeros((len(features), 2), np.int64)
                bag = Bag(features.astype(np.float32), positions, {}, "stream")
                if "genes" in fusion.specs:
                    fusion.check_genes(genes)
                covariates, clinical_notes = _clinical(fusion, clinical or {})
                result = await self._fuse(model, fusion, bag, genes, covariates, header.top_k, header.id)
            except asyncio.CancelledError:
                model.stats.failed("CANCELED", time.perf_counter_ns() - received)
                raise
            except Exception as e:
                code, reason, message = failure_status(e, model.name)
                if reason is not None:
                    model.stats.failed(reason, time.perf_counter_ns() - received)
                await context.abort(code, message)
            finished = time.perf_counter_ns()
            access_log.note(queue_ns=result.queue_ns, compute_ns=result.run_ns)
            self._record(model, "StreamFeatures", received, finished, result.queue_ns, 0, result)
            self.metrics.slide_patches.labels(model.name).observe(len(bag))
            self.metrics.stage_seconds.labels(model.name, "fuse").observe(result.run_ns / 1e9)
            result.response.stage_seconds.update(
                {"fuse": result.run_ns / 1e9, "queue": result.queue_ns / 1e9, "total": (finished - received) / 1e9}
            )
            result.response.notes.extend(clinical_notes)
            return result.response

    # --- shared --------------------------------------------------------------------------------

    async def _lease(self, held: ExitStack, name: str, version: str, context) -> LoadedModel:
        try:
            model = held.enter_context(self.store.lease(name, version))
        except ModelNotFound as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        access_log.note(model=model.name, version=str(model.version.version))
        return model

    def _encoder(self, held: ExitStack, model: LoadedModel, request) -> tuple[LoadedModel, EncoderChoice]:
        """The loaded encoder for ``model`` and the scale to cut at, chosen as the CLI chooses them."""
        loaded = self.store.loaded()
        if request.encoder_name and request.encoder_name not in {m.name for m in loaded}:
            raise MissingInputError(
                f"patch encoder '{request.encoder_name}' is not loaded (encoders: "
                f"{', '.join(m.name for m in loaded if m.is_encoder) or 'none'})"
            )
        choice = choose_encoder(
            [m.version for m in loaded], model.version, request.encoder_name or None,
            request.patch_mpp or self.config.patch_mpp, request.allow_encoder_mismatch, where="this server's loaded models",
        )
        try:
            encoder = held.enter_context(self.store.lease(choice.encoder.name, str(choice.encoder.version)))
        except ModelNotFound as e:  # unloaded or replaced since the choice: the client may retry
            raise InputError(str(e)) from None
        return encoder, choice

    # --- DescribeModel -------------------------------------------------------------------------

    async def DescribeModel(self, request, context):
        if not request.model_name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "model_name is empty")
        try:
            model = self.store.get(request.model_name, request.model_version)
        except ModelNotFound as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        return describe_model(model.version, model.engine.key)

    @staticmethod
    def _genes(fusion: FusionPredictor, genes) -> np.ndarray | None:
        if "genes" not in fusion.specs:
            if len(genes):
                raise InputError(f"model '{fusion.version.name}' takes no genes, but {len(genes)} were sent")
            return None
        return fusion.check_genes(np.asarray(genes, np.float32) if len(genes) else None)

    async def _admit(self, model: LoadedModel) -> int:
        """Waits for a slide slot; returns the nanoseconds waited. Raises QueueFull when too many wait."""
        if self._slots.locked() and self._waiting >= self.config.max_queued:
            raise QueueFull(
                f"{self.config.max_active} slides are being scored and {self._waiting} wait (limit {self.config.max_queued}); retry later"
            )
        start = time.perf_counter_ns()
        self._waiting += 1
        with model.stats.lock:
            model.stats.pending += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
            with model.stats.lock:
                model.stats.pending -= 1
        return time.perf_counter_ns() - start

    async def _fuse(self, model: LoadedModel, fusion: FusionPredictor, bag: Bag, genes, clinical, top_k: int, request_id: str):
        inputs = fusion.inputs_for(bag, genes, clinical)
        timed = await model.scheduler.run(lambda: check_outputs(model.engine.run(inputs), model.name))
        outputs = timed.value
        response = spb.ScoreResult(
            id=request_id, model_name=model.name, model_version=str(model.version.version),
            risk=float(np.asarray(outputs["risk"]).reshape(-1)[0]), n_patches=len(bag),
        )
        head = model.version.info.survival
        if "survival" in outputs and head is not None and head.has_curves:
            response.survival.extend(float(v) for v in np.asarray(outputs["survival"]).reshape(-1))
            response.survival_months.extend(head.times)
            group = int(np.asarray(outputs["risk_group"]).reshape(-1)[0])
            response.risk_group = group
            response.risk_group_label = group_label(head, group)
        attention = outputs.get("attention")
        if attention is not None:
            attention = np.asarray(attention, np.float32).reshape(-1)
            k = min(top_k or self.config.top_k, len(attention))
            for i in np.argsort(-attention, kind="stable")[:k]:
                x, y = (int(v) for v in bag.coords[i])
                response.top_patches.add(x=x, y=y, attention=float(attention[i]), index=int(i))
        return _Fused(response, timed.queue_ns, timed.run_ns, attention)

    async def _explain(self, model: LoadedModel, fusion: FusionPredictor, bag: Bag, genes, clinical, fused, path) -> None:
        """Fills the result's explanation (see ``runtime.explain``): the occlusion passes run as one job of the
        model's scheduler; the top patches' crops are read from the slide in a slide worker."""
        k = max(1, min(len(fused.response.top_patches), MAX_CROPS))  # crops of the result's first top patches
        explained = await model.scheduler.run(lambda: explain_bag(fusion, bag, genes, clinical, fused.attention, k=k))
        e = explained.value
        crops = []
        if e.top_patches:
            attention = np.array([p.attention for p in e.top_patches])
            coords = np.array([[p.x, p.y] for p in e.top_patches], np.int64)
            size = int(bag.attrs.get("patch_size_level0") or 0) or None
            crops = await asyncio.get_running_loop().run_in_executor(
                self._executor, top_patches, attention, coords, MAX_CROPS, path, size, DEFAULT_CROP, self.config.slide.reader
            )
            for crop in crops:  # rows of this re-ranking are rows of the top list: back to the bag's
                crop.index = e.top_patches[crop.index].index
        fused.response.explanation.CopyFrom(explanation_message(e, crops))

    def _record(self, model: LoadedModel, rpc: str, received: int, finished: int, queue_ns: int, input_s: float, fused) -> None:
        model.stats.executed(finished - received, fused.run_ns, queue_ns, int(input_s * 1e9))
        version = str(model.version.version)
        self.metrics.request_seconds.labels(model.name, version, rpc).observe((finished - received) / 1e9)
        self.metrics.queue_seconds.labels(model.name, version).observe(queue_ns / 1e9)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class _Queued:
    """A batch waiting in the batcher; waiting for it gives up once the slide is cancelled."""

    def __init__(self, future, cancelled: threading.Event):
        self.future, self.cancelled = future, cancelled

    def result(self) -> np.ndarray:
        while True:
            try:
                return self.future.result(timeout=0.1)
            except TimeoutError:
                if self.cancelled.is_set():
                    self.future.cancel()  # dropped by the batcher if not yet taken
                    raise SlideCancelled() from None

    def cancel(self) -> None:
        self.future.cancel()


@dataclass
class _Fused:
    response: spb.ScoreResult
    queue_ns: int
    run_ns: int
    attention: np.ndarray | None = None


def _progress(stage: str, done: int, total: int) -> spb.ScoreSlideEvent:
    return spb.ScoreSlideEvent(progress=spb.Progress(stage=stage, done=done, total=total))


def _clinical(fusion: FusionPredictor, values: Mapping[str, str]) -> tuple[np.ndarray | None, list[str]]:
    """A request's covariates (name -> text) as the model's wire values, and the notes for its result;
    (None, ...) is "scored without covariates" (all NaN). InputError names a covariate the model does not
    read, a value that is not a number, or a category it never saw."""
    spec, name = fusion.clinical_spec, fusion.version.name
    if spec is None:
        if values:
            raise InputError(f"model '{name}' takes no clinical covariates; the request sends {', '.join(sorted(values))}")
        return None, []
    if not values:
        return None, [f"model '{name}' takes clinical covariates ({', '.join(spec.names)}); none were sent, so it "
                      "scored without them"]
    # a misspelt name would otherwise be silently a missing covariate
    unknown = sorted(set(values) - set(spec.names))
    if unknown:
        raise InputError(
            f"model '{name}' reads no clinical covariate {', '.join(map(repr, unknown))}; its covariates are "
            f"{spec.describe()}"
        )
    return encode_row(spec, dict(values)), []


def _check_header(chunk, fusion: FusionPredictor) -> str | None:
    if fusion.feature_dim is None:
        return f"model '{fusion.version.name}' takes no image features"
    if (chunk.datatype or "FP32") not in DATATYPES:
        return f"datatype '{chunk.datatype}' is not supported for features (FP32 or FP16)"
    if chunk.feature_dim != fusion.feature_dim:
        return f"feature_dim is {chunk.feature_dim} but model '{fusion.version.name}' takes {fusion.feature_dim}-d features"
    return None
