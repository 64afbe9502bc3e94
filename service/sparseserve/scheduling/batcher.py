"""Dynamic batching: requests for one loaded model that arrive close together run as one
backend execution, which amortises the per-run cost (thread-pool hop, kernel launches,
reading the weights) over many rows.

Semantics follow Triton's dynamic batcher, configured per model in config.pbtxt
(`max_batch_size` > 0 and a `dynamic_batching { }` block):

- The batch dimension is the leading dimension of every input and output. Requests are
  joined with `np.concatenate` and each caller gets back exactly its own rows (views into
  the batch's outputs). Requests whose inputs differ in anything but the leading
  dimension (another shape, another dtype) or that ask for other outputs never share an
  execution.
- A batch holds at most `max_batch_size` rows; a single request larger than that runs
  on its own rather than being refused (ONNX models with a dynamic batch dimension take
  any size; Triton would refuse it).
- At most `max_queue_size` requests wait (0: only the server's in-flight limit bounds
  them); one more is refused with `Overloaded` (RESOURCE_EXHAUSTED).
- At most `instances` batches run at once (Triton's instance_group count); requests that
  arrive meanwhile queue and form the next batch as soon as one finishes.

What differs from Triton is when a batch that could still grow is sent. Triton waits up
to `max_queue_delay_microseconds` for more requests even when none will come, which
costs a lone client the whole window on every request. Here a batch waits for more
requests only when recent batches show that requests overlap (the largest batch of the
last few held more than one request), and only until as many requests as that are
queued, the rows reach the largest preferred batch size or the oldest request has waited
`max_queue_delay`. A lone client (concurrency 1) therefore never waits for the window.
Moreover, a request that finds the batcher idle, with no overlap lately, while the event
loop has nothing else ready to run, runs at once in the caller's own task, exactly as
without batching: whatever arrives later reaches the batcher after it has started, so
nothing could have joined it (at concurrency 1 this is every request). When the loop
does have callbacks ready (requests received together with it may be among them), the
request is queued and sent on the next turn, so that they can join. After a burst, the
first few lone requests may still wait the window, until the history forgets the burst.

A request whose caller is gone (gRPC deadline passed, client cancelled) is dropped from
the queue before it runs. A batch that fails is split in halves and each half retried
(down to single requests), so that a request the model rejects at run time fails alone,
with the model's error, while the others still share executions.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from sparseserve.backends.base import Backend, ExecutionRecord, ModelSignature
from sparseserve.errors import (
    InferenceFailed,
    InvalidInput,
    ModelLoadError,
    Overloaded,
    SparseServeError,
)
from sparseserve.protocol import model_config_pb2
from sparseserve.settings import MAX_QUEUE_DELAY_US, BatchingSettings

log = logging.getLogger(__name__)

# How many recent batches decide whether requests overlap (see the module docstring).
HISTORY = 8

Outputs = dict[str, np.ndarray]


@dataclass(slots=True)  # not frozen: one per request, frozen's __init__ is slower
class BatchShare:
    """One request's share of the execution that ran it. `record.outputs` are the
    request's own rows; `record.backend` and `record.compute_ns` are the execution's.
    Exactly one request of each execution `counts_execution`, so that the caller that
    records its stats counts the execution once (with `execution_rows`)."""

    record: ExecutionRecord
    queue_ns: int  # how long the request waited before its execution started
    execution_rows: int  # rows of the whole execution (the batch size)
    counts_execution: bool


@dataclass(frozen=True, slots=True)
class BatchingPolicy:
    """How one model's requests are batched."""

    max_batch_size: int  # rows per execution
    max_queue_delay_us: int  # the longest a request waits for others to join it
    preferred_batch_sizes: tuple[int, ...] = ()  # a batch this large is sent at once
    max_queue_size: int = 0  # requests waiting; 0: bounded by max_inflight_per_model only
    instances: int = 1  # batches running at once

    @property
    def target_rows(self) -> int:
        """Rows at which a waiting batch is sent without waiting any longer."""
        preferred = [s for s in self.preferred_batch_sizes if s <= self.max_batch_size]
        return max(preferred, default=self.max_batch_size)

    @classmethod
    def for_model(
        cls,
        name: str,
        config: model_config_pb2.ModelConfig | None,
        signature: ModelSignature,
        defaults: BatchingSettings,
    ) -> BatchingPolicy | None:
        """The policy for a model, or None to run its requests one by one.

        A `dynamic_batching` block in config.pbtxt enables batching (and must come with
        `max_batch_size` > 0 and a model that can batch, or loading fails); a model
        without one is batched only if `defaults.enabled` and the model can batch."""
        explicit = config is not None and config.HasField("dynamic_batching")
        if not explicit and not defaults.enabled:
            return None
        why_not = signature.batch_dimension_problem()
        if explicit:
            assert config is not None
            if config.max_batch_size <= 0:
                raise ModelLoadError(
                    f"model {name!r}: config.pbtxt has dynamic_batching but max_batch_size "
                    f"is {config.max_batch_size}; set max_batch_size > 0 or remove the "
                    "dynamic_batching block"
                )
            if why_not:
                raise ModelLoadError(f"model {name!r} cannot be batched: {why_not}")
            batching = config.dynamic_batching
            too_large = [s for s in batching.preferred_batch_size if s > config.max_batch_size]
            if too_large:
                raise ModelLoadError(
                    f"model {name!r}: config.pbtxt dynamic_batching preferred_batch_size "
                    f"{too_large} exceeds max_batch_size {config.max_batch_size}; expected "
                    "sizes up to max_batch_size"
                )
            if batching.max_queue_delay_microseconds > MAX_QUEUE_DELAY_US:
                raise ModelLoadError(
                    f"model {name!r}: config.pbtxt dynamic_batching "
                    f"max_queue_delay_microseconds is {batching.max_queue_delay_microseconds}; "
                    f"expected at most {MAX_QUEUE_DELAY_US:,} (60 s)"
                )
            return cls(
                max_batch_size=config.max_batch_size,
                max_queue_delay_us=batching.max_queue_delay_microseconds,
                preferred_batch_sizes=tuple(s for s in batching.preferred_batch_size if s > 0),
                max_queue_size=batching.default_queue_policy.max_queue_size,
                instances=_instances(config),
            )
        if why_not:
            log.info("model %s is not batched: %s", name, why_not)
            return None
        max_batch_size = config.max_batch_size if config and config.max_batch_size > 0 else 0
        return cls(
            max_batch_size=max_batch_size or defaults.max_batch_size,
            max_queue_delay_us=defaults.max_queue_delay_us,
            max_queue_size=defaults.max_queue_size,
            instances=_instances(config),
        )


def _instances(config: model_config_pb2.ModelConfig | None) -> int:
    if config is None or not config.instance_group:
        return 1
    return max(1, sum(group.count or 1 for group in config.instance_group))


@dataclass(eq=False, slots=True)
class _Request:
    """One caller's request, waiting in the queue or running in a batch."""

    key: Hashable  # requests with equal keys may share an execution
    inputs: Mapping[str, np.ndarray]
    outputs: Sequence[str]
    rows: int
    enqueued_ns: int
    future: asyncio.Future[BatchShare] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class DynamicBatcher:
    """Queues one model's requests and runs them on its backend in batches.

    Everything here runs on the event loop; the backend call of a batch takes the
    backend's normal path (inline when short, thread pool otherwise)."""

    def __init__(self, name: str, backend: Backend, policy: BatchingPolicy):
        self.name = name
        self.backend = backend
        self.policy = policy
        self._queue: deque[_Request] = deque()
        self._queued_rows = 0
        self._running: set[asyncio.Task[None]] = set()
        self._wakeup: asyncio.TimerHandle | asyncio.Handle | None = None
        self._recent: deque[int] = deque([1], maxlen=HISTORY)  # requests per recent batch
        self._delay_ns = policy.max_queue_delay_us * 1000

    async def infer(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> BatchShare:
        """Run validated `inputs` in some batch; return the request's share of it."""
        limit = self.policy.max_queue_size
        if limit and len(self._queue) >= limit:
            raise Overloaded(
                f"the batch queue of model {self.name!r} is full ({limit} requests "
                "waiting, max_queue_size); retry later"
            )
        rows = self._rows(inputs)
        idle = not self._queue and self._wakeup is None and not self._running
        if idle and max(self._recent) <= 1 and not _others_ready():
            # Nothing could join it: run it now, in this task, as if unbatched. It counts
            # as a running batch for requests that arrive meanwhile.
            self._recent.append(1)
            task = asyncio.current_task()
            assert task is not None
            self._running.add(task)
            try:
                record = await self.backend.infer(inputs, outputs)
                return BatchShare(record, 0, rows, counts_execution=True)  # it never queued
            finally:
                self._running.discard(task)
                if self._queue:
                    self._schedule()
        key = (
            tuple((n, a.dtype.str, a.shape[1:]) for n, a in inputs.items()),
            tuple(outputs),
        )
        request = _Request(key, inputs, outputs, rows, time.perf_counter_ns())
        self._queue.append(request)
        self._queued_rows += rows
        self._schedule()
        return await self._answer(request)

    async def _answer(self, request: _Request) -> BatchShare:
        """Wait for the batch task that runs `request` to answer it."""
        try:
            return await request.future
        except asyncio.CancelledError:
            # The caller is gone: if the request still waits, it must not run.
            if request in self._queue:
                self._queue.remove(request)
                self._queued_rows -= request.rows
            raise

    def _rows(self, inputs: Mapping[str, np.ndarray]) -> int:
        """Rows of a request: the leading dimension, which all its inputs must share."""
        sizes = [array.shape[0] for array in inputs.values()]
        if len(set(sizes)) > 1:
            by_name = {name: array.shape[0] for name, array in inputs.items()}
            raise InvalidInput(
                f"the inputs of model {self.name!r} (batched) must agree on their leading "
                f"(batch) dimension; got {by_name}"
            )
        return sizes[0] if sizes else 0

    # -- when to send a batch ---------------------------------------------------------

    def _schedule(self) -> None:
        """Arrange for the next batch to be sent: now, or when it is worth sending."""
        if not self._queue or len(self._running) >= self.policy.instances:
            return  # a running batch calls again when it ends
        loop = asyncio.get_running_loop()
        if self._worth_sending():
            if isinstance(self._wakeup, asyncio.TimerHandle):
                self._wakeup.cancel()
                self._wakeup = None
            if self._wakeup is None:
                # On the next turn of the loop, so that requests already received in
                # this turn join the batch.
                self._wakeup = loop.call_soon(self._dispatch)
        elif self._wakeup is None:
            waited_ns = time.perf_counter_ns() - self._queue[0].enqueued_ns
            self._wakeup = loop.call_later((self._delay_ns - waited_ns) / 1e9, self._dispatch)

    def _worth_sending(self) -> bool:
        """Whether the queued requests should go now rather than wait for company."""
        expected = max(self._recent)  # requests per batch lately: 1 if none overlapped
        return (
            expected <= 1
            or len(self._queue) >= expected
            or self._queued_rows >= self.policy.target_rows
            or time.perf_counter_ns() - self._queue[0].enqueued_ns >= self._delay_ns
        )

    def _dispatch(self) -> None:
        self._wakeup = None
        while self._queue and len(self._running) < self.policy.instances:
            batch = self._take()
            if not batch:
                break
            self._recent.append(len(batch))
            task = asyncio.get_running_loop().create_task(self._execute(batch))
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _take(self) -> list[_Request]:
        """The oldest live request and the requests after it that fit in its batch."""
        while self._queue and self._queue[0].future.done():  # cancelled meanwhile
            self._queued_rows -= self._queue.popleft().rows
        if not self._queue:
            return []
        first = self._queue[0]
        batch: list[_Request] = []
        kept: deque[_Request] = deque()
        rows = 0
        for request in self._queue:
            if request.future.done():
                self._queued_rows -= request.rows
            elif request.key == first.key and (
                not batch or rows + request.rows <= self.policy.max_batch_size
            ):
                batch.append(request)
                rows += request.rows
            else:
                kept.append(request)
        self._queue = kept
        self._queued_rows -= rows
        return batch

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            # Its requests were failed with it; said once here, not by asyncio's
            # "Task exception was never retrieved".
            log.error("model %s: a batch execution failed: %r", self.name, error)
        self._schedule()

    # -- running a batch --------------------------------------------------------------

    async def _execute(self, batch: list[_Request]) -> None:
        """Run `batch` and answer each of its requests; if it fails, retry each half."""
        started = time.perf_counter_ns()
        try:
            record, results = await self._run(batch)
        except SparseServeError as exc:
            if len(batch) == 1:
                _fail(batch[0], exc)
                return
            # Find the culprits by halves: the good requests still share executions.
            log.debug("a batch of %d requests failed (%s); retrying in halves", len(batch), exc)
            await self._execute_halves(batch)
            return
        except BaseException as exc:  # e.g. cancelled at shutdown: its callers fail too
            for request in batch:
                _fail(request, InferenceFailed(f"batch execution failed: {exc!r}"))
            raise
        rows = sum(r.rows for r in batch)
        counted = False  # the first caller still waiting counts the execution
        for request, outputs in zip(batch, results, strict=True):
            if not request.future.done():
                own = record
                if outputs is not record.outputs:  # a batch of several: its own rows
                    own = ExecutionRecord(outputs, record.backend, record.compute_ns)
                share = BatchShare(
                    own,
                    queue_ns=started - request.enqueued_ns,
                    execution_rows=rows,
                    counts_execution=not counted,
                )
                counted = True
                request.future.set_result(share)

    async def _execute_halves(self, batch: list[_Request]) -> None:
        """Run each half of a failed batch. A half that fails with an error that is not
        the server's own has had its requests failed with it; the other half still runs,
        and the error is raised after it. Cancelled: every request left fails too."""
        half = len(batch) // 2
        unexpected: Exception | None = None
        try:
            for part in (batch[:half], batch[half:]):
                if live := [r for r in part if not r.future.done()]:
                    try:
                        await self._execute(live)
                    except Exception as error:
                        unexpected = unexpected or error
        except BaseException as error:
            for request in batch:
                _fail(request, InferenceFailed(f"batch execution failed: {error!r}"))
            raise
        if unexpected is not None:
            raise unexpected

    async def _run(self, batch: list[_Request]) -> tuple[ExecutionRecord, list[Outputs]]:
        """One backend execution for `batch`: its record, and each request's own rows of
        the outputs."""
        first = batch[0]
        if len(batch) == 1:
            inputs = first.inputs
        else:
            inputs = {
                name: np.concatenate([r.inputs[name] for r in batch]) for name in first.inputs
            }
        total = sum(r.rows for r in batch)
        record = await self.backend.infer(inputs, first.outputs)
        outputs = record.outputs
        if len(batch) == 1:
            return record, [outputs]
        for name, array in outputs.items():
            if array.ndim == 0 or array.shape[0] != total:
                raise InferenceFailed(
                    f"output {name!r} has shape {list(array.shape)} for a batch of {total} "
                    "rows: the model's leading dimension is not a batch dimension; disable "
                    "dynamic batching for it"
                )
        bounds = list(itertools.accumulate(r.rows for r in batch))
        return record, [
            {name: array[stop - r.rows : stop] for name, array in outputs.items()}
            for r, stop in zip(batch, bounds, strict=True)
        ]


def _others_ready() -> bool:
    """Whether the running event loop has other callbacks to run (in this turn): requests
    received with this one may be among them. Read from CPython's `BaseEventLoop._ready`
    (measured in the server: always empty at concurrency 1, almost never at 8); a loop
    without it (uvloop) is assumed busy, which only costs the fast path."""
    ready = getattr(asyncio.get_running_loop(), "_ready", None)
    return ready is None or len(ready) > 0


def _fail(request: _Request, error: BaseException) -> None:
    if not request.future.done():
        request.future.set_exception(error)
