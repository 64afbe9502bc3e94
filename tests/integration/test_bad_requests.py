"""Bad requests get a precise status and a message that says what was expected, and
never hurt the server: after each one, a good request to `mlp` is answered.

Requests tritonclient can express go through tritonclient; the others (typed
`contents`, raw data that does not match its shape, duplicate inputs, unknown datatype
strings, negative dimensions) are built with tritonclient's own generated stubs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype, triton_to_np_dtype

from sparseserve.client.server_process import ServerProcess
from sparseserve.testing import onnx_models

pytestmark = pytest.mark.integration

Stub = service_pb2_grpc.GRPCInferenceServiceStub
Send = Callable[[triton.InferenceServerClient, Stub], object]
InputTensor = service_pb2.ModelInferRequest.InferInputTensor

ROW = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)  # one good mlp sample


# -- building and sending requests ----------------------------------------------------


def via_triton(
    model: str,
    arrays: Mapping[str, np.ndarray],
    outputs: Sequence[str] = (),
    version: str = "",
) -> Send:
    """Send `arrays` with tritonclient (datatypes follow the numpy dtypes)."""

    def send(client: triton.InferenceServerClient, stub: Stub) -> object:
        inputs = []
        for name, array in arrays.items():
            tensor = triton.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        requested = [triton.InferRequestedOutput(name) for name in outputs] or None
        return client.infer(model, inputs, model_version=version, outputs=requested)

    return send


def via_stub(
    *inputs: InputTensor,
    raw: Sequence[bytes] = (),
    model: str = "mlp",
    outputs: Sequence[str] = (),
) -> Send:
    """Send a ModelInferRequest built field by field, as tritonclient never would."""
    request = service_pb2.ModelInferRequest(
        model_name=model,
        inputs=inputs,
        raw_input_contents=raw,
        outputs=[service_pb2.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in outputs],
    )
    return lambda client, stub: stub.ModelInfer(request, timeout=10)


def tensor(
    name: str = "input", datatype: str = "FP32", shape: Sequence[int] = (1, 64), **contents: list
) -> InputTensor:
    """An input tensor; keyword arguments fill its typed `contents`."""
    result = InputTensor(name=name, datatype=datatype, shape=shape)
    if contents:
        result.contents.CopyFrom(service_pb2.InferTensorContents(**contents))
    return result


def identity_arrays(**overrides: np.ndarray) -> dict[str, np.ndarray]:
    """One element for each input of `identity`; keyword `BYTES=...` replaces `in_BYTES`."""
    arrays = {}
    for datatype in onnx_models.ELEMENT_TYPES:
        if datatype == "BYTES":
            array = np.array([[b"ok"]], dtype=object)
        else:
            array = np.zeros((1, 1), dtype=triton_to_np_dtype(datatype))
        arrays[f"in_{datatype}"] = overrides.get(datatype, array)
    return arrays


def refusal(send: Send, client: triton.InferenceServerClient, stub: Stub) -> tuple[str, str]:
    """Send a request that must be refused; return (status code name, message)."""
    try:
        send(client, stub)
    except InferenceServerException as exc:
        return str(exc.status()).removeprefix("StatusCode."), exc.message() or ""
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or ""
    pytest.fail("the server answered a request it should have refused")


def assert_mlp_still_serves(client: triton.InferenceServerClient) -> None:
    tensor = triton.InferInput("input", [1, 64], "FP32")
    tensor.set_data_from_numpy(ROW)
    assert client.infer("mlp", [tensor]).as_numpy("output").shape == (1, 10)


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[Stub]:
    with grpc.insecure_channel(server.grpc_url) as channel:
        yield Stub(channel)


# -- requests that do not match the model or the wire format --------------------------

FP64_ROW = ROW.astype(np.float64)
BAD_BYTES = (
    (5).to_bytes(4, "little") + b"ok"  # claims 5 bytes, holds 2
)

INVALID = [
    pytest.param(
        via_triton("mlp", {"inputs": ROW}),
        ["'inputs'", "input FP32[-1, 64]"],
        id="wrong input name",
    ),
    pytest.param(
        via_triton("identity", {k: v for k, v in identity_arrays().items() if k != "in_FP16"}),
        ["missing", "'in_FP16'", "in_FP16 FP16[-1, -1]"],
        id="missing input",
    ),
    pytest.param(
        via_triton("mlp", {"input": ROW, "extra": ROW}),
        ["'extra'", "input FP32[-1, 64]"],
        id="extra input",
    ),
    pytest.param(
        via_triton("mlp", {"input": FP64_ROW}),
        ["'input'", "FP32", "FP64"],
        id="wrong datatype",
    ),
    pytest.param(
        via_triton("mlp", {"input": ROW.reshape(64)}),
        ["'input'", "[-1, 64]", "[64]"],
        id="wrong rank",
    ),
    pytest.param(
        via_triton("mlp", {"input": np.zeros((2, 63), dtype=np.float32)}),
        ["'input'", "[-1, 64]", "[2, 63]"],
        id="wrong static dimension",
    ),
    pytest.param(
        via_stub(tensor(shape=[2, 64]), raw=[ROW.tobytes()]),
        ["'input'", "256 bytes", "[2, 64]", "512"],
        id="raw length not shape x dtype",
    ),
    pytest.param(
        via_stub(tensor(shape=[1, 64]), raw=[ROW.tobytes() + b"\0"]),
        ["'input'", "257 bytes", "256"],
        id="raw data one byte too long",
    ),
    pytest.param(
        via_stub(tensor("in_BYTES", "BYTES", [1, 1]), raw=[BAD_BYTES], model="identity"),
        ["'in_BYTES'", "5 bytes"],
        id="BYTES element longer than data",
    ),
    pytest.param(
        via_stub(tensor("in_BYTES", "BYTES", [1, 2]), raw=[b"\x02\0\0\0ok"], model="identity"),
        ["'in_BYTES'", "[1, 2]", "needs 2"],
        id="BYTES data with too few elements",
    ),
    pytest.param(
        via_stub(tensor(fp32_contents=[0.5] * 10)),
        ["'input'", "10", "[1, 64]", "64"],
        id="typed contents count mismatch",
    ),
    pytest.param(
        via_stub(tensor(fp32_contents=[0.5] * 64), raw=[ROW.tobytes()]),
        ["'input'", "raw_input_contents", "contents"],
        id="raw and typed mixed",
    ),
    pytest.param(
        via_stub(tensor(), tensor("extra", fp32_contents=[1.0]), raw=[ROW.tobytes()]),
        ["2 inputs", "1 raw_input_contents"],
        id="fewer raw entries than inputs",
    ),
    pytest.param(
        via_stub(tensor(), tensor(), raw=[ROW.tobytes(), ROW.tobytes()]),
        ["'input'", "more than once"],
        id="duplicate input",
    ),
    pytest.param(
        via_triton("mlp", {"input": ROW}, outputs=["probabilities"]),
        ["'probabilities'", "output FP32[-1, 10]"],
        id="unknown requested output",
    ),
    pytest.param(
        via_triton("mlp", {"input": ROW}, outputs=["output", "output"]),
        ["'output'", "more than once"],
        id="duplicate requested output",
    ),
    pytest.param(
        via_stub(tensor(datatype="FLOAT32"), raw=[ROW.tobytes()]),
        ["'FLOAT32'", "FP32"],
        id="unknown datatype string",
    ),
    pytest.param(
        via_stub(tensor(shape=[-1, 64]), raw=[ROW.tobytes()]),
        ["'input'", "[-1, 64]", "negative"],
        id="negative dimension",
    ),
    pytest.param(
        via_stub(tensor("in_FP16", "FP16", [1, 1], fp32_contents=[1.0]), model="identity"),
        ["'in_FP16'", "FP16", "raw"],
        id="FP16 as typed contents",
    ),
    pytest.param(
        via_stub(tensor("in_INT8", "INT8", [1, 1], int_contents=[300]), model="identity"),
        ["'in_INT8'", "INT8"],
        id="typed value out of range",
    ),
    pytest.param(
        via_triton("identity", identity_arrays(BYTES=np.array([[b"caf\xe9"]], dtype=object))),
        ["'in_BYTES'", "UTF-8"],
        id="BYTES not UTF-8",
    ),
    pytest.param(
        via_stub(tensor(fp32_contents=[0.5] * 64, int_contents=[1])),
        ["'input'", "FP32", "fp32_contents", "int_contents"],
        id="typed contents of another type too",
    ),
    pytest.param(
        via_stub(tensor("in_BOOL", "BOOL", [1, 2]), raw=[b"\x01\x07"], model="identity"),
        ["'in_BOOL'", "other than 0 and 1"],
        id="BOOL byte that is not 0 or 1",
    ),
    pytest.param(
        via_stub(tensor(shape=[1] * 65), raw=[ROW[0, :1].tobytes()]),
        ["'input'", "65 dimensions", "at most 64"],
        id="rank past numpy's 64",
    ),
    pytest.param(
        lambda client, stub: client.infer(
            "mlp", [_mlp_input()], outputs=[triton.InferRequestedOutput("output", class_count=3)]
        ),
        ["'output'", "classification extension is not supported"],
        id="classification extension",
    ),
    pytest.param(
        lambda client, stub: stub.ModelInfer(_shared_memory_request(), timeout=10),
        ["'input'", "shared-memory extension is not supported"],
        id="shared-memory extension",
    ),
]


def _shared_memory_request() -> service_pb2.ModelInferRequest:
    """An input whose data is in a shared-memory region, as tritonclient's
    `set_shared_memory` asks."""
    request = service_pb2.ModelInferRequest(model_name="mlp", inputs=[tensor()])
    request.inputs[0].parameters["shared_memory_region"].string_param = "region"
    request.inputs[0].parameters["shared_memory_byte_size"].int64_param = 256
    return request


@pytest.mark.parametrize(("send", "keywords"), INVALID)
def test_invalid_request_is_refused_precisely_and_the_server_keeps_serving(
    client: triton.InferenceServerClient, stub: Stub, send: Send, keywords: list[str]
) -> None:
    """INVALID_ARGUMENT, with a message naming the input and what it should have been."""
    code, message = refusal(send, client, stub)
    assert code == "INVALID_ARGUMENT", message
    missing = [word for word in keywords if word not in message]
    assert not missing, f"{missing} not in {message!r}"
    assert_mlp_still_serves(client)


# -- requests that reach no model -----------------------------------------------------


@pytest.mark.parametrize(
    ("model", "version", "keywords"),
    [
        ("no_such_model", "", ["'no_such_model'"]),
        ("mlp", "7", ["'mlp'", "'7'", "serving: 1"]),
        ("mlp", "abc", ["'mlp'", "'abc'", "serving: 1"]),
        ("latest", "1", ["'latest'", "serving: 3"]),
    ],
)
def test_unknown_model_or_version_is_not_found(
    client: triton.InferenceServerClient,
    stub: Stub,
    model: str,
    version: str,
    keywords: list[str],
) -> None:
    x = np.zeros((1, 4), dtype=np.float32)
    send = via_triton(model, {"x": x}, version=version)
    code, message = refusal(send, client, stub)
    assert code == "NOT_FOUND", message
    assert all(word in message for word in keywords), message
    assert_mlp_still_serves(client)


@pytest.mark.parametrize("model", ["corrupt", "truncated", "bad_manifest"])
def test_broken_model_is_unavailable_and_says_why(
    client: triton.InferenceServerClient, stub: Stub, model: str
) -> None:
    """The message carries the reason RepositoryIndex gives for the model."""
    (reason,) = [m.reason for m in client.get_model_repository_index().models if m.name == model]
    code, message = refusal(via_triton(model, {"input": ROW}), client, stub)
    assert code == "UNAVAILABLE", message
    assert reason and reason in message
    assert_mlp_still_serves(client)


@pytest.mark.parametrize(
    "name", ["../mlp", "mlp/../mlp", "/etc", "..", ".", "./mlp", "mlp/", "", "mlp\0"]
)
def test_model_name_that_escapes_the_repository_is_never_served(
    client: triton.InferenceServerClient, stub: Stub, name: str
) -> None:
    code, message = refusal(via_triton(name, {"input": ROW}), client, stub)
    assert code in {"INVALID_ARGUMENT", "NOT_FOUND"}, message
    assert client.is_model_ready(name) is False
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata(name)
    assert str(info.value.status()) in {"StatusCode.INVALID_ARGUMENT", "StatusCode.NOT_FOUND"}
    assert_mlp_still_serves(client)


# -- item by item: hostile input that used to escape as INTERNAL or UNKNOWN -----------


def test_shape_with_zero_and_overflowing_dimensions_is_invalid_argument(
    client: triton.InferenceServerClient, stub: Stub
) -> None:
    """[0, 2**62, 2**62] holds no elements, but no array of that shape can exist."""
    send = via_stub(tensor(shape=[0, 2**62, 2**62]), raw=[b""])
    code, message = refusal(send, client, stub)
    assert code == "INVALID_ARGUMENT", message
    assert "'input'" in message and "too large" in message
    assert_mlp_still_serves(client)


@pytest.mark.parametrize(
    "method", ["ModelInfer", "ModelReady", "ModelMetadata", "RepositoryIndex", "ServerLive"]
)
@pytest.mark.parametrize(
    "payload",
    [b"\x0a\xff\xff\xff\xff\x0f", b"\x2a\x05abc", b"\xff" * 16],
    ids=["length-past-end", "truncated-input", "bad-tag"],
)
def test_undecodable_message_is_invalid_argument(
    server: ServerProcess, client: triton.InferenceServerClient, method: str, payload: bytes
) -> None:
    """Bytes that are no protobuf message: INVALID_ARGUMENT naming the message type, not
    grpc.aio's UNKNOWN, on every unary RPC."""
    with grpc.insecure_channel(server.grpc_url) as channel:
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
        with pytest.raises(grpc.RpcError) as info:
            call(payload, timeout=10)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert f"not a valid {method}" in (info.value.details() or "")
    assert_mlp_still_serves(client)


@pytest.mark.parametrize("version", [" 1", "1 ", "\u0661", "+1", "01", "1_0", "1.0"])
def test_version_is_plain_ascii_decimal(
    client: triton.InferenceServerClient, stub: Stub, version: str
) -> None:
    """Versions are spelled as ModelMetadata lists them ("1"); Python's int() would
    have taken these as 1 (or 10)."""
    code, message = refusal(via_triton("mlp", {"input": ROW}, version=version), client, stub)
    assert code == "NOT_FOUND", message
    assert "serving: 1" in message
    assert client.is_model_ready("mlp", version) is False
    assert client.infer("mlp", [_mlp_input()], model_version="1").as_numpy("output").shape == (
        1,
        10,
    )


def test_a_version_of_thousands_of_digits_is_not_found(
    client: triton.InferenceServerClient, stub: Stub
) -> None:
    """Python's int() refuses a string of more than 4,300 digits: such a version was
    answered INTERNAL, on every call that takes a version."""
    version = "9" * 4301
    code, message = refusal(via_triton("mlp", {"input": ROW}, version=version), client, stub)
    assert code == "NOT_FOUND", message
    assert "serving: 1" in message
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_metadata("mlp", version)
    assert caught.value.status() == "StatusCode.NOT_FOUND"
    assert client.is_model_ready("mlp", version) is False
    assert_mlp_still_serves(client)


def test_a_name_of_twenty_thousand_characters_is_refused_readably(
    client: triton.InferenceServerClient, stub: Stub
) -> None:
    """Messages echo what the client sent; gRPC's trailer holds 16 KiB, past which the
    client saw RESOURCE_EXHAUSTED "Stream removed" instead of the status. The middle of a
    long message is cut."""
    name = "a" * 20_000
    code, message = refusal(via_triton(name, {"input": ROW}), client, stub)
    assert code in ("NOT_FOUND", "INVALID_ARGUMENT"), message
    assert "characters cut" in message and len(message) <= 1100, message[:300]
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_metadata(name)
    assert caught.value.status() in ("StatusCode.NOT_FOUND", "StatusCode.INVALID_ARGUMENT")
    assert_mlp_still_serves(client)


def _mlp_input() -> triton.InferInput:
    tensor = triton.InferInput("input", [1, 64], "FP32")
    tensor.set_data_from_numpy(ROW)
    return tensor


def test_dynamic_dimensions_that_do_not_broadcast_are_invalid_argument(
    client: triton.InferenceServerClient, stub: Stub
) -> None:
    """multi_io adds a [2, 4] and b [3, 4]: each fits the signature [-1, 4], together
    they do not broadcast. The client's fault, with a message free of onnxruntime's
    source paths."""
    send = via_triton(
        "multi_io", {"a": np.ones((2, 4), np.float32), "b": np.ones((3, 4), np.int64)}
    )
    code, message = refusal(send, client, stub)
    assert code == "INVALID_ARGUMENT", message
    assert "'multi_io'" in message and "broadcast" in message and "2 by 3" in message
    assert "onnxruntime_src" not in message and "::" not in message and ".h:" not in message
    assert_mlp_still_serves(client)


@pytest.fixture(scope="module")
def any_rank_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("any-rank")
    onnx_models.any_rank(root / "any_rank" / "1" / "model.onnx")
    with ServerProcess(root) as process:
        yield process
    assert process.returncode == 0, process.log()


@pytest.mark.parametrize("shape", [(), (3,), (2, 3), (1, 2, 1, 2)])
def test_input_of_unknown_rank_accepts_any_rank(
    any_rank_server: ServerProcess, shape: tuple[int, ...]
) -> None:
    x = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    inputs = via_triton_inputs({"x": x, "s": np.array(2.0, dtype=np.float32)})
    with triton.InferenceServerClient(any_rank_server.grpc_url) as client:
        result = client.infer("any_rank", inputs)
        metadata = client.get_model_metadata("any_rank")
    np.testing.assert_array_equal(result.as_numpy("y"), x)
    assert result.as_numpy("t") == -2.0
    shapes = {t.name: list(t.shape) for t in metadata.inputs}
    assert shapes == {"x": [-1], "s": []}


def test_scalar_input_still_takes_only_scalars(any_rank_server: ServerProcess) -> None:
    """The same [] from onnxruntime, but a declared rank 0: a vector is refused."""
    inputs = via_triton_inputs(
        {"x": np.zeros(1, np.float32), "s": np.array([2.0], dtype=np.float32)}
    )
    with (
        triton.InferenceServerClient(any_rank_server.grpc_url) as client,
        pytest.raises(InferenceServerException) as info,
    ):
        client.infer("any_rank", inputs)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "'s'" in info.value.message() and "expects shape []" in info.value.message()


def via_triton_inputs(arrays: Mapping[str, np.ndarray]) -> list[triton.InferInput]:
    inputs = []
    for name, array in arrays.items():
        tensor = triton.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


# -- fuzz: mutated bytes on the wire --------------------------------------------------


def mlp_request_bytes(rows: int) -> bytes:
    request = service_pb2.ModelInferRequest(model_name="mlp", id="fuzz")
    request.inputs.add(name="input", datatype="FP32", shape=[rows, 64])
    request.raw_input_contents.append(np.ones((rows, 64), np.float32).tobytes())
    request.outputs.add(name="output")
    return request.SerializeToString()


# A small request, and one large enough (77 kB) for the server's zero-copy parse.
VALID_REQUESTS = [mlp_request_bytes(1), mlp_request_bytes(300)]


@st.composite
def mutated_requests(draw: st.DrawFn) -> bytes:
    """A valid ModelInferRequest with a few bytes changed, cut short or added to; most
    mutations land in the header fields (names, datatype, shape), where they matter."""
    wire = bytearray(draw(st.sampled_from(VALID_REQUESTS)))
    header = len(wire) - 64 * 4 * (1 if len(wire) < 1024 else 300) - 10
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, max(header, 1)) | st.integers(0, len(wire) - 1))
        wire[at] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        wire = wire[: draw(st.integers(0, len(wire)))]
    if draw(st.booleans()):
        wire += draw(st.binary(min_size=1, max_size=16))
    return bytes(wire)


@pytest.fixture(scope="module")
def raw_infer(server: ServerProcess) -> Iterator[Callable[[bytes], grpc.StatusCode]]:
    """ModelInfer with the request given as bytes: the status the server answers."""
    with grpc.insecure_channel(server.grpc_url) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")

        def infer(wire: bytes) -> grpc.StatusCode:
            try:
                call(wire, timeout=10)
            except grpc.RpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        yield infer


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(wire=mutated_requests())
def test_mutated_requests_are_never_unknown_or_internal(
    raw_infer: Callable[[bytes], grpc.StatusCode], wire: bytes
) -> None:
    """Whatever the bytes, the answer is a deliberate status (OK, INVALID_ARGUMENT,
    NOT_FOUND, ...), never UNKNOWN or INTERNAL, and the server answers the next
    valid request."""
    status = raw_infer(wire)
    assert status not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), status
    assert raw_infer(VALID_REQUESTS[0]) is grpc.StatusCode.OK
