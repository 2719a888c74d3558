"""The wire contract: histosurv's KServe v2 messages are field-for-field those tritonclient speaks.

tritonclient carries its own generated descriptors of Triton's grpc_service.proto and
model_config.proto; every field of every message histosurv defines must have the same number, type,
cardinality and message/enum type there, every enum value the same number, and every RPC the same
name and message types. Fields histosurv leaves out of a message are allowed (absent on the wire);
a field it has that Triton does not is not.
"""

from __future__ import annotations

import pytest
from google.protobuf import descriptor_pool

pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is a dev dependency")

import tritonclient.grpc.model_config_pb2  # noqa: E402,F401  (registers Triton's descriptors)
import tritonclient.grpc.service_pb2  # noqa: E402,F401

from histosurv.runtime.server._proto import grpc_service_pb2 as ours  # noqa: E402

TRITON = descriptor_pool.Default()


def _messages(descriptors):
    for d in descriptors:
        yield d
        yield from _messages(d.nested_types)


def _shape(field) -> tuple:
    repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
    kind = field.message_type or field.enum_type
    return field.number, field.type, repeated, kind.full_name if kind else None


MESSAGES = sorted(m.full_name for m in _messages(ours.DESCRIPTOR.message_types_by_name.values()))


@pytest.mark.parametrize("name", MESSAGES)
def test_every_field_matches_tritonclients(name):
    mine, theirs = ours.POOL.FindMessageTypeByName(name), TRITON.FindMessageTypeByName(name)
    for field in mine.fields:
        assert field.name in theirs.fields_by_name, f"{name}.{field.name} is not in Triton's protocol"
        assert _shape(field) == _shape(theirs.fields_by_name[field.name]), f"{name}.{field.name}"


def test_enums_match_tritonclients():
    for enum in ours.DESCRIPTOR.enum_types_by_name.values():
        theirs = TRITON.FindEnumTypeByName(enum.full_name)
        assert {v.name: v.number for v in enum.values} == {
            v.name: v.number for v in theirs.values if v.name in enum.values_by_name
        }
        assert set(enum.values_by_name) <= set(theirs.values_by_name)


def test_every_rpc_matches_tritonclients():
    mine = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = TRITON.FindServiceByName("inference.GRPCInferenceService")
    assert mine.full_name == "inference.GRPCInferenceService"
    for method in mine.methods:
        other = theirs.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name) == (
            other.input_type.full_name,
            other.output_type.full_name,
        )
    assert len(mine.methods) == 11


def test_messages_cross_between_the_two_definitions():
    """A request tritonclient builds parses in histosurv's messages, raw tensor bytes included."""
    import numpy as np
    from tritonclient.grpc import service_pb2 as triton

    request = triton.ModelInferRequest(model_name="ammasurv", model_version="2", id="r1")
    tensor = request.inputs.add(name="features", datatype="FP32", shape=[4, 3])
    tensor.parameters["binary_data_size"].int64_param = 48
    request.raw_input_contents.append(np.arange(12, dtype=np.float32).tobytes())
    parsed = ours.ModelInferRequest.FromString(request.SerializeToString())
    assert (parsed.model_name, parsed.model_version, parsed.id) == ("ammasurv", "2", "r1")
    assert list(parsed.inputs[0].shape) == [4, 3] and parsed.inputs[0].parameters["binary_data_size"].int64_param == 48
    assert np.frombuffer(parsed.raw_input_contents[0], np.float32).tolist() == list(range(12))
