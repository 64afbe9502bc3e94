"""What a sparseserve server says about its models on its Prometheus endpoint.

The comparison reads its per-variant facts (which variants a family has, which is the
baseline, file size, parameters, sparsity, measured memory, shadow agreement and cosine)
and the server's own request counts and latency histograms from here, so that the report
shows what the server measured, not what a manifest claims.
"""

from __future__ import annotations

import http.client
import math
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

# The per-model gauges the report shows, by the name the report gives them.
MODEL_GAUGES = {
    "file_bytes": "sparseserve_model_file_bytes",
    "parameters": "sparseserve_model_parameters",
    "nonzero_parameters": "sparseserve_model_nonzero_parameters",
    "weight_sparsity": "sparseserve_model_weight_sparsity",
    "memory_bytes": "sparseserve_model_memory_bytes",
    # Layers the engine runs on a sparse kernel (OpenVINO's AMX int8 one; 0 elsewhere):
    # whether the zeros of a pruned variant were turned into speed at all.
    "sparse_kernel_layers": "sparseserve_model_sparse_kernel_layers",
}
REQUEST_DURATION = "sparseserve_request_duration_seconds"


class MetricsUnavailable(RuntimeError):
    """The metrics endpoint cannot be read."""


@dataclass(frozen=True)
class ServedVariant:
    """One ready model version, as `sparseserve_model_ready` labels it."""

    model: str
    version: str
    family: str
    variant: str
    backend: str


@dataclass
class Snapshot:
    """One scrape of the endpoint."""

    samples: list[Sample]

    def _matching(self, name: str, **labels: str) -> Iterable[Sample]:
        return (
            s
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def exports(self, name: str) -> bool:
        """Whether any sample of metric family `name` is exported."""
        prefixes = (name, f"{name}_total", f"{name}_bucket", f"{name}_count")
        return any(s.name in prefixes for s in self.samples)

    def variants(self) -> list[ServedVariant]:
        """Every ready model version, sorted by model name."""
        found = {
            ServedVariant(
                s.labels["model"],
                s.labels["version"],
                s.labels["family"],
                s.labels["variant"],
                s.labels["backend"],
            )
            for s in self._matching("sparseserve_model_ready")
            if s.value == 1
        }
        return sorted(found, key=lambda v: (v.model, v.version))

    def baseline_variant(self, family: str) -> str | None:
        """The family's baseline variant per `sparseserve_model_info{is_baseline="true"}`."""
        for s in self._matching("sparseserve_model_info", family=family, is_baseline="true"):
            return s.labels["variant"]
        return None

    def gauge(self, name: str, model: str, version: str) -> float | None:
        """The value of a per-model gauge, or None when the server does not export it."""
        for s in self._matching(name, model=model, version=version):
            return s.value
        return None

    def requests(self, model: str) -> dict[str, float]:
        """Requests of `model` (all versions and backends) by status code."""
        codes: dict[str, float] = defaultdict(float)
        for s in self._matching("sparseserve_requests_total", model=model):
            codes[s.labels["code"]] += s.value
        return dict(codes)

    def histogram(self, name: str, model: str) -> Histogram:
        """The cumulative buckets of histogram `name` for `model`, summed over versions
        and backends."""
        buckets: dict[float, float] = defaultdict(float)
        total = 0.0
        for s in self._matching(f"{name}_bucket", model=model):
            buckets[float(s.labels["le"])] += s.value
        for s in self._matching(f"{name}_sum", model=model):
            total += s.value
        return Histogram(dict(buckets), total)

    def shadow_runs(self) -> float:
        """Shadow runs of every outcome, all comparisons: unchanged between two scrapes
        once the shadow queue has drained."""
        return sum(s.value for s in self._matching("sparseserve_shadow_runs_total"))

    def shadow(self, family: str, variant: str, baseline: str) -> ShadowTotals:
        """The shadow counters of one comparison (zeros where the server has none)."""
        key = {"family": family, "variant": variant, "baseline": baseline}

        def total(name: str) -> float | None:
            found = list(self._matching(name, **key))
            return sum(s.value for s in found) if found else None

        return ShadowTotals(
            rows=total("sparseserve_shadow_compared_rows_total") or 0.0,
            agreements=total("sparseserve_shadow_top1_agreements_total"),
            cosine_sum=total("sparseserve_shadow_cosine_sum") or 0.0,
            cosine_count=total("sparseserve_shadow_cosine_count") or 0.0,
        )


@dataclass(frozen=True)
class ShadowTotals:
    """Totals of one (family, variant, baseline) comparison's shadow series."""

    rows: float
    agreements: float | None  # None: not a classifier, the server counts no top-1
    cosine_sum: float
    cosine_count: float

    def minus(self, earlier: ShadowTotals) -> ShadowTotals:
        """The comparisons made since `earlier` (a scrape of the same server)."""
        agreements = None
        if self.agreements is not None:
            agreements = self.agreements - (earlier.agreements or 0.0)
        return ShadowTotals(
            self.rows - earlier.rows,
            agreements,
            self.cosine_sum - earlier.cosine_sum,
            self.cosine_count - earlier.cosine_count,
        )


@dataclass
class Histogram:
    """Cumulative bucket counts by upper bound (+Inf included) and the sum."""

    buckets: dict[float, float] = field(default_factory=dict)
    sum: float = 0.0

    @property
    def count(self) -> float:
        return self.buckets.get(math.inf, 0.0)

    def minus(self, earlier: Histogram) -> Histogram:
        """The observations made since `earlier` (a scrape of the same series)."""
        return Histogram(
            {le: n - earlier.buckets.get(le, 0.0) for le, n in self.buckets.items()},
            self.sum - earlier.sum,
        )

    def quantile(self, q: float) -> float | None:
        """The q-quantile, interpolated within its bucket as PromQL's histogram_quantile
        does (so it equals what a dashboard shows for the same observations)."""
        count = self.count
        if count <= 0:
            return None
        bounds = sorted(self.buckets)
        rank = q * count
        lower, below = 0.0, 0.0
        for upper in bounds:
            cumulative = self.buckets[upper]
            if cumulative >= rank:
                if math.isinf(upper):
                    return lower  # PromQL answers the highest finite bound
                if cumulative == below:
                    return upper
                return lower + (upper - lower) * (rank - below) / (cumulative - below)
            lower, below = upper, cumulative
        return lower


def scrape(metrics_url: str, timeout: float = 10.0) -> Snapshot:
    """Read and parse the endpoint; raise `MetricsUnavailable` saying why it could not."""
    hint = "(--metrics-url is the server's metrics port, http://HOST:8002/metrics)"
    try:
        with urllib.request.urlopen(metrics_url, timeout=timeout) as response:
            text = response.read().decode("utf-8")
        samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    except (urllib.error.URLError, OSError) as exc:
        raise MetricsUnavailable(f"cannot read metrics from {metrics_url}: {exc} {hint}") from exc
    # What a gRPC port (HTTP/2 only) or any other non-Prometheus server answers.
    except (http.client.HTTPException, ValueError) as exc:
        raise MetricsUnavailable(
            f"{metrics_url} does not answer with Prometheus metrics ({type(exc).__name__}): "
            f"is it the gRPC port? {hint}"
        ) from exc
    return Snapshot(samples)
