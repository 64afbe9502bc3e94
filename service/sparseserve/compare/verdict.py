"""The verdict of one variant against the baseline, by a stated rule.

Speed: the variants take turns in rounds, so each round gives one ratio of the
baseline's latency to the variant's, measured over the same stretch of the machine's load.
The estimate is the geometric mean of those ratios and its 95% confidence interval is
Student's t on their logarithms. A difference is claimed only when the interval
excludes "as fast" and the estimate is at least 10% away from it; "as fast" only when
the whole interval lies within 10%; anything else is "undecided" in this run, with the
ratio (0.91x dense's: slower) and its interval shown, rather than a word that flips
between runs.

The latency is the server's own: the mean request duration of each round, from its
histogram's `_sum` and `_count` (exact), not the histogram's p50. The buckets are 2 to
2.5x apart (100 us, 250 us, 500 us, ...), so a bucket-interpolated p50 cannot resolve
a 1.3x difference, and below the first bucket it only counts requests under 100 us.
The client's round trip adds the same gRPC and Python cost to every variant and hides
the model's share; its p50 is used only when the server exports no histogram. The
verdict says which latency it used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

SERVER_MEAN = "server-side mean"
CLIENT_P50 = "client p50"
# Below this relative difference two latencies are called the same.
SAME_WITHIN = 1.1
# Two-sided 95% quantiles of Student's t by degrees of freedom (1..30); 1.96 beyond.
_T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


@dataclass(frozen=True)
class SpeedEstimate:
    """Baseline latency over the variant's (2.0: twice as fast), from per-round ratios."""

    ratio: float
    low: float  # 95% confidence interval of the ratio
    high: float
    rounds: int
    latency: str  # which latency: SERVER_MEAN or CLIENT_P50

    def words(self, baseline: str) -> str:
        """ "2.3x faster (server-side mean)", "as fast as dense (...)", or "speed
        undecided (0.91x dense's, 95% CI ...)" by the rule in this module's docstring."""
        if self.low > 1 and self.ratio >= SAME_WITHIN:
            return f"{self.ratio:.1f}x faster ({self.latency})"
        if self.high < 1 and self.ratio <= 1 / SAME_WITHIN:
            return f"{1 / self.ratio:.1f}x slower than {baseline} ({self.latency})"
        if self.low >= 1 / SAME_WITHIN and self.high <= SAME_WITHIN:
            return f"as fast as {baseline} (within 10%, {self.latency})"
        return (
            f"speed undecided ({self.ratio:.2f}x {baseline}'s, 95% CI "
            f"{_interval(self.low, self.high)} over {self.rounds} rounds, {self.latency})"
        )


def _interval(low: float, high: float) -> str:
    shown = "inf" if math.isinf(high) else f"{high:.2f}"
    return f"{low:.2f}-{shown}"


def t_quantile_975(degrees_of_freedom: int) -> float:
    """Student's t two-sided 95% quantile (1.96, the normal's, beyond 30)."""
    if degrees_of_freedom < 1:
        raise ValueError("degrees of freedom must be at least 1")
    return _T_975[degrees_of_freedom - 1] if degrees_of_freedom <= len(_T_975) else 1.96


def speed_estimate(
    baseline_rounds: Sequence[float | None],
    variant_rounds: Sequence[float | None],
    latency: str,
) -> SpeedEstimate | None:
    """The ratio baseline/variant from the latency of each round (paired by round; a round
    missing either is left out). None when no round has both; one round gives an
    interval of 0..inf (one ratio says nothing of the noise)."""
    ratios = [
        b / v
        for b, v in zip(baseline_rounds, variant_rounds, strict=False)
        if b is not None and v is not None and b > 0 and v > 0
    ]
    if not ratios:
        return None
    logs = [math.log(r) for r in ratios]
    mean = sum(logs) / len(logs)
    if len(logs) < 2:
        return SpeedEstimate(math.exp(mean), 0.0, math.inf, 1, latency)
    variance = sum((x - mean) ** 2 for x in logs) / (len(logs) - 1)
    half = t_quantile_975(len(logs) - 1) * math.sqrt(variance / len(logs))
    return SpeedEstimate(
        math.exp(mean), math.exp(mean - half), math.exp(mean + half), len(logs), latency
    )


def ratio_words(ratio: float | None, better: str, worse: str, same: str) -> str | None:
    """ "4.0x smaller" / "1.5x larger" / `same` (within 10%), None when unknown. For
    figures measured exactly (file size) or already rounded to their resolution."""
    if ratio is None:
        return None
    if ratio >= SAME_WITHIN:
        return f"{ratio:.1f}x {better}"
    if ratio <= 1 / SAME_WITHIN:
        return f"{1 / ratio:.1f}x {worse}"
    return same


RANDOM_CAVEAT = "on random inputs: not a quality measure"


class _Value(Protocol):
    @property
    def value(self) -> float | None: ...


class VerdictFigures(Protocol):
    """What a verdict reads of a variant's figures (`figures.VariantFigures`, which holds
    a SpeedEstimate: a protocol here keeps the two modules from importing each other)."""

    @property
    def is_baseline(self) -> bool: ...
    @property
    def speed(self) -> SpeedEstimate | None: ...
    @property
    def size_ratio(self) -> float | None: ...
    @property
    def memory_ratio(self) -> float | None: ...
    @property
    def memory_resolved(self) -> bool: ...
    @property
    def memory_bytes(self) -> _Value: ...
    @property
    def agreement(self) -> _Value: ...


def verdict(figures: VerdictFigures, baseline: str, random_data: bool) -> str:
    """One plain sentence: "2.3x faster (server-side mean), 4.0x smaller, 99.4%
    agreement"; agreement on random rows says that it is not a quality measure."""
    if figures.is_baseline:
        return "baseline"
    parts = [
        None if figures.speed is None else figures.speed.words(baseline),
        ratio_words(figures.size_ratio, "smaller", "larger", "no smaller"),
    ]
    if figures.memory_ratio is not None:
        # Resident memory is measured to about 1 MiB: a smaller difference is no difference.
        parts.append(
            _memory_words(figures.memory_ratio, figures.memory_bytes.value)
            if figures.memory_resolved
            else "same memory (within 1 MiB)"
        )
    if figures.agreement.value is not None:
        caveat = f" {RANDOM_CAVEAT}" if random_data else ""
        parts.append(f"{figures.agreement.value:.1%} agreement{caveat}")
    return ", ".join(p for p in parts if p) or "no measurements"


def _memory_words(ratio: float, variant_bytes: float | None) -> str | None:
    """ "4.0x less memory (2.1 vs 8.4 MiB)": the amounts beside the ratio; where either is
    under 1 MiB, the difference instead ("1.5 MiB more memory (1.6 vs 0.1 MiB)"): a ratio
    of such readings is mostly their noise (14x in one run, 15x in the next)."""
    said = ratio_words(ratio, "less memory", "more memory", "same memory")
    if said is None or said == "same memory" or not variant_bytes:
        return said
    mib = variant_bytes / (1 << 20)
    baseline_mib = mib * ratio
    if min(mib, baseline_mib) < 1:  # a ratio of readings under 1 MiB is mostly noise
        more = mib - baseline_mib
        said = f"{abs(more):.1f} MiB {'more' if more > 0 else 'less'} memory"
    return f"{said} ({mib:.1f} vs {baseline_mib:.1f} MiB)"
