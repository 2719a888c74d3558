"""``inference.GRPCInferenceService``: the KServe v2 protocol plus the Triton extensions its clients use.

Errors a client causes come back as INVALID_ARGUMENT (bad tensors: the message names the tensor and
the problem) or NOT_FOUND (unknown model or version); the server stays live. They are not inference
failures (``nv_inference_request_failure`` and ModelStatistics' ``fail`` count only what the server
failed to do, as Triton's reasons do); every non-OK call is counted by code in the access recorder. Engines run in worker
threads so one slow request does not stall the event loop that serves the others.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

import grpc

from ... import __version__
from ...data.covariates import check_wire_values
from ...data.features import coords_problem
from ...errors import HistosurvError, InputError, MismatchError, MissingInputError, RepositoryError
from ..metrics import ServerMetrics
from ..finite import check_input_range, check_outputs
from ..triton_config import PLATFORMS, serving_parameters
from ._proto import grpc_service_pb2 as pb
from ._proto import grpc_service_pb2_grpc as pb_grpc
from . import access_log
from ..repository import check_model_name
from .models import LoadedModel, ModelNotFound, ModelStore, check_repository_name
from .scheduler import QueueFull
from .tensors import decode_inputs, encode_outputs

__all__ = ["InferenceServicer", "SERVER_NAME", "EXTENSIONS"]

SERVER_NAME = "histosurv"
EXTENSIONS = ["model_configuration", "statistics", "model_repository"]
_DATA_TYPES = {"FP32": "TYPE_FP32", "FP16": "TYPE_FP16", "INT64": "TYPE_INT64", "INT32": "TYPE_INT32", "UINT8": "TYPE_UINT8"}


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, store: ModelStore, model_control: str = "none", metrics: ServerMetrics | None = None, changed=None):
        self.store, self.model_control = store, model_control
        self.metrics = metrics or ServerMetrics(store.loaded)
        self.changed = changed  # awaited after an explicit load or unload (the server's health follows)

    # --- health and metadata -------------------------------------------------------------------

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.store.ready)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)

    async def ModelReady(self, request, context):
        try:
            self.store.get(request.name, request.version)
        except ModelNotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ModelMetadata(self, request, context):
        model = await self._model(request.name, request.version, context)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[str(model.version.version)],
            platform=_platform(model),
            inputs=[tensor(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in model.version.inputs],
            outputs=[tensor(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in model.version.outputs],
        )

    async def ModelConfig(self, request, context):
        model = await self._model(request.name, request.version, context)
        config = pb.ModelConfig(name=model.name, platform=_platform(model), max_batch_size=0)
        for t in model.version.inputs:
            config.input.add(name=t.name, data_type=_DATA_TYPES[t.datatype], dims=list(t.shape))
        for t in model.version.outputs:
            config.output.add(name=t.name, data_type=_DATA_TYPES[t.datatype], dims=list(t.shape))
        for key, value in serving_parameters(model.version.info).items():
            config.parameters[key].string_value = value
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(self, request, context):
        if request.name:
            models = [await self._model(request.name, request.version, context)]
        else:
            models = self.store.loaded()
        return pb.ModelStatisticsResponse(model_stats=[_statistics(m) for m in models])

    # --- inference -----------------------------------------------------------------------------

    async def ModelInfer(self, request, context):
        received = time.perf_counter_ns()
        async with self._leased(request.model_name, request.model_version, context) as model:
            stats, version = model.stats, str(model.version.version)
            access_log.note(patches=_bag_size(request, model.version.inputs))
            try:
                inputs = decode_inputs(request, model.version.inputs, missing_markers(model.version.info))
                check_input_range(model.version.info, inputs)
                if "coords" in inputs and (problem := coords_problem(inputs["coords"])):
                    raise InputError(problem)
                if "clinical" in inputs and model.version.info.clinical is not None:
                    # a category index the model never saw would one-hot to "no category" without a word
                    inputs["clinical"] = check_wire_values(model.version.info.clinical, inputs["clinical"])
                decoded = time.perf_counter_ns()
                timed = await model.scheduler.run(lambda: check_outputs(model.engine.run(inputs), model.name))
                ran = time.perf_counter_ns()
                response = pb.ModelInferResponse(model_name=model.name, model_version=version, id=request.id)
                encode_outputs(response, timed.value, model.version.outputs, [o.name for o in request.outputs])
            except asyncio.CancelledError:  # the client went away or its deadline passed
                stats.failed("CANCELED", time.perf_counter_ns() - received)
                raise
            except Exception as e:
                code, reason, message = failure_status(e, model.name)
                if reason is not None:
                    stats.failed(reason, time.perf_counter_ns() - received)
                await context.abort(code, message)
            finished = time.perf_counter_ns()
            access_log.note(queue_ns=timed.queue_ns, compute_ns=timed.run_ns)
            stats.executed(finished - received, timed.run_ns, timed.queue_ns, decoded - received, finished - ran)
            self.metrics.request_seconds.labels(model.name, version, "ModelInfer").observe((finished - received) / 1e9)
            self.metrics.queue_seconds.labels(model.name, version).observe(timed.queue_ns / 1e9)
            return response

    # --- repository control --------------------------------------------------------------------

    async def RepositoryIndex(self, request, context):
        await self._repository(request.repository_name, context)
        index = pb.RepositoryIndexResponse.ModelIndex
        rows = [index(name=n, version=v, state=s, reason=self._relative(r)) for n, v, s, r in self.store.index()]
        if request.ready:
            rows = [r for r in rows if r.state == "READY"]
        return pb.RepositoryIndexResponse(models=rows)

    async def RepositoryModelLoad(self, request, context):
        await self._explicit(request.repository_name, context)
        await self._model_folder(request.model_name, context)
        if request.parameters:
            # Triton's "config" override and "file:" contents would serve something the repository does not
            # hold (and could name files anywhere); a version is served only as exported into the repository.
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"load parameters {', '.join(sorted(request.parameters))} are not taken: histosurv serves a model "
                "only as exported into its repository (no config overrides or files in the request)",
            )
        try:
            await asyncio.to_thread(self.store.load, request.model_name)
        except HistosurvError as e:
            await context.abort(grpc.StatusCode.INTERNAL, f"failed to load '{request.model_name}': {self._relative(str(e))}")
        finally:
            await self._changed()
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        await self._explicit(request.repository_name, context)
        await self._name_shape(request.model_name, context)
        try:
            self.store.unload(request.model_name)
        except ModelNotFound as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        await self._changed()
        return pb.RepositoryModelUnloadResponse()

    # --- helpers -------------------------------------------------------------------------------

    async def _model(self, name: str, version: str, context) -> LoadedModel:
        if not name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "model name is empty")
        try:
            model = self.store.get(name, version)
        except ModelNotFound as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        access_log.note(model=model.name, version=str(model.version.version))
        return model

    @asynccontextmanager
    async def _leased(self, name: str, version: str, context) -> AsyncIterator[LoadedModel]:
        """The model, held until the request is done (a reload meanwhile does not take it away)."""
        model = await self._model(name, version, context)
        model.acquire()
        try:
            yield model
        finally:
            model.release()

    async def _repository(self, name: str, context) -> None:
        try:
            check_repository_name(name)
        except HistosurvError as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))

    async def _name_shape(self, name: str, context) -> None:
        try:
            check_model_name(name)
        except InputError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    async def _model_folder(self, name: str, context) -> None:
        """Only a model folder of the repository may be loaded: never ``../x`` or an absolute path."""
        await self._name_shape(name, context)
        known = self.store.repository.models()
        if name not in known:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"the model repository has no model '{name}' (models: {', '.join(known) or 'none'})",
            )

    def _relative(self, message: str) -> str:
        """A message for a remote client, with the repository's paths relative to its root."""
        root = str(self.store.repository.root)
        return message.replace(root + "/", "").replace(root, "the model repository")

    async def _changed(self) -> None:
        if self.changed is not None:
            await self.changed()

    async def _explicit(self, repository: str, context) -> None:
        await self._repository(repository, context)
        if self.model_control != "explicit":
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"explicit model load/unload is not allowed with --model-control {self.model_control}",
            )


def missing_markers(info) -> dict[str, str]:
    """Where NaN means "missing" for this model version: any clinical covariate; a whole gene vector
    where genes are optional (the manifest's modalities)."""
    markers = {"clinical": "values"} if info.clinical is not None else {}
    if "genes" in info.optional_inputs:
        markers["genes"] = "whole"
    return markers


def failure_status(error: Exception, model: str) -> tuple[grpc.StatusCode, str | None, str]:
    """(gRPC status, Triton failure reason, message) for an exception a request ended with. The reason
    is None for a request refused before inference (the client's mistake): Triton does not count
    request validation as an inference failure, and an alert on the failure ratio must not fire on it."""
    if isinstance(error, QueueFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "REJECTED", str(error)
    if isinstance(error, MissingInputError):
        return grpc.StatusCode.NOT_FOUND, None, str(error)
    if isinstance(error, (MismatchError, RepositoryError)):  # valid request, but this server cannot serve it as asked
        return grpc.StatusCode.FAILED_PRECONDITION, None, str(error)
    if isinstance(error, InputError):
        return grpc.StatusCode.INVALID_ARGUMENT, None, str(error)
    if isinstance(error, PermissionError):
        return grpc.StatusCode.PERMISSION_DENIED, None, str(error)
    # an engine failure: the request fails, the server goes on
    return grpc.StatusCode.INTERNAL, "BACKEND", f"model '{model}' failed: {type(error).__name__}: {error}"


def _bag_size(request, specs) -> int | None:
    """Patches in the request, as its shape declares them (first dimension of the first input whose
    first dimension is variable: features, or an encoder's patches); None where it sends none."""
    variable = {s.name for s in specs if s.shape and s.shape[0] == -1}
    for tensor in request.inputs:
        if tensor.name in variable and tensor.shape:
            return int(tensor.shape[0])
    return None


def _platform(model: LoadedModel) -> str:
    """Triton's platform name where Triton has one for the backend (onnxruntime_onnx, tensorrt_plan)."""
    return PLATFORMS[model.engine.name][0] if model.engine.name in PLATFORMS else f"histosurv_{model.engine.name}"


def _statistics(model: LoadedModel) -> pb.ModelStatistics:
    s = model.stats
    with s.lock:
        duration = lambda d: pb.StatisticDuration(count=d.count, ns=d.ns)  # noqa: E731
        return pb.ModelStatistics(
            name=model.name,
            version=str(model.version.version),
            last_inference=s.last_inference_ms,
            inference_count=s.inference_count,
            execution_count=s.execution_count,
            inference_stats=pb.InferStatistics(
                success=duration(s.success),
                fail=duration(s.fail),
                queue=duration(s.queue),
                compute_input=duration(s.compute_input),
                compute_infer=duration(s.compute_infer),
                compute_output=duration(s.compute_output),
            ),
        )
