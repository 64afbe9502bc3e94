"""Triton's restricted protocols on a real server, called with tritonclient: a restricted
group answers UNAVAILABLE "This protocol is restricted, expecting header
'triton-grpc-protocol-<key>'" unless the call carries that header (tritonclient's
`headers=`), and the groups left open behave as before."""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from sparseserve.client.health_check import SERVING, HealthCheckError, check_health
from sparseserve.client.server_process import ServerProcess
from sparseserve.compare.loadgen import LoadGenerator, LoadSettings
from sparseserve.testing import onnx_models

pytestmark = pytest.mark.integration

ADMIN = {"triton-grpc-protocol-admin-key": "s3cret"}
PROBE = {"triton-grpc-protocol-probe-key": "pr0be"}


@pytest.fixture(scope="module")
def small_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("restricted-models")
    onnx_models.mlp(root / "mlp" / "1" / "model.onnx")
    return root


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Restrictions in a settings file: Triton's string, and a mapping whose value is a
    file (a mounted Secret, with its trailing newline)."""
    directory = tmp_path_factory.mktemp("restricted-config")
    (directory / "probe-key").write_text("pr0be\n")
    config = directory / "config.yaml"
    config.write_text(
        "grpc_restricted_protocols:\n"
        "  - model-repository:admin-key=s3cret\n"
        "  - groups: [health, model-config]\n"
        "    key: probe-key\n"
        f"    value_file: {directory / 'probe-key'}\n"
    )
    return config


@pytest.fixture(scope="module")
def server(small_repository: Path, config_file: Path) -> Iterator[ServerProcess]:
    with ServerProcess(small_repository, "--config", str(config_file)) as process:
        yield process
    assert process.returncode == 0, process.log()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(server.grpc_url) as c:
        yield c


def refusal(call: Callable[[], object]) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as refused:
        call()
    return refused.value


def expecting(header: str) -> str:
    return f"This protocol is restricted, expecting header '{header}'"


def test_repository_rpcs_refuse_calls_without_the_header(
    client: triton.InferenceServerClient,
) -> None:
    """Index, load and unload: UNAVAILABLE with Triton's exact message, also for a
    wrong value, and the model is still loaded afterwards."""
    calls = {
        "index": lambda headers: client.get_model_repository_index(headers=headers),
        "load": lambda headers: client.load_model("mlp", headers=headers),
        "unload": lambda headers: client.unload_model("mlp", headers=headers),
    }
    for what, call in calls.items():
        for headers in (None, {"triton-grpc-protocol-admin-key": "wrong"}, {"admin-key": "s3cret"}):
            error = refusal(lambda: call(headers))  # noqa: B023 - called at once
            assert error.status() == "StatusCode.UNAVAILABLE", (what, headers)
            assert error.message() == expecting("triton-grpc-protocol-admin-key"), (what, headers)
    assert client.is_model_ready("mlp", headers=PROBE)


def test_repository_rpcs_work_with_the_header(client: triton.InferenceServerClient) -> None:
    index = client.get_model_repository_index(headers=ADMIN, as_json=True)
    assert [model["name"] for model in index["models"]] == ["mlp"]
    client.unload_model("mlp", headers=ADMIN)
    assert not client.is_model_ready("mlp", headers=PROBE)
    client.load_model("mlp", headers=ADMIN)
    assert client.is_model_ready("mlp", headers=PROBE)


def test_a_restriction_covers_each_of_its_groups(client: triton.InferenceServerClient) -> None:
    """health and model-config share the probe key; grpc.health.v1 is in health."""
    for call in (client.is_server_live, lambda: client.get_model_config("mlp")):
        error = refusal(call)
        assert error.status() == "StatusCode.UNAVAILABLE"
        assert error.message() == expecting("triton-grpc-protocol-probe-key")
    assert client.is_server_live(headers=PROBE)
    assert client.get_model_config("mlp", headers=PROBE, as_json=True)["config"]["name"] == "mlp"


def test_open_groups_need_no_header(client: triton.InferenceServerClient) -> None:
    """inference, metadata and statistics are not restricted here: no header needed."""
    pixels = np.ones((1, 64), dtype=np.float32)
    tensor = triton.InferInput("input", [1, 64], "FP32")
    tensor.set_data_from_numpy(pixels)
    assert client.infer("mlp", [tensor]).as_numpy("output").shape == (1, 10)
    assert client.get_server_metadata().name
    assert client.get_model_metadata("mlp").name == "mlp"
    assert client.get_inference_statistics("mlp").model_stats


def test_health_check_sends_the_health_groups_header(
    server: ServerProcess, config_file: Path
) -> None:
    """`sparseserve health --config` finds the health group's header in the settings."""
    with pytest.raises(HealthCheckError, match=r"UNAVAILABLE.*probe-key"):
        check_health(server.grpc_url)
    assert check_health(server.grpc_url, metadata=list(PROBE.items())) == SERVING
    run = subprocess.run(
        [sys.executable, "-m", "sparseserve", "health", "--config", str(config_file),
         "--address", server.grpc_url],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "SERVING" in run.stdout


def test_triton_flags_restrict_inference_streams_too(
    small_repository: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """Triton's flag syntax (key case-folded, a value holding ':' and '='), and a
    restricted streaming RPC: the stream is refused, with the header it is served."""
    server = start_server(
        small_repository,
        "--grpc-restricted-protocol", "inference:Infer-Key=a:b=c",
        "--grpc-restricted-protocol", "model-repository,statistics:admin-key=s3cret",
        "--grpc-address", "localhost",  # Triton's flag: the gRPC port's own bind address
    )  # fmt: skip
    assert f"gRPC localhost:{server.grpc_port} (plaintext)" in server.log()
    tensor = triton.InferInput("input", [1, 64], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 64), dtype=np.float32))
    with triton.InferenceServerClient(server.grpc_url) as client:
        error = refusal(lambda: client.infer("mlp", [tensor]))
        assert error.message() == expecting("triton-grpc-protocol-infer-key")
        infer_key = {"triton-grpc-protocol-infer-key": "a:b=c"}
        assert client.infer("mlp", [tensor], headers=infer_key).as_numpy("output").shape == (1, 10)
        assert refusal(lambda: client.get_inference_statistics(headers=None)).message() == (
            expecting("triton-grpc-protocol-admin-key")
        )
        assert client.is_server_ready()  # health is open here

        # A refused stream reports its status through the stream's callback.
        refused: queue.Queue = queue.Queue()
        client.start_stream(lambda result, error: refused.put(error), headers=None)
        with contextlib.suppress(InferenceServerException):  # if the refusal came first
            client.async_stream_infer("mlp", [tensor])
        error = refused.get(timeout=10)
        client.stop_stream()
        assert error is not None and error.message() == expecting("triton-grpc-protocol-infer-key")

        served: queue.Queue = queue.Queue()
        client.start_stream(lambda result, error: served.put((result, error)), headers=infer_key)
        client.async_stream_infer("mlp", [tensor])
        result, error = served.get(timeout=10)
        client.stop_stream()
        assert error is None and result.as_numpy("output").shape == (1, 10)

    # `sparseserve compare --header`: its load sends the header with every call.
    settings = LoadSettings(concurrency=2, duration_seconds=0.3, rounds=1, warmup_requests=1)
    loads = asyncio.run(LoadGenerator(server.grpc_url, settings, headers=infer_key).run(["mlp"]))
    assert loads["mlp"].ok > 0 and not loads["mlp"].errors


def test_refused_large_requests_give_their_bytes_back_to_the_budget(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """A large request refused for its missing header holds no part of the request
    budget afterwards: had the three refused ones kept theirs, the fourth (sent with the
    header) would exceed the budget and be refused RESOURCE_EXHAUSTED."""
    onnx_models.mlp(tmp_path / "wide" / "1" / "model.onnx", sizes=(65536, 4))
    server = start_server(
        tmp_path,
        "--grpc-restricted-protocol", "inference:infer-key=k",
        "--max-inflight-request-bytes", str(600_000),
    )  # fmt: skip
    rows = np.ones((2, 65536), dtype=np.float32)  # 512 KiB: counted by the budget
    tensor = triton.InferInput("input", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows)
    with triton.InferenceServerClient(server.grpc_url) as client:
        for _ in range(3):
            error = refusal(lambda: client.infer("wide", [tensor]))
            assert error.message() == expecting("triton-grpc-protocol-infer-key")
        result = client.infer("wide", [tensor], headers={"triton-grpc-protocol-infer-key": "k"})
        assert result.as_numpy("output").shape == (2, 4)


def test_rest_routes_are_restricted_by_their_own_flag(
    small_repository: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """Triton's --http-restricted-api: a restricted group answers 403 with Triton's message
    unless the request carries the header `<key>: <value>`; other groups stay open."""
    server = start_server(
        small_repository, "--http-restricted-api", "model-repository,statistics:admin-key=s3cret"
    )
    base = f"http://{server.http_url}"

    def call(method: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        body = b"{}" if method == "POST" else None
        sent = urllib.request.Request(base + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(sent, timeout=10) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as error:
            with error:
                return error.code, error.read()

    for method, path in (("POST", "/v2/repository/index"), ("GET", "/v2/models/stats")):
        status, body = call(method, path, {})
        assert status == 403, body
        assert json.loads(body) == {"error": "This API is restricted, expecting header 'admin-key'"}
        assert call(method, path, {"admin-key": "wrong"})[0] == 403
        assert call(method, path, {"Admin-Key": "s3cret"})[0] == 200
    assert call("GET", "/v2/health/ready", {})[0] == 200
    assert call("GET", "/v2/models/mlp", {})[0] == 200
    # The gRPC port has its own flag: not restricted here.
    with triton.InferenceServerClient(server.grpc_url) as client:
        assert client.get_model_repository_index() is not None


def test_start_warns_of_groups_restricted_on_grpc_but_open_on_rest(
    server: ServerProcess, small_repository: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """As in Triton each protocol has its own flag, so restricting gRPC alone leaves the
    REST port open to the same calls (an unload with no header): the start says so."""
    assert (
        "health,model-config,model-repository restricted on gRPC but open on REST" in server.log()
    )
    assert (
        "--http-restricted-api health,model-config,model-repository:<key>=<value>" in server.log()
    )
    admin = "model-repository:admin-key=s3cret"
    both = start_server(
        small_repository, "--grpc-restricted-protocol", admin, "--http-restricted-api", admin,
        # Groups REST has no routes in: nothing is open there.
        "--grpc-restricted-protocol", "shared-memory,trace,logging:other-key=x",
    )  # fmt: skip
    assert "restricted REST route groups: model-repository (header admin-key)" in both.log()
    assert "open on REST" not in both.log()


def serve_exit(repository: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "sparseserve", "serve", "--repository", str(repository)]
    command += ["--host", "127.0.0.1", "--grpc-port", "0", "--no-metrics", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["model-repository"], "must be <group>[,<group>...]:<key>=<value>"),
        (["model-repository:admin-key"], "must be <group>[,<group>...]:<key>=<value>"),
        (["models:admin-key=s3cret"], "unknown restricted group 'models'; groups: health,"),
        (["health:k=v", "health,metadata:j=w"], "'health' is in more than one restriction"),
        (["health:bad key=v"], "is not a header name gRPC can carry"),
    ],
    ids=["no-key", "no-value", "unknown-group", "group-twice", "bad-key"],
)
def test_bad_restriction_flags_are_a_one_line_start_error(
    small_repository: Path, flags: list[str], expected: str
) -> None:
    args = [arg for flag in flags for arg in ("--grpc-restricted-protocol", flag)]
    run = serve_exit(small_repository, *args)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stderr
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith(
        "sparseserve: error: invalid configuration: grpc_restricted_protocols"
    )
    assert expected in lines[0]
    assert "s3cret" not in run.stderr  # the value is a secret
