"""Property-based fuzzing of what the server decodes from the wire (issue 22): KServe v2 tensors
(names, datatypes, shapes, raw and typed contents, counts), clinical wire values, and the two gRPC
paths on a real loopback server (ModelInfer, and StreamFeatures' chunk streams).

The property everywhere: a named error (an ``InputError``, or a gRPC status with a message that is the
client's to fix) or a correct answer, never another exception, a hang, a crash of the server or a
non-finite answer. Examples are bounded and derandomized for CI; ``HISTOSURV_FUZZ_EXAMPLES=N`` raises
the budget (and draws fresh random examples) for a long run, as ``bench/fuzz.py`` does.
"""

from __future__ import annotations

import math
import os

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from histosurv.data.covariates import ClinicalSpec, Covariate, check_wire_values
from histosurv.errors import InputError
from histosurv.runtime.manifest import TensorSpec
from histosurv.runtime.server._proto import grpc_service_pb2 as pb
from histosurv.runtime.server._proto import grpc_service_pb2_grpc as pb_grpc
from histosurv.runtime.server._proto import slide_service_pb2 as spb
from histosurv.runtime.server._proto import slide_service_pb2_grpc as spb_grpc
from histosurv.runtime.server.models import ModelStore
from histosurv.runtime.server.tensors import TYPED_FIELDS, WIRE_DTYPES, decode_inputs

from .serving import RunningServer


def fuzz_settings(ci_examples: int) -> settings:
    """Bounded and reproducible in CI; ``HISTOSURV_FUZZ_EXAMPLES`` sets a long run's budget (random draws)."""
    long_run = os.environ.get("HISTOSURV_FUZZ_EXAMPLES")
    return settings(
        max_examples=int(long_run) if long_run else ci_examples,
        deadline=None,
        derandomize=not long_run,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


# ---------------------------------------------------------------------------------------------------
# KServe v2 tensors, decoded directly (fast: most of the examples)

D, G, C = 4, 3, 2
SPECS = [
    TensorSpec("features", "FP32", (-1, D)),
    TensorSpec("coords", "INT64", (-1, 2)),
    TensorSpec("genes", "FP32", (G,)),
    TensorSpec("clinical", "FP32", (C,)),
]
DATATYPE_NAMES = sorted(WIRE_DTYPES) + ["BYTES", "fp32", ""]
ODD_DIMS = [-1, -(2**63), 2**31, 2**40 + 1, 2**62, 2**63 - 1]
dims = st.one_of(st.integers(0, 6), st.sampled_from([D, G, C, *ODD_DIMS]))
shapes = st.one_of(st.lists(dims, max_size=4), st.lists(st.just(1), min_size=30, max_size=70), st.lists(st.just(0), max_size=70))
floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
wire_values = {
    "fp32_contents": st.lists(floats, max_size=24),
    "fp64_contents": st.lists(st.floats(), max_size=24),
    "int64_contents": st.lists(st.integers(-(2**63), 2**63 - 1), max_size=24),
    "int_contents": st.lists(st.integers(-(2**31), 2**31 - 1), max_size=24),
    "uint_contents": st.lists(st.integers(0, 2**32 - 1), max_size=24),
    "uint64_contents": st.lists(st.integers(0, 2**64 - 1), max_size=24),
    "bool_contents": st.lists(st.booleans(), max_size=24),
}


def _good_array(spec: TensorSpec, n: int, draw) -> np.ndarray:
    shape = tuple(n if d == -1 else d for d in spec.shape)
    if spec.datatype == "INT64":
        values = draw(st.lists(st.integers(-(2**63), 2**63 - 1) | st.integers(0, 5000), min_size=math.prod(shape), max_size=math.prod(shape)))
        return np.array(values, np.int64).reshape(shape)
    values = draw(st.lists(floats | st.floats(-10, 10, width=32), min_size=math.prod(shape), max_size=math.prod(shape)))
    return np.array(values, np.float32).reshape(shape)


@st.composite
def infer_requests(draw, specs=SPECS, model_name: str = ""):
    """Mostly well-formed requests with a few things wrong: a name, a datatype, a shape, the contents'
    size, kind or values, a tensor left out or sent twice; raw or typed contents."""
    request = pb.ModelInferRequest(model_name=model_name)
    raw = draw(st.booleans())
    n = draw(st.integers(0, 5))
    chosen = draw(st.lists(st.sampled_from(specs), min_size=len(specs) - 1, max_size=len(specs) + 1))
    if draw(st.booleans()):
        chosen = list(specs)
    for spec in chosen:
        array = _good_array(spec, n, draw)
        name = draw(st.sampled_from([spec.name] * 6 + ["patches", "", "features"]))
        datatype = draw(st.sampled_from([spec.datatype] * 6 + DATATYPE_NAMES))
        shape = list(array.shape) if draw(st.integers(0, 3)) else draw(shapes)
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        if datatype == "FP16" and spec.datatype == "FP32":
            with np.errstate(over="ignore"):
                array = array.astype(np.float16)
        if raw:
            data = array.tobytes() if draw(st.integers(0, 3)) else draw(st.binary(max_size=64))
            request.raw_input_contents.append(data)
            if draw(st.integers(0, 9)) == 0:  # the same tensor typed as well
                tensor.contents.fp32_contents.extend([1.0])
        else:
            field = TYPED_FIELDS.get(datatype, "fp32_contents")
            if draw(st.integers(0, 3)):
                getattr(tensor.contents, field).extend(_typed_values(array, field))
            else:
                other = draw(st.sampled_from(sorted(wire_values)))
                getattr(tensor.contents, other).extend(draw(wire_values[other]))
    if raw and draw(st.integers(0, 9)) == 0:
        request.raw_input_contents.append(b"\0" * 8)  # one raw entry too many
    return request


def _typed_values(array: np.ndarray, field: str) -> list:
    flat = array.reshape(-1)
    if field in ("fp32_contents", "fp64_contents"):
        return [float(v) for v in flat]
    if field == "bool_contents":
        return [bool(v) for v in flat]
    low, high = {"int64_contents": (-(2**63), 2**63 - 1), "int_contents": (-(2**31), 2**31 - 1),
                 "uint_contents": (0, 2**32 - 1), "uint64_contents": (0, 2**64 - 1)}[field]
    return [min(max(int(v), low), high) if math.isfinite(v) else 0 for v in flat.astype(np.float64)]


MISSING_MARKERS = st.sampled_from([{}, {"clinical": "values"}, {"clinical": "values", "genes": "whole"}])


def _check_decoded(arrays: dict, specs, missing: dict) -> None:
    """What a decoded request must be: every input, of its spec's dtype and shape, finite where NaN is not
    "missing", features and coords of one non-zero length."""
    assert sorted(arrays) == sorted(s.name for s in specs)
    for spec in specs:
        array = arrays[spec.name]
        assert array.dtype == spec.dtype and spec.check(array) is None, (spec, array.shape, array.dtype)
        if array.dtype.kind == "f":
            assert not np.isinf(array).any()
            nan = np.isnan(array)
            how = missing.get(spec.name)
            assert not nan.any() or how == "values" or (how == "whole" and nan.all())
    lengths = {arrays[s.name].shape[0] for s in specs if s.shape[0] == -1}
    assert len(lengths) == 1 and lengths.pop() > 0


def _decode(request, missing):
    try:
        arrays = decode_inputs(request, SPECS, missing)
    except InputError as e:
        assert str(e)  # a named error says what is wrong
        return None
    _check_decoded(arrays, SPECS, missing)
    return arrays


def _request(*tensors, raw: bool = True):
    """A request of (name, datatype, shape, raw bytes) tensors."""
    request = pb.ModelInferRequest()
    for name, datatype, shape, data in tensors:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(data)
    return request


_GOOD = [("coords", "INT64", [1, 2], b"\0" * 16), ("genes", "FP32", [G], b"\0" * 4 * G), ("clinical", "FP32", [C], b"\0" * 4 * C)]


@fuzz_settings(200)
@given(infer_requests(), MISSING_MARKERS)
# a zero in the shape made the element count 0, but numpy still refused the other dimension's size
@example(_request(("features", "FP32", [0, 2**62], b""), *_GOOD), {})
# 65 dimensions of 1 hold one element: numpy allows at most 64 dimensions
@example(_request(("features", "FP32", [1] * 65, b"\0" * 4), *_GOOD), {})
def test_decoded_tensors_are_named_errors_or_fit_their_specs(request, missing):
    _decode(request, missing)


@st.composite
def good_requests(draw):
    """Well-formed requests (raw or typed, FP16 features or FP32) and the arrays they carry."""
    n = draw(st.integers(1, 5))
    finite = st.floats(-1e4, 1e4, width=16)
    arrays = {
        "features": np.array(draw(st.lists(finite, min_size=n * D, max_size=n * D)), np.float32).reshape(n, D),
        "coords": np.array(draw(st.lists(st.integers(0, 10**7), min_size=n * 2, max_size=n * 2)), np.int64).reshape(n, 2),
        "genes": np.array(draw(st.lists(finite, min_size=G, max_size=G)), np.float32),
        "clinical": np.array(draw(st.lists(finite | st.just(math.nan), min_size=C, max_size=C)), np.float32),
    }
    raw = draw(st.booleans())
    request = pb.ModelInferRequest()
    for name in draw(st.permutations(sorted(arrays))):
        array = arrays[name]
        datatype = "INT64" if name == "coords" else "FP32"
        if raw and name == "features" and draw(st.booleans()):
            datatype = "FP16"
        tensor = request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        if raw:
            request.raw_input_contents.append(array.astype(np.float16 if datatype == "FP16" else array.dtype).tobytes())
        else:
            getattr(tensor.contents, TYPED_FIELDS[datatype]).extend(array.reshape(-1).tolist())
    return request, arrays


@fuzz_settings(200)
@given(good_requests())
def test_well_formed_requests_decode_to_exactly_what_was_sent(case):
    request, sent = case
    decoded = decode_inputs(request, SPECS, {"clinical": "values"})
    for name, array in sent.items():
        np.testing.assert_array_equal(decoded[name], array)  # FP16 values of this range widen exactly


CLINICAL = ClinicalSpec((Covariate("age", "numeric", 60.0, 10.0), Covariate("stage", "categorical", categories=("I", "II", "III"))))


@fuzz_settings(300)
@given(st.lists(st.floats(width=32) | st.integers(-5, 5).map(float), max_size=4))
def test_clinical_wire_values_are_refused_by_name_or_valid_codes(values):
    try:
        out = check_wire_values(CLINICAL, np.array(values, np.float32))
    except InputError as e:
        assert str(e)
        return
    assert out.shape == (2,) and out.dtype == np.float32 and not np.isinf(out).any()
    assert math.isnan(out[1]) or (out[1].is_integer() and 0 <= out[1] < 3)


# ---------------------------------------------------------------------------------------------------
# The same on a real loopback server: ModelInfer and StreamFeatures

CLIENT_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION}


@pytest.fixture(scope="module")
def fuzz_server(tiny_repo):
    store = ModelStore(tiny_repo)
    store.load_all()
    running = RunningServer(store)
    channel = grpc.insecure_channel(running.url)
    yield running, channel
    channel.close()
    running.stop()


def _served_specs(running) -> list[TensorSpec]:
    return list(running.store.get("ammasurv").version.inputs)


def _check_refusal(error: grpc.RpcError) -> None:
    """A refusal is the client's to fix and says why; the one INTERNAL allowed is the engine's non-finite
    answer to finite but absurd features, which is never served as a success (DESIGN.md)."""
    if error.code() == grpc.StatusCode.INTERNAL:
        assert "produced non-finite" in error.details(), error.details()
    else:
        assert error.code() in CLIENT_CODES, (error.code(), error.details())
    assert error.details()


def _check_alive(running, channel) -> None:
    assert pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10).live
    version = running.store.get("ammasurv").version
    features = np.linspace(0, 1, 5 * version.feature_dim, dtype=np.float32).reshape(5, -1)
    response = spb_grpc.SlideServiceStub(channel).StreamFeatures(iter([_chunk(version, features)]), timeout=30)
    assert math.isfinite(response.risk) and response.n_patches == 5


def _chunk(version, features, coords=None, **fields) -> spb.FeatureChunk:
    n = len(features)
    coords = np.stack(np.divmod(np.arange(n), 7), axis=1).astype("<i8") * 256 if coords is None else coords
    genes = np.zeros(len(version.info.gene_names), np.float32)
    return spb.FeatureChunk(model_name="ammasurv", datatype="FP32", feature_dim=features.shape[1],
                            features=features.astype("<f4").tobytes(), coords=coords.tobytes(), genes=genes, **fields)


@fuzz_settings(30)
@given(data=st.data())
def test_fuzzed_model_infer_requests_leave_the_server_serving(fuzz_server, data):
    running, channel = fuzz_server
    specs = _served_specs(running)
    request = data.draw(infer_requests(specs, model_name=data.draw(st.sampled_from(["ammasurv"] * 8 + ["nope", ""]))))
    try:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    except grpc.RpcError as e:
        _check_refusal(e)
    else:
        for output, raw in zip(response.outputs, response.raw_output_contents):
            values = np.frombuffer(raw, {"FP32": "<f4", "INT64": "<i8"}[output.datatype])
            assert np.isfinite(values).all(), output.name
    _check_alive(running, channel)


@st.composite
def feature_streams(draw, dim: int, n_genes: int):
    """A stream of FeatureChunks: the header's fields right or wrong, then chunks whose features and
    coords are whole rows or not, in any number, with the model named again (rightly or not)."""
    header = {
        "model_name": draw(st.sampled_from(["ammasurv"] * 6 + ["", "nope"])),
        "model_version": draw(st.sampled_from([""] * 6 + ["1", "7", "x"])),
        "datatype": draw(st.sampled_from(["", "FP32", "FP32", "FP16", "INT64", "fp32"])),
        "feature_dim": draw(st.sampled_from([dim] * 6 + [0, 1, dim + 1, 2**32 - 1])),
        "top_k": draw(st.integers(0, 2**32 - 1) | st.just(0)),
    }
    itemsize = 2 if header["datatype"] == "FP16" else 4
    chunks = []
    for i in range(draw(st.integers(0, 4))):
        rows = draw(st.integers(0, 4))
        chunk = spb.FeatureChunk(**(header if i == 0 else {}))
        if draw(st.integers(0, 3)):
            values = draw(st.lists(st.floats(width=16) | st.floats(-3, 3, width=16), min_size=rows * dim, max_size=rows * dim))
            data = np.array(values, "<f2" if itemsize == 2 else "<f4").tobytes()
        else:
            data = draw(st.binary(max_size=3 * dim * itemsize))
        chunk.features = data
        if draw(st.integers(0, 3)):
            coords = draw(st.lists(st.integers(0, 5000) | st.integers(-(2**63), 2**63 - 1), min_size=rows * 2, max_size=rows * 2))
            chunk.coords = np.array(coords, "<i8").tobytes()
        else:
            chunk.coords = draw(st.binary(max_size=40))
        if draw(st.integers(0, 2)) == 0:
            chunk.genes.extend(draw(st.lists(st.floats(width=32), min_size=n_genes - 1, max_size=n_genes + 1)))
        elif i == 0:
            chunk.genes.extend([0.5] * n_genes)
        if draw(st.integers(0, 5)) == 0:
            chunk.model_name = draw(st.sampled_from(["ammasurv", "other"]))
        if draw(st.integers(0, 5)) == 0:
            chunk.clinical[draw(st.sampled_from(["age", "stage", ""]))] = draw(st.sampled_from(["61", "x", "nan", ""]))
        chunks.append(chunk)
    return chunks


@fuzz_settings(40)
@given(data=st.data())
def test_fuzzed_feature_streams_leave_the_server_serving(fuzz_server, data):
    running, channel = fuzz_server
    version = running.store.get("ammasurv").version
    chunks = data.draw(feature_streams(version.feature_dim, len(version.info.gene_names)))
    try:
        response = spb_grpc.SlideServiceStub(channel).StreamFeatures(iter(chunks), timeout=30)
    except grpc.RpcError as e:
        _check_refusal(e)
    else:
        assert math.isfinite(response.risk) and response.n_patches > 0
        assert all(math.isfinite(p.attention) for p in response.top_patches)
    _check_alive(running, channel)
