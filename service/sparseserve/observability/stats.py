"""Plain stats: what the request path counts, in plain ints, for a single writer (the
event loop). The bottom layer: the registry, the batcher's callers, the backends and the
shadow runner write these; `observability.metrics` (the top layer, beside the server)
turns them into Prometheus series when scraped, so recording a request costs a few
additions instead of a lock per update. This module imports nothing of sparseserve."""

from __future__ import annotations

import time
from bisect import bisect_left
from dataclasses import dataclass, field

import numpy as np

# Latency buckets from 100 µs (tiny models on CPU) to 10 s (large models under load).
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# The same bounds in integer nanoseconds, so that recording needs no float arithmetic.
_BOUNDS_NS = tuple(round(bound * 1e9) for bound in LATENCY_BUCKETS)
# Rows per execution: powers of two up to 1024 (Triton's largest max_batch_size in use).
BATCH_SIZE_BUCKETS = tuple(float(2**i) for i in range(11))
# Shadow comparison: cosine similarity is interesting near 1; differences span decades.
COSINE_BUCKETS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999, 1.0)
ABS_DIFF_BUCKETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)


@dataclass(slots=True)
class LatencyHistogram:
    """A histogram over LATENCY_BUCKETS in plain ints, for a single writer thread.

    `counts[i]` counts the observations in bucket `i` alone (not cumulative); the last
    one is the +Inf bucket."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    sum_ns: int = 0

    def observe(self, ns: int) -> None:
        """Count one duration of `ns` nanoseconds."""
        # The first bound >= ns: Prometheus buckets are `le`, upper bounds included.
        self.counts[bisect_left(_BOUNDS_NS, ns)] += 1
        self.sum_ns += ns

    @property
    def count(self) -> int:
        return sum(self.counts)

    def add(self, other: LatencyHistogram) -> None:
        """Add `other`'s observations to these (copying its buckets first: its writer
        may be recording meanwhile)."""
        counts = other.counts.copy()
        self.counts = [a + b for a, b in zip(self.counts, counts, strict=True)]
        self.sum_ns += other.sum_ns


class ValueHistogram:
    """A histogram over fixed `bounds` (in base units) in plain ints, for one writer
    thread; the counterpart of `LatencyHistogram` for batch sizes and shadow scores."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def observe_many(self, values: np.ndarray) -> None:
        """Count every value of `values`."""
        if values.size <= 16:  # a few rows: plain bisect beats numpy's call overhead
            for item in values.tolist():
                self.observe(item)
            return
        found = np.bincount(
            np.searchsorted(self.bounds, values, side="left"), minlength=len(self.counts)
        )
        self.counts = [a + int(b) for a, b in zip(self.counts, found, strict=True)]
        self.total += float(values.sum())

    @property
    def count(self) -> int:
        return sum(self.counts)

    def add(self, other: ValueHistogram) -> None:
        counts = other.counts.copy()
        self.counts = [a + b for a, b in zip(self.counts, counts, strict=True)]
        self.total += other.total


def batch_size_histogram() -> ValueHistogram:
    return ValueHistogram(BATCH_SIZE_BUCKETS)


@dataclass(frozen=True, slots=True)
class WeightCounts:
    """A model's parameters counted from its own weights at load: every numeric
    initializer (biases, scales and quantized weights included), the non-zero ones, and
    the fraction of zeros in the layer weights (initializers of rank 2 or more), as
    `sparseserve manifest` would record them."""

    parameters: int
    nonzero_parameters: int
    weight_sparsity: float


@dataclass(slots=True)
class ModelFootprint:
    """What one loaded version costs, measured once at load (see `observability.memory`)."""

    file_bytes: int = 0  # the version's files on disk
    memory_bytes: int = 0  # resident memory growth across load and warm-up
    # Counted only where the manifest does not record them (None: not counted).
    weights: WeightCounts | None = None


SHADOW_OUTCOMES = ("compared", "error", "dropped")
ShadowKey = tuple[str, str, str]  # (family, variant, baseline)


@dataclass(slots=True)
class ShadowStats:
    """One (family, variant, baseline) comparison: shadow runs and how the outputs agree.
    Written on the event loop by the shadow runner, read at scrape time."""

    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SHADOW_OUTCOMES, 0))
    compared_rows: int = 0
    top1_agreements: int | None = None  # None: not a classifier, no top-1 series
    cosine: ValueHistogram = field(default_factory=lambda: ValueHistogram(COSINE_BUCKETS))
    max_abs_diff: ValueHistogram = field(default_factory=lambda: ValueHistogram(ABS_DIFF_BUCKETS))
    created: float = field(default_factory=time.time)


@dataclass(slots=True)
class DispatchStats:
    """The state of a model dispatched to Triton, beside its per-backend request stats:
    written by its `DispatchingBackend` on the event loop, read at scrape time."""

    # Every execution it ran, by the backend that ran it: requests' and shadow runs'
    # (the per-backend request stats count requests' only).
    executions: dict[str, int] = field(default_factory=dict)
    fallbacks: int = 0  # executions onnxruntime ran because Triton failed or was open
    breaker_open: bool = False

    def count(self, backend: str) -> None:
        """One execution `backend` ran."""
        self.executions[backend] = self.executions.get(backend, 0) + 1


@dataclass(slots=True)
class InferenceStats:
    """What one loaded model version has served: the numbers behind ModelStatistics
    (Triton's names; durations in nanoseconds) and behind its Prometheus series.

    Plain ints, written on the event loop only, so recording a request takes no lock;
    the metrics thread reads them when scraped (see `observability.metrics.ModelCollector`)."""

    codes: dict[str, int] = field(default_factory=dict)  # requests, by status code name
    request_duration: LatencyHistogram = field(default_factory=LatencyHistogram)  # successes
    queue_duration: LatencyHistogram = field(default_factory=LatencyHistogram)  # batched ones
    compute_duration: LatencyHistogram = field(default_factory=LatencyHistogram)  # executions
    batch_size: ValueHistogram = field(default_factory=batch_size_histogram)  # executions
    fail_ns: int = 0
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    created: float = field(default_factory=time.time)  # when counting began (Unix time)

    def record_success(self, request_ns: int, rows: int, queue_ns: int | None = None) -> None:
        """One request answered with `rows` samples; `queue_ns`: how long it waited for
        its batch (None: the model is not batched)."""
        self.codes["OK"] = self.codes.get("OK", 0) + 1
        self.request_duration.observe(request_ns)
        if queue_ns is not None:
            self.queue_duration.observe(queue_ns)
        self.inference_count += rows
        self.last_inference_ms = time.time_ns() // 1_000_000

    def record_execution(self, compute_ns: int, rows: int) -> None:
        """One successful backend execution of `rows` samples, of one request or of a
        batch of them."""
        self.compute_duration.observe(compute_ns)
        self.batch_size.observe(rows)
        self.execution_count += 1

    def record_failure(self, code: str, request_ns: int) -> None:
        """One request refused or failed with status `code` after reaching the model."""
        self.codes[code] = self.codes.get(code, 0) + 1
        self.fail_ns += request_ns

    @property
    def success_count(self) -> int:
        return self.request_duration.count

    @property
    def success_ns(self) -> int:
        return self.request_duration.sum_ns

    @property
    def fail_count(self) -> int:
        return sum(count for code, count in self.codes.items() if code != "OK")

    @property
    def compute_count(self) -> int:
        return self.compute_duration.count

    @property
    def compute_ns(self) -> int:
        return self.compute_duration.sum_ns

    @property
    def queue_count(self) -> int:
        return self.queue_duration.count

    @property
    def queue_ns(self) -> int:
        return self.queue_duration.sum_ns

    @classmethod
    def total(cls, parts: list[InferenceStats]) -> InferenceStats:
        """The sum of `parts` (e.g. one model's stats per serving backend)."""
        if len(parts) == 1:
            return parts[0]
        total = cls(created=min(p.created for p in parts))
        for part in parts:
            for code, count in part.codes.copy().items():
                total.codes[code] = total.codes.get(code, 0) + count
            total.request_duration.add(part.request_duration)
            total.queue_duration.add(part.queue_duration)
            total.compute_duration.add(part.compute_duration)
            total.batch_size.add(part.batch_size)
            total.fail_ns += part.fail_ns
            total.inference_count += part.inference_count
            total.execution_count += part.execution_count
            total.last_inference_ms = max(total.last_inference_ms, part.last_inference_ms)
        return total


class ModelStats:
    """Everything one loaded model version has served, in one object: an
    `InferenceStats` part per backend that ran its requests (the `backend` label of its
    Prometheus series). A plain model has one part, its own backend's; a model dispatched
    to Triton gets one for each backend that served it, and its refusals and failures
    count under its route (the backend it was loaded with), whoever would have run them.

    `parts` is replaced, never changed, so the metrics thread reads it without a copy."""

    __slots__ = ("created", "parts", "route")

    def __init__(self, route: str):
        self.route = route
        self.parts: dict[str, InferenceStats] = {route: InferenceStats()}
        self.created = self.parts[route].created  # when counting began (Unix time)

    def part(self, backend: str) -> InferenceStats:
        """The stats of the requests `backend` served (created on its first)."""
        stats = self.parts.get(backend)
        if stats is None:
            stats = InferenceStats()
            self.parts = {**self.parts, backend: stats}
        return stats

    def record_success(
        self, backend: str, request_ns: int, rows: int, queue_ns: int | None = None
    ) -> None:
        """One request that `backend` answered (see `InferenceStats.record_success`)."""
        self.part(backend).record_success(request_ns, rows, queue_ns)

    def record_execution(self, backend: str, compute_ns: int, rows: int) -> None:
        """One execution of `rows` samples that `backend` ran in `compute_ns`."""
        self.part(backend).record_execution(compute_ns, rows)

    def record_failure(self, code: str, request_ns: int) -> None:
        """One request refused or failed with status `code`: counted under the route."""
        self.parts[self.route].record_failure(code, request_ns)

    def total(self) -> InferenceStats:
        """All its requests, whoever served them (Triton's per-model ModelStatistics)."""
        return InferenceStats.total(list(self.parts.values()))
