"""Messages off the wire: the zero-copy parse of large ModelInferRequests, refusals of
messages that do not parse, and the budget of request bytes in flight."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as triton
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as triton_pb

from sparseserve import codec
from sparseserve.errors import InvalidInput, Overloaded
from sparseserve.protocol import grpc_service_pb2 as pb
from sparseserve.server import wire
from sparseserve.server.wire import InferRequestMessage, RefusedMessage, RequestBytesBudget


def tritonclient_request(rows: int) -> bytes:
    """What tritonclient sends for an FP32 [rows, 64] input and a BYTES [2] input."""
    request = triton_pb.ModelInferRequest(model_name="mlp", model_version="1", id="r")
    request.parameters["priority"].int64_param = 3
    for name, array in (
        ("input", np.arange(rows * 64, dtype=np.float32).reshape(rows, 64)),
        ("words", np.array([b"a\x00", b"longer word"], dtype=object)),
    ):
        client_input = triton.InferInput(name, list(array.shape), codec.datatype_of(array).name)
        client_input.set_data_from_numpy(array)
        request.inputs.append(client_input._get_tensor())
        request.raw_input_contents.append(client_input._get_content())
    request.outputs.add(name="output")
    return request.SerializeToString()


@pytest.mark.parametrize("rows", [1, 1024], ids=["small", "large"])
def test_parse_equals_protobuf_and_large_raw_tensors_are_views(rows: int) -> None:
    data = tritonclient_request(rows)
    expected = pb.ModelInferRequest.FromString(data)
    request = wire.parse_infer_request(data)
    assert request.message.model_name == "mlp" and request.model_version == "1"
    assert request.id == "r" and request.parameters["priority"].int64_param == 3
    assert [o.name for o in request.outputs] == ["output"]
    assert list(request.inputs) == list(expected.inputs)
    assert [bytes(r) for r in request.raw_input_contents] == list(expected.raw_input_contents)
    arrays = codec.decode_inputs(request)
    assert arrays["words"].tolist() == [b"a\x00", b"longer word"]
    np.testing.assert_array_equal(arrays["input"].reshape(-1), np.arange(rows * 64))
    if len(data) >= wire.ZERO_COPY_MIN_BYTES:
        # No copy: the array reads the very bytes gRPC handed over.
        assert all(isinstance(r, memoryview) and r.obj is data for r in request.raw_input_contents)
        assert np.shares_memory(arrays["input"], np.frombuffer(data, dtype=np.uint8))


def _key(number: int, wire_type: int) -> bytes:
    return (
        bytes([number << 3 | wire_type])
        if number < 16
        else bytes([(number << 3 | wire_type) & 0x7F | 0x80, number >> 4])
    )


@pytest.mark.parametrize("rows", [1, 1024], ids=["small", "large"])
def test_unknown_groups_are_skipped_as_protobuf_skips_them(rows: int) -> None:
    """Field 99 as a group (wire types 3 and 4) holding a varint, a string and a nested
    group: protobuf keeps it as an unknown field; the large-message walk refused it
    ("unsupported protobuf wire type 3"), so the same message passed at 61 bytes and
    failed at 80 KB. A group that never ends, or ends with another's end, is refused."""
    inner = (
        _key(2, 0)
        + b"\x05"
        + _key(3, 2)
        + b"\x02hi"
        + _key(4, 3)
        + _key(1, 0)
        + b"\x01"
        + _key(4, 4)
    )
    group = _key(99, 3) + inner + _key(99, 4)
    data = group + tritonclient_request(rows)
    expected = pb.ModelInferRequest.FromString(data)
    request = wire.parse_infer_request(data)
    assert list(request.inputs) == list(expected.inputs)
    assert [bytes(r) for r in request.raw_input_contents] == list(expected.raw_input_contents)
    for broken in (_key(99, 3) + inner, _key(99, 3) + inner + _key(98, 4)):
        with pytest.raises((ValueError, DecodeError)):
            wire.parse_infer_request(broken + tritonclient_request(1024))


@pytest.mark.parametrize(
    "cut", [1, 7, 100, -1], ids=["first-byte", "in-header", "in-tensor", "last-byte-missing"]
)
def test_truncated_large_message_is_refused(cut: int) -> None:
    data = tritonclient_request(1024)
    with pytest.raises((ValueError, DecodeError)):
        wire.parse_infer_request(data[:cut])
    refused = RequestBytesBudget(2**30).admit(data[:cut])
    assert isinstance(refused, RefusedMessage)
    assert isinstance(refused.error, InvalidInput)
    assert "not a valid ModelInferRequest" in str(refused.error)


def test_safe_deserializer_turns_a_parse_failure_into_an_input_error() -> None:
    parse = wire.safe_deserializer(pb.ModelReadyRequest.FromString, "ModelReady request")
    assert parse(pb.ModelReadyRequest(name="m").SerializeToString()).name == "m"
    refused = parse(b"\x0a\xff\xff")
    assert isinstance(refused, RefusedMessage) and isinstance(refused.error, InvalidInput)
    assert "not a valid ModelReady request (3 bytes)" in str(refused.error)


def test_budget_refuses_beyond_its_limit_until_bytes_are_released() -> None:
    budget = RequestBytesBudget(limit_bytes=300_000, trim_after_bytes=2**40)
    data = tritonclient_request(1024)  # ~270 kB
    first = budget.admit(data)
    assert isinstance(first, InferRequestMessage)
    assert budget.inflight_bytes == len(data)
    second = budget.admit(data)
    assert isinstance(second, RefusedMessage) and isinstance(second.error, Overloaded)
    message = str(second.error)
    assert "max_inflight_request_bytes" in message and "300000" in message
    assert budget.inflight_bytes == len(data)
    first.release()
    first.release()  # once only
    assert budget.inflight_bytes == 0
    assert isinstance(budget.admit(data), InferRequestMessage)


def test_budget_admits_a_lone_request_larger_than_itself() -> None:
    """Within the message limit, a request is never refused for the budget alone."""
    budget = RequestBytesBudget(limit_bytes=1024)
    data = tritonclient_request(1024)
    request = budget.admit(data)
    assert isinstance(request, InferRequestMessage)
    wire.release(request)
    assert budget.inflight_bytes == 0


def test_small_messages_are_plain_protobuf_and_not_counted() -> None:
    """Under the zero-copy size, admit is protobuf's own parse: the hot path of small
    requests pays nothing for the budget."""
    budget = RequestBytesBudget(limit_bytes=1024)
    request = budget.admit(tritonclient_request(1))
    assert isinstance(request, pb.ModelInferRequest)
    assert budget.inflight_bytes == 0
    wire.release(request)  # nothing to give back
    refused = budget.admit(b"\x0a\xff")
    assert isinstance(refused, RefusedMessage) and isinstance(refused.error, InvalidInput)


def test_return_free_memory_runs() -> None:
    wire.return_free_memory()  # glibc malloc_trim, or nothing where there is none
