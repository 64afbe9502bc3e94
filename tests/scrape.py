"""Reading a real server's Prometheus endpoint in tests, with prometheus_client's parser."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from sparseserve.client.server_process import ServerProcess


def scrape(server: ServerProcess) -> list[Sample]:
    """Every sample the server exposes now."""
    with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
        assert response.status == 200
        text = response.read().decode("utf-8")
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def values(samples: list[Sample], name: str, **labels: str) -> list[float]:
    """Values of the samples called `name` whose labels include `labels`."""
    return [
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """The one sample called `name` with `labels` (0 if there is none, as Prometheus
    reads a counter that was never incremented)."""
    found = values(samples, name, **labels)
    assert len(found) <= 1, f"{name}{labels} matches {len(found)} series"
    return found[0] if found else 0.0


def inflight(server: ServerProcess, model: str) -> float:
    """Requests of `model` in flight (all versions), from the server's metrics."""
    return sum(values(scrape(server), "sparseserve_inflight_requests", model=model))
