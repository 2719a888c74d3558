"""The KServe v2 REST body <-> the gRPC messages the servicers take.

An infer body is JSON, optionally followed by binary tensors (Triton's binary data extension, what
``tritonclient.http`` sends by default): the header ``Inference-Header-Content-Length`` says where the
JSON ends, and each input with ``parameters.binary_data_size`` takes that many bytes of what follows, in
input order. Every input becomes raw little-endian bytes of a ``ModelInferRequest``, JSON ``data``
included, so one decoder (``tensors.decode_inputs``) checks both doors with the same messages; what is
checked here is only what JSON itself can get wrong (not a list of numbers, a value count that does not
fill the shape, binary sizes that do not add up).
"""

from __future__ import annotations

import json
import math

import numpy as np
from google.protobuf import json_format

from ...errors import InputError
from ._proto import grpc_service_pb2 as pb
from .tensors import WIRE_DTYPES

__all__ = ["HEADER_LENGTH", "infer_request", "infer_response", "message_json", "parse_json"]

HEADER_LENGTH = "Inference-Header-Content-Length"
# int64 fields that protobuf's JSON mapping writes as strings; Triton's REST answers carry numbers
_INT_KEYS = {"shape", "dims", "last_inference", "inference_count", "execution_count", "count", "ns", "batch_size"}


def parse_json(body: bytes, what: str = "request body"):
    try:
        return json.loads(body) if body else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{what} is not JSON: {e}") from None


def infer_request(body: bytes, header_length: str | None, model: str, version: str) -> tuple[pb.ModelInferRequest, set[str] | bool]:
    """The gRPC request for an infer body, and which outputs go back binary (a set of names, or True: all)."""
    split = _header_split(body, header_length)
    header = parse_json(body[:split], "the JSON header of the infer request")
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise InputError('the infer request must be a JSON object with an "inputs" list')
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=_text(header.get("id", ""), "id"))
    binary = memoryview(body)[split:]
    for i, tensor in enumerate(header["inputs"]):
        raw, binary = _input(request, tensor, i, binary)
        request.raw_input_contents.append(raw)
    if len(binary):
        raise InputError(f"binary data: {len(binary)} bytes after the JSON header belong to no input (binary_data_size)")
    return request, _binary_outputs(request, header)


def _header_split(body: bytes, header_length: str | None) -> int:
    if header_length is None:
        return len(body)
    if not header_length.strip().isdigit() or int(header_length) > len(body):
        raise InputError(f"{HEADER_LENGTH}: {header_length!r} is not a byte count within the {len(body)}-byte body")
    return int(header_length)


def _text(value, field: str) -> str:
    if not isinstance(value, str):
        raise InputError(f'"{field}" must be a string, got {json.dumps(value)[:80]}')
    return value


def _input(request, tensor, i: int, binary: memoryview) -> tuple[bytes, memoryview]:
    if not isinstance(tensor, dict):
        raise InputError(f"inputs[{i}] must be an object with name, datatype, shape and data")
    name, datatype = _text(tensor.get("name"), f"inputs[{i}].name"), _text(tensor.get("datatype"), f"inputs[{i}].datatype")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InputError(f"input '{name}': shape must be a list of integers, got {json.dumps(shape)[:80]}")
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InputError(f"input '{name}': binary_data_size must be a byte count, got {json.dumps(size)[:80]}")
        if size > len(binary):
            raise InputError(f"input '{name}': binary_data_size is {size} bytes, only {len(binary)} are left in the body")
        return bytes(binary[:size]), binary[size:]
    if "data" not in tensor:
        raise InputError(f"input '{name}' has neither data nor parameters.binary_data_size")
    return _json_data(name, datatype, shape, tensor["data"]), binary


def _json_data(name: str, datatype: str, shape: list[int], data) -> bytes:
    """JSON values as the raw bytes the same tensor would have been sent as; a datatype the server has no
    use for gives no bytes (the decoder names the datatype the input takes)."""
    dtype = WIRE_DTYPES.get(datatype)
    if dtype is None:
        return b""
    try:
        array = np.asarray(data, dtype=np.dtype(dtype).newbyteorder("<")).ravel()
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"input '{name}': data must be a (nested) list of {datatype} numbers, row-major") from None
    needed = math.prod(shape)
    if array.size != needed and needed <= 1 << 40:  # a shape no request can carry is named by the decoder
        raise InputError(f"input '{name}': {array.size} values in data, shape {shape} needs {needed}")
    return array.tobytes()


def _binary_outputs(request, header: dict) -> set[str] | bool:
    every = bool((header.get("parameters") or {}).get("binary_data_output", False))
    outputs = header.get("outputs") or []
    if not isinstance(outputs, list):
        raise InputError('"outputs" must be a list of {"name": ...} objects')
    binary = set()
    for i, output in enumerate(outputs):
        if not isinstance(output, dict):
            raise InputError(f'outputs[{i}] must be an object with a "name"')
        name = _text(output.get("name"), f"outputs[{i}].name")
        request.outputs.add(name=name)
        if (output.get("parameters") or {}).get("binary_data", every):
            binary.add(name)
    return True if every and not outputs else binary


def infer_response(response: pb.ModelInferResponse, binary: set[str] | bool) -> tuple[bytes, int | None]:
    """The REST body of a response, and its JSON header's length where binary outputs follow it."""
    outputs, chunks = [], []
    for tensor, raw in zip(response.outputs, response.raw_output_contents):
        entry = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if binary is True or tensor.name in binary:
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = np.frombuffer(raw, np.dtype(WIRE_DTYPES[tensor.datatype]).newbyteorder("<")).tolist()
        outputs.append(entry)
    header = {"model_name": response.model_name, "model_version": response.model_version, "outputs": outputs}
    if response.id:
        header["id"] = response.id
    text = json.dumps(header, separators=(",", ":")).encode()
    return (text + b"".join(chunks), len(text)) if chunks else (text, None)


def message_json(message) -> dict:
    """A gRPC response as Triton's REST side writes it: field names as in the proto, integers as numbers."""
    return _numbers(json_format.MessageToDict(message, preserving_proto_field_name=True))


def _numbers(value, key: str = ""):
    if isinstance(value, dict):
        return {k: _numbers(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v, key) for v in value]
    if key in _INT_KEYS and isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return value
