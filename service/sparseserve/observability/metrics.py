"""Prometheus metrics: prefix `sparseserve_`, base units, one label set everywhere.

Request, inference and execution counts are kept apart (Triton's convention) so that the
average batch size is `inferences / executions`. Histograms, not summaries: they
aggregate across replicas.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
)

LABELS = ("model", "version", "family", "variant", "backend")
# Latency buckets from 100 µs (tiny models on CPU) to 10 s (large models under load).
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class Metrics:
    """The server's metric families, registered on their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        if registry is None:
            # Process CPU/memory/fds on our registry too (the default one is not served).
            ProcessCollector(registry=self.registry)
        r = self.registry
        self.request_duration = Histogram(
            "sparseserve_request_duration_seconds",
            "Time from a decoded request to its result, per model, including queueing.",
            LABELS, buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.compute_duration = Histogram(
            "sparseserve_compute_duration_seconds",
            "Time the backend spent running the model for one execution.",
            LABELS, buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.requests = Counter(
            "sparseserve_requests",
            "Inference requests that reached a model, by gRPC status code.",
            (*LABELS, "code"), registry=r,
        )  # fmt: skip
        self.inferences = Counter(
            "sparseserve_inferences",
            "Samples inferred (rows of the batch dimension; 1 for unbatched models).",
            LABELS, registry=r,
        )  # fmt: skip
        self.executions = Counter(
            "sparseserve_executions", "Backend executions.", LABELS, registry=r
        )
        self.inflight = Gauge(
            "sparseserve_inflight_requests", "Requests being run or waiting.", LABELS, registry=r
        )
        self.model_ready = Gauge(
            "sparseserve_model_ready", "1 while the model version serves requests.", LABELS,
            registry=r,
        )  # fmt: skip
        self.unroutable = Counter(
            "sparseserve_unroutable_requests",
            "Inference requests refused before reaching a model (unknown model, bad name...).",
            ("code",), registry=r,
        )  # fmt: skip

    def bind(self, labels: Mapping[str, str]) -> ModelMetrics:
        """Children bound to one loaded model's labels, so the hot path does no lookups."""
        values = tuple(labels[name] for name in LABELS)
        return ModelMetrics(
            metrics=self,
            values=values,
            request_duration=self.request_duration.labels(*values),
            compute_duration=self.compute_duration.labels(*values),
            inferences=self.inferences.labels(*values),
            executions=self.executions.labels(*values),
            inflight=self.inflight.labels(*values),
            ready=self.model_ready.labels(*values),
        )

    def forget(self, bound: ModelMetrics) -> None:
        """Drop an unloaded model's series (a new version gets its own)."""
        for family in (
            self.request_duration, self.compute_duration, self.inferences, self.executions,
            self.inflight, self.model_ready,
        ):  # fmt: skip
            with contextlib.suppress(KeyError):
                family.remove(*bound.values)
        for code in bound.codes:
            with contextlib.suppress(KeyError):
                self.requests.remove(*bound.values, code)


@dataclass(slots=True)
class ModelMetrics:
    metrics: Metrics
    values: tuple[str, ...]
    request_duration: Histogram
    compute_duration: Histogram
    inferences: Counter
    executions: Counter
    inflight: Gauge
    ready: Gauge
    codes: dict[str, Counter] = field(default_factory=dict)

    def count(self, code: str) -> None:
        child = self.codes.get(code)
        if child is None:
            child = self.codes[code] = self.metrics.requests.labels(*self.values, code)
        child.inc()
