"""The numbers of one comparison, per variant, each with where it came from.

Latency and throughput come from the load run (measured at the client), the server's
request counts and latency histogram from its metrics endpoint (scraped before and
after the run), size, parameters, sparsity and memory from the endpoint's per-model
gauges, and agreement and cosine similarity with the baseline from the server's shadow
series when a shadow policy compared rows during the run, else from the probe inputs
this run sent to every variant. The manifest adds only what the server cannot know:
quality measured on labelled data when the variant was built.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Sources of a figure, as the report names them.
FROM_LOAD = "load run"
FROM_METRICS = "server metrics"
FROM_SHADOW = "shadow traffic"
FROM_PROBE = "probe inputs"


@dataclass
class Sourced:
    """A number and where it came from (None: nobody knows it)."""

    value: float | None = None
    source: str | None = None

    @property
    def known(self) -> bool:
        return self.value is not None


@dataclass
class VariantFigures:
    model: str
    version: str
    variant: str
    backend: str
    is_baseline: bool
    # load run (client side)
    requests_ok: int = 0
    requests_failed: int = 0
    requests_sent: int = 0
    requests_per_second: float = 0.0
    rows_per_second: float = 0.0
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    latency_p99_s: float | None = None
    # server metrics, deltas over the run
    server_requests: float = 0.0
    server_errors: float = 0.0
    server_p50_s: float | None = None
    server_p99_s: float | None = None
    # per-model gauges
    file_bytes: Sourced = field(default_factory=Sourced)
    parameters: Sourced = field(default_factory=Sourced)
    nonzero_parameters: Sourced = field(default_factory=Sourced)
    weight_sparsity: Sourced = field(default_factory=Sourced)
    memory_bytes: Sourced = field(default_factory=Sourced)
    # quality versus the baseline
    agreement: Sourced = field(default_factory=Sourced)
    agreement_rows: int = 0  # rows compared (shadow or probe)
    cosine: Sourced = field(default_factory=Sourced)  # mean cosine similarity per row
    manifest_quality: dict[str, float] = field(default_factory=dict)
    # versus the baseline
    speedup_p50: float | None = None
    size_ratio: float | None = None  # baseline / variant: 4 = four times smaller
    memory_ratio: float | None = None  # baseline / variant
    verdict: str = ""


@dataclass
class Comparison:
    family: str
    baseline: str  # the baseline's variant name
    url: str
    metrics_url: str
    concurrency: int
    duration_seconds: float
    rounds: int
    batch: int
    started: str
    machine: str
    variants: list[VariantFigures]
    notes: list[str] = field(default_factory=list)


def ratio_word(ratio: float | None, better: str, worse: str, same: str) -> str | None:
    """ "2.3x better" / "1.5x worse" / `same` (within 10%), or None when unknown."""
    if ratio is None:
        return None
    if ratio >= 1.1:
        return f"{ratio:.1f}x {better}"
    if ratio <= 1 / 1.1:
        return f"{1 / ratio:.1f}x {worse}"
    return same


def verdict(figures: VariantFigures, baseline: str) -> str:
    """A plain sentence: "2.3x faster, 4.0x smaller, 99.4% agreement"."""
    if figures.is_baseline:
        return "baseline"
    parts = [
        ratio_word(figures.speedup_p50, "faster", f"slower than {baseline}",
                   f"no faster than {baseline}"),
        ratio_word(figures.size_ratio, "smaller", "larger", "no smaller"),
        ratio_word(figures.memory_ratio, "less memory", "more memory", "no less memory"),
    ]  # fmt: skip
    if figures.agreement.known:
        parts.append(f"{figures.agreement.value:.1%} agreement")
    return ", ".join(p for p in parts if p) or "no measurements"
