"""The report's plots, drawn to go on a slide: 1600x900 px, fonts of 13 pt and more.

Variants are rows of horizontal bars, so their names never collide however many a
family has; every bar carries its value with its unit (never scientific notation); the
legend sits outside the bars; memory is rounded to the resolution of its measurement, so
bars that differ by less are drawn equal, and the plot says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparseserve.compare.figures import MEMORY_RESOLUTION_BYTES, Comparison, VariantFigures
from sparseserve.compare.verdict import CLIENT_P50, SAME_WITHIN, SERVER_MEAN

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.typing import RcKeyType

WIDTH_IN, HEIGHT_IN, DPI = 12.8, 7.2, 125  # 1600 x 900 px
STYLE: dict[RcKeyType, Any] = {
    "font.size": 14,
    "axes.titlesize": 17,
    "axes.labelsize": 15,
    "xtick.labelsize": 13,
    "ytick.labelsize": 14,
    "legend.fontsize": 13,
    "figure.titlesize": 19,
    "axes.spines.top": False,
    "axes.spines.right": False,
}
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd")
MISSING = "not known"
Value = float | None
Format = Callable[[float], str]


def plain(value: float, trim: bool = False) -> str:
    """A number without scientific notation, to three significant digits below 100 and
    with thousands separators above; `trim` drops trailing zeros (for axis ticks)."""
    if value == 0 or not math.isfinite(value):
        return "0" if value == 0 else str(value)
    magnitude = math.floor(math.log10(abs(value)))
    decimals = min(max(2 - magnitude, 0), 6)
    text = f"{value:,.{decimals}f}"
    return text.rstrip("0").rstrip(".") if trim and "." in text else text


def count(value: float) -> str:
    """A parameter count: exact below a million, then in millions ("10.8 M")."""
    if abs(value) >= 1e9:
        return f"{value / 1e9:,.1f} G"
    if abs(value) >= 1e6:
        return f"{value / 1e6:,.1f} M"
    return f"{value:,.0f}"


def with_unit(unit: str) -> Format:
    """A formatter: `plain(value)` and the unit ("0.412 ms", "12 MiB", "97.5%")."""
    separator = "" if unit == "%" else " "
    return lambda value: f"{plain(value)}{separator}{unit}"


def _figure(rows: int, columns: int = 1) -> tuple[Figure, list[Axes]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)  # files only, never a window; and text extents can be measured
    axes = figure.subplots(1, columns, sharey=True, squeeze=False)[0]
    return figure, list(axes)


def _plain_ticks(ax: Axes) -> None:
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    # Few ticks: "10,000,000" is wide, and the value labels carry the exact numbers.
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: plain(x, trim=True)))


def hbars(
    ax: Axes,
    labels: Sequence[str],
    series: dict[str, Sequence[Value]],
    fmt: Format,
    xlabel: str,
    limit: float | None = None,
    texts: Sequence[str] | None = None,
) -> None:
    """Grouped horizontal bars, a group per label (the first at the top), each bar
    with its formatted value (or `texts`, for a single series); a missing value is a
    gap labelled "not known"."""
    group = 0.8
    height = group / max(len(series), 1)
    top = max((v for values in series.values() for v in values if v is not None), default=1.0)
    for i, (name, values) in enumerate(series.items()):
        ys = [j - group / 2 + (i + 0.5) * height for j in range(len(labels))]
        widths = [0.0 if v is None else v for v in values]
        bars = ax.barh(ys, widths, height * 0.9, label=name, color=COLOURS[i % len(COLOURS)])
        shown = texts or [MISSING if v is None else fmt(v) for v in values]
        ax.bar_label(bars, labels=shown, padding=4, fontsize=12 if len(series) > 2 else 13)
    ax.set_yticks(range(len(labels)), labels)
    if not ax.yaxis_inverted():  # axes sharing y share the inversion: invert once
        ax.invert_yaxis()
    # Room on the right for the value labels.
    ax.set_xlim(0, limit if limit is not None else (top or 1.0) * 1.3)
    ax.set_xlabel(xlabel)
    _plain_ticks(ax)
    ax.grid(axis="x", alpha=0.3)


def _title(figure: Figure, text: str) -> None:
    """The plot's title, from the figure's left edge (long variant names push the axes
    right; a title aligned with them would run off the picture)."""
    figure.suptitle(text, x=0.01, ha="left")


def _legend_outside(ax: Axes, columns: int) -> None:
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.01), ncols=columns, frameon=False)


def latency(c: Comparison) -> Figure:
    """Server-side mean and p99, client p50 and p99, a panel each."""
    names, vs = [v.variant for v in c.variants], c.variants
    figure, (server, client) = _figure(len(vs), 2)

    def ms(x: float | None) -> Value:
        return None if x is None else x * 1000

    hbars(server, names, {"mean": [ms(v.server_mean_s) for v in vs],
                          "p99": [ms(v.server_p99_s) for v in vs]},
          with_unit("ms"), "ms at the server (request duration)")  # fmt: skip
    # Two series a panel: three thin bars of similar length would stack their labels
    # (p95 is in the table).
    hbars(client, names, {"p50": [ms(v.latency_p50_s) for v in vs],
                          "p99": [ms(v.latency_p99_s) for v in vs]},
          with_unit("ms"), "ms at the client (gRPC and Python included)")  # fmt: skip
    server.set_title("At the server (the mean is the verdict's)", loc="left", pad=36)
    client.set_title("Client round trip", loc="left", pad=36)
    _legend_outside(server, 2)
    _legend_outside(client, 2)
    _title(figure, f"{c.family}: latency, {c.concurrency} requests in flight, batch {c.batch}")
    return figure


def speedup(c: Comparison) -> Figure:
    """Each variant's speed versus the baseline with its 95% interval, and the band
    within which the verdict calls them equal."""
    figure, (ax,) = _figure(len(c.variants))
    names = [v.variant for v in c.variants]
    used = {v.speed.latency for v in c.variants if v.speed is not None}
    ax.axvspan(1 / SAME_WITHIN, SAME_WITHIN, color="#dddddd", label="within 10%: as fast")
    ax.axvline(1.0, color="#555555", linewidth=1)
    highest = SAME_WITHIN
    for j, v in enumerate(c.variants):
        if v.is_baseline:
            ax.annotate("baseline", (1.0, j), xytext=(8, 0), textcoords="offset points",
                        va="center", fontsize=13)  # fmt: skip
            continue
        if v.speed is None:
            ax.annotate(MISSING, (1.0, j), xytext=(8, 0), textcoords="offset points",
                        va="center", fontsize=13)  # fmt: skip
            continue
        s = v.speed
        high = s.high if math.isfinite(s.high) else s.ratio * 4
        highest = max(highest, high, s.ratio)
        ax.errorbar(s.ratio, j, xerr=[[s.ratio - s.low], [high - s.ratio]], fmt="o",
                    color=COLOURS[0], capsize=6, markersize=9, linewidth=2)  # fmt: skip
        ax.annotate(f"{plain(s.ratio)}x  (95% CI {plain(s.low)}-{plain(s.high)}x)", (high, j),
                    xytext=(8, 0), textcoords="offset points", va="center",
                    fontsize=13)  # fmt: skip
    ax.set_yticks(range(len(names)), names)
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.set_xscale("log")
    lowest = min([1 / SAME_WITHIN, *(v.speed.low for v in c.variants if v.speed and v.speed.low)])
    ax.set_xlim(lowest / 1.3, highest * 3.0)
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{plain(x, trim=True)}x"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    which = " / ".join(sorted(used)) or SERVER_MEAN
    ax.set_xlabel(f"baseline {which} / variant {which}  (> 1: faster than {c.baseline})")
    _title(figure, f"{c.family}: speed versus {c.baseline}, {c.rounds} rounds of turns")
    _legend_outside(ax, 1)
    ax.grid(axis="x", alpha=0.3)
    if CLIENT_P50 in used:
        ax.text(0.0, -0.14, "client p50: this server exports no request-duration histogram",
                transform=ax.transAxes, fontsize=12)  # fmt: skip
    return figure


def throughput(c: Comparison) -> Figure:
    figure, (ax,) = _figure(len(c.variants))
    hbars(ax, [v.variant for v in c.variants],
          {"rows/s": [v.rows_per_second for v in c.variants]}, with_unit("rows/s"),
          f"rows per second, {c.concurrency} requests in flight")  # fmt: skip
    _title(figure, f"{c.family}: throughput (load run)")
    return figure


def memory(c: Comparison) -> Figure:
    """Memory per loaded model at the measurement's resolution: a variant within it of
    the baseline is drawn as the baseline's bar, and values are shown in whole MiB."""
    resolution = MEMORY_RESOLUTION_BYTES
    figure, (ax,) = _figure(len(c.variants))
    base = next((v.memory_bytes.value for v in c.variants if v.is_baseline), None)

    def drawn(v: VariantFigures) -> Value:
        value = v.memory_bytes.value
        if value is None:
            return None
        if base is not None and abs(value - base) < resolution:
            value = base
        return value / 2**20

    def shown(mib: float) -> str:
        whole = round(mib * 2**20 / resolution) * resolution / 2**20
        return "< 1 MiB" if whole < 1 else f"{whole:,.0f} MiB"

    values = [drawn(v) for v in c.variants]
    texts = []
    for v, value in zip(c.variants, values, strict=True):
        text = MISSING if value is None else shown(value)
        measured = v.memory_bytes.value
        near = measured is not None and base is not None and abs(measured - base) < resolution
        if near and not v.is_baseline:
            text += f"  (same as {c.baseline} within 1 MiB)"
        texts.append(text)
    top = max((x for x in values if x is not None), default=1.0)
    hbars(ax, [v.variant for v in c.variants], {"MiB": values}, shown,
          "MiB (resolution 1 MiB)", limit=top * 2.6, texts=texts)  # fmt: skip
    _title(
        figure,
        f"{c.family}: memory per loaded model (server gauge)\nmeasured to about 1 MiB: "
        "a variant within 1 MiB of the baseline is drawn equal to it",
    )
    return figure


def size(c: Comparison) -> Figure:
    figure, (ax,) = _figure(len(c.variants))
    hbars(ax, [v.variant for v in c.variants],
          {"KiB": [None if v.file_bytes.value is None else v.file_bytes.value / 1024
                   for v in c.variants]}, with_unit("KiB"), "KiB on disk")  # fmt: skip
    _title(figure, f"{c.family}: model file size")
    return figure


def parameters(c: Comparison) -> Figure:
    """Non-zero and zero parameters stacked, each bar annotated with its sparsity."""
    figure, (ax,) = _figure(len(c.variants))
    names = [v.variant for v in c.variants]
    nonzero = [v.nonzero_parameters.value for v in c.variants]
    total = [v.parameters.value for v in c.variants]
    zeros = [
        None if n is None or t is None else max(t - n, 0.0)
        for n, t in zip(nonzero, total, strict=True)
    ]
    ys = range(len(names))
    ax.barh(ys, [n or 0 for n in nonzero], 0.7, color=COLOURS[0], label="non-zero")
    ax.barh(ys, [z or 0 for z in zeros], 0.7, left=[n or 0 for n in nonzero], color="#c6dbef",
            hatch="//", edgecolor="#6baed6", label="zero")  # fmt: skip
    for j, v in enumerate(c.variants):
        if v.parameters.value is None:
            text = MISSING
        else:
            sparsity = v.weight_sparsity.value
            if sparsity is None and v.nonzero_parameters.value is not None:
                sparsity = 1 - v.nonzero_parameters.value / max(v.parameters.value, 1)
            share = "" if sparsity is None else f", {sparsity:.1%} of weights zero"
            text = f"{count(v.nonzero_parameters.value or 0)} of {count(v.parameters.value)}{share}"
        ax.annotate(text, (v.parameters.value or 0, j), xytext=(6, 0), textcoords="offset points",
                    va="center", fontsize=13)  # fmt: skip
    ax.set_yticks(list(ys), names)
    ax.invert_yaxis()
    ax.set_xlim(0, max((t for t in total if t is not None), default=1.0) * 1.8)
    ax.set_xlabel("parameters")
    _plain_ticks(ax)
    ax.grid(axis="x", alpha=0.3)
    _title(figure, f"{c.family}: parameters and sparsity (server gauges)")
    _legend_outside(ax, 2)
    return figure


def quality(c: Comparison) -> Figure:
    figure, (ax,) = _figure(len(c.variants))
    vs = c.variants
    series: dict[str, Sequence[Value]] = {
        "top-1 agreement with the baseline": [
            100.0 if v.is_baseline else (None if v.agreement.value is None
                                         else v.agreement.value * 100) for v in vs
        ]
    }  # fmt: skip
    # One accuracy: measured here through the server when the rows have labels, else
    # the manifest's (two series keep the bars thick enough for their labels).
    recorded = [v.manifest_quality.get("accuracy") for v in vs]
    if any(v.probe_accuracy is not None for v in vs):
        series["accuracy on these rows (through the server)"] = [
            None if v.probe_accuracy is None else v.probe_accuracy * 100 for v in vs
        ]
    elif any(a is not None for a in recorded):
        series["accuracy recorded in the manifest"] = [
            None if a is None else a * 100 for a in recorded
        ]
    hbars(ax, [v.variant for v in vs], series, with_unit("%"), "%", limit=125.0)
    ax.set_xticks([0, 20, 40, 60, 80, 100])
    what = "on RANDOM inputs: not a quality measure" if c.random_data else "on the evaluation rows"
    _title(figure, f"{c.family}: quality versus the baseline, {what}")
    _legend_outside(ax, 1)
    return figure


# The report's plots: file name -> (caption, drawing function).
PLOTS: dict[str, tuple[str, Callable[[Comparison], Figure]]] = {
    "speedup.png": ("Speed versus the baseline, with its 95% interval", speedup),
    "latency.png": ("Latency percentiles at the server and at the client", latency),
    "throughput.png": ("Throughput (load run)", throughput),
    "quality.png": ("Quality versus the baseline", quality),
    "parameters.png": ("Parameters and sparsity", parameters),
    "size.png": ("Model file size", size),
    "memory.png": ("Memory per loaded model", memory),
}


def draw(c: Comparison) -> dict[str, Figure]:
    """Every plot of the report, drawn in the report's style (not yet saved)."""
    import matplotlib

    with matplotlib.rc_context(STYLE):
        return {name: make(c) for name, (_, make) in PLOTS.items()}


def save(c: Comparison, out: Path) -> list[Path]:
    """Draw every plot into `out`; return the files."""
    import matplotlib

    written = []
    with matplotlib.rc_context(STYLE):
        for name, (_, make) in PLOTS.items():
            figure = make(c)
            figure.savefig(out / name)
            written.append(out / name)
    return written
