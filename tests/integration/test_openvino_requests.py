"""Bad requests to models served by OpenVINO get exactly what they get on onnxruntime:
the same status, a message naming what was expected, and a server that serves on.

The same cases as test_bad_requests.py, on a server whose CPU engine is OpenVINO (the
cases that need the `identity` model are left out: its BYTES tensors are not something
OpenVINO can exchange, so it does not load there, and they are refused while decoding,
before any engine, anyway).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton

from sparseserve.client.server_process import ServerProcess
from tests.integration.test_bad_requests import (
    INVALID,
    Send,
    Stub,
    assert_mlp_still_serves,
    refusal,
    via_triton,
)

pytestmark = pytest.mark.integration

IDENTITY_CASES = {
    "missing input",
    "BYTES element longer than data",
    "BYTES data with too few elements",
    "FP16 as typed contents",
    "typed value out of range",
    "BYTES not UTF-8",
    "BOOL byte that is not 0 or 1",
}
ON_MLP = [case for case in INVALID if case.id not in IDENTITY_CASES]


@pytest.fixture(scope="module")
def openvino_server(repository: Path) -> Iterator[ServerProcess]:
    with ServerProcess(repository, "--cpu-engine", "openvino") as process:
        yield process
    assert process.returncode == 0, process.log()


@pytest.fixture
def client(openvino_server: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(openvino_server.grpc_url) as c:
        yield c


@pytest.fixture(scope="module")
def stub(openvino_server: ServerProcess) -> Iterator[Stub]:
    with grpc.insecure_channel(openvino_server.grpc_url) as channel:
        yield Stub(channel)


def test_the_models_are_served_by_openvino(client: triton.InferenceServerClient) -> None:
    for model in ("mlp", "multi_io", "slow"):
        assert client.get_model_config(model).config.backend == "openvino"


@pytest.mark.parametrize(("send", "keywords"), ON_MLP)
def test_invalid_request_is_refused_precisely_and_the_server_keeps_serving(
    client: triton.InferenceServerClient, stub: Stub, send: Send, keywords: list[str]
) -> None:
    code, message = refusal(send, client, stub)
    assert code == "INVALID_ARGUMENT", message
    missing = [word for word in keywords if word not in message]
    assert not missing, f"{missing} not in {message!r}"
    assert_mlp_still_serves(client)


def test_dynamic_dimensions_that_do_not_broadcast_are_invalid_argument(
    client: triton.InferenceServerClient, stub: Stub
) -> None:
    """multi_io adds a [2, 4] and b [3, 4]: refused by OpenVINO's shape inference before
    they reach the compiled model (which, with one thread, answered them with [1, 4]
    and then gave wrong answers to valid requests). The client's fault, without
    OpenVINO's source paths in the message; valid requests are answered right after."""
    send = via_triton(
        "multi_io", {"a": np.ones((2, 4), np.float32), "b": np.ones((3, 4), np.int64)}
    )
    code, message = refusal(send, client, stub)
    assert code == "INVALID_ARGUMENT", message
    assert "'multi_io'" in message and "a [2, 4], b [3, 4]" in message
    assert "inconsistent" in message
    assert "src/" not in message and ".cpp" not in message
    assert_mlp_still_serves(client)
    for rows_a, rows_b in ((1, 1), (2, 2), (1, 3), (4, 1)):
        a = np.arange(rows_a * 4, dtype=np.float32).reshape(rows_a, 4)
        b = np.ones((rows_b, 4), np.int64)
        inputs = [
            triton.InferInput("a", [rows_a, 4], "FP32"),
            triton.InferInput("b", [rows_b, 4], "INT64"),
        ]
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(b)
        result = client.infer("multi_io", inputs)
        np.testing.assert_array_equal(result.as_numpy("sum"), a + b)


@pytest.mark.parametrize("model", ["corrupt", "truncated"])
def test_a_corrupt_model_file_is_unavailable_and_says_why(
    client: triton.InferenceServerClient, stub: Stub, model: str
) -> None:
    (reason,) = [m.reason for m in client.get_model_repository_index().models if m.name == model]
    assert "openvino cannot load" in reason
    code, message = refusal(
        via_triton(model, {"input": np.zeros((1, 64), np.float32)}), client, stub
    )
    assert code == "UNAVAILABLE", message
    assert reason in message
    assert_mlp_still_serves(client)


def test_a_model_with_string_tensors_is_refused_by_openvino_and_says_so(
    client: triton.InferenceServerClient,
) -> None:
    (reason,) = [
        m.reason for m in client.get_model_repository_index().models if m.name == "identity"
    ]
    assert "'in_BYTES'" in reason and "string" in reason and "onnxruntime" in reason


def test_an_fp16_variant_keeps_its_tensor_names_on_openvino(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """`quantize: {mode: fp16}` keeps float32 inputs and outputs behind Cast nodes, and
    compiling gave those ports a second name that OpenVINO reported first: the model's
    `input` was served as `graph_input_cast_0`, and every client's request was refused.
    Its names are the file's, as on onnxruntime, and it answers as the fp32 model does."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from sparseserve.testing import onnx_models

    dense = onnx_models.mlp(tmp_path / "dense.onnx")
    half = convert_float_to_float16(onnx.load(dense), keep_io_types=True)
    (tmp_path / "models" / "half" / "1").mkdir(parents=True)
    onnx.save(half, tmp_path / "models" / "half" / "1" / "model.onnx")
    server = start_server(tmp_path / "models", "--cpu-engine", "openvino")
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    with triton.InferenceServerClient(server.grpc_url) as client:
        metadata = client.get_model_metadata("half")
        assert [t.name for t in metadata.inputs] == ["input"]
        assert [t.name for t in metadata.outputs] == ["output"]
        assert client.get_model_config("half").config.backend == "openvino"
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        y = client.infer("half", [tensor]).as_numpy("output")
    expected = ort_run(dense, x)
    np.testing.assert_allclose(y, expected, rtol=2e-2, atol=2e-2)


def ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"input": x})
    return np.asarray(y)
