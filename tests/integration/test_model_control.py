"""Model control against a real server on a copy of the test repository: explicit
load/unload/reload through tritonclient, poll mode following the files on disk, and
requests in flight while a version is swapped."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from sparseserve.client.server_process import ServerProcess
from sparseserve.repository.manifest import Task, VariantManifest
from sparseserve.testing import onnx_models
from tests import scrape
from tests.scrape import inflight

pytestmark = pytest.mark.integration

POLL = ("--model-control", "poll", "--poll-interval", "0.2")
DEADLINE = 10.0  # seconds a change on disk may take to be served (50 poll intervals)

StartServer = Callable[..., ServerProcess]


# -- helpers --------------------------------------------------------------------------


@pytest.fixture
def repo(repository: Path, tmp_path: Path) -> Path:
    """A private copy of the test repository, free to change."""
    return Path(shutil.copytree(repository, tmp_path / "repo", symlinks=True))


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    path = tmp_path / "staging"
    path.mkdir()
    return path


def publish(staged: Path, target: Path) -> None:
    """Move a fully written file or folder into the repository in one rename, as a
    deployment tool does, so the server never sees half a model."""
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, target)


def add_constant_version(staging: Path, model_dir: Path, version: int, value: float) -> None:
    """Version `version` of `model_dir`: y = x + value."""
    staged = staging / f"{model_dir.name}-{version}"
    onnx_models.add_constant(staged / "model.onnx", value)
    publish(staged, model_dir / str(version))


@pytest.fixture
def connect() -> Iterator[Callable[[ServerProcess], triton.InferenceServerClient]]:
    clients: list[triton.InferenceServerClient] = []

    def make(server: ServerProcess) -> triton.InferenceServerClient:
        client = triton.InferenceServerClient(server.grpc_url)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def infer(
    client: triton.InferenceServerClient, model: str, x: np.ndarray, version: str = ""
) -> tuple[np.ndarray, str]:
    """Run `model` (one FP32 input) on `x`; return its first output and the version
    that answered."""
    name = {"slow": "x", "mlp": "input"}.get(model, "x")
    tensor = triton.InferInput(name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer(model, [tensor], model_version=version)
    response = result.get_response()
    return result.as_numpy(response.outputs[0].name), response.model_version


def added(client: triton.InferenceServerClient, model: str, version: str = "") -> tuple[float, str]:
    """What an add_constant model adds to 0, and which version said so."""
    y, answered = infer(client, model, np.zeros((1, 4), np.float32), version)
    return float(y[0, 0]), answered


def rpc_error(call: Callable[[], object]) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def status(error: InferenceServerException) -> str:
    return str(error.status()).removeprefix("StatusCode.")


def outcome(call: Callable[[], object]) -> str:
    """The status code name a call ends with ("OK" if it succeeds)."""
    try:
        call()
    except InferenceServerException as exc:
        return status(exc)
    return "OK"


def repository_call(server: ServerProcess, method: str, model: str) -> tuple[str, str]:
    """RepositoryModel{Load,Unload} with no parameters at all, on a plain gRPC stub;
    returns (status code name, details)."""
    request_type = getattr(service_pb2, f"RepositoryModel{method}Request")
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            getattr(stub, f"RepositoryModel{method}")(request_type(model_name=model), timeout=10)
        except grpc.RpcError as exc:
            return exc.code().name, exc.details() or ""
    return "OK", ""


def index(client: triton.InferenceServerClient) -> dict[tuple[str, str], tuple[str, str]]:
    """RepositoryIndex as {(name, version): (state, reason)}."""
    rows = client.get_model_repository_index().models
    return {(m.name, m.version): (m.state, m.reason) for m in rows}


def wait_until(condition: Callable[[], object], what: str, timeout: float = DEADLINE) -> object:
    """Poll `condition` until it returns something true; fail saying `what` did not happen."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except InferenceServerException:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout}s: {what}")
        time.sleep(0.05)


# -- explicit mode --------------------------------------------------------------------


@pytest.fixture
def explicit(start_server: StartServer, repo: Path) -> ServerProcess:
    return start_server(repo, "--model-control", "explicit", "--load-model", "mlp")


def test_explicit_start_loads_only_the_named_model(
    explicit: ServerProcess, connect: Callable[..., triton.InferenceServerClient]
) -> None:
    """--load-model mlp: mlp serves; every other model is listed, "not loaded"."""
    client = connect(explicit)
    rows = index(client)
    assert rows[("mlp", "1")] == ("READY", "")
    for name in ("multi_io", "identity", "versioned", "latest", "slow", "corrupt"):
        assert rows[(name, "")] == ("UNAVAILABLE", "not loaded")
    assert client.is_model_ready("mlp")
    assert not client.is_model_ready("multi_io")


def test_infer_on_a_model_that_is_not_loaded_is_unavailable(
    explicit: ServerProcess, connect: Callable[..., triton.InferenceServerClient]
) -> None:
    client = connect(explicit)
    a = triton.InferInput("a", [1, 4], "FP32")
    a.set_data_from_numpy(np.zeros((1, 4), np.float32))
    b = triton.InferInput("b", [1, 4], "INT64")
    b.set_data_from_numpy(np.zeros((1, 4), np.int64))
    error = rpc_error(lambda: client.infer("multi_io", [a, b]))
    assert status(error) == "UNAVAILABLE"
    assert "not loaded" in error.message()


def test_load_then_unload(
    explicit: ServerProcess, connect: Callable[..., triton.InferenceServerClient]
) -> None:
    """load_model makes a model serve; unload_model stops it (UNAVAILABLE, not ready)."""
    client = connect(explicit)
    a = triton.InferInput("a", [1, 4], "FP32")
    a.set_data_from_numpy(np.array([[1, 2, 3, 4]], np.float32))
    b = triton.InferInput("b", [1, 4], "INT64")
    b.set_data_from_numpy(np.array([[10, 20, 30, 40]], np.int64))
    outputs = [triton.InferRequestedOutput("sum")]

    client.load_model("multi_io")
    assert client.is_model_ready("multi_io")
    result = client.infer("multi_io", [a, b], outputs=outputs)
    np.testing.assert_array_equal(result.as_numpy("sum"), [[11, 22, 33, 44]])
    assert index(client)[("multi_io", "1")] == ("READY", "")

    client.unload_model("multi_io")  # tritonclient always sends unload_dependents
    assert not client.is_model_ready("multi_io")
    error = rpc_error(lambda: client.infer("multi_io", [a, b], outputs=outputs))
    assert status(error) == "UNAVAILABLE"
    assert "not loaded" in error.message()
    assert index(client)[("multi_io", "")] == ("UNAVAILABLE", "not loaded")
    assert client.is_model_ready("mlp")


def test_load_unknown_model_is_not_found(
    explicit: ServerProcess, connect: Callable[..., triton.InferenceServerClient]
) -> None:
    error = rpc_error(lambda: connect(explicit).load_model("no_such_model"))
    assert status(error) == "NOT_FOUND"
    assert "no_such_model" in error.message()


def test_load_of_a_model_whose_folder_was_renamed_says_it_still_serves(
    explicit: ServerProcess, repo: Path, connect: Callable[..., triton.InferenceServerClient]
) -> None:
    """Explicit mode changes only when asked: the old model serves until unloaded, and
    the NOT_FOUND says so rather than leaving the operator to guess."""
    client = connect(explicit)
    (repo / "mlp").rename(repo / "mlp-renamed")
    error = rpc_error(lambda: client.load_model("mlp"))
    assert status(error) == "NOT_FOUND"
    assert "not in the repository; version 1 still serves from memory" in error.message()
    assert client.is_model_ready("mlp")


def test_load_corrupt_model_fails_with_the_reason_and_others_keep_serving(
    explicit: ServerProcess, connect: Callable[..., triton.InferenceServerClient]
) -> None:
    client = connect(explicit)
    error = rpc_error(lambda: client.load_model("corrupt"))
    assert status(error) == "FAILED_PRECONDITION"
    assert "onnxruntime cannot load" in error.message()
    assert "corrupt/1/model.onnx" in error.message()
    state, reason = index(client)[("corrupt", "1")]
    assert state == "UNAVAILABLE" and "onnxruntime cannot load" in reason
    assert not client.is_model_ready("corrupt")
    y, _ = infer(client, "mlp", np.ones((2, 64), np.float32))
    assert y.shape == (2, 10)
    # What an alert sees (SparseserveModelLoadFailed): the failure, and nothing for mlp.
    samples = scrape.scrape(explicit)
    assert scrape.value(samples, "sparseserve_model_load_failed", model="corrupt", version="1") == 1
    assert not scrape.values(samples, "sparseserve_model_load_failed", model="mlp")


def test_load_model_whose_version_policy_selects_no_version_fails(
    explicit: ServerProcess, repo: Path, connect: Callable[..., triton.InferenceServerClient]
) -> None:
    """A policy naming only versions that are not on disk leaves nothing to serve:
    the load is an error that says so (as in Triton), not a silent success."""
    onnx_models.add_constant(repo / "picky" / "1" / "model.onnx", 1)
    (repo / "picky" / "config.pbtxt").write_text("version_policy: { specific { versions: [5] } }")
    client = connect(explicit)
    error = rpc_error(lambda: client.load_model("picky"))
    assert status(error) == "FAILED_PRECONDITION"
    assert "picky" in error.message()
    assert any(name == "picky" and state == "UNAVAILABLE" and reason
               for (name, _), (state, reason) in index(client).items())  # fmt: skip


@pytest.mark.parametrize(
    "parameters",
    [
        {"config": '{"max_batch_size": 4}'},
        {"file:1/model.onnx": b"\x00"},
        {"repository_name": "elsewhere"},
    ],
    ids=["config-override", "file-override", "repository-name"],
)
def test_load_with_overrides_is_invalid_argument(
    explicit: ServerProcess, parameters: dict[str, object]
) -> None:
    """Config/file overrides and other repositories are not supported: refused, not
    silently ignored."""
    request = service_pb2.RepositoryModelLoadRequest(model_name="multi_io")
    for key, value in parameters.items():
        if key == "repository_name":
            request.repository_name = str(value)
        elif isinstance(value, bytes):
            request.parameters[key].bytes_param = value
        else:
            request.parameters[key].string_param = str(value)
    with grpc.insecure_channel(explicit.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.RepositoryModelLoad(request, timeout=10)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        ready = stub.ModelReady(service_pb2.ModelReadyRequest(name="multi_io"), timeout=10)
    assert not ready.ready


def test_load_config_override_through_tritonclient_is_invalid_argument(
    explicit: ServerProcess, connect: Callable[..., triton.InferenceServerClient]
) -> None:
    error = rpc_error(lambda: connect(explicit).load_model("multi_io", config="{}"))
    assert status(error) == "INVALID_ARGUMENT"
    assert "parameters are not supported" in error.message()


@pytest.mark.parametrize("name", ["../x", "..", "mlp/../mlp", ".hidden"])
@pytest.mark.parametrize("method", ["Load", "Unload"])
def test_load_and_unload_of_a_path_like_name_is_invalid_argument(
    explicit: ServerProcess,
    connect: Callable[..., triton.InferenceServerClient],
    method: str,
    name: str,
) -> None:
    code, details = repository_call(explicit, method, name)
    assert code == "INVALID_ARGUMENT"
    assert "not a valid model name" in details
    assert connect(explicit).is_model_ready("mlp")


def test_explicit_reload_serves_the_new_version(
    start_server: StartServer,
    repo: Path,
    staging: Path,
    connect: Callable[..., triton.InferenceServerClient],
) -> None:
    """A new version folder, then load_model again: version 2 answers (x + 2) and, under
    the default latest-1 policy, version 1 is gone."""
    add_constant_version(staging, repo / "adder", 1, 1.0)
    server = start_server(repo, "--model-control", "explicit", "--load-model", "adder")
    client = connect(server)
    assert added(client, "adder") == (1.0, "1")

    add_constant_version(staging, repo / "adder", 2, 2.0)
    assert added(client, "adder") == (1.0, "1")  # nothing changes before the reload
    client.load_model("adder")
    assert added(client, "adder") == (2.0, "2")
    assert added(client, "adder", "2") == (2.0, "2")
    assert not client.is_model_ready("adder", "1")
    error = rpc_error(lambda: added(client, "adder", "1"))
    assert status(error) == "NOT_FOUND"
    assert [k for k in index(client) if k[0] == "adder"] == [("adder", "2")]


def test_reloads_while_large_requests_decode_lose_no_request(
    start_server: StartServer, repo: Path, connect: Callable[..., triton.InferenceServerClient]
) -> None:
    """Requests of 1.2 MB of BYTES (decoded on the codec thread, off the event loop)
    while new versions are loaded one after another: each reload retires the version
    these requests were routed to, and must wait for the ones still decoding. (It once
    unloaded the version under them: INTERNAL "model 'strings' is not loaded".)"""
    onnx_models.bytes_identity(repo / "strings" / "1" / "model.onnx")
    server = start_server(repo, "--model-control", "explicit", "--load-model", "strings")
    data = np.array([b"abcdefgh"] * 100_000, dtype=object)
    stop = threading.Event()

    def client_loop() -> tuple[int, list[str]]:
        answered, errors = 0, []
        with triton.InferenceServerClient(server.grpc_url) as client:
            tensor = triton.InferInput("s", [len(data)], "BYTES")
            tensor.set_data_from_numpy(data)
            while not stop.is_set() and not errors:
                try:
                    result = client.infer("strings", [tensor], client_timeout=20)
                    assert result.as_numpy("t").shape == data.shape
                    answered += 1
                except InferenceServerException as exc:
                    errors.append(f"{exc.status()}: {exc.message()}")
        return answered, errors

    control = connect(server)
    with ThreadPoolExecutor(3) as pool:
        clients = [pool.submit(client_loop) for _ in range(3)]
        for version in range(2, 22):
            onnx_models.bytes_identity(repo / "strings" / str(version) / "model.onnx")
            control.load_model("strings")
            time.sleep(0.05)
            if any(c.done() for c in clients):
                break
        stop.set()
        outcomes = [c.result(timeout=60) for c in clients]
    assert [e for _, errors in outcomes for e in errors] == []
    assert all(answered > 0 for answered, _ in outcomes)
    assert control.is_model_ready("strings", str(version))


# -- poll mode ------------------------------------------------------------------------


@pytest.fixture
def polling(start_server: StartServer, repo: Path) -> ServerProcess:
    return start_server(repo, *POLL)


def test_poll_serves_a_new_model(
    polling: ServerProcess,
    repo: Path,
    staging: Path,
    connect: Callable[..., triton.InferenceServerClient],
) -> None:
    client = connect(polling)
    assert status(rpc_error(lambda: added(client, "newcomer"))) == "NOT_FOUND"
    add_constant_version(staging, repo / "newcomer", 1, 5.0)
    wait_until(lambda: client.is_model_ready("newcomer"), "new model 'newcomer' served")
    assert added(client, "newcomer") == (5.0, "1")


def test_poll_serves_a_new_version_and_unloads_the_old_one(
    polling: ServerProcess,
    repo: Path,
    staging: Path,
    connect: Callable[..., triton.InferenceServerClient],
) -> None:
    """`latest` serves 3 of versions 1-3; version 4 appears: 4 answers, 3 is unloaded."""
    client = connect(polling)
    assert added(client, "latest") == (3.0, "3")
    add_constant_version(staging, repo / "latest", 4, 4.0)
    wait_until(lambda: added(client, "latest") == (4.0, "4"), "version 4 of 'latest' served")
    wait_until(
        lambda: [k for k in index(client) if k[0] == "latest"] == [("latest", "4")],
        "version 3 of 'latest' unloaded",
    )
    assert not client.is_model_ready("latest", "3")


def test_poll_keeps_serving_when_a_version_is_replaced_by_a_corrupt_file(
    polling: ServerProcess,
    repo: Path,
    staging: Path,
    connect: Callable[..., triton.InferenceServerClient],
) -> None:
    """A broken model file never replaces one that serves; RepositoryIndex says why the
    new file is not being served."""
    client = connect(polling)
    assert added(client, "latest") == (3.0, "3")
    broken = staging / "model.onnx"
    broken.write_bytes(b"definitely not onnx" * 10)
    publish(broken, repo / "latest" / "3" / "model.onnx")
    wait_until(
        lambda: "model latest version 3 failed to load" in polling.log(),
        "the server tried the corrupt file",
    )
    assert added(client, "latest") == (3.0, "3")
    assert client.is_model_ready("latest", "3")
    state, reason = index(client)[("latest", "3")]
    assert state == "READY"
    assert "onnxruntime cannot load" in reason, f"RepositoryIndex gives no reason: {reason!r}"


def test_poll_does_not_retry_a_broken_model_whose_files_did_not_change(
    polling: ServerProcess,
    repo: Path,
    staging: Path,
    connect: Callable[..., triton.InferenceServerClient],
) -> None:
    """`corrupt` fails once at start. Polling goes on (a new model gets served), but an
    unchanged broken file is not loaded again on every pass: that would log an ERROR
    and redo a possibly expensive load every poll interval, forever."""
    client = connect(polling)
    add_constant_version(staging, repo / "newcomer", 1, 5.0)
    # Passes go through models in name order: the pass that serves `newcomer` has
    # already been through `corrupt`.
    wait_until(lambda: client.is_model_ready("newcomer"), "new model 'newcomer' served")
    failures = polling.log().count("model corrupt version 1 failed to load")
    assert failures == 1, f"the broken model was loaded {failures} times:\n{polling.log()}"
    state, reason = index(client)[("corrupt", "1")]
    assert state == "UNAVAILABLE" and "onnxruntime cannot load" in reason


def test_poll_stops_serving_a_removed_model(
    polling: ServerProcess, repo: Path, connect: Callable[..., triton.InferenceServerClient]
) -> None:
    client = connect(polling)
    assert added(client, "latest") == (3.0, "3")
    shutil.rmtree(repo / "latest")
    wait_until(
        lambda: outcome(lambda: added(client, "latest")) == "NOT_FOUND",
        "removed model answers NOT_FOUND",
    )
    assert not client.is_model_ready("latest")
    assert not [k for k in index(client) if k[0] == "latest"]


@pytest.mark.parametrize("method", ["Load", "Unload"])
def test_load_and_unload_are_refused_in_poll_mode(
    polling: ServerProcess, connect: Callable[..., triton.InferenceServerClient], method: str
) -> None:
    code, details = repository_call(polling, method, "mlp")
    assert code == "FAILED_PRECONDITION"
    assert "--model-control explicit" in details
    assert connect(polling).is_model_ready("mlp")


def test_request_in_flight_finishes_across_a_version_swap(
    polling: ServerProcess,
    repo: Path,
    staging: Path,
    connect: Callable[..., triton.InferenceServerClient],
) -> None:
    """A ~1.2 s request on `slow` version 1 is running when version 2 appears: the
    request completes with version 1's answer, and the next request gets version 2."""
    client = connect(polling)
    probe, expected_v1, big = slow_request(client)
    rows = len(big)

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(infer, connect(polling), "slow", big)
        wait_until(lambda: inflight(polling, "slow") >= 1, "the slow request is running")
        staged = staging / "slow-2"
        onnx_models.slow(staged / "model.onnx", width=512, depth=32, seed=1)
        publish(staged, repo / "slow" / "2")
        wait_until(lambda: client.is_model_ready("slow", "2"), "version 2 of 'slow' loaded")
        assert not running.done(), "the request ended before the swap; it must span it"
        after, answered = infer(client, "slow", probe)
        assert answered == "2"
        assert not np.allclose(after, expected_v1)

        y, version = running.result(timeout=60)
    assert version == "1"
    assert y.shape == (rows, 512)
    np.testing.assert_allclose(y[: len(probe)], expected_v1, rtol=1e-4, atol=1e-5)
    wait_until(
        lambda: [k for k in index(client) if k[0] == "slow"] == [("slow", "2")],
        "version 1 of 'slow' unloaded once its request finished",
    )


def slow_request(client: triton.InferenceServerClient) -> tuple[np.ndarray, ...]:
    """A probe for `slow`, its answer now, and a request that lasts ~1.2 s on this
    machine whose first rows are the probe."""
    probe = np.random.default_rng(0).standard_normal((8, 512)).astype(np.float32)
    expected, _ = infer(client, "slow", probe)
    timing = np.zeros((1024, 512), np.float32)
    elapsed = min(_timed(lambda: infer(client, "slow", timing)) for _ in range(2))
    rows = max(1024, min(int(1024 * 1.2 / elapsed), 100_000))
    big = np.zeros((rows, 512), np.float32)
    big[: len(probe)] = probe
    return probe, expected, big


def _timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def test_reload_of_changed_files_under_the_same_version_drains_and_unloads_the_old_copy(
    start_server: StartServer,
    repo: Path,
    staging: Path,
    connect: Callable[..., triton.InferenceServerClient],
) -> None:
    """Version 1's file replaced, then load_model: the request running on the old copy
    finishes with the old answer, the next one gets the new file's, the metrics never
    show version 1 twice, and the old copy is unloaded once its request ends (it was
    once dropped without an unload: its engine, and a Triton breaker's probes, lived on)."""
    server = start_server(repo, "--model-control", "explicit", "--load-model", "slow")
    client = connect(server)
    probe, expected_old, big = slow_request(client)

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(infer, connect(server), "slow", big)
        wait_until(lambda: inflight(server, "slow") >= 1, "the slow request is running")
        staged = staging / "slow.onnx"
        onnx_models.slow(staged, width=512, depth=32, seed=1)
        os.replace(staged, repo / "slow" / "1" / "model.onnx")
        client.load_model("slow")
        assert not running.done(), "the request ended before the reload; it must span it"
        samples = scrape.scrape(server)
        assert scrape.value(samples, "sparseserve_model_ready", model="slow", version="1") == 1
        after, answered = infer(client, "slow", probe)
        assert answered == "1"
        assert not np.allclose(after, expected_old)
        y, version = running.result(timeout=60)
    assert version == "1"
    np.testing.assert_allclose(y[: len(probe)], expected_old, rtol=1e-4, atol=1e-5)
    wait_until(
        lambda: "unloaded model slow version 1" in server.log(),
        "the old copy of version 1 unloaded once its request finished",
    )
    assert server.log().count("loaded model slow version 1 with") == 2


# -- a bad new version never takes down the one that serves -----------------------------


class Traffic:
    """Requests sent without pause from a background thread to each of `targets`
    ((model or family name, version) of an add_constant model) until stopped; counts
    what each call ended with."""

    def __init__(self, server: ServerProcess, targets: list[tuple[str, str]]):
        self._server = server
        self._targets = targets
        self._stop = threading.Event()
        self.outcomes: dict[str, int] = {}
        self.failures: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with triton.InferenceServerClient(self._server.grpc_url) as client:
            while not self._stop.is_set():
                for name, version in self._targets:
                    try:
                        added(client, name, version)
                        code = "OK"
                    except InferenceServerException as exc:
                        code = status(exc)
                        self.failures.append(f"{name}:{version!r} {code} {exc.message()}")
                    self.outcomes[code] = self.outcomes.get(code, 0) + 1

    def sent(self) -> int:
        return sum(self.outcomes.values())

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def test_explicit_load_of_a_corrupt_new_version_keeps_the_serving_one(
    start_server: StartServer,
    repo: Path,
    staging: Path,
    connect: Callable[..., triton.InferenceServerClient],
) -> None:
    """Version 1 serves (also through its family name); a corrupt `2/model.onnx` is
    written and loaded: the load fails naming version 2 and why, and not one request
    fails, before, during or after it. A good version 2 then replaces version 1."""
    add_constant_version(staging, repo / "adder", 1, 1.0)
    VariantManifest(family="adders", variant="dense", task=Task.regression).write(
        repo / "adder" / "sparseserve.yaml"
    )
    server = start_server(repo, "--model-control", "explicit", "--load-model", "adder")
    client = connect(server)
    targets = [("adder", ""), ("adder", "1"), ("adders", "")]
    with Traffic(server, targets) as traffic:
        wait_until(lambda: traffic.outcomes.get("OK", 0) > 10, "requests are answered")
        (repo / "adder" / "2").mkdir()
        (repo / "adder" / "2" / "model.onnx").write_bytes(b"not an onnx model" * 20)
        error = rpc_error(lambda: client.load_model("adder"))
        sent = traffic.sent()
        wait_until(lambda: traffic.sent() > sent + 30, "requests go on")
    assert traffic.failures == [], traffic.failures[:5]
    assert status(error) == "FAILED_PRECONDITION"
    assert "version 2" in error.message() and "onnxruntime cannot load" in error.message()
    assert "still serving version 1" in error.message()
    assert added(client, "adder") == (1.0, "1")
    assert added(client, "adder", "1") == (1.0, "1")
    assert added(client, "adders") == (1.0, "1")
    rows = index(client)
    assert rows[("adder", "1")] == ("READY", "")
    state, reason = rows[("adder", "2")]
    assert state == "UNAVAILABLE" and "onnxruntime cannot load" in reason
    assert "unloaded model adder version 1" not in server.log()

    shutil.rmtree(repo / "adder" / "2")
    add_constant_version(staging, repo / "adder", 2, 2.0)
    client.load_model("adder")
    assert added(client, "adder") == (2.0, "2")
    assert added(client, "adders") == (2.0, "2")
    wait_until(
        lambda: [k for k in index(client) if k[0] == "adder"] == [("adder", "2")],
        "version 1 unloaded once version 2 serves",
    )


def test_poll_keeps_the_serving_version_when_a_corrupt_new_one_is_moved_in(
    polling: ServerProcess,
    repo: Path,
    staging: Path,
    connect: Callable[..., triton.InferenceServerClient],
) -> None:
    """The rollout of docs/deploy.md (write the version aside, `mv` it in) with a
    corrupt file: version 3 of `latest` keeps serving every request; the failure is
    logged once and retried when the files change, and a good version 4 then serves."""
    client = connect(polling)
    with Traffic(polling, [("latest", ""), ("latest", "3")]) as traffic:
        wait_until(lambda: traffic.outcomes.get("OK", 0) > 10, "requests are answered")
        staged = staging / "latest-4"
        staged.mkdir()
        (staged / "model.onnx").write_bytes(b"not an onnx model" * 20)
        publish(staged, repo / "latest" / "4")
        wait_until(
            lambda: "model latest version 4 failed to load" in polling.log(),
            "the server tried the corrupt version",
        )
        time.sleep(1.0)  # five poll passes more
        sent = traffic.sent()
        wait_until(lambda: traffic.sent() > sent + 30, "requests go on")
    assert traffic.failures == [], traffic.failures[:5]
    assert polling.log().count("model latest version 4 failed to load") == 1
    assert added(client, "latest") == (3.0, "3")
    assert added(client, "latest", "3") == (3.0, "3")
    rows = index(client)
    assert rows[("latest", "3")] == ("READY", "")
    assert rows[("latest", "4")][0] == "UNAVAILABLE"

    shutil.rmtree(repo / "latest" / "4")
    add_constant_version(staging, repo / "latest", 4, 4.0)
    wait_until(lambda: added(client, "latest") == (4.0, "4"), "the fixed version 4 served")
    wait_until(
        lambda: [k for k in index(client) if k[0] == "latest"] == [("latest", "4")],
        "version 3 unloaded once version 4 serves",
    )


# -- load and unload in quick succession ------------------------------------------------


# gRPC does not order separate calls: sent 5 ms apart on a busy 2-core machine, a load
# and an unload reached their handlers in the opposite order (seen in the server log).
# 50 ms apart they arrive in order, and still queue behind the reload (0.3 s or more).
CALL_GAP = 0.05


def repository_calls_in_a_row(
    server: ServerProcess, model: str, methods: list[str], gap: float = CALL_GAP
) -> list[str]:
    """Send RepositoryModel{Load,Unload} calls `gap` seconds apart without waiting for
    their answers; return the status code name each ended with, in order."""
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        grpc.channel_ready_future(channel).result(timeout=10)
        calls = []
        for method in methods:
            request = getattr(service_pb2, f"RepositoryModel{method}Request")(model_name=model)
            calls.append(getattr(stub, f"RepositoryModel{method}").future(request, timeout=30))
            time.sleep(gap)
        codes = []
        for call in calls:
            try:
                call.result()
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
    return codes


@pytest.fixture
def big_model(repo: Path) -> Path:
    """A 16 MiB model, so that a reload takes long enough for calls to queue behind it."""
    path = repo / "big" / "1" / "model.onnx"
    onnx_models.slow(path, width=2048, depth=1)
    return path


def test_load_unload_load_in_quick_succession_ends_loaded(
    start_server: StartServer,
    repo: Path,
    big_model: Path,
    connect: Callable[..., triton.InferenceServerClient],
) -> None:
    """load (a real reload: the file changed) -> unload -> load, sent while the reload
    runs: the model serves afterwards, as the last call asked."""
    server = start_server(repo, "--model-control", "explicit", "--load-model", "big")
    client = connect(server)
    for round_ in range(5):
        os.utime(big_model, ns=(time.time_ns(), time.time_ns()))  # the reload is real
        codes = repository_calls_in_a_row(server, "big", ["Load", "Unload", "Load"])
        assert codes == ["OK", "OK", "OK"], f"round {round_}"
        assert client.is_model_ready("big"), f"round {round_}: not served after the last load"
        y, version = infer(client, "big", np.zeros((1, 2048), np.float32))
        assert version == "1" and y.shape == (1, 2048)


def test_a_load_whose_client_gives_up_still_ends_loaded(
    start_server: StartServer,
    repo: Path,
    big_model: Path,
    connect: Callable[..., triton.InferenceServerClient],
) -> None:
    """A client's deadline passes while its load runs: the client hears
    DEADLINE_EXCEEDED, the load goes on to its end, as Triton's does (it was cut
    half-way: the model neither loaded nor listed in the index), and so does an unload
    whose client gives up."""
    server = start_server(repo, "--model-control", "explicit", "--load-model", "mlp")
    client = connect(server)
    error = rpc_error(lambda: client.load_model("big", client_timeout=0.01))
    assert status(error) == "DEADLINE_EXCEEDED"
    wait_until(lambda: client.is_model_ready("big"), "'big' loaded after its client left")
    assert index(client)[("big", "1")] == ("READY", "")
    y, _ = infer(client, "big", np.zeros((1, 2048), np.float32))
    assert y.shape == (1, 2048)

    os.utime(big_model, ns=(time.time_ns(), time.time_ns()))
    with ThreadPoolExecutor(1) as pool:
        reload = pool.submit(connect(server).load_model, "big")  # holds the model's lock
        deadline = time.monotonic() + DEADLINE  # polled without a pause: it is short
        while index(client)[("big", "1")][0] != "LOADING":
            assert time.monotonic() < deadline, "'big' never seen reloading"
        # Behind the reload's lock it outlives its deadline (OK only if the reload ended
        # first, on a machine far faster than this one).
        said = outcome(lambda: client.unload_model("big", client_timeout=0.01))
        assert said in ("DEADLINE_EXCEEDED", "OK"), said
        reload.result(timeout=60)
    wait_until(lambda: not client.is_model_ready("big"), "'big' unloaded after its client left")
    assert "unloaded model big version 1" in server.log()


def test_load_load_unload_in_quick_succession_ends_unloaded(
    start_server: StartServer,
    repo: Path,
    big_model: Path,
    connect: Callable[..., triton.InferenceServerClient],
) -> None:
    server = start_server(repo, "--model-control", "explicit", "--load-model", "big")
    client = connect(server)
    for round_ in range(3):
        os.utime(big_model, ns=(time.time_ns(), time.time_ns()))
        codes = repository_calls_in_a_row(server, "big", ["Load", "Load", "Unload"])
        assert codes == ["OK", "OK", "OK"], f"round {round_}"
        assert not client.is_model_ready("big"), f"round {round_}: served after the unload"
        assert index(client)[("big", "")] == ("UNAVAILABLE", "not loaded")
        client.load_model("big")


# -- models whose files are wrong in ways the store did not foresee -------------------


def unreadable_models(repo: Path) -> None:
    """Three models that stopped the whole server's start: a config.pbtxt that is not
    UTF-8, a version folder `²` (a digit to Python, not to `int`) beside no other, and a
    fixed input dimension of 2**40 (the warm-up asked numpy for 4 TiB)."""
    onnx_models.add_constant(repo / "latin" / "1" / "model.onnx", 1)
    (repo / "latin" / "config.pbtxt").write_bytes(b'name: "latin" # caf\xe9\n')
    onnx_models.add_constant(repo / "super" / "²" / "model.onnx", 1)
    onnx_models.add_constant(repo / "huge" / "1" / "model.onnx", 1, width=2**40)


def test_start_serves_every_model_beside_ones_whose_files_are_unreadable(
    start_server: StartServer, repo: Path, connect: Callable[..., triton.InferenceServerClient]
) -> None:
    """Each unreadable model is UNAVAILABLE with a reason naming its file and what was
    expected; the others serve."""
    unreadable_models(repo)
    server = start_server(repo)
    client = connect(server)
    y, _ = infer(client, "mlp", np.ones((2, 64), np.float32))
    assert y.shape == (2, 10)
    rows = index(client)
    assert rows[("latin", "")][0] == "UNAVAILABLE"
    assert "latin/config.pbtxt: not UTF-8 text" in rows[("latin", "")][1]
    assert rows[("super", "")][0] == "UNAVAILABLE"
    assert "'super' has no version" in rows[("super", "")][1]
    assert "super/² is skipped: a version folder is named by a plain decimal" in server.log()
    state, reason = rows[("huge", "1")]
    assert state == "UNAVAILABLE"
    assert "input 'x' of shape [-1, 1099511627776] needs 4,398,046,511,104 bytes" in reason
    assert "Traceback" not in server.log()


def test_load_of_an_unreadable_model_is_failed_precondition_with_its_reason(
    explicit: ServerProcess, repo: Path, connect: Callable[..., triton.InferenceServerClient]
) -> None:
    """Not INTERNAL with a traceback, and the model stays in RepositoryIndex with why."""
    unreadable_models(repo)
    client = connect(explicit)
    for name, expected in (("latin", "not UTF-8 text"), ("huge", "more than any request")):
        error = rpc_error(lambda name=name: client.load_model(name))  # type: ignore[misc]
        assert status(error) == "FAILED_PRECONDITION", error
        assert expected in error.message()
        assert any(
            row[0] == name and expected in reason for row, (_, reason) in index(client).items()
        )
    assert "Traceback" not in explicit.log()


def test_reload_of_a_model_whose_config_turned_unreadable_says_so_and_keeps_serving(
    start_server: StartServer,
    repo: Path,
    staging: Path,
    connect: Callable[..., triton.InferenceServerClient],
) -> None:
    add_constant_version(staging, repo / "adder", 1, 1.0)
    server = start_server(repo, "--model-control", "explicit", "--load-model", "adder")
    client = connect(server)
    (repo / "adder" / "config.pbtxt").write_bytes(b'name: "adder" # caf\xe9\n')
    error = rpc_error(lambda: client.load_model("adder"))
    assert status(error) == "FAILED_PRECONDITION"
    assert "not UTF-8 text" in error.message() and "still serving version 1" in error.message()
    assert added(client, "adder") == (1.0, "1")
    state, reason = index(client)[("adder", "1")]
    assert state == "READY" and "serving the files loaded before" in reason
    assert "not UTF-8 text" in reason


def test_poll_goes_on_past_a_model_whose_config_is_not_utf8(
    polling: ServerProcess,
    repo: Path,
    staging: Path,
    connect: Callable[..., triton.InferenceServerClient],
) -> None:
    """A bad model sorted first no longer stops every pass before the models after it:
    a new model and a new version behind it are served."""
    client = connect(polling)
    onnx_models.add_constant(staging / "aaa" / "1" / "model.onnx", 1)
    (staging / "aaa" / "config.pbtxt").write_bytes(b'name: "aaa" # caf\xe9\n')
    publish(staging / "aaa", repo / "aaa")
    wait_until(lambda: ("aaa", "") in index(client), "the bad model is listed")
    add_constant_version(staging, repo / "zzz", 1, 5.0)
    add_constant_version(staging, repo / "latest", 4, 4.0)
    wait_until(lambda: client.is_model_ready("zzz"), "new model 'zzz' served")
    wait_until(lambda: added(client, "latest") == (4.0, "4"), "version 4 of 'latest' served")
    state, reason = index(client)[("aaa", "")]
    assert state == "UNAVAILABLE" and "aaa/config.pbtxt: not UTF-8 text" in reason
    assert "poll failed" not in polling.log() and "Traceback" not in polling.log()


def test_config_that_contradicts_the_model_is_refused_naming_the_mismatch(
    explicit: ServerProcess, repo: Path, connect: Callable[..., triton.InferenceServerClient]
) -> None:
    """ModelConfig reports config.pbtxt's tensors, and clients build requests from it: a
    config naming an input the model lacks, or typing or shaping one otherwise, is
    refused at load as Triton refuses it, never served with a signature it lacks."""
    onnx_models.add_constant(repo / "liar" / "1" / "model.onnx", 1)
    (repo / "liar" / "config.pbtxt").write_text(
        'input [{ name: "x" data_type: TYPE_INT64 dims: [-1, 7] }]\n'
    )
    client = connect(explicit)
    error = rpc_error(lambda: client.load_model("liar"))
    assert status(error) == "FAILED_PRECONDITION"
    message = error.message()
    assert "liar/config.pbtxt does not match the model model.onnx" in message
    assert "input 'x' is TYPE_FP32 in the model, TYPE_INT64 in config.pbtxt" in message
    assert "input 'x' has dims [-1, 4] in the model (-1: any), [-1, 7] in config.pbtxt" in message


def test_poll_logs_a_broken_config_once_and_the_index_says_why(
    polling: ServerProcess,
    repo: Path,
    staging: Path,
    connect: Callable[..., triton.InferenceServerClient],
) -> None:
    """A config.pbtxt edited into something that does not parse: the serving version
    goes on, the log says so once (not at every pass, not never), the index names it."""
    client = connect(polling)
    (repo / "latest" / "config.pbtxt").write_text("version_policy { latest { num_versions: 2 }\n")
    wait_until(lambda: "cannot parse Triton model config" in polling.log(), "the failure logged")
    add_constant_version(staging, repo / "newcomer", 1, 5.0)  # two passes later at least
    wait_until(lambda: client.is_model_ready("newcomer"), "new model 'newcomer' served")
    time.sleep(1.0)  # five more passes
    assert polling.log().count("cannot parse Triton model config") == 1, polling.log()
    assert added(client, "latest") == (3.0, "3")
    state, reason = index(client)[("latest", "3")]
    assert state == "READY"
    assert "serving the files loaded before" in reason and "latest/config.pbtxt" in reason
    samples = scrape.scrape(polling)
    assert scrape.value(samples, "sparseserve_model_load_failed", model="latest", version="") == 1
    (repo / "latest" / "config.pbtxt").unlink()  # fixed: the failure goes away
    wait_until(
        lambda: (
            not scrape.values(
                scrape.scrape(polling), "sparseserve_model_load_failed", model="latest"
            )
        ),
        "the load failure cleared from the metrics",
    )


def test_poll_warns_once_that_a_version_holds_the_slot_of_one_that_failed(
    polling: ServerProcess,
    repo: Path,
    staging: Path,
    connect: Callable[..., triton.InferenceServerClient],
) -> None:
    client = connect(polling)
    broken = staging / "4"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"not onnx" * 20)
    publish(broken, repo / "latest" / "4")
    wait_until(lambda: "model latest version 4 failed to load" in polling.log(), "tried v4")
    time.sleep(1.5)  # several more passes
    holding = polling.log().count("model latest: version 3 keeps serving until")
    assert holding == 1, polling.log()
    assert added(client, "latest") == (3.0, "3")


def test_index_gives_the_latest_reason_not_an_older_one(
    start_server: StartServer,
    repo: Path,
    staging: Path,
    connect: Callable[..., triton.InferenceServerClient],
) -> None:
    """A corrupt file fails a reload; once it is fixed, a bad manifest fails the next:
    RepositoryIndex names the manifest, not the file that is fine again."""
    add_constant_version(staging, repo / "adder", 1, 1.0)
    server = start_server(repo, "--model-control", "explicit", "--load-model", "adder")
    client = connect(server)
    model = repo / "adder" / "1" / "model.onnx"
    good = model.read_bytes()
    model.write_bytes(b"not onnx" * 20)
    assert "onnxruntime cannot load" in rpc_error(lambda: client.load_model("adder")).message()
    model.write_bytes(good)
    (repo / "adder" / "sparseserve.yaml").write_text("family: f\nvariant: v\nbogus: 1\n")
    assert "invalid manifest" in rpc_error(lambda: client.load_model("adder")).message()
    state, reason = index(client)[("adder", "1")]
    assert state == "READY" and "sparseserve.yaml: invalid manifest: bogus" in reason, reason
    assert "onnxruntime" not in reason
