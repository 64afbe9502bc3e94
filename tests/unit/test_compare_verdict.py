"""The speed rule of `sparseserve compare`'s verdicts, on constructed measurements: the
same numbers always give the same words, a difference inside the run's noise is "not
measurable", and the verdict names the latency it used."""

from __future__ import annotations

import math

import pytest

from sparseserve.compare.figures import MEMORY_RESOLUTION_BYTES, Sourced, VariantFigures
from sparseserve.compare.verdict import (
    CLIENT_P50,
    RANDOM_CAVEAT,
    SERVER_MEAN,
    speed_estimate,
    t_quantile_975,
    verdict,
)

MS = 1e-3


def words(baseline_ms: list[float], variant_ms: list[float], latency: str = SERVER_MEAN) -> str:
    estimate = speed_estimate([b * MS for b in baseline_ms], [v * MS for v in variant_ms], latency)
    assert estimate is not None
    return estimate.words("dense")


def test_clearly_faster_in_every_round() -> None:
    assert words([2.0, 2.1, 1.9, 2.0, 2.05], [1.0, 1.02, 0.98, 1.0, 1.01]) == (
        "2.0x faster (server-side mean)"
    )


def test_clearly_slower_says_slower_than_the_baseline() -> None:
    """The issue's CNN int8: 2.3x dense's server-side mean is not "no faster"."""
    assert words([0.10, 0.11, 0.10, 0.09, 0.10], [0.23, 0.25, 0.23, 0.21, 0.23]) == (
        "2.3x slower than dense (server-side mean)"
    )


def test_a_difference_within_the_noise_is_not_measurable() -> None:
    """About 1.3x overall, but the rounds disagree: the interval includes 1."""
    said = words([1.0, 1.0, 1.0, 1.0, 1.0], [0.5, 1.2, 0.6, 1.1, 0.7])
    assert said.startswith("speed undecided (1.29x dense's, 95% CI ")
    assert said.endswith(" over 5 rounds, server-side mean)")


def test_equal_within_ten_percent_is_as_fast() -> None:
    assert words([1.0, 1.01, 0.99, 1.0], [1.02, 1.0, 1.0, 1.01]) == (
        "as fast as dense (within 10%, server-side mean)"
    )


def test_a_small_but_certain_difference_is_as_fast() -> None:
    """5% faster in every round: real, but below the 10% the verdict calls a difference."""
    assert words([1.05, 1.05, 1.05], [1.0, 1.0, 1.0]).startswith("as fast as dense")


def test_one_round_cannot_measure_its_noise() -> None:
    estimate = speed_estimate([2.0], [1.0], SERVER_MEAN)
    assert estimate is not None and estimate.low == 0 and math.isinf(estimate.high)
    assert estimate.words("dense").startswith("speed undecided")


def test_the_rule_is_deterministic_and_ignores_round_order() -> None:
    base, variant = [1.0, 1.3, 0.9, 1.1, 1.2], [0.6, 0.9, 0.5, 0.6, 0.7]
    first = words(base, variant)
    assert words(base, variant) == first
    assert words(base[::-1], variant[::-1]) == first


def test_rounds_missing_a_measurement_are_left_out() -> None:
    estimate = speed_estimate([2e-3, None, 2e-3, 2e-3], [1e-3, 1e-3, None, 1e-3], SERVER_MEAN)
    assert estimate is not None and estimate.rounds == 2
    assert speed_estimate([None], [1e-3], SERVER_MEAN) is None


def test_the_interval_is_student_t_on_log_ratios() -> None:
    estimate = speed_estimate([2.0, 4.0], [1.0, 1.0], SERVER_MEAN)
    assert estimate is not None
    mean, sd = math.log(8) / 2, math.log(2) / math.sqrt(2)
    half = t_quantile_975(1) * sd / math.sqrt(2)
    assert estimate.ratio == pytest.approx(math.sqrt(8))
    assert (estimate.low, estimate.high) == pytest.approx(
        (math.exp(mean - half), math.exp(mean + half))
    )
    assert t_quantile_975(4) == 2.776 and t_quantile_975(100) == 1.96


def figures(**changes: object) -> VariantFigures:
    row = VariantFigures("f.pruned", "1", "pruned", "onnxruntime", is_baseline=False)
    for name, value in changes.items():
        setattr(row, name, value)
    return row


def test_the_verdict_names_the_latency_it_used() -> None:
    row = figures(speed=speed_estimate([2.0, 2.0, 2.1], [1.0, 1.0, 1.0], CLIENT_P50))
    assert verdict(row, "dense", random_data=False) == "2.0x faster (client p50)"


def test_agreement_on_random_rows_says_it_is_not_a_quality_measure() -> None:
    row = figures(agreement=Sourced(0.438, "probe inputs"))
    assert verdict(row, "dense", random_data=True) == f"43.8% agreement {RANDOM_CAVEAT}"
    assert verdict(row, "dense", random_data=False) == "43.8% agreement"


def test_memory_within_its_resolution_is_the_same() -> None:
    near = figures(memory_ratio=0.6, memory_resolved=False)
    assert verdict(near, "dense", random_data=False) == "same memory (within 1 MiB)"
    far = figures(memory_ratio=2.0, memory_resolved=True)
    assert verdict(far, "dense", random_data=False) == "2.0x less memory"  # amounts unknown


def test_a_memory_ratio_comes_with_the_amounts() -> None:
    """16x more memory sounds alarming; 1.6 MiB against 0.1 MiB says what it is, and
    under 1 MiB the difference is the figure, not the ratio."""
    tiny = figures(memory_ratio=0.0625, memory_resolved=True,
                   memory_bytes=Sourced(1.6 * 2**20, "sparseserve_model_memory_bytes"))  # fmt: skip
    assert verdict(tiny, "dense", random_data=False) == "1.5 MiB more memory (1.6 vs 0.1 MiB)"
    large = figures(memory_ratio=0.25, memory_resolved=True,
                    memory_bytes=Sourced(8 * 2**20, "sparseserve_model_memory_bytes"))  # fmt: skip
    assert verdict(large, "dense", random_data=False) == "4.0x more memory (8.0 vs 2.0 MiB)"
    half = figures(memory_ratio=2.0, memory_resolved=True,
                   memory_bytes=Sourced(4 * 2**20, "sparseserve_model_memory_bytes"))  # fmt: skip
    assert verdict(half, "dense", random_data=False) == "2.0x less memory (4.0 vs 8.0 MiB)"
    assert MEMORY_RESOLUTION_BYTES == 2**20


@pytest.mark.parametrize(
    ("url", "given", "read"),
    [
        ("localhost:8001", None, "http://localhost:8002/metrics"),
        ("10.0.0.5:9001", None, "http://10.0.0.5:8002/metrics"),
        ("[::1]:8001", None, "http://[::1]:8002/metrics"),
        ("localhost:8001", "localhost:9100", "http://localhost:9100/metrics"),
        ("localhost:8001", "http://h:1/custom", "http://h:1/custom"),
        ("localhost:8001", "https://h:1", "https://h:1/metrics"),
    ],
)
def test_the_metrics_address_is_completed_or_defaulted(
    url: str, given: str | None, read: str
) -> None:
    """`--metrics-url` may be left out (port 8002 on --url's host) or given as host:port
    (it was required, and host:port failed with "unknown url type")."""
    from sparseserve.compare.run import metrics_address

    assert metrics_address(url, given) == read
