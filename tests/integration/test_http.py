"""The v2 REST endpoint, as its users see it: `tritonclient.http` (sync and asyncio, JSON
and binary tensors) and raw HTTP requests (the README's curl examples, and the bad input
tritonclient cannot send) against the real server process. Also the metrics port, which
serves `/metrics` and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import http.client
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
import tritonclient.http.aio as triton_http_aio
from tritonclient.utils import InferenceServerException, np_to_triton_dtype, triton_to_np_dtype

from sparseserve.client.server_process import ServerProcess
from sparseserve.repository.manifest import VariantManifest
from sparseserve.testing import onnx_models
from tests import routing_repository
from tests.integration.test_lifecycle import WIDTH, rows_lasting, wait_for
from tests.scrape import inflight, scrape, value

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"
# Every datatype a JSON tensor can carry (FP16 and BF16 travel as binary data in practice,
# and tritonclient cannot put BF16 in numpy at all).
JSON_DATATYPES = tuple(dt for dt in onnx_models.ELEMENT_TYPES if dt not in ("FP16", "BF16"))
BINARY_DATATYPES = tuple(dt for dt in onnx_models.ELEMENT_TYPES if dt != "BF16")


# -- helpers --------------------------------------------------------------------------


def request(
    server: ServerProcess,
    method: str,
    path: str,
    body: bytes | str | dict[str, object] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP request to the server's REST port: (status, headers, body)."""
    if isinstance(body, dict):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    call = urllib.request.Request(
        f"http://{server.http_url}{path}", data=body, method=method, headers=headers or {}
    )
    try:
        with urllib.request.urlopen(call, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), error.read()


def error_of(server: ServerProcess, method: str, path: str, body: object = None) -> tuple[int, str]:
    """(status, the `error` of the JSON body) of a request that fails."""
    status, headers, raw = request(server, method, path, body)  # type: ignore[arg-type]
    assert status >= 400, raw
    assert headers["Content-Type"].startswith("application/json")
    return status, json.loads(raw)["error"]


def mlp_rows(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 64)).astype(np.float32)


def http_input(name: str, array: np.ndarray, binary: bool) -> triton_http.InferInput:
    tensor = triton_http.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def grpc_answer(server: ServerProcess, model: str, name: str, array: np.ndarray) -> np.ndarray:
    """What the gRPC endpoint answers: the reference the REST answers must equal."""
    with triton_grpc.InferenceServerClient(server.grpc_url) as client:
        tensor = triton_grpc.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        return client.infer(model, [tensor]).as_numpy("output")


def assert_serves(server: ServerProcess) -> None:
    """The server still answers a good request."""
    with triton_http.InferenceServerClient(server.http_url) as client:
        x = mlp_rows(1)
        result = client.infer("mlp", [http_input("input", x, binary=True)])
        assert result.as_numpy("output").shape == (1, 10)


def edge_values(datatype: str) -> np.ndarray:
    """A [2, 3] tensor of `datatype` holding values most likely to be mangled."""
    if datatype == "BOOL":
        return np.array([[True, False, True], [False, False, True]])
    if datatype == "BYTES":
        return np.array([["", "héllo wörld", "日本語 ✓"], ["a\x00b", "plain", "🎉"]], dtype=object)
    dtype = np.dtype(triton_to_np_dtype(datatype))
    if dtype.kind == "f":
        info = np.finfo(dtype)
        return np.array([[info.min, info.max, -0.0], [np.inf, info.smallest_subnormal, 1.5]], dtype)
    info = np.iinfo(dtype)
    return np.array([[info.min, info.max, 0], [1, info.max - 1, info.min + 1]], dtype=dtype)


@pytest.fixture
def http_client(server: ServerProcess) -> Iterator[triton_http.InferenceServerClient]:
    with triton_http.InferenceServerClient(server.http_url) as client:
        yield client


# -- health, metadata, config, statistics ---------------------------------------------


def test_health_and_server_metadata(
    server: ServerProcess, http_client: triton_http.InferenceServerClient
) -> None:
    assert http_client.is_server_live()
    assert http_client.is_server_ready()
    assert http_client.is_model_ready("mlp")
    assert http_client.is_model_ready("versioned", "2")
    assert not http_client.is_model_ready("versioned", "9")
    assert not http_client.is_model_ready("no_such_model")
    assert not http_client.is_model_ready("corrupt")
    metadata = http_client.get_server_metadata()
    assert metadata["name"] == "sparseserve"
    assert set(metadata["extensions"]) >= {"model_repository", "statistics"}
    # A false answer says why, for a human reading it with curl.
    status, reason = error_of(server, "GET", "/v2/models/corrupt/ready")
    assert status == 400 and "corrupt" in reason


def test_model_metadata_and_config(http_client: triton_http.InferenceServerClient) -> None:
    assert http_client.get_model_metadata("mlp") == {
        "name": "mlp",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}],
    }
    assert http_client.get_model_metadata("versioned", "2")["versions"] == ["1", "2", "3"]
    config = http_client.get_model_config("mlp")
    assert config["name"] == "mlp"
    assert config["input"][0]["dims"] == [-1, 64]  # numbers, as Triton writes them
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    with pytest.raises(InferenceServerException) as info:
        http_client.get_model_metadata("no_such_model")
    assert info.value.status() == "404" and "no_such_model" in info.value.message()


def test_statistics_count_rest_requests(http_client: triton_http.InferenceServerClient) -> None:
    def successes() -> int:
        (stats,) = http_client.get_inference_statistics("multi_io")["model_stats"]
        return stats["inference_stats"]["success"]["count"]

    before = successes()
    inputs = [http_input("a", np.ones((1, 4), np.float32), True)]
    inputs.append(http_input("b", np.ones((1, 4), np.int64), True))
    http_client.infer("multi_io", inputs)
    assert successes() == before + 1
    every = http_client.get_inference_statistics()["model_stats"]
    assert {"mlp", "multi_io", "identity"} <= {s["name"] for s in every}
    assert isinstance(every[0]["inference_count"], int)
    with pytest.raises(InferenceServerException) as info:
        http_client.get_inference_statistics("no_such_model")
    assert info.value.status() == "404"


# -- inference ------------------------------------------------------------------------


@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-in", "json-in"])
@pytest.mark.parametrize("binary_out", [True, False, None], ids=["binary", "json", "default"])
def test_infer_matches_grpc(
    server: ServerProcess,
    http_client: triton_http.InferenceServerClient,
    binary_in: bool,
    binary_out: bool | None,
) -> None:
    """JSON or binary inputs and outputs: the same numbers as the gRPC endpoint."""
    x = mlp_rows(3, seed=1)
    outputs = None
    if binary_out is not None:
        outputs = [triton_http.InferRequestedOutput("output", binary_data=binary_out)]
    result = http_client.infer(
        "mlp", [http_input("input", x, binary_in)], outputs=outputs, request_id="r-1"
    )
    answer = result.get_response()
    assert answer["model_name"] == "mlp" and answer["model_version"] == "1"
    assert answer["id"] == "r-1"
    (output,) = answer["outputs"]
    # No outputs named: tritonclient asks for binary ones (binary_data_output).
    assert ("binary_data_size" in output.get("parameters", {})) == (binary_out is not False)
    # JSON carries float32 values exactly (as their shortest float64 repr).
    np.testing.assert_array_equal(result.as_numpy("output"), grpc_answer(server, "mlp", "input", x))


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_every_datatype_round_trips(
    http_client: triton_http.InferenceServerClient, binary: bool
) -> None:
    datatypes = BINARY_DATATYPES if binary else JSON_DATATYPES
    arrays = {dt: edge_values(dt) for dt in datatypes}
    inputs, outputs = [], []
    for dt in onnx_models.ELEMENT_TYPES:
        array = arrays.get(dt)
        if array is None:  # BF16 (and FP16 in JSON): one binary element nobody looks at
            tensor = triton_http.InferInput(f"in_{dt}", [1, 1], dt)
            tensor.set_data_from_numpy(np.zeros((1, 1), np.float32 if dt == "BF16" else "f2"))
            inputs.append(tensor)
            continue
        inputs.append(http_input(f"in_{dt}", array, binary))
        outputs.append(triton_http.InferRequestedOutput(f"out_{dt}", binary_data=binary))
    result = http_client.infer("identity", inputs, outputs=outputs)
    for dt, sent in arrays.items():
        got = result.as_numpy(f"out_{dt}")
        if dt == "BYTES":
            # Binary BYTES come back as bytes, JSON ones as text.
            expected = [s.encode() if binary else s for s in sent.reshape(-1)]
            assert list(got.reshape(-1)) == expected
        else:
            assert got.dtype == sent.dtype, dt
            np.testing.assert_array_equal(got, sent, err_msg=dt)
        assert got.shape == sent.shape


def test_asyncio_client(server: ServerProcess) -> None:
    x = mlp_rows(2, seed=3)

    async def run() -> tuple[bool, dict[str, object], list[np.ndarray]]:
        async with triton_http_aio.InferenceServerClient(server.http_url) as client:
            ready = await client.is_server_ready()
            metadata = await client.get_model_metadata("mlp")
            results = await asyncio.gather(
                *(client.infer("mlp", [http_input("input", x, True)]) for _ in range(4))
            )
            return ready, metadata, [r.as_numpy("output") for r in results]

    ready, metadata, answers = asyncio.run(run())
    assert ready and metadata["name"] == "mlp"
    expected = grpc_answer(server, "mlp", "input", x)
    for answer in answers:
        np.testing.assert_array_equal(answer, expected)


def test_version_in_the_path(http_client: triton_http.InferenceServerClient) -> None:
    x = np.zeros((1, 4), np.float32)
    for version in ("1", "3"):
        result = http_client.infer("versioned", [http_input("x", x, True)], model_version=version)
        assert result.get_response()["model_version"] == version
        np.testing.assert_array_equal(result.as_numpy("y"), x + int(version))


def test_rest_requests_count_in_the_same_metrics_as_grpc(server: ServerProcess) -> None:
    labels = {"model": "multi_io", "version": "1"}
    before = value(scrape(server), "sparseserve_requests_total", code="OK", **labels)
    body = {
        "inputs": [
            {"name": "a", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]},
            {"name": "b", "datatype": "INT64", "shape": [1, 4], "data": [1, 2, 3, 4]},
        ]
    }
    assert request(server, "POST", "/v2/models/multi_io/infer", body)[0] == 200
    after = value(scrape(server), "sparseserve_requests_total", code="OK", **labels)
    assert after == before + 1


# -- bad input ------------------------------------------------------------------------

MLP_INFER = "/v2/models/mlp/infer"


def mlp_body(**tensor: object) -> dict[str, object]:
    base: dict[str, object] = {"name": "input", "datatype": "FP32", "shape": [1, 64]}
    base["data"] = [0.0] * 64
    base.update(tensor)
    return {"inputs": [base]}


@pytest.mark.parametrize(
    ("path", "body", "status", "expected"),
    [
        (MLP_INFER, b"{not json", 400, "not valid JSON"),
        (MLP_INFER, {"inputs": "x"}, 400, "'inputs'"),
        (MLP_INFER, mlp_body(shape=[1, 63], data=[0.0] * 63), 400, "expects shape [-1, 64]"),
        (MLP_INFER, mlp_body(datatype="INT32", data=[0] * 64), 400, "expects datatype FP32"),
        (MLP_INFER, mlp_body(name="pixels"), 400, "has no input 'pixels'"),
        (MLP_INFER, mlp_body(datatype="FP33"), 400, "unknown datatype 'FP33'"),
        (MLP_INFER, mlp_body(data=[0.0] * 63), 400, "data has 63 elements"),
        (MLP_INFER, mlp_body(data=["a"] * 64), 400, "FP32 data must be JSON numbers"),
        (MLP_INFER, mlp_body(data=None), 400, "'data' must be a JSON array"),
        (MLP_INFER, {**mlp_body(), "outputs": [{"name": "nope"}]}, 400, "has no output 'nope'"),
        (
            MLP_INFER,
            mlp_body(parameters={"shared_memory_region": "r"}),
            400,
            "shared-memory extension is not supported",
        ),
        (
            MLP_INFER,
            {
                **mlp_body(),
                "outputs": [{"name": "output", "parameters": {"shared_memory_region": "r"}}],
            },
            400,
            "shared-memory extension is not supported",
        ),
        (
            MLP_INFER,
            b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            400,
            "nested too deeply",
        ),
        ("/v2/models/no_such_model/infer", mlp_body(), 404, "no_such_model"),
        ("/v2/models/mlp/versions/7/infer", mlp_body(), 404, "no version '7'"),
        ("/v2/models/corrupt/infer", mlp_body(), 503, "corrupt"),
        ("/v2/models/no_such_model", None, 404, "no_such_model"),
        ("/v2/no/such/route", None, 404, "no v2 REST route GET /v2/no/such/route"),
        ("/v2/models", None, 404, "listed by POST /v2/repository/index"),
        (MLP_INFER, mlp_body(data=[0.0] * 63 + [True]), 400, "JSON numbers, got True"),
        (MLP_INFER, mlp_body(data=[0.0] * 63 + [None]), 400, "JSON numbers, got None"),
        ("/metrics", None, 404, "metrics are on the metrics port"),
    ],
    ids=lambda v: v if isinstance(v, int) else None,
)
def test_bad_requests_get_their_status_and_the_server_serves_on(
    server: ServerProcess, path: str, body: object, status: int, expected: str
) -> None:
    method = "GET" if body is None else "POST"
    got, message = error_of(server, method, path, body)
    assert (got, expected in message) == (status, True), message
    assert_serves(server)


def test_binary_framing_errors(server: ServerProcess) -> None:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [1, 64],
                    "parameters": {"binary_data_size": 256},
                }
            ]
        }
    ).encode()
    raw = np.zeros((1, 64), np.float32).tobytes()
    cases = [
        (header + raw, str(len(header)), None),  # the good one
        (header + raw[:-4], str(len(header)), "only 252 bytes of binary data remain"),
        (header + raw + b"xx", str(len(header)), "2 bytes of binary data follow"),
        (header + raw, str(len(header) + len(raw) + 1), "Inference-Header-Content-Length"),
        (header + raw, "ten", "Inference-Header-Content-Length"),
    ]
    for body, length, expected in cases:
        status, _, answer = request(
            server,
            "POST",
            MLP_INFER,
            body,
            {"Inference-Header-Content-Length": length, "Content-Type": "application/octet-stream"},
        )
        if expected is None:
            assert status == 200, answer
        else:
            assert status == 400 and expected in json.loads(answer)["error"], answer


def test_a_repeated_header_length_is_refused(server: ServerProcess) -> None:
    """Two Inference-Header-Content-Length fields could each frame the body differently:
    400 naming the header, rather than serving by whichever one is read first."""
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 64],
              "parameters": {"binary_data_size": 256}}  # fmt: skip
    header = json.dumps({"inputs": [tensor]}).encode()
    body = header + np.zeros((1, 64), np.float32).tobytes()
    host, port = server.http_url.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.putrequest("POST", MLP_INFER)
        connection.putheader("Content-Type", "application/octet-stream")
        connection.putheader("Content-Length", str(len(body)))
        connection.putheader("Inference-Header-Content-Length", str(len(header)))
        connection.putheader("Inference-Header-Content-Length", str(len(header) + 4))
        connection.endheaders(body)
        response = connection.getresponse()
        error = json.loads(response.read())["error"]
    finally:
        connection.close()
    assert response.status == 400, error
    assert "Inference-Header-Content-Length is given 2 times" in error
    assert_serves(server)


def test_a_client_closing_mid_body_leaves_no_error_in_the_log(server: ServerProcess) -> None:
    """Clients that send half a body and hang up (at will, and many times) cost the log
    nothing louder than a debug line: no ERROR, no traceback; the server serves on."""
    before = len(server.log())
    host, port = server.http_url.rsplit(":", 1)
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=10) as connection:
            connection.sendall(
                f"POST {MLP_INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                "\r\nContent-Length: 100000\r\n\r\n".encode()
                + b'{"inputs": ['
            )
            time.sleep(0.1)
    assert_serves(server)
    added = server.log()[before:]
    assert "Traceback" not in added and "ERROR" not in added, added


def test_wrong_method_is_405_with_a_json_error(server: ServerProcess) -> None:
    status, message = error_of(server, "GET", MLP_INFER)
    assert status == 405 and "GET" in message


def test_load_of_a_corrupt_model_is_400(server: ServerProcess) -> None:
    """FAILED_PRECONDITION (a load that fails) is 400, with the reason."""
    status, message = error_of(server, "POST", "/v2/repository/models/corrupt/load", {})
    assert status == 400 and "corrupt" in message


# -- repository, limits, settings: dedicated servers -----------------------------------


def test_repository_index_load_and_unload(
    repository: Path, start_server: Callable[..., ServerProcess]
) -> None:
    server = start_server(repository, "--load-model", "mlp")
    with triton_http.InferenceServerClient(server.http_url) as client:
        index = {row["name"]: row for row in client.get_model_repository_index()}
        assert index["mlp"]["state"] == "READY" and index["mlp"]["version"] == "1"
        assert "multi_io" in index and index["multi_io"]["state"] != "READY"
        ready_only = request(server, "POST", "/v2/repository/index", {"ready": True})
        assert [row["name"] for row in json.loads(ready_only[2])] == ["mlp"]

        assert not client.is_model_ready("multi_io")
        client.load_model("multi_io")
        assert client.is_model_ready("multi_io")
        client.unload_model("mlp")
        assert not client.is_model_ready("mlp")
        with pytest.raises(InferenceServerException) as info:
            client.infer("mlp", [http_input("input", mlp_rows(1), True)])
        assert info.value.status() == "503"
        with pytest.raises(InferenceServerException) as info:
            client.load_model("no_such_model")
        assert info.value.status() == "404"
    status, message = error_of(
        server, "POST", "/v2/repository/models/mlp/load", {"parameters": {"config": "{}"}}
    )
    assert status == 400 and "not supported" in message


def test_limits_body_size_and_inflight(
    repository: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """A body over max_http_body_bytes is refused with 413; requests over the in-flight
    limit with 429 (Overloaded); the server serves on after both."""
    server = start_server(
        repository,
        "--max-http-body-bytes", "150000",
        "--max-inflight-per-model", "1",
        "--inference-threads", "2",
    )  # fmt: skip
    status, message = error_of(server, "POST", MLP_INFER, mlp_body(data=[0.0] * 40000))
    assert status == 413 and "150000" in message
    assert_serves(server)

    slow = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [64, 512]}]}
    slow["inputs"][0]["parameters"] = {"binary_data_size": 64 * 512 * 4}
    header = json.dumps(slow).encode()
    body = header + np.ones((64, 512), np.float32).tobytes()
    headers = {"Inference-Header-Content-Length": str(len(header))}

    def post_slow(_: int) -> tuple[int, dict[str, str], bytes]:
        return request(server, "POST", "/v2/models/slow/infer", body, headers)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(post_slow, range(8)))
    statuses = sorted(status for status, _, _ in answers)
    assert 200 in statuses and 429 in statuses, statuses
    for status, _, raw in answers:
        if status == 429:
            assert "limit 1" in json.loads(raw)["error"]
    assert_serves(server)


def raw_http(server: ServerProcess, head: bytes) -> socket.socket:
    """A connection to the REST port that has sent `head` (and nothing more)."""
    host, port = server.http_url.rsplit(":", 1)
    connection = socket.create_connection((host, int(port)), timeout=10)
    connection.sendall(head)
    return connection


def read_status(connection: socket.socket) -> tuple[int, bytes]:
    """The status and whatever came with it, until the server closes or goes quiet."""
    data = b""
    with contextlib.suppress(TimeoutError):
        while chunk := connection.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data and b'"error"' in data:
                break
    return int(data.split(b" ", 2)[1]), data


def test_the_rest_body_counts_against_the_request_budget(
    server: ServerProcess, repository: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """A REST inference body of 64 KiB or more counts against max_inflight_request_bytes
    (shared with gRPC) from its arrival until its answer, its JSON at 8 times its size:
    while a slow binary request holds most of the budget, a 100 KB JSON body is refused
    with 429; alone it is served. A Content-Length past max_http_body_bytes is refused
    with 413 before any body is sent."""
    rows = rows_lasting(server, 1.0)  # on the session's server
    slow = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, WIDTH],
                        "parameters": {"binary_data_size": rows * WIDTH * 4}}]}  # fmt: skip
    header = json.dumps(slow).encode()
    slow_body = header + np.ones((rows, WIDTH), np.float32).tobytes()
    json_body = json.dumps(mlp_body(shape=[300, 64], data=[0.5] * 300 * 64)).encode()
    assert len(json_body) > 64 * 1024
    budget = len(slow_body) + 4 * len(json_body)  # the slow body and half the JSON's 8x
    server = start_server(repository, "--max-http-body-bytes", str(len(slow_body) + 2**20),
                          "--inference-threads", "2",
                          "--max-inflight-request-bytes", str(budget))  # fmt: skip
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(request, server, "POST", "/v2/models/slow/infer", slow_body,
                           {"Inference-Header-Content-Length": str(len(header))})  # fmt: skip
        wait_for(lambda: inflight(server, "slow") == 1, "the slow request to run")
        status, message = error_of(server, "POST", MLP_INFER, json_body)
        assert status == 429 and "max_inflight_request_bytes" in message, message
        assert held.result(timeout=60)[0] == 200
    status, _, _ = request(server, "POST", MLP_INFER, json_body)
    assert status == 200
    huge = (f"POST {MLP_INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 99999999999\r\nConnection: close\r\n\r\n").encode()  # fmt: skip
    with raw_http(server, huge) as connection:
        status, data = read_status(connection)
    assert status == 413 and b"max_http_body_bytes" in data, data
    assert_serves(server)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_from_tritonclient_are_answered_as_plain_ones(
    server: ServerProcess, http_client: triton_http.InferenceServerClient, algorithm: str
) -> None:
    """tritonclient.http's `request_compression_algorithm` (Triton takes gzip and
    deflate): the answer equals gRPC's, in JSON and in binary form; the repository
    routes take compressed bodies too."""
    x = mlp_rows(300)  # 77 KB: inflated on the codec thread
    want = grpc_answer(server, "mlp", "input", x)
    for binary in (False, True):
        result = http_client.infer(
            "mlp", [http_input("input", x, binary)], request_compression_algorithm=algorithm
        )
        np.testing.assert_array_equal(result.as_numpy("output"), want)
    small = http_client.infer(
        "mlp", [http_input("input", x[:1], True)], request_compression_algorithm=algorithm
    )
    np.testing.assert_array_equal(small.as_numpy("output"), want[:1])
    compress = gzip.compress if algorithm == "gzip" else zlib.compress
    status, _, raw = request(server, "POST", "/v2/repository/index", compress(b"{}"),
                             {"Content-Encoding": algorithm})  # fmt: skip
    assert status == 200 and json.loads(raw)
    # An empty body is empty whatever its encoding says (tritonclient sends one).
    status, _, _ = request(server, "POST", "/v2/repository/index", b"",
                           {"Content-Encoding": algorithm})  # fmt: skip
    assert status == 200


def test_gzip_of_several_members_and_x_gzip_are_gzip(
    server: ServerProcess, http_client: triton_http.InferenceServerClient
) -> None:
    """RFC 1952 lets a gzip body hold several members back to back (as `cat a.gz b.gz`
    makes), and RFC 9110 names x-gzip an alias of gzip: both are read as gzip."""
    x = mlp_rows(2)
    body = json.dumps(mlp_body(shape=[2, 64], data=x.reshape(-1).tolist())).encode()
    want = grpc_answer(server, "mlp", "input", x)
    halves = gzip.compress(body[:100]) + gzip.compress(body[100:])
    for encoding, data in (("gzip", halves), ("x-gzip", gzip.compress(body))):
        status, _, raw = request(server, "POST", MLP_INFER, data, {"Content-Encoding": encoding})
        assert status == 200, raw
        (output,) = json.loads(raw)["outputs"]
        np.testing.assert_allclose(np.array(output["data"]).reshape(2, 10), want, rtol=1e-6)


@pytest.mark.parametrize(
    ("encoding", "body", "expected"),
    [
        ("gzip", b'{"inputs": []}', "not valid gzip data"),
        ("deflate", b'{"inputs": []}', "not valid deflate data"),
        ("gzip", gzip.compress(b'{"inputs": []}')[:-4], "not a whole gzip stream"),
        ("gzip", gzip.compress(b"{}") + b"junk", "not valid gzip data"),
        ("deflate", zlib.compress(b"{}") + b"junk", "data after its deflate stream"),
        ("br", b"\x0b\x02\x80{}\x03", "'br' is not supported"),
        ("gzip, gzip", b"{}", "not supported"),
        # 200,000 of them held the codec thread for 14 s (each copies the rest of the body)
        ("gzip", gzip.compress(b"") * 65 + gzip.compress(b"{}"), "more than 64 gzip members"),
    ],
)
def test_a_body_that_is_not_what_its_content_encoding_says_is_a_400(
    server: ServerProcess, encoding: str, body: bytes, expected: str
) -> None:
    """Not a 500 with a traceback in the log (it was, for each of these but the last)."""
    status, _, raw = request(server, "POST", MLP_INFER, body, {"Content-Encoding": encoding})
    assert status == 400 and expected in json.loads(raw)["error"], raw
    assert_serves(server)


def test_a_compressed_body_past_the_limit_is_refused_without_inflating_the_rest(
    repository: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """256 KB of gzip that inflates to 256 MiB, to a server that takes 4 MiB bodies: 413,
    and no more than the limit is ever inflated (all of it was, after the 413: seconds
    of CPU on the event loop, hundreds of MB, every client of both protocols stalled)."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)  # gzip framing
    bomb = b"".join([compressor.compress(bytes(1 << 20)) for _ in range(256)])
    bomb += compressor.flush()
    server = start_server(repository, "--max-http-body-bytes", str(4 << 20))
    started = time.perf_counter()
    zlib.decompress(bomb, 31)
    inflate_all = time.perf_counter() - started  # what inflating all of it costs here
    before = _cpu_seconds(server.pid)
    head = (f"POST {MLP_INFER} HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n"
            f"Content-Length: {len(bomb)}\r\n\r\n").encode()  # fmt: skip
    with raw_http(server, head) as connection:
        connection.sendall(bomb)
        status, data = read_status(connection)
    assert status == 413 and b"max_http_body_bytes" in data, data
    time.sleep(0.5)
    spent = _cpu_seconds(server.pid) - before
    assert spent < inflate_all / 4, (
        f"{spent:.2f} s of server CPU; inflating it all: {inflate_all:.2f} s"
    )
    assert_serves(server)


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_requests_that_cannot_be_parsed_are_400_without_a_traceback_each(
    repository: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """A bad request line, a bad chunk size, a header line too long: each is answered
    400 and logged at most as one DEBUG line (each was an ERROR with a traceback: 28
    bytes from any client wrote 550 bytes of log)."""
    server = start_server(repository)
    malformed = [
        b"GET /\x7f HTTP/1.1\r\nHost: x\r\n\r\n",
        f"POST {MLP_INFER} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        "zz\r\n".encode(),
        b"GET /v2 HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 10_000 + b"\r\n\r\n",
    ]
    before = len(server.log())
    for head in malformed * 10:
        with raw_http(server, head) as connection:
            assert connection.recv(100).split(b" ", 2)[1] == b"400"
    assert_serves(server)
    written = server.log()[before:]
    assert "Traceback" not in written and "Error handling request" not in written, written


def test_connections_past_the_limit_are_refused_and_grpc_serves_on(
    repository: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """Idle connections (a client sending a header line now and then never finishes a
    request) used to stay open in any number, until the process ran out of file
    descriptors and gRPC with it. Past max_http_connections a new one is answered 503
    and closed; gRPC is untouched; a freed slot serves again."""
    server = start_server(repository, "--max-http-connections", "3")
    # Each answers one request (so the server has set it up), then sends half of another.
    idle = []
    for _ in range(3):
        connection = raw_http(server, b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        assert connection.recv(65536).startswith(b"HTTP/1.1 200")
        connection.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n")
        idle.append(connection)
    with raw_http(server, b"") as extra:
        status, data = read_status(extra)
    assert status == 503 and b"max_http_connections" in data, data
    with triton_grpc.InferenceServerClient(server.grpc_url) as client:
        assert client.is_server_ready()
    for connection in idle:
        connection.close()
    deadline = time.monotonic() + 10
    while True:
        status, _, _ = request(server, "GET", "/v2/health/ready")
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert status == 200
    assert_serves(server)


def test_http_can_be_turned_off(
    repository: Path, start_server: Callable[..., ServerProcess]
) -> None:
    server = start_server(repository, "--allow-http", "false", "--load-model", "identity")
    assert server.http_port is None
    assert "REST off" in server.log()


def test_a_family_call_is_routed_and_shadowed_as_over_grpc(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """A REST request may name a family: the policy's variant answers (and says so), and
    the request is shadowed once its answer has been sent."""
    repository = routing_repository.build(tmp_path / "repository")
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "families: {fam: {default: dense, shadow: {variants: [pruned50], fraction: 1}}}"
    )
    server = start_server(repository, "--traffic-policy", str(policy))
    x = routing_repository.pixels(2)
    with triton_http.InferenceServerClient(server.http_url) as client:
        result = client.infer("fam", [http_input("input", x, True)])
    assert result.get_response()["model_name"] == "fam.dense"

    def compared() -> float:
        return value(
            scrape(server), "sparseserve_shadow_runs_total", family="fam",
            variant="pruned50", baseline="dense", outcome="compared",
        )  # fmt: skip

    wait_for(lambda: compared() == 1, "the shadow run to be compared")


# -- the metrics port ------------------------------------------------------------------


def test_metrics_port_serves_metrics_and_404_elsewhere(server: ServerProcess) -> None:
    """An HTTP readiness probe or tritonclient.http pointed at the metrics port by
    mistake must fail, not read the metrics text as a yes."""
    base = f"http://127.0.0.1:{server.metrics_port}"
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
        assert response.status == 200
        assert b"sparseserve_requests_total" in response.read()
    for path in ("/v2/health/ready", "/v2/health/live", "/", "/v2", "/metricsx"):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{base}{path}", timeout=5)
        with info.value:
            assert info.value.code == 404, path
    with triton_http.InferenceServerClient(f"127.0.0.1:{server.metrics_port}") as client:
        assert not client.is_server_ready()
        assert not client.is_server_live()


# -- the README's curl examples ---------------------------------------------------------


def readme_curl_commands() -> list[str]:
    """The curl commands of the README's REST section, as a user would paste them."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n### REST", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```(?:sh|bash|console)?\n(.*?)```", section, flags=re.S):
        joined = block.replace("\\\n", " ")
        commands += [line.strip() for line in joined.splitlines() if line.startswith("curl ")]
    return commands


@pytest.fixture(scope="module")
def digits_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with the README's model: `digits-mlp.dense`, "pixels" [-1, 64] FP32
    -> "logits" [-1, 10] (an untrained MLP; the examples read shapes, not answers)."""
    root = tmp_path_factory.mktemp("digits")
    path = root / "digits-mlp.dense" / "1" / "model.onnx"
    onnx_models.mlp(path)
    model = onnx.load(path)
    for node in model.graph.node:
        node.input[:] = ["pixels" if n == "input" else n for n in node.input]
        node.output[:] = ["logits" if n == "output" else n for n in node.output]
    model.graph.input[0].name = "pixels"
    model.graph.output[0].name = "logits"
    onnx.save(model, path)
    VariantManifest(family="digits-mlp", variant="dense").write(
        root / "digits-mlp.dense" / "sparseserve.yaml"
    )
    return root


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_readme_curl_examples_work_as_pasted(
    digits_repository: Path, start_server: Callable[..., ServerProcess]
) -> None:
    commands = readme_curl_commands()
    assert len(commands) >= 5, commands
    server = start_server(digits_repository)
    for command in commands:
        argv = shlex.split(command.replace("localhost:8000", server.http_url))
        # --fail-with-body: a 4xx/5xx answer fails the command and shows the error.
        done = subprocess.run(
            [argv[0], "--silent", "--show-error", "--fail-with-body", *argv[1:]],
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, f"{command}\n{done.stdout!r}\n{done.stderr!r}"


# -- shutdown ----------------------------------------------------------------------------


def rest_ready(server: ServerProcess) -> bool:
    """/v2/health/ready says yes (a refused or reset connection: no)."""
    try:
        return request(server, "GET", "/v2/health/ready")[0] == 200
    except OSError:
        return False


def http_accepts_connections(server: ServerProcess) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", server.http_port or 0), timeout=1):
            return True
    except OSError:
        return False


def test_sigterm_drains_a_rest_request_in_flight(
    repository: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """On SIGTERM REST readiness turns false, the port closes, and the request in flight
    is still answered before the process exits 0."""
    server = start_server(repository, "--shutdown-grace", "10", "--load-model", "slow")
    rows = rows_lasting(server, 1.5)
    x = np.ones((rows, WIDTH), np.float32)

    def run() -> np.ndarray:
        with triton_http.InferenceServerClient(server.http_url, network_timeout=60) as client:
            return client.infer("slow", [http_input("x", x, True)]).as_numpy("y")

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(run)
        wait_for(lambda: inflight(server, "slow") >= 1, "the slow request starts running")
        server.signal(signal.SIGTERM)
        wait_for(lambda: not rest_ready(server), "REST readiness turns false")
        wait_for(lambda: not http_accepts_connections(server), "the HTTP port closes")
        assert not running.done(), "the in-flight request must still be running"
        assert running.result(timeout=30).shape == (rows, WIDTH)
    assert server.process is not None and server.process.wait(timeout=15) == 0


def test_zero_grace_cuts_a_rest_request_in_flight(
    repository: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """--shutdown-grace 0 means no wait, as for gRPC (aiohttp reads a zero shutdown
    timeout as "no timeout": the drain must not wait for the request instead)."""
    server = start_server(repository, "--shutdown-grace", "0", "--load-model", "slow")
    rows = rows_lasting(server, 1.5)
    x = np.ones((rows, WIDTH), np.float32)

    def run() -> np.ndarray:
        with triton_http.InferenceServerClient(server.http_url, network_timeout=60) as client:
            return client.infer("slow", [http_input("x", x, True)]).as_numpy("y")

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(run)
        wait_for(lambda: inflight(server, "slow") >= 1, "the slow request starts running")
        server.signal(signal.SIGTERM)
        with pytest.raises(Exception) as cut:  # a reset, whatever its class
            running.result(timeout=30)
    assert not isinstance(cut.value, AssertionError)
    assert server.process is not None and server.process.wait(timeout=15) == 0
