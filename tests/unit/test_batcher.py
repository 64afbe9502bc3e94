"""The DynamicBatcher on a real onnxruntime backend, driven directly on an event loop:
batches form, every caller gets exactly its rows, failures stay with their requests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import text_format

from sparseserve.backends.base import ExecutionRecord, ModelFiles, ModelSignature
from sparseserve.backends.onnxruntime import OnnxRuntimeBackend
from sparseserve.errors import InferenceFailed, InvalidInput, ModelLoadError, Overloaded
from sparseserve.protocol import model_config_pb2
from sparseserve.scheduling.batcher import BatchingPolicy, BatchShare, DynamicBatcher
from sparseserve.settings import BatchingSettings, OnnxRuntimeSettings
from sparseserve.testing import onnx_models


@dataclass
class Executions:
    """What the backend ran successfully: one entry per execution."""

    compute_ns: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)

    def __call__(self, compute_ns: int, rows: int) -> None:
        self.compute_ns.append(compute_ns)
        self.rows.append(rows)


class CountedBackend(OnnxRuntimeBackend):
    """onnxruntime that notes each successful execution (after warm-up) in `executions`."""

    executions: Executions | None = None

    async def infer(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> ExecutionRecord:
        record = await super().infer(inputs, outputs)
        if self.executions is not None:
            first = next(iter(inputs.values()))
            self.executions(record.compute_ns, int(first.shape[0]) if first.ndim else 1)
        return record


@asynccontextmanager
async def batcher_for(
    path: Path, policy: BatchingPolicy, inline_max_us: float = 100.0
) -> AsyncIterator[tuple[DynamicBatcher, ModelSignature, Executions]]:
    executor = ThreadPoolExecutor(2)
    backend = CountedBackend(
        ModelFiles(path.stem, 1, path), OnnxRuntimeSettings(inline_max_us=inline_max_us), executor
    )
    signature = await backend.load()
    executions = backend.executions = Executions()
    try:
        yield DynamicBatcher(path.stem, backend, policy), signature, executions
    finally:
        await backend.unload()
        executor.shutdown()


def config(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


POLICY = BatchingPolicy(max_batch_size=64, max_queue_delay_us=0)


@pytest.mark.parametrize("inline_max_us", [0.0, 1e9], ids=["thread-pool", "inline"])
def test_concurrent_requests_share_executions_and_get_their_own_rows(
    tmp_path: Path, inline_max_us: float
) -> None:
    """Requests of 1..7 rows submitted together run in fewer executions than requests,
    and each answer equals onnxruntime's for that request alone, bit for bit."""
    path = onnx_models.mlp(tmp_path / "mlp.onnx")
    session = ort.InferenceSession(str(path))
    rng = np.random.default_rng(1)
    inputs = [rng.standard_normal((1 + i % 7, 64)).astype(np.float32) for i in range(20)]

    async def main() -> tuple[list[np.ndarray], int]:
        async with batcher_for(path, POLICY, inline_max_us) as (batcher, _, executions):
            answers = await asyncio.gather(
                *(batcher.infer({"input": x}, ["output"]) for x in inputs)
            )
            return [a.record.outputs["output"] for a in answers], len(executions.compute_ns)

    answers, executions = asyncio.run(main())
    assert executions < len(inputs) / 2
    for x, got in zip(inputs, answers, strict=True):
        (want,) = session.run(["output"], {"input": x})
        assert got.shape == want.shape and np.array_equal(got, want)


def test_max_batch_size_caps_rows_per_execution(tmp_path: Path) -> None:
    """10 requests of 3 rows with max_batch_size 7: executions of 2 requests (6 rows),
    each reported with its rows (the batch-size histogram's input)."""
    path = onnx_models.add_constant(tmp_path / "add.onnx", 1.0)
    policy = BatchingPolicy(max_batch_size=7, max_queue_delay_us=0)

    async def main() -> list[int]:
        async with batcher_for(path, policy) as (batcher, _, executions):
            x = np.zeros((3, 4), np.float32)
            await asyncio.gather(*(batcher.infer({"x": x}, ["y"]) for _ in range(10)))
            return executions.rows

    assert asyncio.run(main()) == [6] * 5


def test_requests_of_different_shapes_are_never_mixed(tmp_path: Path) -> None:
    """Widths 3 and 5 interleaved on a [batch, width] model: every answer is x + 1 with
    the caller's own width, in two executions (one per width)."""
    path = onnx_models.add_constant(tmp_path / "add.onnx", 1.0, width=None)
    widths = [3, 5] * 6

    async def main() -> tuple[list[np.ndarray], list[np.ndarray], int]:
        async with batcher_for(path, POLICY) as (batcher, _, executions):
            xs = [np.full((2, w), i, np.float32) for i, w in enumerate(widths)]
            answers = await asyncio.gather(*(batcher.infer({"x": x}, ["y"]) for x in xs))
            return xs, [a.record.outputs["y"] for a in answers], len(executions.compute_ns)

    xs, ys, executions = asyncio.run(main())
    assert executions == 2
    for x, y in zip(xs, ys, strict=True):
        assert np.array_equal(y, x + 1)


def test_a_request_the_model_rejects_at_run_time_fails_alone(tmp_path: Path) -> None:
    """One out-of-range index among good requests: the batch fails in onnxruntime and is
    retried in halves; only the bad request gets the model's error, and the good half
    still runs as one execution."""
    path = onnx_models.lookup(tmp_path / "lookup.onnx")

    async def main() -> tuple[list[object], int]:
        async with batcher_for(path, POLICY) as (batcher, _, executions):
            indexes = [[0, 1], [2], [9], [3, 3]]
            results = await asyncio.gather(
                *(batcher.infer({"index": np.array(i, np.int64)}, ["y"]) for i in indexes),
                return_exceptions=True,
            )
            return results, len(executions.compute_ns)

    results, executions = asyncio.run(main())
    assert executions == 2  # [0, 1] together, then [3] alone (only successes count)
    assert isinstance(results[2], InvalidInput) and "out of data bounds" in str(results[2])
    good = [r.record.outputs["y"].tolist() for i, r in enumerate(results) if i != 2]  # type: ignore[union-attr]
    assert good == [[10.0, 20.0], [30.0], [40.0, 40.0]]


class UntranslatedFailure(CountedBackend):
    """onnxruntime, but a lone request with a negative value fails with a plain
    RuntimeError, as an engine error the backend does not translate would (a GPU
    Triton's client errors can be such; no GPU runs here), and a batch holding one
    fails as the model's own error does."""

    async def infer(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> ExecutionRecord:
        x = inputs["x"]
        if (x < 0).any():
            if len(x) > 1:
                raise InvalidInput("a negative row in the batch")
            raise RuntimeError("engine blew up")
        return await super().infer(inputs, outputs)


def test_an_untranslated_failure_in_a_retried_half_leaves_no_request_waiting(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The batch fails, its halves are retried, and the bad request's retry fails with
    an error that is not the server's own: it gets that error as INTERNAL, every other
    request is still answered (the half after it was once never run: its callers waited
    for ever), and the error is logged once."""
    path = onnx_models.add_constant(tmp_path / "add.onnx", 1.0)

    async def main() -> list[object]:
        executor = ThreadPoolExecutor(2)
        backend = UntranslatedFailure(ModelFiles("add", 1, path), OnnxRuntimeSettings(), executor)
        await backend.load()
        batcher = DynamicBatcher("add", backend, POLICY)
        try:
            rows = [np.full((1, 4), v, np.float32) for v in (-1.0, 1.0, 2.0, 3.0)]
            calls = [batcher.infer({"x": x}, ["y"]) for x in rows]
            return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)
        finally:
            await backend.unload()
            executor.shutdown()

    results = asyncio.run(main())
    assert isinstance(results[0], InferenceFailed) and "engine blew up" in str(results[0])
    answers = [r.record.outputs["y"].tolist() for r in results[1:]]  # type: ignore[union-attr]
    assert answers == [[[2.0] * 4], [[3.0] * 4], [[4.0] * 4]]
    failures = [r for r in caplog.records if "a batch execution failed" in r.getMessage()]
    assert len(failures) == 1


def test_inputs_that_disagree_on_the_batch_dimension_are_refused(tmp_path: Path) -> None:
    path = onnx_models.multi_io(tmp_path / "multi_io.onnx")

    async def main() -> None:
        async with batcher_for(path, POLICY) as (batcher, _, _executions):
            a, b = np.zeros((2, 4), np.float32), np.zeros((3, 4), np.int64)
            await batcher.infer({"a": a, "b": b}, ["sum"])

    with pytest.raises(InvalidInput, match="leading"):
        asyncio.run(main())


def test_a_full_queue_refuses_and_a_cancelled_request_never_runs(tmp_path: Path) -> None:
    """One instance busy with a long run; the queue (max 2) holds two requests, a third
    is refused with Overloaded. One queued caller is cancelled: it is never executed."""
    path = onnx_models.slow(tmp_path / "slow.onnx", width=512, depth=32)
    policy = BatchingPolicy(max_batch_size=4096, max_queue_delay_us=0, max_queue_size=2)

    async def main() -> tuple[int, BaseException | None]:
        async with batcher_for(path, policy, inline_max_us=0) as (batcher, _, executions):
            long = asyncio.ensure_future(
                batcher.infer({"x": np.ones((1024, 512), np.float32)}, ["y"])
            )
            await asyncio.sleep(0.01)  # the long run has started: the instance is busy
            small = {"x": np.ones((1, 512), np.float32)}
            kept = asyncio.ensure_future(batcher.infer(small, ["y"]))
            dropped = asyncio.ensure_future(
                batcher.infer({"x": np.ones((2, 512), np.float32)}, ["y"])
            )
            await asyncio.sleep(0)
            refused: BaseException | None = None
            try:
                await batcher.infer(small, ["y"])
            except Overloaded as exc:
                refused = exc
            dropped.cancel()
            await asyncio.gather(long, kept)
            with pytest.raises(asyncio.CancelledError):
                await dropped
            return len(executions.compute_ns), refused

    executions, refused = asyncio.run(main())
    assert refused is not None and "max_queue_size" in str(refused)
    assert executions == 2  # the long run, then `kept` alone: `dropped` never ran


def test_a_lone_request_does_not_wait_for_the_window(tmp_path: Path) -> None:
    """With a 200 ms window, sequential requests (never overlapping) take ≪ 200 ms."""
    path = onnx_models.mlp(tmp_path / "mlp.onnx")
    policy = BatchingPolicy(max_batch_size=64, max_queue_delay_us=200_000)

    async def main() -> float:
        async with batcher_for(path, policy) as (batcher, _, _executions):
            x = {"input": np.ones((1, 64), np.float32)}
            started = time.perf_counter()
            for _ in range(20):
                await batcher.infer(x, ["output"])
            return (time.perf_counter() - started) / 20

    assert asyncio.run(main()) < 0.02


def test_a_lone_request_runs_in_its_callers_task(tmp_path: Path) -> None:
    """Sequential requests (the concurrency-1 case: nothing else ready on the loop) start
    no batch task: each runs in its caller's own task, and one the model rejects fails
    with the model's error. Requests sent together still get a batch task and share one
    execution."""
    path = onnx_models.lookup(tmp_path / "lookup.onnx")
    policy = BatchingPolicy(max_batch_size=64, max_queue_delay_us=500)

    async def main() -> tuple[int, BaseException | None, int, list[int]]:
        loop = asyncio.get_running_loop()
        created = 0

        def counting(loop: asyncio.AbstractEventLoop, coro, **kwargs) -> asyncio.Task:  # type: ignore[no-untyped-def]
            nonlocal created
            created += 1
            return asyncio.Task(coro, loop=loop, **kwargs)

        async with batcher_for(path, policy) as (batcher, _, executions):
            loop.set_task_factory(counting)
            for i in range(10):
                share = await batcher.infer({"index": np.array([i % 4], np.int64)}, ["y"])
                assert share.record.outputs["y"].tolist() == [10.0 * (i % 4 + 1)]
            lone_tasks = created
            error: BaseException | None = None
            try:
                await batcher.infer({"index": np.array([9], np.int64)}, ["y"])
            except InvalidInput as exc:
                error = exc
            created = 0
            together = [np.array([i], np.int64) for i in range(4)]
            await asyncio.gather(*(batcher.infer({"index": x}, ["y"]) for x in together))
            loop.set_task_factory(None)
            return lone_tasks, error, created, executions.rows

    lone_tasks, error, together_tasks, rows = asyncio.run(main())
    assert lone_tasks == 0
    assert isinstance(error, InvalidInput) and "out of data bounds" in str(error)
    assert together_tasks == 4 + 1  # gather's four, and one batch task
    assert rows == [1] * 10 + [4]


def test_a_lone_request_cancelled_before_it_runs_never_runs(tmp_path: Path) -> None:
    """A request that arrives while other callbacks are ready waits one loop turn for
    company; cancelled then, it never runs, and the batcher goes on serving."""
    path = onnx_models.mlp(tmp_path / "mlp.onnx")

    async def main() -> tuple[int, bool]:
        async with batcher_for(path, POLICY) as (batcher, _, executions):
            x = {"input": np.ones((1, 64), np.float32)}
            gone = asyncio.ensure_future(batcher.infer(x, ["output"]))
            await asyncio.sleep(0)  # it has started (with this task ready) and waits
            gone.cancel()
            with pytest.raises(asyncio.CancelledError):
                await gone
            ran_before = len(executions.compute_ns)
            share = await batcher.infer(x, ["output"])
            return ran_before, share.record.outputs["output"].shape == (1, 10)

    assert asyncio.run(main()) == (0, True)


def test_overlapping_requests_wait_for_each_other(tmp_path: Path) -> None:
    """Once requests have been seen to overlap, a request waits (up to the window) for
    as many companions as recently came: 4 requests sent 5 ms apart share one run."""
    path = onnx_models.mlp(tmp_path / "mlp.onnx")
    policy = BatchingPolicy(max_batch_size=64, max_queue_delay_us=200_000)
    x = {"input": np.ones((1, 64), np.float32)}

    async def main() -> list[int]:
        async with batcher_for(path, policy) as (batcher, _, executions):
            await asyncio.gather(*(batcher.infer(x, ["output"]) for _ in range(4)))
            assert len(executions.compute_ns) == 1  # submitted together: one run

            async def later(delay: float) -> BatchShare:
                await asyncio.sleep(delay)
                return await batcher.infer(x, ["output"])

            answers = await asyncio.gather(*(later(0.005 * i) for i in range(4)))
            assert len(executions.compute_ns) == 2
            return [a.queue_ns for a in answers]

    queued = asyncio.run(main())
    assert queued[0] > 10_000_000 and queued[-1] < queued[0]  # the first waited for the rest


# -- configuration ----------------------------------------------------------------------


def _signature(tmp_path: Path, batch: int | None = None) -> ModelSignature:
    path = onnx_models.add_constant(tmp_path / "m.onnx", 1.0, batch=batch)

    async def load() -> ModelSignature:
        with ThreadPoolExecutor(1) as executor:
            backend = OnnxRuntimeBackend(ModelFiles("m", 1, path), OnnxRuntimeSettings(), executor)
            return await backend.load()

    return asyncio.run(load())


def test_policy_from_config_pbtxt(tmp_path: Path) -> None:
    text = """
        max_batch_size: 32
        dynamic_batching {
          preferred_batch_size: [4, 16]
          max_queue_delay_microseconds: 300
          default_queue_policy { max_queue_size: 10 }
        }
        instance_group [{ count: 2 kind: KIND_CPU }]
    """
    policy = BatchingPolicy.for_model("m", config(text), _signature(tmp_path), BatchingSettings())
    assert policy == BatchingPolicy(32, 300, (4, 16), 10, 2)
    assert policy.target_rows == 16


@pytest.mark.parametrize(
    ("batching", "expected"),
    [
        (
            "preferred_batch_size: [4, 128]",
            r"preferred_batch_size \[128\] exceeds max_batch_size 8",
        ),
        ("max_queue_delay_microseconds: 18446744073709551615", r"expected at most 60,000,000"),
    ],
    ids=["preferred-above-max", "delay-of-years"],
)
def test_batching_values_past_sense_are_refused(
    tmp_path: Path, batching: str, expected: str
) -> None:
    """As Triton refuses a preferred size above the maximum; a queue delay of years left
    every request after a burst waiting for company until its deadline."""
    text = f"max_batch_size: 8 dynamic_batching {{ {batching} }}"
    with pytest.raises(ModelLoadError, match=expected):
        BatchingPolicy.for_model("m", config(text), _signature(tmp_path), BatchingSettings())
    at_most = "max_batch_size: 8 dynamic_batching { max_queue_delay_microseconds: 60000000 }"
    assert BatchingPolicy.for_model("m", config(at_most), _signature(tmp_path), BatchingSettings())


def test_batching_is_off_unless_configured(tmp_path: Path) -> None:
    signature = _signature(tmp_path)
    assert BatchingPolicy.for_model("m", None, signature, BatchingSettings()) is None
    plain = config("max_batch_size: 8")  # Triton: batches allowed, no dynamic batcher
    assert BatchingPolicy.for_model("m", plain, signature, BatchingSettings()) is None
    on = BatchingSettings(enabled=True, max_batch_size=16, max_queue_delay_us=100)
    assert BatchingPolicy.for_model("m", None, signature, on) == BatchingPolicy(16, 100)
    assert BatchingPolicy.for_model("m", plain, signature, on) == BatchingPolicy(8, 100)


def test_a_model_that_cannot_batch_is_refused_or_left_unbatched(tmp_path: Path) -> None:
    fixed = _signature(tmp_path, batch=1)
    with pytest.raises(ModelLoadError, match=r"dynamic \(-1\) leading dimension"):
        BatchingPolicy.for_model(
            "m", config("max_batch_size: 8 dynamic_batching { }"), fixed, BatchingSettings()
        )
    assert BatchingPolicy.for_model("m", None, fixed, BatchingSettings(enabled=True)) is None
    with pytest.raises(ModelLoadError, match="max_batch_size"):
        BatchingPolicy.for_model(
            "m", config("dynamic_batching { }"), _signature(tmp_path), BatchingSettings()
        )
