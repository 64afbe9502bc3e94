"""The protocol-agnostic core: every protocol adapter calls these methods, so validation,
metrics, statistics and errors live in one place."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from sparseserve.errors import Overloaded, SparseServeError, status_of
from sparseserve.models import LoadedModel, ModelRegistry
from sparseserve.observability.metrics import Metrics


class DataPlane:
    def __init__(self, registry: ModelRegistry, metrics: Metrics, max_inflight_per_model: int):
        self.registry = registry
        self.metrics = metrics
        self._max_inflight = max_inflight_per_model

    def model(self, name: str, version: str = "") -> LoadedModel:
        """The loaded model for a metadata/config/inference call (raises if none)."""
        return self.registry.get(name, version)

    async def infer(
        self,
        name: str,
        version: str,
        decode: Callable[[], Mapping[str, np.ndarray]],
        requested_outputs: Sequence[str] = (),
    ) -> tuple[LoadedModel, dict[str, np.ndarray]]:
        """Route to the model, decode the inputs with `decode` (so that malformed requests
        are counted against the model they were sent to), validate them against the model
        and run it (through the model's batcher if it has one). The outputs come back in
        the order requested (or the model's order when none were requested)."""
        try:
            model = self.registry.get(name, version)
        except SparseServeError as exc:
            self.metrics.unroutable.labels(status_of(exc)).inc()
            raise
        started = time.perf_counter_ns()
        stats = model.stats
        try:
            inputs = decode()
            signature = model.signature
            signature.validate(name, inputs)
            outputs = signature.select_outputs(name, requested_outputs)
            if model.inflight >= self._max_inflight:
                raise Overloaded(
                    f"model {name!r} already has {model.inflight} requests in flight "
                    f"(limit {self._max_inflight}); retry later"
                )
            model.begin()
            try:
                if model.batcher is not None:
                    # The batcher records its executions itself (one per batch).
                    results, queue_ns = await model.batcher.infer(inputs, outputs)
                    compute_ns = None
                else:
                    compute_started = time.perf_counter_ns()
                    results = await model.backend.infer(inputs, outputs)
                    compute_ns = time.perf_counter_ns() - compute_started
                    queue_ns = None
            finally:
                model.end()
            if model.relays:  # count it for the backend that served it
                stats = model.served_stats()
            if compute_ns is not None:
                stats.record_execution(compute_ns)
        except SparseServeError as exc:
            # Counted against the route (model.stats): who failed is not the question.
            stats.record_failure(status_of(exc), time.perf_counter_ns() - started)
            raise
        stats.record_success(time.perf_counter_ns() - started, _batch_rows(inputs), queue_ns)
        return model, results


def _batch_rows(inputs: Mapping[str, np.ndarray]) -> int:
    """Samples in a request: the leading dimension of its first input (1 if scalar)."""
    for array in inputs.values():
        return int(array.shape[0]) if array.ndim else 1
    return 1
