"""Shadow traffic: run a sample of a family's requests on other variants too, after the
answer is sent, and record how the outputs agree.

- **Never before, never instead.** The data plane samples a request once it has its
  answer; the protocol adapter submits the job only once the answer is on the wire (the
  RPC's done callback, or after a stream has written it). A shadow run cannot delay,
  change or fail the primary answer: it sees its own copy of nothing but the inputs and
  the outputs already sent, and its errors are counted, never raised.
- **Bounded.** Jobs wait in one queue of `shadow_queue_size`; a job sampled while it is
  full is dropped (`outcome="dropped"`). `shadow_concurrency` workers (default 1) run
  them, so shadows take at most that many execution slots however busy the server is,
  and a worker yields to the event loop before each run, so requests that are ready to
  run go first.
- **Outside the variant's request series.** A shadow run calls the variant's backend
  directly: it is not a request of that variant (no `sparseserve_requests_total`, no
  batching with real requests), only a shadow run of the comparison.
- **Compared per (family, variant, baseline).** `variant` is the sparse side: the
  variant that answered, or, when the family's baseline answered, the shadow variant.
  Per compared row (the outputs both variants have, flattened per row of the batch
  dimension): cosine similarity and largest absolute difference; for classifiers
  (manifest task `classification`) also whether the arg-max of the first output agrees.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from sparseserve.errors import InvalidInput, ModelNotReady
from sparseserve.observability.stats import ShadowKey, ShadowStats
from sparseserve.registry import LoadedModel, ModelRegistry
from sparseserve.repository.manifest import Task

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ShadowJob:
    """One sampled request: its inputs, the answer that was sent and where to shadow it."""

    primary: LoadedModel
    inputs: Mapping[str, np.ndarray]
    outputs: Mapping[str, np.ndarray]
    targets: tuple[tuple[str, str], ...]  # (variant, model name; "" if not loaded)


@dataclass(frozen=True, slots=True)
class Comparison:
    """How a shadow run's outputs compare with the answer's, row by row."""

    rows: int
    cosine: np.ndarray
    max_abs_diff: np.ndarray
    top1_agreements: int | None  # None: not compared (not a classifier)


class ShadowRunner:
    """The shadow queue, its workers and the comparison stats (see the module docstring)."""

    def __init__(self, registry: ModelRegistry, queue_size: int, concurrency: int):
        self._registry = registry
        self._queue: asyncio.Queue[ShadowJob] = asyncio.Queue(queue_size)
        self._concurrency = concurrency
        self._workers: list[asyncio.Task[None]] = []
        # Replaced (never changed) when a comparison appears, so scrapes read it safely.
        self.stats: dict[ShadowKey, ShadowStats] = {}

    def start(self) -> None:
        self._workers = [
            asyncio.create_task(self._work(), name=f"shadow-{i}") for i in range(self._concurrency)
        ]

    async def stop(self) -> None:
        """Stop the workers; jobs still queued are abandoned (nobody waits for them)."""
        for worker in self._workers:
            worker.cancel()
        for worker in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        self._workers = []

    def submit(self, job: ShadowJob) -> None:
        """Queue `job` (called once the primary answer is sent); drop it if full."""
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            for variant, _ in job.targets:
                self._stats(job.primary, variant, None).outcomes["dropped"] += 1

    async def idle(self) -> None:
        """Wait until every queued job has run (for tests and the benchmark)."""
        await self._queue.join()

    async def _work(self) -> None:
        while True:
            job = await self._queue.get()
            try:
                for variant, name in job.targets:
                    await asyncio.sleep(0)  # requests that are ready to run go first
                    await self._run(job, variant, name)
            finally:
                self._queue.task_done()

    async def _run(self, job: ShadowJob, variant: str, name: str) -> None:
        shadow: LoadedModel | None = None
        try:
            if not name:
                raise ModelNotReady(f"shadow variant {variant!r} is not loaded")
            shadow = self._registry.get(name)
            signature = shadow.signature
            signature.validate(name, job.inputs)
            common = [n for n in job.outputs if n in signature.output_names]
            if not common:
                raise InvalidInput(
                    f"{name!r} has none of the outputs {list(job.outputs)} to compare"
                )
            results = (await shadow.backend.infer(job.inputs, common)).outputs
            comparison = compare(job.outputs, results, _is_classifier(job.primary, shadow))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a failing shadow is counted, never propagated
            log.debug("shadow run of %s on %s failed: %s", job.primary.name, variant, exc)
            self._stats(job.primary, variant, shadow).outcomes["error"] += 1
            return
        stats = self._stats(job.primary, variant, shadow)
        stats.outcomes["compared"] += 1
        stats.compared_rows += comparison.rows
        stats.cosine.observe_many(comparison.cosine)
        stats.max_abs_diff.observe_many(comparison.max_abs_diff)
        if comparison.top1_agreements is not None:
            stats.top1_agreements = (stats.top1_agreements or 0) + comparison.top1_agreements

    def _stats(self, primary: LoadedModel, variant: str, shadow: LoadedModel | None) -> ShadowStats:
        key = comparison_key(primary, variant)
        stats = self.stats.get(key)
        if stats is None:
            stats = ShadowStats()
            if _is_classifier(primary, shadow):
                stats.top1_agreements = 0
            self.stats = {**self.stats, key: stats}
        return stats


def comparison_key(primary: LoadedModel, shadow_variant: str) -> ShadowKey:
    """(family, variant, baseline): the baseline side is the family's baseline when it
    answered, else the shadow variant the answer is compared with."""
    manifest = primary.manifest
    if manifest is None or manifest.is_baseline:
        return (primary.family, shadow_variant, primary.variant)
    return (primary.family, primary.variant, shadow_variant)


def _is_classifier(*models: LoadedModel | None) -> bool:
    return any(
        m is not None and m.manifest is not None and m.manifest.task is Task.classification
        for m in models
    )


def compare(
    answer: Mapping[str, np.ndarray], shadow: Mapping[str, np.ndarray], classifier: bool
) -> Comparison:
    """Compare the outputs `shadow` has with the same-named outputs of `answer`, per row
    of the batch dimension (an output without one is one row)."""
    names: Sequence[str] = list(shadow)
    rows = _rows(answer[names[0]])
    left, right, numeric = [], [], []
    for name in names:
        a, b = np.asarray(answer[name]), np.asarray(shadow[name])
        if a.shape != b.shape:
            raise InvalidInput(
                f"output {name!r} has shape {list(b.shape)} in the shadow run and "
                f"{list(a.shape)} in the answer"
            )
        if a.dtype == object or b.dtype == object:
            continue  # BYTES outputs: nothing numeric to compare
        if _rows(a) != rows:
            raise InvalidInput(f"output {name!r} has {_rows(a)} rows, the first output {rows}")
        numeric.append(name)
        left.append(_per_row(a, rows).astype(np.float64))
        right.append(_per_row(b, rows).astype(np.float64))
    if not left:
        raise InvalidInput("no numeric output to compare")
    if rows == 0:
        empty = np.zeros(0)
        return Comparison(0, empty, empty, 0 if classifier else None)
    # Few numpy calls on the common path: a shadow's comparison runs on the event loop,
    # and for small outputs each call costs more than its arithmetic.
    a = left[0] if len(left) == 1 else np.concatenate(left, axis=1)
    b = right[0] if len(right) == 1 else np.concatenate(right, axis=1)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        dot = np.einsum("ij,ij->i", a, b)
        norms = np.sqrt(np.einsum("ij,ij->i", a, a) * np.einsum("ij,ij->i", b, b))
        cosine = dot / norms
        diff = np.abs(a - b).max(axis=1) if a.shape[1] else np.zeros(rows)
    if not np.isfinite(cosine).all():  # zero or non-finite rows: rare, done row-wise
        both_zero = ~a.any(axis=1) & ~b.any(axis=1)  # two all-zero rows: the same answer
        cosine = np.where(both_zero, 1.0, np.where(np.isfinite(cosine), cosine, 0.0))
        diff = np.where(np.isnan(diff), np.inf, diff)
    # Rounding may step past +-1 (np.clip costs more than these two).
    np.minimum(np.maximum(cosine, -1.0, out=cosine), 1.0, out=cosine)
    top1 = None
    if classifier:
        first = numeric[0]
        scores_a = _per_row(np.asarray(answer[first]), rows)
        scores_b = _per_row(np.asarray(shadow[first]), rows)
        top1 = int(np.count_nonzero(scores_a.argmax(axis=1) == scores_b.argmax(axis=1)))
    return Comparison(rows, cosine, diff, top1)


def _per_row(array: np.ndarray, rows: int) -> np.ndarray:
    """`array` as `rows` flat rows (reshape(rows, -1) cannot infer a width for 0 rows)."""
    return array.reshape(rows, math.prod(array.shape[1:]) if array.ndim else 1)


def _rows(array: np.ndarray) -> int:
    return int(array.shape[0]) if array.ndim else 1
