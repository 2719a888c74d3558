"""KServe v2 tensors <-> numpy, checked against a model's tensor specs.

Every problem a client can cause is a ``BadTensor`` naming the tensor and what is wrong with it,
which the servicer answers with INVALID_ARGUMENT: unknown, missing or repeated inputs, a datatype the
input does not take, a wrong rank or size, raw bytes that do not fill the shape, typed contents of the
wrong kind or count, a tensor sent both typed and raw, NaN or infinite values, an empty bag, and features
and coords of different lengths.

NaN is the protocol's "missing" where a model says an input may be missing (``missing``): any value of
clinical covariates, or a whole optional gene vector; anywhere else it is refused. Sizes are computed in
Python integers: a shape of [2^62, 2^62] must not wrap around to "needs 0 bytes".
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from ...errors import InputError
from ..manifest import DATATYPES, TensorSpec

__all__ = ["BadTensor", "decode_inputs", "encode_outputs", "TYPED_FIELDS"]

# The InferTensorContents field that carries each datatype when it is not sent raw (FP16: raw only).
TYPED_FIELDS = {
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "INT64": "int64_contents",
    "INT32": "int_contents",
    "UINT8": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "BOOL": "bool_contents",
}
WIRE_DTYPES = {**DATATYPES, "FP64": np.float64, "UINT32": np.uint32, "UINT64": np.uint64, "BOOL": np.bool_}
# A client may send FP16 where the model takes FP32 (half the bytes on the wire); it is widened here.
WIDENED = {("FP16", "FP32")}


class BadTensor(InputError):
    pass


def decode_inputs(request, specs: list[TensorSpec], missing: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
    """``missing``: input name -> "values" (any value may be NaN: missing) or "whole" (the tensor may be
    all NaN: the input is absent); NaN anywhere else is refused."""
    by_name = {s.name: s for s in specs}
    missing = missing or {}
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise BadTensor(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; send all inputs raw or none")
    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        spec = by_name.get(tensor.name)
        if spec is None:
            raise BadTensor(f"input '{tensor.name}' is not an input of this model (inputs: {', '.join(by_name)})")
        if tensor.name in arrays:
            raise BadTensor(f"input '{tensor.name}' is given twice")
        if tensor.datatype != spec.datatype and (tensor.datatype, spec.datatype) not in WIDENED:
            raise BadTensor(f"input '{tensor.name}' must be {spec.datatype}, got datatype '{tensor.datatype}'")
        shape = tuple(int(d) for d in tensor.shape)
        if any(d < 0 for d in shape):
            raise BadTensor(f"input '{tensor.name}' has a negative dimension in shape {list(shape)}")
        if raw and _has_typed_contents(tensor):
            raise BadTensor(f"input '{tensor.name}' is sent both as typed contents and in raw_input_contents; send one")
        _check_size(tensor, shape, spec)
        array = _raw(tensor, shape, raw[i]) if raw else _typed(tensor, shape)
        problem = spec.check(array)
        if problem:
            raise BadTensor(problem)
        if array.dtype.kind == "f":
            _check_finite(tensor.name, array, missing.get(tensor.name))
        arrays[tensor.name] = np.ascontiguousarray(array, dtype=spec.dtype)
    missing = [name for name in by_name if name not in arrays]
    if missing:
        raise BadTensor(f"missing input(s) {', '.join(repr(m) for m in missing)}")
    _check_bag_lengths(arrays, by_name)
    return arrays


def _has_typed_contents(tensor) -> bool:
    return tensor.HasField("contents") and any(len(getattr(tensor.contents, f)) for f in set(TYPED_FIELDS.values()))


def _check_size(tensor, shape: tuple[int, ...], spec: TensorSpec) -> None:
    """A fixed dimension of the spec bounds nothing on its own (sizes are checked after decoding); what
    must not happen is decoding a shape whose element count no message can hold, or one numpy cannot
    make at all: more than 64 dimensions, or [0, 2^62] (no elements, but numpy refuses the extent)."""
    if len(shape) != len(spec.shape):
        raise BadTensor(f"'{tensor.name}' must have {len(spec.shape)} dimensions {list(spec.shape)}, got shape {list(shape)}")
    count = math.prod(shape)
    limit = 1 << 40  # far beyond any gRPC message (2 GiB at most): a count this large is a malformed shape
    if count > limit:
        raise BadTensor(f"input '{tensor.name}' has shape {list(shape)}: {count} elements, more than any request can carry")
    if math.prod(max(d, 1) for d in shape) > limit:
        raise BadTensor(f"input '{tensor.name}' has shape {list(shape)}: a dimension beyond what any request can carry")


def _check_finite(name: str, array: np.ndarray, missing: str | None) -> None:
    if np.isinf(array).any():
        raise BadTensor(f"input '{name}' contains infinite values")
    nan = np.isnan(array)
    if not nan.any() or missing == "values" or (missing == "whole" and nan.all()):
        return
    hint = " (NaN is allowed only for the whole vector: the input absent)" if missing == "whole" else ""
    raise BadTensor(f"input '{name}' contains NaN values{hint}")


def _check_bag_lengths(arrays: dict[str, np.ndarray], specs: dict[str, TensorSpec]) -> None:
    """Inputs with a variable first dimension (features, coords; an encoder's patches) describe the same
    patches: they must agree in length, and an empty bag has no risk to give."""
    lengths = {name: arrays[name].shape[0] for name, spec in specs.items() if spec.shape and spec.shape[0] == -1}
    if len(set(lengths.values())) > 1:
        described = ", ".join(f"'{name}' has {n}" for name, n in lengths.items())
        raise BadTensor(f"inputs disagree on the number of patches: {described}")
    if lengths and next(iter(lengths.values())) == 0:
        raise BadTensor(f"input '{next(iter(lengths))}' is empty: a bag needs at least one patch")


def _raw(tensor, shape: tuple[int, ...], data: bytes) -> np.ndarray:
    dtype = np.dtype(WIRE_DTYPES[tensor.datatype]).newbyteorder("<")
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise BadTensor(
            f"input '{tensor.name}': raw contents are {len(data)} bytes, shape {list(shape)} of {tensor.datatype} "
            f"needs {expected}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _typed(tensor, shape: tuple[int, ...]) -> np.ndarray:
    field = TYPED_FIELDS.get(tensor.datatype)
    if field is None:
        raise BadTensor(f"input '{tensor.name}': {tensor.datatype} can only be sent in raw_input_contents")
    values = getattr(tensor.contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise BadTensor(f"input '{tensor.name}': {len(values)} values in contents.{field}, shape {list(shape)} needs {count}")
    return np.asarray(values, dtype=WIRE_DTYPES[tensor.datatype]).reshape(shape)


def encode_outputs(response, arrays: dict[str, np.ndarray], specs: list[TensorSpec], requested: list[str]) -> None:
    """Appends the requested outputs (all when none were named) as raw little-endian contents."""
    by_name = {s.name: s for s in specs}
    unknown = [name for name in requested if name not in by_name]
    if unknown:
        raise BadTensor(f"requested output(s) {unknown} are not outputs of this model (outputs: {', '.join(by_name)})")
    for name in requested or list(by_name):
        spec = by_name[name]
        array = np.ascontiguousarray(arrays[name], dtype=np.dtype(spec.dtype).newbyteorder("<"))
        response.outputs.add(name=name, datatype=spec.datatype, shape=list(array.shape))
        response.raw_output_contents.append(array.tobytes())
