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

from sparseserve.compare.verdict import SpeedEstimate

# Sources of a figure, as the report names them.
FROM_LOAD = "load run"
FROM_METRICS = "server metrics"
FROM_SHADOW = "shadow traffic"
FROM_PROBE = "probe inputs"  # the rows compare sent every variant (see Comparison.data)


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
    server_mean_s: float | None = None  # exact: the histogram's sum over its count
    # each round of the turns: the server's p50 and mean request duration (None: no
    # requests seen) and the client's p50
    server_round_p50_s: list[float | None] = field(default_factory=list)
    server_round_mean_s: list[float | None] = field(default_factory=list)
    client_round_p50_s: list[float] = field(default_factory=list)
    # per-model gauges
    file_bytes: Sourced = field(default_factory=Sourced)
    parameters: Sourced = field(default_factory=Sourced)
    nonzero_parameters: Sourced = field(default_factory=Sourced)
    weight_sparsity: Sourced = field(default_factory=Sourced)
    memory_bytes: Sourced = field(default_factory=Sourced)
    sparse_kernel_layers: Sourced = field(default_factory=Sourced)
    # quality versus the baseline
    agreement: Sourced = field(default_factory=Sourced)
    agreement_rows: int = 0  # rows compared (shadow or probe)
    cosine: Sourced = field(default_factory=Sourced)  # mean cosine similarity per row
    # top-1 accuracy of the answers to the probe rows, when their labels are known
    probe_accuracy: float | None = None
    manifest_quality: dict[str, float] = field(default_factory=dict)
    # versus the baseline
    speedup_p50: float | None = None  # baseline / variant client p50 over the whole run
    speed: SpeedEstimate | None = None  # what the verdict says, from the rounds
    size_ratio: float | None = None  # baseline / variant: 4 = four times smaller
    memory_ratio: float | None = None  # baseline / variant
    memory_resolved: bool = False  # the two differ by more than MEMORY_RESOLUTION_BYTES
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
    data: str = ""  # what the probe and load rows were
    random_data: bool = True  # made up here: agreement on them is not a quality measure
    notes: list[str] = field(default_factory=list)


# Differences of resident memory below this are page-granular noise of the measurement
# (a small model's load grows the process by a few hundred KiB, whatever its weights).
MEMORY_RESOLUTION_BYTES = 1 << 20
