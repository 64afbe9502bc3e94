"""Dispatch to Triton and fallback to onnxruntime, over the real network.

Triton cannot run here, but its protocol can: the upstream "Triton" in these tests is a
second, real sparseserve process on a loopback port, serving the same repository. The
downstream server under test is configured with it as `triton.url`. Where a test needs
the GPU path, the hardware probe's input is injected with `--assume-gpus` (this machine
has no GPU); nothing else is faked.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from sparseserve.client.server_process import ServerProcess
from sparseserve.testing import onnx_models
from tests.scrape import scrape, value

pytestmark = pytest.mark.integration

MODEL = "mlp"
PIXELS = np.linspace(-1, 1, 4 * 64, dtype=np.float32).reshape(4, 64)
# Fast breaker probes, so recovery is seen in well under a second.
FAST_PROBES = {"SPARSESERVE_TRITON__PROBE_INTERVAL_SECONDS": "0.2"}


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dispatch-repository")
    onnx_models.mlp(root / MODEL / "1" / "model.onnx")
    return root


def infer(url: str, pixels: np.ndarray = PIXELS) -> np.ndarray:
    with triton.InferenceServerClient(url) as client:
        tensor = triton.InferInput("input", list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels)
        return client.infer(MODEL, [tensor], client_timeout=10).as_numpy("output")


def upstream_inferences(url: str) -> int:
    """Samples the upstream has inferred for MODEL (its ModelStatistics)."""
    with triton.InferenceServerClient(url) as client:
        (stats,) = client.get_inference_statistics(MODEL).model_stats
        return stats.inference_count


def executions_by(server: ServerProcess, backend: str) -> float:
    return value(scrape(server), "sparseserve_backend_executions_total", backend=backend)


def free_port() -> int:
    """A port that was free a moment ago (for an upstream that must restart on it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def upstream(repository: Path) -> Iterator[ServerProcess]:
    """The stand-in for Triton, on a fixed free port so that it can restart there.
    Managed here rather than by `start_server`: tests kill it with SIGKILL."""
    process = ServerProcess(repository, "--grpc-port", str(free_port()), "--no-metrics")
    try:
        yield process.start()
    finally:
        process.close()


def test_auto_dispatch_uses_triton_when_the_probe_reports_a_gpu(
    repository: Path, upstream: ServerProcess, start_server: Callable[..., ServerProcess]
) -> None:
    """With a GPU (injected: `--assume-gpus 1`) and a ready Triton, `auto` sends the
    model to Triton; the answers are bit for bit those of onnxruntime."""
    gpu_host = start_server(
        repository, "--triton-url", upstream.grpc_url, "--assume-gpus", "1", "--dispatch", "auto"
    )
    before = upstream_inferences(upstream.grpc_url)
    served = infer(gpu_host.grpc_url)
    assert upstream_inferences(upstream.grpc_url) == before + len(PIXELS)
    samples = scrape(gpu_host)
    assert value(samples, "sparseserve_backend_executions_total", backend="triton") == 1
    assert value(samples, "sparseserve_requests_total", backend="triton", code="OK") == 1
    assert value(samples, "sparseserve_gpus") == 1

    np.testing.assert_array_equal(served, infer(upstream.grpc_url))


def test_auto_dispatch_stays_on_the_cpu_without_a_gpu(
    repository: Path, upstream: ServerProcess, start_server: Callable[..., ServerProcess]
) -> None:
    """No GPU (injected: `--assume-gpus 0`): Triton configured and ready, yet `auto`
    serves on onnxruntime, and the upstream sees nothing."""
    cpu_host = start_server(
        repository, "--triton-url", upstream.grpc_url, "--assume-gpus", "0", "--dispatch", "auto"
    )
    before = upstream_inferences(upstream.grpc_url)
    served = infer(cpu_host.grpc_url)
    assert upstream_inferences(upstream.grpc_url) == before
    samples = scrape(cpu_host)
    assert value(samples, "sparseserve_requests_total", backend="onnxruntime", code="OK") == 1
    assert value(samples, "sparseserve_gpus") == 0
    np.testing.assert_array_equal(served, infer(upstream.grpc_url))


@dataclass
class Load:
    """Closed-loop load from `workers` concurrent clients, counting what happened."""

    ok: int = 0
    inflight: int = 0
    failures: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def worker(self, url: str) -> None:
        async with triton_aio.InferenceServerClient(url) as client:
            tensor = triton_aio.InferInput("input", list(PIXELS.shape), "FP32")
            tensor.set_data_from_numpy(PIXELS)
            while not self.stop.is_set():
                self.inflight += 1
                try:
                    await client.infer(MODEL, [tensor], client_timeout=10)
                    self.ok += 1
                except InferenceServerException as exc:
                    self.failures.append(str(exc))
                finally:
                    self.inflight -= 1

    async def until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not await asyncio.to_thread(condition):
            assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
            await asyncio.sleep(0.05)


def test_upstream_killed_under_load_falls_back_and_returns(
    repository: Path, upstream: ServerProcess, start_server: Callable[..., ServerProcess]
) -> None:
    """SIGKILL the upstream while four clients keep sending: at most the requests in
    flight at that moment may fail (none do: each is retried on onnxruntime), the
    breaker serves from onnxruntime, and once the upstream is back on the same port the
    traffic returns to it."""
    server = start_server(
        repository, "--triton-url", upstream.grpc_url, "--dispatch", "triton", env=FAST_PROBES
    )

    async def scenario() -> tuple[Load, int]:
        load = Load()
        workers = [asyncio.create_task(load.worker(server.grpc_url)) for _ in range(4)]
        await load.until(lambda: executions_by(server, "triton") >= 20, 20, "Triton traffic")
        inflight_at_kill = load.inflight
        upstream.kill()
        await load.until(lambda: executions_by(server, "onnxruntime") >= 20, 20, "fallback traffic")
        assert value(scrape(server), "sparseserve_circuit_open") == 1
        await asyncio.to_thread(upstream.start)  # the same port: a restarted Triton
        await load.until(lambda: upstream_inferences(upstream.grpc_url) > 0, 20, "recovery")
        load.stop.set()
        await asyncio.gather(*workers)
        return load, inflight_at_kill

    load, inflight_at_kill = asyncio.run(scenario())
    assert len(load.failures) <= inflight_at_kill, load.failures
    samples = scrape(server)
    fallbacks = value(samples, "sparseserve_fallbacks_total")
    assert fallbacks >= 20
    assert value(samples, "sparseserve_circuit_open") == 0
    # Every answer is counted for who served it: onnxruntime the fallbacks (one request
    # per execution: the model is not batched), Triton the rest.
    ok = {"model": MODEL, "code": "OK"}
    by_onnxruntime = value(samples, "sparseserve_requests_total", **ok, backend="onnxruntime")
    by_triton = value(samples, "sparseserve_requests_total", **ok, backend="triton")
    assert by_onnxruntime == fallbacks
    assert by_triton == load.ok - fallbacks
    assert by_triton == value(samples, "sparseserve_backend_executions_total", backend="triton")
    assert value(samples, "sparseserve_executions_total", backend="onnxruntime") == fallbacks


def test_without_fallback_the_client_sees_unavailable(
    repository: Path, upstream: ServerProcess, start_server: Callable[..., ServerProcess]
) -> None:
    """`--no-dispatch-fallback`: a dead Triton surfaces as UNAVAILABLE, and the model
    serves again once Triton is back."""
    server = start_server(
        repository,
        "--triton-url", upstream.grpc_url, "--dispatch", "triton", "--no-dispatch-fallback",
        env=FAST_PROBES,
    )  # fmt: skip
    expected = infer(server.grpc_url)
    upstream.kill()
    upstream.process.wait()  # type: ignore[union-attr]
    with pytest.raises(InferenceServerException) as caught:
        infer(server.grpc_url)
    assert caught.value.status() == "StatusCode.UNAVAILABLE"
    upstream.start()

    def serves() -> bool:
        try:
            return bool(np.array_equal(infer(server.grpc_url), expected))
        except InferenceServerException:
            return False

    wait_for(serves, 20, "the model to serve from Triton again")
    assert value(scrape(server), "sparseserve_fallbacks_total") == 0


@pytest.fixture(scope="module")
def mixed_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fp32 MLP, and three variants Triton would compute otherwise: an OpenVINO IR, an
    ONNX file whose config.pbtxt names the openvino backend, and a bf16 variant."""
    import openvino

    root = tmp_path_factory.mktemp("dispatch-mixed")
    source = onnx_models.mlp(root / MODEL / "1" / "model.onnx")
    (root / "ir" / "1").mkdir(parents=True)
    openvino.save_model(
        openvino.convert_model(str(source)), str(root / "ir" / "1" / "model.xml"),
        compress_to_fp16=False,
    )  # fmt: skip
    onnx_models.mlp(root / "openvino_config" / "1" / "model.onnx")
    (root / "openvino_config" / "config.pbtxt").write_text('backend: "openvino"\n')
    onnx_models.mlp(root / "bf16" / "1" / "model.onnx")
    (root / "bf16" / "sparseserve.yaml").write_text("family: m\nvariant: bf16\nprecision: bf16\n")
    return root


def reasons(url: str) -> dict[str, str]:
    """Each model's state and reason, from the repository index."""
    with triton.InferenceServerClient(url) as client:
        index = client.get_model_repository_index().models
    return {m.name: f"{m.state}: {m.reason}" for m in index}


def cpu_computes_bf16() -> bool:
    import openvino

    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def test_auto_keeps_on_the_cpu_what_triton_would_compute_in_another_precision(
    mixed_repository: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """GPU (injected) and a ready Triton: the fp32 ONNX model goes to Triton, while the IR,
    the openvino-configured model and the bf16 variant stay on this server's OpenVINO,
    never sent upstream (where they would run on Triton's CPU, or in fp32)."""
    upstream = start_server(mixed_repository, "--no-metrics")
    server = start_server(
        mixed_repository,
        "--triton-url", upstream.grpc_url, "--assume-gpus", "1", "--dispatch", "auto",
    )  # fmt: skip
    for model in ("ir", "openvino_config"):
        with triton.InferenceServerClient(server.grpc_url) as client:
            tensor = triton.InferInput("input", list(PIXELS.shape), "FP32")
            tensor.set_data_from_numpy(PIXELS)
            client.infer(model, [tensor])
        with triton.InferenceServerClient(upstream.grpc_url) as client:
            (stats,) = client.get_inference_statistics(model).model_stats
            assert stats.inference_count == 0, model
    infer(server.grpc_url)
    samples = scrape(server)
    for model in ("ir", "openvino_config"):
        assert value(samples, "sparseserve_requests_total", model=model, backend="openvino",
                     code="OK") == 1, model  # fmt: skip
    assert value(samples, "sparseserve_requests_total", model=MODEL, backend="triton") == 1
    bf16 = reasons(server.grpc_url)["bf16"]
    if cpu_computes_bf16():
        assert bf16.startswith("READY"), bf16
    else:  # refused by OpenVINO for want of bf16, not sent to Triton to run in fp32
        assert "OPTIMIZATION_CAPABILITIES" in bf16 and "Triton" not in bf16, bf16
    kept = [line for line in server.log().splitlines() if "stays on the CPU" in line]
    for model in ("ir", "openvino_config", "bf16"):  # once per load, not per step of it
        assert sum(f"model {model} stays" in line for line in kept) == 1, kept


def test_dispatch_triton_refuses_what_triton_would_compute_in_another_precision(
    mixed_repository: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """`--dispatch triton`: the three are not loaded; each reason says why Triton would
    not compute it as measured, and names the setting that serves it on the CPU."""
    upstream = start_server(mixed_repository, "--no-metrics")
    server = start_server(mixed_repository, "--triton-url", upstream.grpc_url, "--dispatch",
                          "triton")  # fmt: skip
    found = reasons(server.grpc_url)
    assert found[MODEL].startswith("READY")
    for model, why in (
        ("bf16", "a bf16 variant, and Triton's onnxruntime backend would compute it in fp32"),
        ("ir", "an OpenVINO model (model.xml)"),
        ("openvino_config", "configured for the openvino backend"),
    ):
        assert not found[model].startswith("READY"), found[model]
        assert f"is dispatched to Triton, but it is {why}" in found[model], found[model]
        assert f"dispatch_overrides: {{{model}: cpu}}" in found[model], found[model]
    np.testing.assert_array_equal(infer(server.grpc_url), infer(upstream.grpc_url))


def test_a_request_running_on_a_draining_triton_is_answered_by_it(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """A long request is running on the upstream when it starts to drain (SIGTERM, as in
    a rolling restart): new requests find it unavailable and open the breaker, whose
    probes find it not ready. The long request is still answered, by the upstream (a
    failed probe once closed the connection under it: the client got CANCELLED)."""
    root = tmp_path / "repository"
    onnx_models.mlp(root / MODEL / "1" / "model.onnx")
    onnx_models.slow(root / "slow" / "1" / "model.onnx", width=512, depth=32)
    upstream = ServerProcess(root, "--shutdown-grace", "60").start()
    try:
        server = start_server(
            root, "--triton-url", upstream.grpc_url, "--dispatch", "triton", env=FAST_PROBES
        )
        rows = np.random.default_rng(0).standard_normal((8, 512)).astype(np.float32)

        def slow(url: str, x: np.ndarray) -> np.ndarray:
            with triton.InferenceServerClient(url) as client:
                tensor = triton.InferInput("x", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x)
                return client.infer("slow", [tensor], client_timeout=60).as_numpy("y")

        want = slow(upstream.grpc_url, rows)
        started = time.monotonic()
        slow(upstream.grpc_url, np.zeros((4096, 512), np.float32))
        seconds = time.monotonic() - started  # for 4,096 rows here
        long = np.zeros((min(100_000, max(4096, int(4096 * 2.5 / seconds))), 512), np.float32)
        long[: len(rows)] = rows  # lasts ~2.5 s

        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(slow, server.grpc_url, long)
            wait_for(lambda: value(scrape(upstream), "sparseserve_inflight_requests",
                                   model="slow") >= 1, 20, "the long request upstream")  # fmt: skip
            upstream.signal()  # drains: finishes what runs, refuses what comes
            wait_for(lambda: not _ready(upstream.grpc_url), 10, "the upstream to drain")
            for _ in range(3):  # each refused upstream, answered by onnxruntime
                np.testing.assert_allclose(slow(server.grpc_url, rows), want, rtol=1e-5, atol=1e-6)
            assert value(scrape(server), "sparseserve_circuit_open", model="slow") == 1
            time.sleep(1.0)  # several failed probes
            assert not running.done(), "the long request ended early; it must span the probes"
            got = running.result(timeout=60)
        np.testing.assert_allclose(got[: len(rows)], want, rtol=1e-5, atol=1e-6)
        assert value(scrape(server), "sparseserve_fallbacks_total", model="slow") == 3
    finally:
        upstream.close()


def _ready(url: str) -> bool:
    try:
        with triton.InferenceServerClient(url) as client:
            return bool(client.is_server_ready(client_timeout=2))
    except InferenceServerException:
        return False


def test_a_triton_call_whose_connection_closes_under_it_is_unavailable(tmp_path: Path) -> None:
    """The connection to Triton closed while a call runs on it (an unload past its grace
    period): the call ends BackendUnavailable, which a fallback answers, rather than
    with a CancelledError nobody asked for (which left the client unanswered until its
    deadline)."""
    from sparseserve.backends.base import ModelFiles
    from sparseserve.backends.triton import TritonBackend
    from sparseserve.errors import BackendUnavailable
    from sparseserve.settings import TritonSettings

    path = onnx_models.slow(tmp_path / "slow" / "1" / "model.onnx", width=512, depth=32)
    with ServerProcess(tmp_path) as upstream:

        async def main() -> BaseException | None:
            backend = TritonBackend(
                ModelFiles("slow", 1, path), TritonSettings(url=upstream.grpc_url)
            )
            await backend.load()
            long = np.zeros((100_000, 512), np.float32)  # seconds of work
            call = asyncio.create_task(backend.infer({"x": long}, ["y"]))
            await asyncio.sleep(0.5)
            assert not call.done()
            await backend.unload()
            try:
                await asyncio.wait_for(call, 10)
            except BaseException as exc:  # which one is the question
                return exc
            return None

        error = asyncio.run(main())
    assert isinstance(error, BackendUnavailable), repr(error)
    assert "cancelled" in str(error)
