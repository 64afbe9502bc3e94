"""The report's plots read well at 100%: slide-sized, large fonts, no label colliding
with another, values with units and never in scientific notation, the legend clear of
the bars, sparsity shown, memory differences below the gauge's resolution drawn equal."""

from __future__ import annotations

import itertools
import re

import pytest

pytest.importorskip("matplotlib", reason="needs the [compare] extra")

from matplotlib.text import Text

from sparseserve.compare import plots
from sparseserve.compare.figures import (
    FROM_METRICS,
    MEMORY_RESOLUTION_BYTES,
    Comparison,
    Sourced,
    VariantFigures,
)
from sparseserve.compare.verdict import SERVER_MEAN, speed_estimate

# Names as long as real ones, and values spanning the magnitudes that once came out as
# "1.2e+07" and "3.4e-05".
NAMES = ("dense", "pruned90", "l1-pruned90", "structured50", "structured50-int8", "nm24",
         "int8", "a-variant-with-a-rather-long-name")  # fmt: skip
SCIENTIFIC = re.compile(r"\d[eE][+-]?\d")


def comparison(random_data: bool = False) -> Comparison:
    rows = []
    for i, name in enumerate(NAMES):
        row = VariantFigures(f"fam.{name}", "1", name, "onnxruntime", is_baseline=i == 0)
        row.requests_per_second = row.rows_per_second = 12_345.0 / (i + 1)
        row.latency_p50_s, row.latency_p95_s, row.latency_p99_s = 1.2e-3, 2.5e-3, 4.1e-3
        row.server_p50_s, row.server_p99_s = 3.4e-5 * (i + 1), 2.2e-4
        row.server_mean_s = 4.1e-5 * (i + 1)
        row.file_bytes = Sourced(40_000.0 + 1_000_000 * i, FROM_METRICS)
        row.parameters = Sourced(12_000_000.0, FROM_METRICS)
        row.nonzero_parameters = Sourced(12_000_000.0 * (1 - i / 10), FROM_METRICS)
        row.weight_sparsity = Sourced(i / 10, FROM_METRICS)
        # dense 20.3 MiB, the next within 1 MiB of it, the rest well apart
        row.memory_bytes = Sourced((20.3 + (0.6 if i == 1 else 3 * i)) * 2**20, FROM_METRICS)
        row.manifest_quality = {"accuracy": 0.97 - i / 100}
        if i:
            row.agreement = Sourced(0.99 - i / 50, "probe inputs")
            row.probe_accuracy = 0.96 - i / 100
            rounds = [1e-4 * (0.5 + i / 4), 1e-4, 1.1e-4]
            row.speed = speed_estimate([1e-4] * 3, rounds, SERVER_MEAN)
        rows.append(row)
    return Comparison("fam", "dense", "127.0.0.1:1", "http://127.0.0.1:2/metrics", 4, 10.0, 5,
                      1, "2026-12-03T00:00:00+00:00", "test", rows,
                      random_data=random_data)  # fmt: skip


@pytest.fixture(scope="module")
def drawn() -> dict:
    figures = plots.draw(comparison())
    for figure in figures.values():
        figure.canvas.draw()
    return figures


def tick_labels(axis) -> list[Text]:
    """The tick labels drawn: an axis keeps tick objects for ticks outside its view."""
    low, high = sorted(axis.get_view_interval())
    return [
        tick.label1
        for tick in axis.get_major_ticks()
        if low <= tick.get_loc() <= high and tick.label1.get_visible() and tick.label1.get_text()
    ]


def visible_texts(figure) -> list[Text]:
    """Every text drawn: titles, axis labels, legends, value labels and tick labels."""
    ticks = {id(t) for ax in figure.axes for axis in (ax.xaxis, ax.yaxis)
             for t in axis.get_majorticklabels()}  # fmt: skip
    texts = [t for t in figure.findobj(Text) if t.get_visible() and t.get_text().strip()
             and id(t) not in ticks]  # fmt: skip
    return texts + [t for ax in figure.axes for a in (ax.xaxis, ax.yaxis) for t in tick_labels(a)]


def value_labels(figure) -> list[Text]:
    """The labels drawn beside bars and points (annotations of the axes)."""
    return [t for ax in figure.axes for t in ax.texts if t.get_visible() and t.get_text()]


def test_slide_size_and_font_sizes(drawn: dict) -> None:
    assert set(drawn) == set(plots.PLOTS)
    for name, figure in drawn.items():
        width, height = figure.get_size_inches() * figure.dpi
        assert (round(width), round(height)) == (1600, 900), name
        for text in visible_texts(figure):
            assert text.get_fontsize() >= 12, (name, text.get_text(), text.get_fontsize())


def test_tick_labels_never_collide(drawn: dict) -> None:
    for name, figure in drawn.items():
        renderer = figure.canvas.get_renderer()
        for ax in figure.axes:
            for axis in (ax.xaxis, ax.yaxis):
                labels = tick_labels(axis)
                boxes = [t.get_window_extent(renderer) for t in labels]
                for (a, ta), (b, tb) in itertools.combinations(zip(boxes, labels, strict=True), 2):
                    assert not a.overlaps(b), (name, ta.get_text(), tb.get_text())


def test_value_labels_do_not_collide_and_stay_in_the_picture(drawn: dict) -> None:
    for name, figure in drawn.items():
        renderer = figure.canvas.get_renderer()
        whole = figure.bbox
        labels = value_labels(figure)
        boxes = [t.get_window_extent(renderer) for t in labels]
        for (a, ta), (b, tb) in itertools.combinations(zip(boxes, labels, strict=True), 2):
            assert not a.overlaps(b), (name, ta.get_text(), tb.get_text())
        for text in visible_texts(figure):
            box = text.get_window_extent(renderer)
            assert whole.x0 - 1 <= box.x0 and box.x1 <= whole.x1 + 1, (name, text.get_text())
            assert whole.y0 - 1 <= box.y0 and box.y1 <= whole.y1 + 1, (name, text.get_text())


def test_values_have_units_and_no_scientific_notation(drawn: dict) -> None:
    units = {"latency.png": " ms", "throughput.png": " rows/s", "size.png": " KiB",
             "memory.png": "MiB", "quality.png": "%", "speedup.png": "x",
             "parameters.png": "weights zero"}  # fmt: skip
    for name, figure in drawn.items():
        labels = [t.get_text() for t in value_labels(figure)]
        assert labels, name
        for text in labels:
            assert not SCIENTIFIC.search(text), (name, text)
            assert units[name] in text or text in ("baseline", plots.MISSING), (name, text)
        ticks = [t.get_text() for ax in figure.axes for t in tick_labels(ax.xaxis)]
        assert not any(SCIENTIFIC.search(t) for t in ticks), (name, ticks)
        assert all(not ax.xaxis.get_offset_text().get_text() for ax in figure.axes), name


def test_legends_sit_outside_the_bars(drawn: dict) -> None:
    for name, figure in drawn.items():
        renderer = figure.canvas.get_renderer()
        for ax in figure.axes:
            legend = ax.get_legend()
            if legend is None:
                continue
            box = legend.get_window_extent(renderer)
            assert box.y0 >= ax.get_window_extent(renderer).y1 - 1, name


def test_parameters_show_the_non_zero_part_and_the_sparsity(drawn: dict) -> None:
    labels = [t.get_text() for t in value_labels(drawn["parameters.png"])]
    assert labels[1] == "10.8 M of 12.0 M, 10.0% of weights zero"
    legend = drawn["parameters.png"].axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["non-zero", "zero"]


def test_memory_within_the_resolution_is_drawn_equal(drawn: dict) -> None:
    ax = drawn["memory.png"].axes[0]
    widths = [bar.get_width() for bar in ax.patches]
    assert widths[1] == widths[0]  # 0.6 MiB apart: below the gauge's resolution
    assert widths[2] > widths[0]
    labels = [t.get_text() for t in value_labels(drawn["memory.png"])]
    assert labels[0] == "20 MiB"
    assert labels[1] == "20 MiB  (same as dense within 1 MiB)"
    assert MEMORY_RESOLUTION_BYTES == 2**20


def test_quality_on_random_rows_says_so() -> None:
    figure = plots.quality(comparison(random_data=True))
    assert "RANDOM inputs: not a quality measure" in figure.get_suptitle()


@pytest.mark.parametrize(
    ("value", "shown"),
    [(0.000034, "0.000034"), (0.123, "0.123"), (1.5, "1.50"), (97.5, "97.5"),
     (12_345.0, "12,345"), (12_000_000.0, "12,000,000"), (0.0, "0")],
)  # fmt: skip
def test_plain_numbers(value: float, shown: str) -> None:
    assert plots.plain(value) == shown


def test_parameter_counts() -> None:
    assert [plots.count(n) for n in (10_026, 999_999, 10_800_000, 2.5e9)] == [
        "10,026", "999,999", "10.8 M", "2.5 G"
    ]  # fmt: skip
