"""Prometheus metrics: prefix `sparseserve_`, base units, one label set everywhere.

Request, inference and execution counts are kept apart (Triton's convention) so that the
average batch size is `inferences / executions`. Histograms, not summaries: they
aggregate across replicas.

The request path does not touch prometheus_client: each loaded model version counts in
plain ints (`observability.stats`: the bottom layer), which costs a few additions per
request instead of a lock per update, and `ModelCollector` turns those numbers into the
per-model series when the endpoint is scraped. This is the top layer: it reads the
registry, and nothing below the server imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from itertools import accumulate
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from sparseserve.observability.stats import (
    LATENCY_BUCKETS,
    LatencyHistogram,
    ShadowKey,
    ShadowStats,
    ValueHistogram,
)

if TYPE_CHECKING:
    from sparseserve.backends.hardware import HardwareReport
    from sparseserve.registry import LoadedModel, ModelRegistry

LABELS = ("model", "version", "family", "variant", "backend")
# The `le` label of each bucket, written as prometheus_client writes it, then +Inf.
# (floatToGoString is unannotated in prometheus_client.)
_LE = (*(floatToGoString(bound) for bound in LATENCY_BUCKETS), "+Inf")  # type: ignore[no-untyped-call]


class Metrics:
    """The server's metrics registry: the per-model series of `models`, the shadow
    comparisons of `shadow`, requests refused before reaching a model, and the process'
    CPU, memory and file descriptors."""

    def __init__(
        self,
        models: ModelRegistry,
        registry: CollectorRegistry | None = None,
        hardware: HardwareReport | None = None,
        shadow: Callable[[], Mapping[ShadowKey, ShadowStats]] | None = None,
    ):
        self.registry = registry or CollectorRegistry()
        if registry is None:
            # Process CPU/memory/fds on our registry too (the default one is not served).
            ProcessCollector(registry=self.registry)
        self.registry.register(ModelCollector(models))
        self.registry.register(ShadowCollector(shadow or dict))
        # A plain Counter: only errors reach it, so its lock costs nothing that matters.
        self.unroutable = Counter(
            "sparseserve_unroutable_requests",
            "Inference requests refused before reaching a model (unknown model, bad name...).",
            ("code",), registry=self.registry,
        )  # fmt: skip
        if hardware is not None:
            self._add_hardware(hardware)

    def _add_hardware(self, hardware: HardwareReport) -> None:
        """What the dispatcher saw at start: GPUs, cores, providers, CPU features."""
        gpus = Gauge("sparseserve_gpus", "NVIDIA GPUs found at start.", registry=self.registry)
        gpus.set(hardware.gpu_count)
        cores = Gauge("sparseserve_cpu_cores", "CPU cores of the machine.", registry=self.registry)
        cores.set(hardware.cpu_cores)
        info = Gauge(
            "sparseserve_hardware_info",
            "Always 1; the labels describe the hardware found at start.",
            ("gpu_source", "execution_providers", "cpu_features"), registry=self.registry,
        )  # fmt: skip
        info.labels(
            hardware.gpu_source,
            ",".join(hardware.execution_providers),
            ",".join(hardware.cpu_features),
        ).set(1)


class ModelCollector(Collector):
    """The per-model series, built at scrape time from the stats of every version the
    registry serves (`sparseserve_model_ready` 1) or is draining before it unloads it
    (`sparseserve_model_ready` 0). An unloaded version's series disappear with it.

    The counters live on the loaded version, so a version that is reloaded starts new
    series at 0, as a restarted Prometheus target does (`rate()` handles the reset, and
    `_created` tells when it happened).

    Scrapes run on the metrics HTTP thread while the event loop writes the stats, without
    a lock. The GIL makes that safe enough: a stat is an int that its one writer replaces
    whole, so a scrape reads the old value or the new one, never a torn number. A scrape
    that races a request may see it half-recorded (counted in one series and not yet in
    another); the next scrape has all of it. What the loop may grow or change while we
    read (the per-code dict, the bucket lists) is copied first, in one step that the
    other thread cannot interrupt, and each histogram's count is derived from its copied
    buckets, so `+Inf` always equals `_count`.
    """

    def __init__(self, models: ModelRegistry):
        self._models = models

    def describe(self) -> Iterator[Metric]:
        """The families without samples: lets the registry refuse a name clash."""
        return iter(_ModelFamilies({}).all())

    def collect(self) -> Iterator[Metric]:
        serving = list(self._models.loaded())
        draining = self._models.draining()
        # Model name -> variant, so that model_info names the baseline by its variant.
        variants = {model.name: model.variant for model in serving}
        families = _ModelFamilies(variants)
        for model in serving:
            families.add(model, ready=True)
        # An old copy of a version reloaded under the same number drains unseen: its
        # series are the serving copy's (whose counters start again from zero).
        labelled = {(model.name, model.version) for model in serving}
        for model in draining:
            if (model.name, model.version) not in labelled:
                families.add(model, ready=False)
        families.add_backends(serving)
        for name, version in self._models.load_failures():
            families.load_failed.add_metric([name, version], 1)
        return iter(families.all())


class _ModelFamilies:
    """One scrape's per-model metric families: names, help texts and types."""

    def __init__(self, variants: Mapping[str, str]) -> None:
        self._variants = variants
        self.request_duration = HistogramMetricFamily(
            "sparseserve_request_duration_seconds",
            "Time from a decoded request to its result, per model, including queueing.",
            labels=LABELS,
        )
        self.queue_duration = HistogramMetricFamily(
            "sparseserve_queue_duration_seconds",
            "Time a request of a batched model waited in its batch queue before running.",
            labels=LABELS,
        )
        self.compute_duration = HistogramMetricFamily(
            "sparseserve_compute_duration_seconds",
            "Time the backend spent running the model for one execution (one request, or "
            "one batch of them for a batched model).",
            labels=LABELS,
        )
        self.batch_size = HistogramMetricFamily(
            "sparseserve_batch_size",
            "Rows (samples of the batch dimension) per backend execution.",
            labels=LABELS,
        )
        self.requests = CounterMetricFamily(
            "sparseserve_requests",
            "Inference requests that reached a model, by gRPC status code.",
            labels=(*LABELS, "code"),
        )
        self.inferences = CounterMetricFamily(
            "sparseserve_inferences",
            "Samples inferred (rows of the batch dimension; 1 for unbatched models).",
            labels=LABELS,
        )
        self.executions = CounterMetricFamily(
            "sparseserve_executions", "Backend executions.", labels=LABELS
        )
        self.inflight = GaugeMetricFamily(
            "sparseserve_inflight_requests", "Requests being run or waiting.", labels=LABELS
        )
        self.ready = GaugeMetricFamily(
            "sparseserve_model_ready", "1 while the model version serves requests.", labels=LABELS
        )
        self.load_failed = GaugeMetricFamily(
            "sparseserve_model_load_failed",
            "1 while a model version's files fail to load (version empty: the model's own "
            "files, its config.pbtxt, manifest or folders); RepositoryIndex says why. A "
            "version serving the files loaded before goes on serving meanwhile.",
            labels=("model", "version"),
        )
        self.info = GaugeMetricFamily(
            "sparseserve_model_info",
            "Always 1; from the variant's manifest: its family's baseline variant (empty "
            "for the baseline itself), whether it is the baseline, how it was made and its "
            "quantization; and the precision the engine (label backend) computes it in.",
            labels=(*LABELS, "baseline", "is_baseline", "method", "quantization", "precision"),
        )
        self.sparse_kernel_layers = GaugeMetricFamily(
            "sparseserve_model_sparse_kernel_layers",
            "Layers the engine runs on a kernel that skips zero weights, read from the "
            "compiled model at load (OpenVINO's sparse int8 kernel, which needs AMX; 0 for "
            "onnxruntime, which has none).",
            labels=LABELS,
        )
        self.candidate_latency = GaugeMetricFamily(
            "sparseserve_engine_candidate_latency_seconds",
            "With cpu_engine auto: the median run of the version at one row on each candidate "
            "CPU engine (label engine), measured at load; the chosen one serves (label backend).",
            labels=(*LABELS, "engine"),
        )
        self.file_bytes = GaugeMetricFamily(
            "sparseserve_model_file_bytes",
            "Size of the version's files on disk (its version directory), measured at load.",
            labels=LABELS,
        )
        self.parameters = GaugeMetricFamily(
            "sparseserve_model_parameters",
            "Weight parameters: from the variant's manifest (counted when the variant was "
            "built), else counted from the model file's weights at load.",
            labels=LABELS,
        )
        self.nonzero_parameters = GaugeMetricFamily(
            "sparseserve_model_nonzero_parameters",
            "Weight parameters that are not zero: from the variant's manifest, else counted "
            "from the model file's weights at load.",
            labels=LABELS,
        )
        self.weight_sparsity = GaugeMetricFamily(
            "sparseserve_model_weight_sparsity",
            "Fraction of the layer weights (tensors of rank 2 or more) that are zero: from "
            "the variant's manifest, else counted from the model file's weights at load.",
            labels=LABELS,
        )
        self.memory_bytes = GaugeMetricFamily(
            "sparseserve_model_memory_bytes",
            "Growth of the process' resident memory (RSS) across this version's load and "
            "warm-up (onnxruntime session, weights, first-run arenas), measured once; loads "
            "are serialised so that they do not blur each other, and onnxruntime's one-time "
            "set-up is spent on an unmeasured first load; requests served meanwhile by other "
            "models may add to it; memory the allocator keeps after freeing is not given back.",
            labels=LABELS,
        )
        # Only for models dispatched to Triton, labelled with the route (backend="triton")
        # except backend_executions, which says who ran each execution (as the request
        # series do, which also count per serving backend).
        self.backend_executions = CounterMetricFamily(
            "sparseserve_backend_executions",
            "Executions of a dispatched model by the backend that actually ran them.",
            labels=LABELS,
        )
        self.fallbacks = CounterMetricFamily(
            "sparseserve_fallbacks",
            "Executions that onnxruntime ran because Triton failed or its circuit was open.",
            labels=LABELS,
        )
        self.circuit_open = GaugeMetricFamily(
            "sparseserve_circuit_open",
            "1 while a dispatched model's circuit breaker sends everything to onnxruntime.",
            labels=LABELS,
        )
        self.backend_up = GaugeMetricFamily(
            "sparseserve_backend_up",
            "1 while a backend can serve: onnxruntime runs in this process and is always "
            "1; triton (only while a model is dispatched to it) is 1 while at least one "
            "dispatched model's circuit breaker is closed.",
            labels=("backend",),
        )

    def all(self) -> list[Metric]:
        return [
            self.request_duration, self.queue_duration, self.compute_duration,
            self.batch_size, self.requests, self.inferences, self.executions, self.inflight,
            self.ready, self.load_failed, self.info, self.file_bytes, self.parameters,
            self.nonzero_parameters, self.weight_sparsity, self.memory_bytes,
            self.sparse_kernel_layers, self.candidate_latency,
            self.backend_executions, self.fallbacks, self.circuit_open, self.backend_up,
        ]  # fmt: skip

    def add(self, model: LoadedModel, ready: bool) -> None:
        """Add the samples of one model version."""
        # In LABELS order; `backend` is the route (the backend the model was loaded with).
        labels = (model.name, model.version_label, model.family, model.variant, model.backend.name)
        # The request series: one set per backend that served requests (a dispatched
        # model's fallbacks count under backend="onnxruntime"; its failures under the
        # route). `parts` is replaced, never changed, so reading it needs no copy.
        parts = model.stats.parts
        for backend, stats in parts.items():
            served = (*labels[:-1], backend)
            created = stats.created
            _add_latency(self.request_duration, served, stats.request_duration, created)
            _add_latency(self.queue_duration, served, stats.queue_duration, created)
            _add_latency(self.compute_duration, served, stats.compute_duration, created)
            _add_histogram(self.batch_size, LABELS, served, stats.batch_size, created)
            for code, count in stats.codes.copy().items():
                self.requests.add_metric((*served, code), count, created=created)
            self.inferences.add_metric(served, stats.inference_count, created=created)
            self.executions.add_metric(served, stats.execution_count, created=created)
        created = model.stats.created
        self.inflight.add_metric(labels, model.inflight)
        self.ready.add_metric(labels, 1 if ready else 0)
        self._add_footprint(model, labels)
        dispatch = model.backend.dispatch_stats()
        if dispatch is not None:
            for backend, count in dispatch.executions.copy().items():
                actual = (*labels[:-1], backend)
                self.backend_executions.add_metric(actual, count, created=created)
            self.fallbacks.add_metric(labels, dispatch.fallbacks, created=created)
            self.circuit_open.add_metric(labels, 1 if dispatch.breaker_open else 0)

    def _add_footprint(self, model: LoadedModel, labels: tuple[str, ...]) -> None:
        """What the version is and costs: manifest facts and what was measured at load."""
        manifest = model.manifest
        baseline = manifest.baseline if manifest else None
        self.info.add_metric(
            (
                *labels,
                self._variants.get(baseline, baseline) if baseline else "",
                "true" if baseline is None else "false",
                manifest.method if manifest else "",
                (manifest.quantization or "") if manifest else "",
                model.backend.precision.value,
            ),
            1,
        )
        self.sparse_kernel_layers.add_metric(labels, model.backend.sparse_kernel_layers)
        for engine, seconds in model.backend.candidate_seconds.items():
            self.candidate_latency.add_metric((*labels, engine), seconds)
        self.file_bytes.add_metric(labels, model.footprint.file_bytes)
        self.memory_bytes.add_metric(labels, model.footprint.memory_bytes)
        # The manifest's numbers where it records them; else those counted at load.
        counted = model.footprint.weights
        for family, recorded, measured in (
            (
                self.parameters,
                manifest.parameters if manifest else None,
                counted.parameters if counted else None,
            ),
            (
                self.nonzero_parameters,
                manifest.nonzero_parameters if manifest else None,
                counted.nonzero_parameters if counted else None,
            ),
            (
                self.weight_sparsity,
                manifest.sparsity if manifest else None,
                counted.weight_sparsity if counted else None,
            ),
        ):
            number = recorded if recorded is not None else measured
            if number is not None:
                family.add_metric(labels, number)

    def add_backends(self, serving: Sequence[LoadedModel]) -> None:
        self.backend_up.add_metric(("onnxruntime",), 1)
        if any(model.backend.name == "openvino" for model in serving):
            self.backend_up.add_metric(("openvino",), 1)  # in this process, like onnxruntime
        breakers = [
            stats.breaker_open
            for model in serving
            if (stats := model.backend.dispatch_stats()) is not None
        ]
        if breakers:
            self.backend_up.add_metric(("triton",), 0 if all(breakers) else 1)


SHADOW_LABELS = ("family", "variant", "baseline")


class ShadowCollector(Collector):
    """The shadow comparison series, per (family, variant, baseline), read at scrape
    time from the shadow runner's plain-int `ShadowStats` (as `ModelCollector` does)."""

    def __init__(self, stats: Callable[[], Mapping[ShadowKey, ShadowStats]]):
        self._stats = stats

    def describe(self) -> Iterator[Metric]:
        return iter(_ShadowFamilies().all())

    def collect(self) -> Iterator[Metric]:
        families = _ShadowFamilies()
        for key, stats in dict(self._stats()).items():
            families.add(key, stats)
        return iter(families.all())


class _ShadowFamilies:
    def __init__(self) -> None:
        self.runs = CounterMetricFamily(
            "sparseserve_shadow_runs",
            "Shadow runs of a variant beside the one that answered, by outcome: compared, "
            "error (the shadow run or the comparison failed) or dropped (the shadow queue "
            "was full).",
            labels=(*SHADOW_LABELS, "outcome"),
        )
        self.rows = CounterMetricFamily(
            "sparseserve_shadow_compared_rows",
            "Rows (samples) whose outputs were compared between variant and baseline.",
            labels=SHADOW_LABELS,
        )
        self.top1 = CounterMetricFamily(
            "sparseserve_shadow_top1_agreements",
            "Compared rows whose arg-max class is the same for variant and baseline "
            "(classifiers: manifest task classification).",
            labels=SHADOW_LABELS,
        )
        self.cosine = HistogramMetricFamily(
            "sparseserve_shadow_cosine",
            "Cosine similarity of each compared row's outputs, variant vs baseline.",
            labels=SHADOW_LABELS,
        )
        self.max_abs_diff = HistogramMetricFamily(
            "sparseserve_shadow_max_abs_diff",
            "Largest absolute difference between each compared row's outputs, variant vs baseline.",
            labels=SHADOW_LABELS,
        )

    def all(self) -> list[Metric]:
        return [self.runs, self.rows, self.top1, self.cosine, self.max_abs_diff]

    def add(self, key: ShadowKey, stats: ShadowStats) -> None:
        created = stats.created
        for outcome, count in stats.outcomes.copy().items():
            self.runs.add_metric((*key, outcome), count, created=created)
        self.rows.add_metric(key, stats.compared_rows, created=created)
        if stats.top1_agreements is not None:
            self.top1.add_metric(key, stats.top1_agreements, created=created)
        _add_histogram(self.cosine, SHADOW_LABELS, key, stats.cosine, created)
        _add_histogram(self.max_abs_diff, SHADOW_LABELS, key, stats.max_abs_diff, created)


def _add_latency(
    family: HistogramMetricFamily,
    labels: Sequence[str],
    histogram: LatencyHistogram,
    created: float,
) -> None:
    counts = histogram.counts.copy()  # before summing: the event loop may add meanwhile
    family.add_metric(
        labels, list(zip(_LE, accumulate(counts), strict=True)), histogram.sum_ns / 1e9
    )
    _add_created(family, LABELS, labels, created)


def _add_histogram(
    family: HistogramMetricFamily,
    names: Sequence[str],
    labels: Sequence[str],
    histogram: ValueHistogram,
    created: float,
) -> None:
    counts = histogram.counts.copy()  # before summing: the event loop may add meanwhile
    bounds = (*(floatToGoString(b) for b in histogram.bounds), "+Inf")  # type: ignore[no-untyped-call]
    family.add_metric(labels, list(zip(bounds, accumulate(counts), strict=True)), histogram.total)
    _add_created(family, names, labels, created)


def _add_created(
    family: HistogramMetricFamily, names: Sequence[str], labels: Sequence[str], created: float
) -> None:
    # HistogramMetricFamily has no `created`; add the sample prometheus' Histogram writes.
    family.samples.append(
        Sample(f"{family.name}_created", dict(zip(names, labels, strict=True)), created)
    )
