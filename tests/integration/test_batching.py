"""Dynamic batching through a real server: models whose config.pbtxt enables it, called
concurrently with tritonclient's asyncio client."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from sparseserve.client.server_process import ServerProcess
from sparseserve.testing import onnx_models
from tests.scrape import inflight, scrape, value

pytestmark = pytest.mark.integration

# name -> config.pbtxt. Each test uses its own models, so their statistics are its own.
CONFIGS = {
    "mlp_batched": "max_batch_size: 64 dynamic_batching { max_queue_delay_microseconds: 2000 }",
    "mlp_patient": "max_batch_size: 64 dynamic_batching { max_queue_delay_microseconds: 200000 }",
    "widths": "max_batch_size: 64 dynamic_batching { max_queue_delay_microseconds: 2000 }",
    "lookup": "max_batch_size: 64 dynamic_batching { max_queue_delay_microseconds: 5000 }",
    "slow_short_queue": "max_batch_size: 8192 "
    "dynamic_batching { default_queue_policy { max_queue_size: 2 } }",
    "slow_batched": "max_batch_size: 8192 dynamic_batching { }",
    "unbatchable": "max_batch_size: 8 dynamic_batching { }",
}
SLOW_WIDTH = 512


@pytest.fixture(scope="module")
def batching_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("batching")
    mlp = onnx_models.mlp(root / "mlp_batched" / "1" / "model.onnx")
    shutil.copytree(mlp.parent, root / "mlp_patient" / "1")
    onnx_models.add_constant(root / "widths" / "1" / "model.onnx", 1.0, width=None)
    onnx_models.lookup(root / "lookup" / "1" / "model.onnx")
    slow = onnx_models.slow(root / "slow_batched" / "1" / "model.onnx", width=SLOW_WIDTH)
    shutil.copytree(slow.parent, root / "slow_short_queue" / "1")
    onnx_models.add_constant(root / "unbatchable" / "1" / "model.onnx", 1.0, batch=1)
    for name, text in CONFIGS.items():
        (root / name / "config.pbtxt").write_text(text + "\n")
    return root


@pytest.fixture(scope="module")
def batching_server(batching_repository: Path) -> Iterator[ServerProcess]:
    """Every run on the thread pool, so that batches form however idle the machine: while
    one runs, the requests that arrive meanwhile queue. (Runs short enough to execute on
    the event loop batch only requests received in the same turn of the loop or while a
    wait is worth it; tests/unit/test_batcher.py covers both paths.)"""
    env = {"SPARSESERVE_ONNXRUNTIME__INLINE_MAX_US": "0"}
    with ServerProcess(batching_repository, env=env) as process:
        yield process
    assert process.returncode == 0, process.log()


def tensor(name: str, array: np.ndarray) -> triton.InferInput:
    datatype = {np.float32: "FP32", np.int64: "INT64"}[array.dtype.type]
    result = triton.InferInput(name, list(array.shape), datatype)
    result.set_data_from_numpy(array)
    return result


def statistics(server: ServerProcess, model: str) -> Any:  # a tritonclient ModelStatistics
    with triton.InferenceServerClient(server.grpc_url) as client:
        (stats,) = client.get_inference_statistics(model).model_stats
    return stats


async def gather(
    server: ServerProcess, model: str, requests: list[list[triton.InferInput]]
) -> list[object]:
    """Send all `requests` at once; their results (or exceptions) in order."""
    async with triton_aio.InferenceServerClient(server.grpc_url) as client:
        return await asyncio.gather(
            *(client.infer(model, inputs) for inputs in requests), return_exceptions=True
        )


def test_concurrent_requests_are_batched_and_answered_bit_for_bit(
    batching_server: ServerProcess,
) -> None:
    """96 concurrent requests of 1-5 rows: each answer equals onnxruntime's for that
    request alone, bit for bit; they ran in fewer executions than requests, and the
    statistics count requests, rows, executions and queue time apart."""
    rng = np.random.default_rng(7)
    arrays = [rng.standard_normal((1 + i % 5, 64)).astype(np.float32) for i in range(96)]
    results = asyncio.run(
        gather(batching_server, "mlp_batched", [[tensor("input", x)] for x in arrays])
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # as the server runs it
    path = batching_server.repository / "mlp_batched" / "1" / "model.onnx"
    session = ort.InferenceSession(str(path), options)
    for x, result in zip(arrays, results, strict=True):
        assert not isinstance(result, BaseException), result
        (want,) = session.run(["output"], {"input": x})
        assert np.array_equal(result.as_numpy("output"), want)  # type: ignore[attr-defined]

    stats = statistics(batching_server, "mlp_batched")
    assert stats.inference_stats.success.count == len(arrays)
    assert stats.inference_count == sum(len(x) for x in arrays)
    assert 1 <= stats.execution_count < len(arrays)
    assert stats.inference_stats.compute_infer.count == stats.execution_count
    assert stats.inference_stats.queue.count == len(arrays)
    samples = scrape(batching_server)
    labels = {"model": "mlp_batched", "version": "1"}
    assert value(samples, "sparseserve_executions_total", **labels) == stats.execution_count
    assert value(samples, "sparseserve_queue_duration_seconds_count", **labels) == len(arrays)


def test_a_lone_client_does_not_wait_for_the_window(batching_server: ServerProcess) -> None:
    """With max_queue_delay 200 ms, sequential requests take a few ms each, not 200."""
    x = [tensor("input", np.ones((1, 64), np.float32))]
    with triton.InferenceServerClient(batching_server.grpc_url) as client:
        client.infer("mlp_patient", x)
        durations = []
        for _ in range(30):
            started = time.perf_counter()
            client.infer("mlp_patient", x)
            durations.append(time.perf_counter() - started)
    assert max(durations) < 0.1, durations
    assert sum(durations) / len(durations) < 0.02, durations


def test_requests_of_different_shapes_are_never_mixed(batching_server: ServerProcess) -> None:
    """Concurrent requests of widths 3, 5 and 8 on a [batch, width] model: each gets
    x + 1 at its own width."""
    arrays = [np.full((1 + i % 3, (3, 5, 8)[i % 3]), i, np.float32) for i in range(60)]
    results = asyncio.run(gather(batching_server, "widths", [[tensor("x", x)] for x in arrays]))
    for x, result in zip(arrays, results, strict=True):
        assert not isinstance(result, BaseException), result
        assert np.array_equal(result.as_numpy("y"), x + 1)  # type: ignore[attr-defined]
    assert statistics(batching_server, "widths").execution_count < len(arrays)


def test_a_request_the_model_fails_on_fails_alone(batching_server: ServerProcess) -> None:
    """A lookup index out of range passes validation and fails inside onnxruntime.
    Sent among good requests in the same window, it alone gets INVALID_ARGUMENT with the
    model's message; the good ones are answered (and were batched together)."""
    good = [np.array([i % 4, (i + 1) % 4], np.int64) for i in range(16)]
    for _ in range(3):
        requests = [*good[:8], np.array([1, 99], np.int64), *good[8:]]
        results = asyncio.run(
            gather(batching_server, "lookup", [[tensor("index", r)] for r in requests])
        )
        bad = results.pop(8)
        assert isinstance(bad, InferenceServerException), bad
        assert bad.status() == "StatusCode.INVALID_ARGUMENT"
        assert "out of data bounds" in bad.message()
        for index, result in zip(good, results, strict=True):
            assert not isinstance(result, BaseException), result
            want = ((index + 1) * 10).astype(np.float32)
            assert np.array_equal(result.as_numpy("y"), want)  # type: ignore[attr-defined]
    stats = statistics(batching_server, "lookup")
    assert stats.inference_stats.fail.count == 3
    assert stats.inference_stats.success.count == 3 * len(good)
    assert stats.execution_count < 3 * len(good)


def test_a_full_queue_is_resource_exhausted(batching_server: ServerProcess) -> None:
    """max_queue_size 2 on a slow model: of a burst of 10, the requests beyond the queue
    are refused with RESOURCE_EXHAUSTED naming the queue; the rest are answered."""
    x = [tensor("x", np.ones((1024, SLOW_WIDTH), np.float32))]
    results = asyncio.run(gather(batching_server, "slow_short_queue", [x] * 10))
    refused = [r for r in results if isinstance(r, BaseException)]
    assert refused and len(refused) < len(results)
    for error in refused:
        assert isinstance(error, InferenceServerException), repr(error)
        assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "max_queue_size" in error.message()


def test_an_expired_request_is_not_run(batching_server: ServerProcess) -> None:
    """A request that expires (client_timeout) while queued behind a long run is
    DEADLINE_EXCEEDED and dropped: the model executes the long run and the next request,
    never the expired one."""

    async def main() -> None:
        long = np.ones((4096, SLOW_WIDTH), np.float32)
        small = np.ones((4, SLOW_WIDTH), np.float32)
        async with triton_aio.InferenceServerClient(batching_server.grpc_url) as client:
            running = asyncio.ensure_future(client.infer("slow_batched", [tensor("x", long)]))
            while not await asyncio.to_thread(inflight, batching_server, "slow_batched"):
                await asyncio.sleep(0.01)  # until the long run has reached the model
            with pytest.raises(InferenceServerException) as info:
                await client.infer("slow_batched", [tensor("x", small)], client_timeout=0.05)
            assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
            assert not running.done(), "the long run ended too soon to test anything"
            await running
            await client.infer("slow_batched", [tensor("x", small)])

    asyncio.run(main())
    stats = statistics(batching_server, "slow_batched")
    assert stats.execution_count == 2
    assert stats.inference_count == 4096 + 4


def test_a_model_that_cannot_batch_is_not_loaded_and_says_why(
    batching_server: ServerProcess,
) -> None:
    with triton.InferenceServerClient(batching_server.grpc_url) as client:
        index = client.get_model_repository_index(as_json=True)["models"]
    (entry,) = [m for m in index if m["name"] == "unbatchable"]
    assert entry["state"] == "UNAVAILABLE"
    assert "max_batch_size is" in entry["reason"] and "leading dimension" in entry["reason"]
