"""The server process's life: graceful drain on SIGTERM / SIGINT (what every Kubernetes
rollout does), a grace period that bounds the drain, and logs fit for a log pipeline."""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from sparseserve.client.server_process import ServerProcess
from sparseserve.testing import onnx_models
from tests.scrape import inflight

pytestmark = pytest.mark.integration

StartServer = Callable[..., ServerProcess]
WIDTH = 512  # the `slow` model's input width


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as executor:
        yield executor


def slow_input(rows: int) -> list[triton.InferInput]:
    tensor = triton.InferInput("x", [rows, WIDTH], "FP32")
    tensor.set_data_from_numpy(np.ones((rows, WIDTH), np.float32))
    return [tensor]


def rows_lasting(server: ServerProcess, seconds: float) -> int:
    """How many rows make one `slow` request last about `seconds` on this machine."""
    with triton.InferenceServerClient(server.grpc_url) as client:
        timings = []
        for _ in range(2):
            started = time.perf_counter()
            client.infer("slow", slow_input(1024))
            timings.append(time.perf_counter() - started)
    return max(1024, min(int(1024 * seconds / min(timings)), 60_000))


def start_slow_request(
    pool: ThreadPoolExecutor, server: ServerProcess, rows: int
) -> Future[triton.InferResult]:
    """Send a `rows`-row request on its own connection; return once it is running."""

    def run() -> triton.InferResult:
        with triton.InferenceServerClient(server.grpc_url) as client:
            return client.infer("slow", slow_input(rows), client_timeout=60)

    future = pool.submit(run)
    deadline = time.monotonic() + 10
    while inflight(server, "slow") < 1:
        assert not future.done(), f"request ended early: {future.exception()!r}"
        assert time.monotonic() < deadline, "the slow request never started running"
        time.sleep(0.02)
    return future


def health(server: ServerProcess) -> str:
    """grpc.health.v1 Check of the whole server: SERVING, NOT_SERVING, or the status
    code of the refusal."""
    with grpc.insecure_channel(server.grpc_url) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5
            )
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def accepts_connections(server: ServerProcess) -> bool:
    host, port = server.grpc_url.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout}s: {what}")
        time.sleep(0.02)


def small_mlp_request(client: triton.InferenceServerClient) -> triton.InferResult:
    tensor = triton.InferInput("input", [1, 64], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 64), np.float32))
    return client.infer("mlp", [tensor], client_timeout=10)


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_sigterm_drains_the_request_in_flight_refuses_new_ones_and_exits_0(
    start_server: StartServer, repository: Path, pool: ThreadPoolExecutor, engine: str
) -> None:
    """During the drain the port stays open: health answers NOT_SERVING, a new call is
    refused with UNAVAILABLE "server is shutting down" (retryable, and it says why),
    ServerReady answers false and ServerLive true, while the request in flight runs to
    its answer. Then the port closes and the process exits 0 within the grace period.
    The same on either CPU engine."""
    server = start_server(repository, "--shutdown-grace", "10", "--cpu-engine", engine)
    client = triton.InferenceServerClient(server.grpc_url)
    assert health(server) == "SERVING"
    small_mlp_request(client)  # this connection is open when SIGTERM arrives
    rows = rows_lasting(server, 2.0)
    running = start_slow_request(pool, server, rows)

    signalled = time.monotonic()
    server.signal(signal.SIGTERM)
    wait_for(lambda: health(server) == "NOT_SERVING", "health answers NOT_SERVING")
    assert accepts_connections(server), "the port closed while a request was in flight"
    with pytest.raises(InferenceServerException) as refused:
        small_mlp_request(client)
    assert "UNAVAILABLE" in str(refused.value.status()), f"refused with {refused.value!r}"
    assert "server is shutting down" in refused.value.message()
    assert not client.is_server_ready()
    assert client.is_server_live()
    assert not running.done(), "the in-flight request must still be running during the drain"

    result = running.result(timeout=30)
    assert result.as_numpy("y").shape == (rows, WIDTH)
    assert np.isfinite(result.as_numpy("y")).all()
    assert server.process is not None
    assert server.process.wait(timeout=15) == 0
    assert time.monotonic() - signalled < 10, "exit took longer than the grace period"
    assert not accepts_connections(server)
    assert "sparseserve stopped" in server.log()
    client.close()


def test_sigint_stops_cleanly(start_server: StartServer, repository: Path) -> None:
    """Ctrl-C is a clean stop too: exit 0, no traceback."""
    server = start_server(repository, "--load-model", "mlp")
    server.signal(signal.SIGINT)
    assert server.process is not None
    assert server.process.wait(timeout=15) == 0
    log = server.log()
    assert "sparseserve stopped" in log
    assert "Traceback" not in log and "KeyboardInterrupt" not in log


def test_sighup_drains_the_request_in_flight_and_exits_0(
    start_server: StartServer, repository: Path, pool: ThreadPoolExecutor
) -> None:
    """A closed terminal sends SIGHUP, whose default ended the process at once with every
    call in flight reset: it drains as SIGTERM does."""
    server = start_server(repository, "--shutdown-grace", "10")
    rows = rows_lasting(server, 1.0)
    running = start_slow_request(pool, server, rows)  # returns once it is running
    server.signal(signal.SIGHUP)
    assert running.result(timeout=30).as_numpy("y").shape == (rows, WIDTH)
    assert server.process is not None
    assert server.process.wait(timeout=15) == 0
    assert "sparseserve stopped" in server.log()


def test_requests_cut_by_their_deadline_leave_no_error_in_the_log(
    start_server: StartServer, repository: Path
) -> None:
    """A client whose deadline passes mid-run: onnxruntime's run is told to terminate,
    and its "Exiting due to terminate flag" is expected, not an error. It was logged as
    asyncio's "Future exception was never retrieved", with a traceback."""
    server = start_server(repository)
    rows = rows_lasting(server, 0.5)
    with triton.InferenceServerClient(server.grpc_url) as client:
        for _ in range(6):
            with pytest.raises(InferenceServerException) as cut:
                client.infer("slow", slow_input(rows), client_timeout=0.1)
            assert "Deadline" in str(cut.value) or "DEADLINE" in str(cut.value.status())
            wait_for(lambda: inflight(server, "slow") == 0, "the cut run to stop")
        assert client.infer("slow", slow_input(8)).as_numpy("y").shape == (8, WIDTH)
    assert server.stop() == 0
    log = server.log()
    assert "never retrieved" not in log and "Traceback" not in log, log[-3000:]


def test_short_grace_period_bounds_the_drain(
    start_server: StartServer, repository: Path, pool: ThreadPoolExecutor
) -> None:
    """--shutdown-grace 0.5 with a request that needs ~6 s: the process does not wait
    for it, and still exits 0 (a rollout must not hang on one long request). The request
    ends UNAVAILABLE, saying the grace period ended, which clients retry on another
    replica (grpc.aio's own stop ended it CANCELLED, or a stream INTERNAL)."""
    server = start_server(repository, "--shutdown-grace", "0.5")
    running = start_slow_request(pool, server, rows_lasting(server, 6.0))
    signalled = time.monotonic()
    server.signal(signal.SIGTERM)
    assert server.process is not None
    code = server.process.wait(timeout=60)
    took = time.monotonic() - signalled
    assert code == 0
    assert took < 3.0, f"exit took {took:.1f}s with a 0.5s grace period:\n{server.log()}"
    with pytest.raises(InferenceServerException) as cut:
        running.result(timeout=30)  # cut off, not answered with a result
    assert cut.value.status() == "StatusCode.UNAVAILABLE", cut.value
    assert "grace period ended" in (cut.value.message() or ""), cut.value


def test_short_grace_period_ends_a_stream_unavailable_too(
    start_server: StartServer, repository: Path
) -> None:
    """The same cut on a ModelStreamInfer stream: its request in flight when the grace
    period ends closes the stream UNAVAILABLE, saying so (grpc.aio's own stop ended a
    stream INTERNAL "Internal error from Core", which clients do not retry)."""
    server = start_server(repository, "--shutdown-grace", "0.5")
    rows = rows_lasting(server, 6.0)
    errors: list[InferenceServerException] = []
    client = triton.InferenceServerClient(server.grpc_url)
    try:
        client.start_stream(callback=lambda result, error: errors.append(error))
        client.async_stream_infer("slow", slow_input(rows))
        wait_for(lambda: inflight(server, "slow") >= 1, "the streamed request to run")
        server.signal(signal.SIGTERM)
        assert server.process is not None
        assert server.process.wait(timeout=60) == 0
        wait_for(lambda: bool(errors), "the stream to end")
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
    error = errors[0]
    assert error is not None and error.status() == "StatusCode.UNAVAILABLE", error
    assert "grace period ended" in (error.message() or ""), error


def test_json_logs_are_one_object_per_line_and_not_per_request(
    start_server: StartServer, repository: Path
) -> None:
    server = start_server(repository, "--log-format", "json", "--load-model", "mlp")
    lines_at_start = server.log().splitlines()
    with triton.InferenceServerClient(server.grpc_url) as client:
        for _ in range(20):
            small_mlp_request(client)
        with pytest.raises(InferenceServerException):
            client.infer("no_such_model", [])  # a failed request is not logged either
    assert server.log().splitlines() == lines_at_start, "a line was logged per request"

    assert server.stop() == 0
    lines = server.log().splitlines()
    assert len(lines) > len(lines_at_start)  # shutdown was logged, in JSON too
    for line in lines:
        entry = json.loads(line)
        assert isinstance(entry, dict), line
        assert {"time", "level", "logger", "message"} <= entry.keys(), line
        assert entry["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    messages = [json.loads(line)["message"] for line in lines]
    assert any(m.startswith("sparseserve ready") for m in messages)
    assert "sparseserve stopped" in messages


HEAVY_WIDTH = 1024  # the `heavy` model: much compute for few bytes sent


@pytest.fixture
def heavy_repository(tmp_path: Path) -> Path:
    """`heavy` (64 MatMul+Tanh layers of 1024 x 1024: ~0.13 GFLOP per row, 4 KiB sent),
    so that many requests in flight take seconds of work without seconds of sending,
    and `mlp` for calls sent during the drain."""
    root = tmp_path / "heavy-repo"
    onnx_models.slow(root / "heavy" / "1" / "model.onnx", width=HEAVY_WIDTH, depth=64)
    onnx_models.mlp(root / "mlp" / "1" / "model.onnx")
    return root


def heavy_input(rows: int) -> list[triton.InferInput]:
    tensor = triton.InferInput("x", [rows, HEAVY_WIDTH], "FP32")
    tensor.set_data_from_numpy(np.ones((rows, HEAVY_WIDTH), np.float32))
    return [tensor]


def infer_heavy_async(
    client: triton.InferenceServerClient, rows: int, count: int
) -> list[Future[triton.InferResult]]:
    """`count` `heavy` requests of `rows` rows each, all sent at once on one connection."""
    futures: list[Future[triton.InferResult]] = []
    for _ in range(count):
        future: Future[triton.InferResult] = Future()

        def done(result: triton.InferResult, error: Exception | None, f=future) -> None:
            f.set_exception(error) if error is not None else f.set_result(result)

        client.async_infer("heavy", heavy_input(rows), done, client_timeout=120)
        futures.append(future)
    return futures


def outcome_of(future: Future[triton.InferResult]) -> str:
    error = future.exception(timeout=120)
    if error is None:
        return "OK"
    assert isinstance(error, InferenceServerException), repr(error)
    return str(error.status()).removeprefix("StatusCode.")


@pytest.mark.slow
def test_sigterm_with_many_requests_in_flight_answers_them_all_and_refuses_new_ones(
    start_server: StartServer, heavy_repository: Path
) -> None:
    """50 requests in flight (seconds of work queued on the model) and a grace that
    covers them: on SIGTERM every one is answered OK, none CANCELLED; health turns
    NOT_SERVING at once, and a call sent during the drain is refused with UNAVAILABLE
    "server is shutting down" (the port still accepts it) instead of being cut off."""
    server = start_server(heavy_repository, "--shutdown-grace", "60")
    count = 50
    with triton.InferenceServerClient(server.grpc_url) as client:
        futures = infer_heavy_async(client, 32, count)

        def all_arrived() -> bool:
            # Answered ones first: one answered between the two reads counts in neither.
            answered = sum(f.done() for f in futures)
            return answered + inflight(server, "heavy") >= count

        wait_for(all_arrived, f"all {count} requests reached the server", 30)
        signalled = time.monotonic()
        server.signal(signal.SIGTERM)
        wait_for(lambda: health(server) == "NOT_SERVING", "health answers NOT_SERVING")
        assert sum(f.done() for f in futures) < count, "the drain ended before the test looked"
        late = triton.InferenceServerClient(server.grpc_url)  # a new connection
        with pytest.raises(InferenceServerException) as refused:
            small_mlp_request(late)
        late.close()
        outcomes = [outcome_of(f) for f in futures]
    assert outcomes.count("OK") == count, {o: outcomes.count(o) for o in set(outcomes)}
    assert str(refused.value.status()) == "StatusCode.UNAVAILABLE", refused.value
    assert "server is shutting down" in refused.value.message()
    assert server.process is not None
    assert server.process.wait(timeout=30) == 0
    assert time.monotonic() - signalled < 60
    assert "sparseserve stopped" in server.log()


@pytest.mark.slow
def test_sigterm_answers_a_streams_requests_then_ends_it_unavailable(
    start_server: StartServer, heavy_repository: Path
) -> None:
    """A ModelStreamInfer stream with requests in flight: each is answered, then the
    stream ends with UNAVAILABLE "server is shutting down" (not CANCELLED), so the
    client knows to reconnect elsewhere; the server does not wait out the grace
    period for a stream the client keeps open."""
    server = start_server(heavy_repository, "--shutdown-grace", "60")
    count = 8
    answers: list[object] = []
    with triton.InferenceServerClient(server.grpc_url) as client:
        client.start_stream(lambda result, error: answers.append(error or result))
        for _ in range(count):
            client.async_stream_infer("heavy", heavy_input(32))
        wait_for(
            lambda: len(answers) + inflight(server, "heavy") >= count,
            "the stream's requests reached the model",
            30,
        )
        assert len(answers) < count, "the stream answered everything before the test looked"
        signalled = time.monotonic()
        server.signal(signal.SIGTERM)
        wait_for(lambda: len(answers) > count, "the stream answered and ended", 60)
        assert server.process is not None
        assert server.process.wait(timeout=30) == 0
        client.stop_stream()
    took = time.monotonic() - signalled
    results, errors = answers[:count], answers[count:]
    assert all(isinstance(r, triton.InferResult) for r in results), results
    assert all(r.as_numpy("y").shape == (32, HEAVY_WIDTH) for r in results)  # type: ignore[union-attr]
    assert len(errors) == 1 and isinstance(errors[0], InferenceServerException), errors
    assert str(errors[0].status()) == "StatusCode.UNAVAILABLE", errors[0]
    assert "server is shutting down" in errors[0].message()
    assert took < 30, f"the server waited {took:.0f}s for an idle stream"


@pytest.mark.slow
def test_sigterm_while_requests_still_arrive_cancels_none(
    start_server: StartServer, heavy_repository: Path
) -> None:
    """SIGTERM while 100 requests are still arriving (30 at the model, the rest on the
    wire or queued in gRPC): each one is either answered OK or refused UNAVAILABLE
    "server is shutting down", which clients retry. None is CANCELLED, as the ones not
    yet handed to a handler were when gRPC's own shutdown began the drain."""
    server = start_server(heavy_repository, "--shutdown-grace", "60")
    count = 100
    with triton.InferenceServerClient(server.grpc_url) as client:
        futures = infer_heavy_async(client, 32, count)
        wait_for(lambda: inflight(server, "heavy") >= 30, "30 requests at the model", 30)
        server.signal(signal.SIGTERM)
        errors = [f.exception(timeout=120) for f in futures]
    refusals = [e for e in errors if e is not None]
    assert all(isinstance(e, InferenceServerException) for e in refusals), refusals[:3]
    wrong = [
        f"{e.status()} {e.message()}"  # type: ignore[union-attr]
        for e in refusals
        if "server is shutting down" not in e.message()  # type: ignore[union-attr]
    ]
    assert wrong == [], f"{len(wrong)} of {count} not answered nor refused: {wrong[:3]}"
    assert count - len(refusals) >= 30, "a request already at the model was refused"
    assert server.process is not None
    assert server.process.wait(timeout=30) == 0
