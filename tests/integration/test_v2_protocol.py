"""Every RPC of the Open Inference Protocol (KServe v2 / Triton gRPC), as a real client
sees it: tritonclient against the real server process, or tritonclient's own generated
stubs where tritonclient cannot say something (typed `contents`, the `ready` filter of
RepositoryIndex). The standard gRPC health and reflection services are checked with
their standard clients.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype, triton_to_np_dtype

import sparseserve
from sparseserve.client.server_process import ServerProcess
from sparseserve.testing import onnx_models

pytestmark = pytest.mark.integration

V2_SERVICE = "inference.GRPCInferenceService"
# The identity model's datatypes, in the order of its inputs and outputs.
IDENTITY_DATATYPES = tuple(onnx_models.ELEMENT_TYPES)
BROKEN_MODELS = ("corrupt", "truncated", "bad_manifest")


# -- helpers --------------------------------------------------------------------------


def infer_input(name: str, array: np.ndarray) -> triton.InferInput:
    """A tritonclient input carrying `array` (its datatype follows the numpy dtype)."""
    tensor = triton.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    tensor.set_data_from_numpy(array)
    return tensor


def mlp_input(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 64)).astype(np.float32)


def filler(datatype: str) -> np.ndarray:
    """A one-element tensor for an identity input the test does not look at."""
    if datatype == "BYTES":
        return np.array([[b"-"]], dtype=object)
    return np.zeros((1, 1), dtype=triton_to_np_dtype(datatype))


def identity_inputs(arrays: Mapping[str, np.ndarray]) -> list[triton.InferInput]:
    """All 13 inputs of `identity`: `arrays` by datatype, a filler for the others."""
    return [
        infer_input(f"in_{dt}", arrays[dt] if dt in arrays else filler(dt))
        for dt in IDENTITY_DATATYPES
    ]


def edge_values(datatype: str) -> np.ndarray:
    """A [2, 3] tensor of `datatype` holding the values most likely to be mangled."""
    if datatype == "BOOL":
        return np.array([[True, False, True], [False, False, True]])
    if datatype == "BYTES":
        # Non-ASCII UTF-8 text, an empty element and an embedded NUL.
        return np.array([["", "héllo wörld", "日本語 ✓"], ["a\x00b", "plain", "🎉"]], dtype=object)
    dtype = np.dtype(triton_to_np_dtype(datatype))
    if dtype.kind == "f":
        info = np.finfo(dtype)
        values = [[info.min, info.max, -0.0], [np.inf, info.smallest_subnormal, np.nan]]
        return np.array(values, dtype=dtype)
    info = np.iinfo(dtype)
    return np.array([[info.min, info.max, 0], [1, info.max // 3, info.min // 7]], dtype=dtype)


def as_wire_bytes(array: np.ndarray) -> list[bytes]:
    """BYTES elements as the client gets them back: UTF-8 encoded."""
    return [x.encode("utf-8") if isinstance(x, str) else bytes(x) for x in array.reshape(-1)]


def reference_session(model_file: Path) -> ort.InferenceSession:
    """onnxruntime in this process, set up like the server's sessions (one thread)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])


def refused(call: Callable[[], object]) -> tuple[str, str]:
    """Run a tritonclient call that must fail; return (status code name, message)."""
    with pytest.raises(InferenceServerException) as info:
        call()
    return str(info.value.status()).removeprefix("StatusCode."), info.value.message()


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.grpc_url) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> service_pb2_grpc.GRPCInferenceServiceStub:
    """tritonclient's generated stub, for requests tritonclient itself cannot build."""
    return service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def mlp_reference(server: ServerProcess) -> ort.InferenceSession:
    return reference_session(server.repository / "mlp" / "1" / "model.onnx")


# -- health and server metadata -------------------------------------------------------


def test_server_is_live_and_ready(client: triton.InferenceServerClient) -> None:
    """ServerLive and ServerReady both answer true once the startup models are loaded."""
    assert client.is_server_live() is True
    assert client.is_server_ready() is True


def test_server_metadata_names_server_version_and_extensions(
    client: triton.InferenceServerClient,
) -> None:
    """ServerMetadata tells Triton's tools who answers and which extensions it speaks."""
    metadata = client.get_server_metadata()
    assert metadata.name == "sparseserve"
    assert metadata.version == sparseserve.__version__
    assert {"model_repository", "model_configuration", "statistics"} <= set(metadata.extensions)


@pytest.mark.parametrize("service", ["", V2_SERVICE])
def test_standard_health_service_answers_serving(channel: grpc.Channel, service: str) -> None:
    """Kubernetes' gRPC probes and grpc_health_probe use grpc.health.v1.Health."""
    health = health_pb2_grpc.HealthStub(channel)
    answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_health_of_an_unknown_service_is_not_found(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def _reflect(
    channel: grpc.Channel, requests: Sequence[reflection_pb2.ServerReflectionRequest]
) -> list[reflection_pb2.ServerReflectionResponse]:
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    return list(reflection.ServerReflectionInfo(iter(requests), timeout=5))


def test_reflection_lists_the_services(channel: grpc.Channel) -> None:
    """grpcurl and Postman discover the API through server reflection."""
    (answer,) = _reflect(channel, [reflection_pb2.ServerReflectionRequest(list_services="")])
    names = {s.name for s in answer.list_services_response.service}
    assert {
        V2_SERVICE,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names


def test_reflection_describes_every_listed_service(channel: grpc.Channel) -> None:
    """`grpcurl describe` resolves each listed service to its .proto file: a service
    that is listed but cannot be described breaks those tools."""
    (listing,) = _reflect(channel, [reflection_pb2.ServerReflectionRequest(list_services="")])
    names = sorted(s.name for s in listing.list_services_response.service)
    answers = _reflect(
        channel,
        [reflection_pb2.ServerReflectionRequest(file_containing_symbol=n) for n in names],
    )
    undescribed = {
        name: answer.error_response.error_message
        for name, answer in zip(names, answers, strict=True)
        if not answer.file_descriptor_response.file_descriptor_proto
    }
    assert undescribed == {}


# -- model readiness, metadata and configuration ---------------------------------------


@pytest.mark.parametrize(
    ("model", "version", "ready"),
    [
        ("mlp", "", True),
        ("mlp", "1", True),
        ("versioned", "2", True),
        ("latest", "3", True),
        ("latest", "1", False),  # on disk, but the default policy serves only the latest
        ("mlp", "7", False),
        ("mlp", "abc", False),
        ("no_such_model", "", False),
        ("corrupt", "", False),
        ("bad_manifest", "", False),
    ],
)
def test_model_ready(
    client: triton.InferenceServerClient, model: str, version: str, ready: bool
) -> None:
    """ModelReady answers for a specific version as well as for the server's choice ("")."""
    assert client.is_model_ready(model, version) is ready


def test_model_metadata_describes_the_mlp(client: triton.InferenceServerClient) -> None:
    """Names, datatypes and shapes come from the ONNX file; -1 marks the batch dimension."""
    metadata = client.get_model_metadata("mlp", as_json=True)
    assert metadata["name"] == "mlp"
    assert metadata["versions"] == ["1"]
    assert metadata["platform"] == "onnxruntime_onnx"
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "64"]}]
    assert metadata["outputs"] == [{"name": "output", "datatype": "FP32", "shape": ["-1", "10"]}]


def test_model_metadata_gives_every_datatype(client: triton.InferenceServerClient) -> None:
    metadata = client.get_model_metadata("identity")
    inputs = [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs]
    outputs = [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs]
    assert inputs == [(f"in_{dt}", dt, [-1, -1]) for dt in IDENTITY_DATATYPES]
    assert outputs == [(f"out_{dt}", dt, [-1, -1]) for dt in IDENTITY_DATATYPES]


@pytest.mark.parametrize(("model", "versions"), [("versioned", ["1", "2", "3"]), ("latest", ["3"])])
def test_model_metadata_lists_the_served_versions(
    client: triton.InferenceServerClient, model: str, versions: list[str]
) -> None:
    assert list(client.get_model_metadata(model).versions) == versions


def test_model_config_gives_triton_types_and_dims(client: triton.InferenceServerClient) -> None:
    """ModelConfig speaks Triton's DataType enum (BYTES is TYPE_STRING)."""
    config = client.get_model_config("identity").config
    assert config.name == "identity"
    assert config.platform == "onnxruntime_onnx"
    config_type = {
        dt: "TYPE_STRING" if dt == "BYTES" else f"TYPE_{dt}" for dt in IDENTITY_DATATYPES
    }
    inputs = [
        (t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in config.input
    ]
    outputs = [
        (t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in config.output
    ]
    assert inputs == [(f"in_{dt}", config_type[dt], [-1, -1]) for dt in IDENTITY_DATATYPES]
    assert outputs == [(f"out_{dt}", config_type[dt], [-1, -1]) for dt in IDENTITY_DATATYPES]


def test_model_config_of_mlp(client: triton.InferenceServerClient) -> None:
    config = client.get_model_config("mlp").config
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        ("input", model_config_pb2.TYPE_FP32, [-1, 64])
    ]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [
        ("output", model_config_pb2.TYPE_FP32, [-1, 10])
    ]


def test_model_config_keeps_the_version_policy_of_config_pbtxt(
    client: triton.InferenceServerClient,
) -> None:
    """`versioned` has `version_policy: { all { } }` in its config.pbtxt."""
    config = client.get_model_config("versioned").config
    assert config.version_policy.WhichOneof("policy_choice") == "all"
    assert [t.name for t in config.input] == ["x"]


# -- statistics -----------------------------------------------------------------------


def multi_io_inputs(rows: int) -> list[triton.InferInput]:
    a = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
    return [infer_input("a", a), infer_input("b", a.astype(np.int64))]


def _stats(client: triton.InferenceServerClient, model: str) -> service_pb2.ModelStatistics:
    (stats,) = client.get_inference_statistics(model).model_stats
    return stats


def test_model_statistics_count_exactly_the_requests_sent(
    client: triton.InferenceServerClient,
) -> None:
    """Successes, rows inferred (`inference_count`), executions and compute time grow by
    exactly what this test sent (only the statistics tests use `multi_io`)."""
    started_ms = time.time_ns() // 1_000_000
    before = _stats(client, "multi_io")
    for rows in (1, 3, 4):
        result = client.infer("multi_io", multi_io_inputs(rows))
        assert result.as_numpy("doubled").shape == (rows, 4)
    after = _stats(client, "multi_io")

    assert (after.name, after.version) == ("multi_io", "1")
    grown = after.inference_stats
    was = before.inference_stats
    assert grown.success.count - was.success.count == 3
    assert grown.compute_infer.count - was.compute_infer.count == 3
    assert grown.fail.count == was.fail.count
    assert after.inference_count - before.inference_count == 1 + 3 + 4
    assert after.execution_count - before.execution_count == 3
    assert grown.success.ns > was.success.ns
    assert grown.compute_infer.ns > was.compute_infer.ns
    assert after.last_inference >= started_ms


def raw_request(model: str, arrays: Mapping[str, np.ndarray]) -> service_pb2.ModelInferRequest:
    """A ModelInferRequest with `arrays` as raw inputs (fixed-size datatypes only)."""
    request = service_pb2.ModelInferRequest(model_name=model)
    for name, array in arrays.items():
        request.inputs.add(
            name=name, datatype=np_to_triton_dtype(array.dtype), shape=list(array.shape)
        )
        request.raw_input_contents.append(array.tobytes())
    return request


def _wrong_shape() -> service_pb2.ModelInferRequest:
    a = np.zeros((2, 5), dtype=np.float32)  # multi_io takes [batch, 4]
    return raw_request("multi_io", {"a": a, "b": np.zeros((2, 5), dtype=np.int64)})


def _short_raw_data() -> service_pb2.ModelInferRequest:
    request = raw_request(
        "multi_io", {"a": np.zeros((2, 4), dtype=np.float32), "b": np.zeros((2, 4), np.int64)}
    )
    request.raw_input_contents[0] = request.raw_input_contents[0][:-4]
    return request


@pytest.mark.parametrize(
    "bad_request", [_wrong_shape, _short_raw_data], ids=["shape", "raw-length"]
)
def test_model_statistics_count_a_refused_request_as_failed(
    client: triton.InferenceServerClient,
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
    bad_request: Callable[[], service_pb2.ModelInferRequest],
) -> None:
    """A request the model refuses counts once under `fail`, never as a success,
    whether the model's shape check or the tensor decoding refused it."""
    before = _stats(client, "multi_io").inference_stats
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(bad_request(), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = _stats(client, "multi_io").inference_stats
    assert after.fail.count - before.fail.count == 1
    assert after.success.count == before.success.count


def test_model_statistics_without_a_name_cover_every_loaded_version(
    client: triton.InferenceServerClient,
) -> None:
    stats = client.get_inference_statistics().model_stats
    listed = {(s.name, s.version) for s in stats}
    assert {("mlp", "1"), ("versioned", "1"), ("versioned", "2"), ("versioned", "3")} <= listed
    assert ("latest", "3") in listed
    assert not {name for name, _ in listed} & set(BROKEN_MODELS)


# -- repository index -----------------------------------------------------------------


def test_repository_index_lists_every_model_with_its_state(
    client: triton.InferenceServerClient,
) -> None:
    """Working models are READY per version; broken ones UNAVAILABLE, saying why."""
    index = client.get_model_repository_index().models
    states = {(m.name, m.version): m.state for m in index}
    for ready in [("mlp", "1"), ("multi_io", "1"), ("identity", "1"), ("slow", "1")]:
        assert states[ready] == "READY"
    assert {v for (name, v), s in states.items() if name == "versioned" and s == "READY"} == {
        "1",
        "2",
        "3",
    }
    assert {v for (name, v), s in states.items() if name == "latest" and s == "READY"} == {"3"}

    reasons = {m.name: m.reason for m in index if m.state == "UNAVAILABLE"}
    assert set(reasons) == set(BROKEN_MODELS)
    assert "onnxruntime cannot load" in reasons["corrupt"]
    assert "onnxruntime cannot load" in reasons["truncated"]
    assert "sparsity" in reasons["bad_manifest"]


def test_repository_index_ready_filter_lists_only_ready_models(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    index = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True), timeout=5)
    assert {m.state for m in index.models} == {"READY"}
    names = {m.name for m in index.models}
    assert {"mlp", "multi_io", "identity", "versioned", "latest", "slow"} <= names
    assert not names & set(BROKEN_MODELS)


# -- inference ------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 7, 64, 333])
def test_mlp_answers_exactly_what_onnxruntime_computes(
    client: triton.InferenceServerClient, mlp_reference: ort.InferenceSession, rows: int
) -> None:
    """Bit for bit: nothing is lost or converted on the way through the server."""
    x = mlp_input(rows, seed=rows)
    result = client.infer("mlp", [infer_input("input", x)])
    (expected,) = mlp_reference.run(["output"], {"input": x})
    got = result.as_numpy("output")
    assert got.dtype == np.float32
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("datatype", IDENTITY_DATATYPES)
def test_every_datatype_round_trips_unchanged(
    client: triton.InferenceServerClient, datatype: str
) -> None:
    """The identity model gives back what tritonclient sent, bit for bit, in every
    datatype (extremes, -0.0, NaN, subnormals, empty and non-ASCII strings)."""
    sent = edge_values(datatype)
    result = client.infer(
        "identity",
        identity_inputs({datatype: sent}),
        outputs=[triton.InferRequestedOutput(f"out_{datatype}")],
    )
    output = result.get_output(f"out_{datatype}")
    assert (output.datatype, list(output.shape)) == (datatype, [2, 3])
    got = result.as_numpy(f"out_{datatype}")
    if datatype == "BYTES":
        assert got.reshape(-1).tolist() == as_wire_bytes(sent)
    else:
        assert got.dtype == sent.dtype
        assert got.tobytes() == sent.tobytes()


@pytest.mark.parametrize(
    "requested",
    [
        ["out_FP64", "out_BOOL", "out_INT8"],
        ["out_BYTES"],
        ["out_UINT16", "out_FP32", "out_INT16", "out_BOOL"],
    ],
    ids=lambda names: "+".join(n.removeprefix("out_") for n in names),
)
def test_requested_outputs_come_back_as_requested_in_that_order(
    client: triton.InferenceServerClient, requested: list[str]
) -> None:
    """Only the outputs asked for, in the order asked for (not the model's), each with
    its raw_output_contents entry at the same position."""
    sent = {dt: edge_values(dt) for dt in IDENTITY_DATATYPES}
    result = client.infer(
        "identity",
        identity_inputs(sent),
        outputs=[triton.InferRequestedOutput(name) for name in requested],
    )
    response = result.get_response()
    assert [o.name for o in response.outputs] == requested
    assert len(response.raw_output_contents) == len(requested)
    for name in requested:
        datatype = name.removeprefix("out_")
        got = result.as_numpy(name)
        if datatype == "BYTES":
            assert got.reshape(-1).tolist() == as_wire_bytes(sent[datatype])
        else:
            assert got.tobytes() == sent[datatype].tobytes()


def test_without_requested_outputs_every_output_comes_back_in_model_order(
    client: triton.InferenceServerClient,
) -> None:
    result = client.infer("identity", identity_inputs({}))
    response = result.get_response()
    assert [o.name for o in response.outputs] == [f"out_{dt}" for dt in IDENTITY_DATATYPES]
    assert len(response.raw_output_contents) == len(IDENTITY_DATATYPES)


@pytest.mark.parametrize(
    ("model", "version", "added", "served"),
    [
        ("versioned", "1", 1, "1"),
        ("versioned", "2", 2, "2"),
        ("versioned", "3", 3, "3"),
        ("versioned", "", 3, "3"),  # the server's choice: the highest version
        ("latest", "", 3, "3"),
        ("latest", "3", 3, "3"),
    ],
)
def test_the_requested_version_answers(
    client: triton.InferenceServerClient, model: str, version: str, added: int, served: str
) -> None:
    """Version N of these models computes x + N, so the answer says who served it."""
    x = np.array([[0.5, -1.0, 2.0, 10.0]], dtype=np.float32)
    result = client.infer(model, [infer_input("x", x)], model_version=version)
    assert np.array_equal(result.as_numpy("y"), x + added)
    assert result.get_response().model_version == served


def test_a_version_outside_the_policy_is_not_found(client: triton.InferenceServerClient) -> None:
    """`latest` has versions 1-3 on disk but no config: Triton's default policy
    (latest 1) serves only version 3."""
    x = np.zeros((1, 4), dtype=np.float32)
    code, message = refused(
        lambda: client.infer("latest", [infer_input("x", x)], model_version="1")
    )
    assert code == "NOT_FOUND"
    assert "latest" in message


def test_request_id_is_echoed(client: triton.InferenceServerClient) -> None:
    result = client.infer("mlp", [infer_input("input", mlp_input(1))], request_id="req-42 ✓")
    assert result.get_response().id == "req-42 ✓"
    assert result.get_response().model_name == "mlp"


def test_reserved_parameters_are_accepted(
    client: triton.InferenceServerClient, mlp_reference: ort.InferenceSession
) -> None:
    """tritonclient sends sequence_id/sequence_start/sequence_end/priority/timeout as
    request parameters; the server ignores what it does not support, it does not fail."""
    x = mlp_input(2, seed=5)
    result = client.infer(
        "mlp",
        [infer_input("input", x)],
        sequence_id=17,
        sequence_start=True,
        sequence_end=True,
        priority=2,
        timeout=5_000_000,
    )
    (expected,) = mlp_reference.run(["output"], {"input": x})
    assert np.array_equal(result.as_numpy("output"), expected)


def test_typed_contents_give_the_same_answer_as_raw_for_mlp(
    client: triton.InferenceServerClient, stub: service_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    """fp32_contents instead of raw_input_contents: same output bytes."""
    x = mlp_input(3, seed=11)
    raw_answer = client.infer("mlp", [infer_input("input", x)]).get_response()
    request = service_pb2.ModelInferRequest(model_name="mlp")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[3, 64])
    tensor.contents.fp32_contents.extend(x.reshape(-1).tolist())
    typed_answer = stub.ModelInfer(request, timeout=10)
    assert list(typed_answer.outputs) == list(raw_answer.outputs)
    assert list(typed_answer.raw_output_contents) == list(raw_answer.raw_output_contents)


# Models with one input of one datatype, for typed `contents`: `identity` cannot take
# typed contents at all, because its FP16 input travels only as raw bytes.
TYPED = {
    "FP32": (TensorProto.FLOAT, "fp32_contents"),
    "INT64": (TensorProto.INT64, "int64_contents"),
    "BOOL": (TensorProto.BOOL, "bool_contents"),
    "BYTES": (TensorProto.STRING, "bytes_contents"),
}


def _echo_model(path: Path, element: int) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "echo",
        [helper.make_tensor_value_info("x", element, ["n", "m"])],
        [helper.make_tensor_value_info("y", element, ["n", "m"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx_models.OPSET)])
    model.ir_version = onnx_models.IR_VERSION
    path.parent.mkdir(parents=True)
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def echo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server of `echo_<DATATYPE>` models (y = x), one per typed-contents datatype."""
    root = tmp_path_factory.mktemp("echo_repository")
    for datatype, (element, _) in TYPED.items():
        _echo_model(root / f"echo_{datatype}" / "1" / "model.onnx", element)
    with ServerProcess(root) as process:
        yield process
    assert process.returncode == 0, process.log()


@pytest.mark.parametrize("datatype", list(TYPED))
def test_typed_contents_give_the_same_answer_as_raw(
    echo_server: ServerProcess, datatype: str
) -> None:
    """The same tensor sent as typed `contents` (stub) and as raw bytes (tritonclient)
    gets the same answer, and that answer is the tensor sent."""
    sent = edge_values(datatype)
    model = f"echo_{datatype}"
    with triton.InferenceServerClient(echo_server.grpc_url) as client:
        raw_result = client.infer(model, [infer_input("x", sent)])

    request = service_pb2.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="x", datatype=datatype, shape=list(sent.shape))
    values = as_wire_bytes(sent) if datatype == "BYTES" else sent.reshape(-1).tolist()
    getattr(tensor.contents, TYPED[datatype][1]).extend(values)
    with grpc.insecure_channel(echo_server.grpc_url) as channel:
        typed = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)

    raw = raw_result.get_response()
    assert list(typed.outputs) == list(raw.outputs)
    assert list(typed.raw_output_contents) == list(raw.raw_output_contents)
    got = raw_result.as_numpy("y")
    if datatype == "BYTES":
        assert got.reshape(-1).tolist() == as_wire_bytes(sent)
    else:
        assert got.tobytes() == sent.tobytes()


def test_async_client_concurrent_requests_are_all_answered_correctly(
    server: ServerProcess, mlp_reference: ort.InferenceSession
) -> None:
    """50 requests in flight at once through tritonclient.grpc.aio: every answer is the
    one for its own input (no mix-ups between concurrent requests)."""
    batches = [mlp_input(1 + i % 5, seed=100 + i) for i in range(50)]

    async def send_all() -> list[triton.InferResult]:
        async with triton_aio.InferenceServerClient(server.grpc_url) as client:
            return await asyncio.gather(
                *(
                    client.infer("mlp", [infer_input("input", x)], request_id=str(i))
                    for i, x in enumerate(batches)
                )
            )

    results = asyncio.run(send_all())
    for i, (x, result) in enumerate(zip(batches, results, strict=True)):
        (expected,) = mlp_reference.run(["output"], {"input": x})
        assert result.get_response().id == str(i)
        assert np.array_equal(result.as_numpy("output"), expected)
