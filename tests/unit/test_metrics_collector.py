"""The per-model Prometheus series, built at scrape time from the plain ints that the
request path counts in: a real model registry, data plane and onnxruntime model, scraped
as text and parsed back with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from sparseserve.backends.base import Backend, ExecutionRecord, ModelFiles
from sparseserve.backends.dispatch import Dispatcher, DispatchingBackend
from sparseserve.backends.hardware import probe_hardware
from sparseserve.backends.onnxruntime import OnnxRuntimeBackend
from sparseserve.dataplane import DataPlane
from sparseserve.errors import BackendUnavailable, InvalidInput
from sparseserve.observability.metrics import LATENCY_BUCKETS, Metrics
from sparseserve.registry import LoadedModel, ModelRegistry
from sparseserve.repository.store import ModelRepository
from sparseserve.settings import BatchingSettings, Settings
from sparseserve.testing import onnx_models

# No sparseserve.yaml: family is the model name, variant "default".
LABELS = {
    "model": "mlp",
    "version": "1",
    "family": "mlp",
    "variant": "default",
    "backend": "onnxruntime",
}
REQUEST = "sparseserve_request_duration_seconds"
COMPUTE = "sparseserve_compute_duration_seconds"
CODES_WHILE_SCRAPING = 2_000


@dataclass
class Served:
    registry: ModelRegistry
    dataplane: DataPlane
    metrics: Metrics

    @property
    def model(self) -> LoadedModel:
        return self.registry.get("mlp")

    async def infer(self, rows: int, width: int = 64) -> None:
        inputs = {"input": np.ones((rows, width), dtype=np.float32)}
        await self.dataplane.infer("mlp", "", lambda: inputs)

    def scrape(self) -> list[Sample]:
        text = generate_latest(self.metrics.registry).decode()
        return [s for family in text_string_to_metric_families(text) for s in family.samples]


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repository")
    onnx_models.mlp(root / "mlp" / "1" / "model.onnx")
    return root


@contextlib.asynccontextmanager
async def serving(repository: Path) -> AsyncIterator[Served]:
    """`mlp` loaded by a real registry, behind a real data plane and metrics registry."""
    settings = Settings(repository=repository, shutdown_grace_seconds=5)
    with ThreadPoolExecutor(max_workers=1) as executor:
        registry = ModelRegistry(ModelRepository(repository), settings, executor)
        metrics = Metrics(registry)
        try:
            await registry.load("mlp")
            yield Served(registry, DataPlane(registry, metrics, max_inflight_per_model=8), metrics)
        finally:
            await registry.close()


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """The one sample called `name` with `labels` (0 if none, as Prometheus reads it)."""
    found = [
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) <= 1, f"{name}{labels} matches {len(found)} series"
    return found[0] if found else 0.0


def buckets(samples: list[Sample], name: str) -> list[tuple[str, float]]:
    """(le, cumulative count) of histogram `name` for `mlp`, in exposition order."""
    return [
        (s.labels["le"], s.value)
        for s in samples
        if s.name == f"{name}_bucket" and s.labels["model"] == "mlp"
    ]


def assert_consistent_histogram(samples: list[Sample], name: str) -> None:
    """Buckets in order and cumulative, `+Inf` equal to `_count`."""
    found = buckets(samples, name)
    assert [float(le) for le, _ in found] == [*LATENCY_BUCKETS, float("inf")]
    counts = [count for _, count in found]
    assert counts == sorted(counts), f"{name} buckets are not cumulative: {counts}"
    assert counts[-1] == value(samples, f"{name}_count", **LABELS)


def test_requests_are_counted_by_code_rows_and_histograms(repository: Path) -> None:
    good, bad = (1, 2, 5, 8), 3

    async def main() -> tuple[list[Sample], float, LoadedModel]:
        async with serving(repository) as served:
            started = time.perf_counter()
            for rows in good:
                await served.infer(rows)
            wall = time.perf_counter() - started
            for _ in range(bad):
                with pytest.raises(InvalidInput):
                    await served.infer(2, width=63)
            return served.scrape(), wall, served.model

    samples, wall, model = asyncio.run(main())
    assert value(samples, "sparseserve_requests_total", **LABELS, code="OK") == len(good)
    assert value(samples, "sparseserve_requests_total", **LABELS, code="INVALID_ARGUMENT") == bad
    assert value(samples, "sparseserve_inferences_total", **LABELS) == sum(good)
    assert value(samples, "sparseserve_executions_total", **LABELS) == len(good)
    assert value(samples, "sparseserve_inflight_requests", **LABELS) == 0
    assert value(samples, "sparseserve_model_ready", **LABELS) == 1
    for name in (REQUEST, COMPUTE):
        assert_consistent_histogram(samples, name)
        assert value(samples, f"{name}_count", **LABELS) == len(good)  # successes only
    request_sum = value(samples, f"{REQUEST}_sum", **LABELS)
    assert 0 < value(samples, f"{COMPUTE}_sum", **LABELS) <= request_sum <= wall
    # ModelStatistics reads the same numbers.
    stats = model.stats.total()
    assert (stats.success_count, stats.fail_count, stats.compute_count) == (len(good), bad, 4)
    assert stats.success_ns / 1e9 == pytest.approx(request_sum)


def test_bucket_bounds_include_their_upper_bound(repository: Path) -> None:
    """Prometheus' `le`: 100 µs exactly is in the 0.0001 bucket, 1 ns more is not."""

    async def main() -> list[Sample]:
        async with serving(repository) as served:
            stats = served.model.stats.part("onnxruntime")
            for request_ns in (100_000, 100_001, 20_000_000_000):
                stats.record_success(request_ns, rows=1)
            return served.scrape()

    samples = asyncio.run(main())
    cumulative = dict(buckets(samples, REQUEST))
    assert (cumulative["0.0001"], cumulative["0.00025"], cumulative["10.0"]) == (1, 2, 2)
    assert cumulative["+Inf"] == value(samples, f"{REQUEST}_count", **LABELS) == 3
    assert value(samples, f"{REQUEST}_sum", **LABELS) == pytest.approx(20.000200001)


def test_a_scrape_that_races_requests_is_self_consistent(repository: Path) -> None:
    """Scrapes run on the metrics thread while the event loop records, without a lock
    (here a second thread records): every scrape must still parse, with cumulative
    buckets and `+Inf == _count`, while new status codes appear."""

    async def main() -> None:
        async with serving(repository) as served:
            stats = served.model.stats.part("onnxruntime")

            def record() -> None:
                for i in range(CODES_WHILE_SCRAPING):
                    stats.record_success(i * 997 % 50_000_000, rows=1)
                    stats.record_execution(i * 991 % 1_000_000, rows=1 + i % 7)
                    stats.record_failure(f"CODE_{i}", i)  # a new series each time

            writer = threading.Thread(target=record)
            interval = sys.getswitchinterval()
            sys.setswitchinterval(1e-6)  # hand the GIL over as often as possible
            scrapes = 0
            try:
                writer.start()
                while writer.is_alive() or scrapes < 3:
                    samples = served.scrape()
                    scrapes += 1
                    assert_consistent_histogram(samples, REQUEST)
                    assert_consistent_histogram(samples, COMPUTE)
            finally:
                writer.join()
                sys.setswitchinterval(interval)

    asyncio.run(main())


def test_a_draining_version_is_not_ready_until_unloaded(repository: Path) -> None:
    """Unloading takes a version out of service at once (ready 0) while its last request
    finishes; once it is unloaded, its series are gone."""

    def series(samples: list[Sample], name: str) -> list[float]:
        return [s.value for s in samples if s.name == name and s.labels["model"] == "mlp"]

    async def main() -> tuple[list[Sample], list[Sample]]:
        async with serving(repository) as served:
            await served.infer(1)
            model = served.model
            model.begin()  # a request still running
            await served.registry.unload("mlp")
            draining = served.scrape()
            model.end()
        return draining, served.scrape()

    draining, unloaded = asyncio.run(main())
    assert series(draining, "sparseserve_model_ready") == [0]
    assert series(draining, "sparseserve_inflight_requests") == [1]
    assert series(draining, "sparseserve_requests_total") == [1]
    assert not [s for s in unloaded if "model" in s.labels]


class FlakyTriton(OnnxRuntimeBackend):
    """A stand-in for Triton: onnxruntime under the name "triton", down on demand."""

    name = "triton"
    down = False

    async def infer(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> ExecutionRecord:
        if self.down:
            raise BackendUnavailable("triton is down")
        return await super().infer(inputs, outputs)


class FlakyDispatcher(Dispatcher):
    """Dispatches every model to a FlakyTriton, with a real onnxruntime fallback."""

    primary: FlakyTriton

    async def backend(self, files: ModelFiles) -> Backend:
        ort = self.settings.onnxruntime
        self.primary = FlakyTriton(files, ort, self._executor)
        fallback = OnnxRuntimeBackend(files, ort, self._executor)
        return DispatchingBackend(self.primary, fallback, 10_000, 60.0)


@pytest.mark.parametrize("batched", [False, True], ids=["direct", "batched"])
def test_a_dispatched_model_counts_each_request_for_the_backend_that_served_it(
    repository: Path, batched: bool
) -> None:
    """Requests Triton answered count under backend="triton", fallbacks under
    backend="onnxruntime", failures under the route; ModelStatistics sums them all."""
    triton_rows, fallback_rows, bad = (1, 2, 3), (4, 5), 2

    async def main() -> tuple[list[Sample], LoadedModel]:
        settings = Settings(
            repository=repository,
            shutdown_grace_seconds=5,
            batching=BatchingSettings(enabled=batched),
        )
        with ThreadPoolExecutor(max_workers=1) as executor:
            dispatcher = FlakyDispatcher(settings, probe_hardware(0), executor)
            registry = ModelRegistry(ModelRepository(repository), settings, executor, dispatcher)
            metrics = Metrics(registry)
            try:
                await registry.load("mlp")
                served = Served(registry, DataPlane(registry, metrics, 8), metrics)
                assert (served.model.batcher is not None) is batched
                for rows in triton_rows:
                    await served.infer(rows)
                dispatcher.primary.down = True
                for rows in fallback_rows:
                    await served.infer(rows)
                for _ in range(bad):
                    with pytest.raises(InvalidInput):
                        await served.infer(2, width=63)
                return served.scrape(), served.model
            finally:
                await registry.close()

    samples, model = asyncio.run(main())
    triton = {**LABELS, "backend": "triton"}
    fallback = {**LABELS, "backend": "onnxruntime"}
    assert value(samples, "sparseserve_fallbacks_total", **triton) == len(fallback_rows)
    for labels, rows in ((triton, triton_rows), (fallback, fallback_rows)):
        assert value(samples, "sparseserve_requests_total", **labels, code="OK") == len(rows)
        assert value(samples, "sparseserve_inferences_total", **labels) == sum(rows)
        assert value(samples, "sparseserve_executions_total", **labels) == len(rows)
        assert value(samples, "sparseserve_backend_executions_total", **labels) == len(rows)
        for name in (REQUEST, COMPUTE):
            assert value(samples, f"{name}_count", **labels) == len(rows)
        queued = len(rows) if batched else 0
        assert value(samples, "sparseserve_queue_duration_seconds_count", **labels) == queued
    assert value(samples, "sparseserve_requests_total", **triton, code="INVALID_ARGUMENT") == bad
    assert value(samples, "sparseserve_requests_total", **fallback, code="INVALID_ARGUMENT") == 0
    # The model-wide series stay single, under the route.
    assert value(samples, "sparseserve_model_ready", **triton) == 1
    assert value(samples, "sparseserve_model_ready", **fallback) == 0
    # ModelStatistics (Triton's per-model view) counts every request once.
    total = model.stats.total()
    requests = len(triton_rows) + len(fallback_rows)
    assert (total.success_count, total.fail_count, total.compute_count) == (requests, bad, requests)
    assert total.inference_count == sum(triton_rows) + sum(fallback_rows)
    assert total.execution_count == requests
