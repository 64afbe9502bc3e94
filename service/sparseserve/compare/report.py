"""report.md + report.html + PNG plots (+ report.json) from one `Comparison`.

Every number is written with its source (load run, server metrics, shadow traffic,
probe inputs; the manifest only for quality measured when the variant was built), so a
reader can tell a measurement from a claim.
"""

from __future__ import annotations

import dataclasses
import html
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from sparseserve.compare.figures import Comparison, Sourced, VariantFigures

PLOTS = {
    "latency.png": "Latency percentiles (load run)",
    "throughput.png": "Throughput (load run)",
    "memory.png": "Memory per loaded model",
    "size.png": "Model file size",
    "parameters.png": "Parameters and sparsity",
    "quality.png": "Quality versus the baseline",
}


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:.3f}"


def _number(x: Sourced, render: Callable[[float], str]) -> str:
    return "—" if x.value is None else render(x.value)


def table_rows(c: Comparison) -> tuple[list[str], list[list[str]]]:
    """The summary table: a header and one row per variant."""
    header = [
        "variant", "req/s", "p50 ms", "p95 ms", "p99 ms", "server p50 ms", "file KiB",
        "parameters", "non-zero", "sparsity", "memory MiB", "agreement", "verdict",
    ]  # fmt: skip
    rows = []
    for v in c.variants:
        rows.append([
            v.model, f"{v.requests_per_second:.0f}", _ms(v.latency_p50_s), _ms(v.latency_p95_s),
            _ms(v.latency_p99_s), _ms(v.server_p50_s),
            _number(v.file_bytes, lambda x: f"{x / 1024:.1f}"),
            _number(v.parameters, lambda x: f"{x:,.0f}"),
            _number(v.nonzero_parameters, lambda x: f"{x:,.0f}"),
            _number(v.weight_sparsity, lambda x: f"{x:.1%}"),
            _number(v.memory_bytes, lambda x: f"{x / 2**20:.1f}"),
            "baseline" if v.is_baseline else _number(v.agreement, lambda x: f"{x:.1%}"),
            v.verdict,
        ])  # fmt: skip
    return header, rows


def text_table(c: Comparison) -> str:
    """The summary as aligned plain text, for a terminal."""
    header, rows = table_rows(c)
    cells = [header, *rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header) - 1)]
    lines = []
    for r in cells:
        lines.append("  ".join(x.rjust(w) if i else x.ljust(w)
                               for i, (x, w) in enumerate(zip(r, widths, strict=False)))
                     + "  " + r[-1])  # fmt: skip
        if r is header:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def _sources(c: Comparison) -> list[str]:
    lines = [
        f"Family **{c.family}**, baseline **{c.baseline}**; server {c.url} "
        f"(metrics {c.metrics_url}); started {c.started}; client machine: {c.machine}.",
        f"Load: {c.concurrency} concurrent requests of batch {c.batch}, "
        f"{c.duration_seconds:g} s per variant in {c.rounds} rounds, the variants taking turns.",
        "Latency and req/s: measured at the client during the load run. Server p50: the "
        "server's own request-duration histogram over the run (bucket-interpolated, as "
        "PromQL's histogram_quantile). File size, parameters, sparsity, memory: the "
        "server's per-model gauges.",
        "Agreement and cosine: top-1 agreement and mean cosine similarity with the "
        "baseline from the server's shadow series over this run when a shadow policy "
        "compared rows, else on the probe inputs this run sent to every variant (the "
        "same rows to each). Accuracy: as recorded in the manifest when the variant was "
        "built.",
    ]
    return lines + [f"Note: {n}." for n in c.notes]


def _details(v: VariantFigures) -> list[str]:
    out = [
        f"requests: {v.requests_ok} ok and {v.requests_failed} failed in the load; "
        f"{v.requests_sent} sent in all (warm-up and probes included), "
        f"{v.server_requests:.0f} counted by the server ({v.server_errors:.0f} errors)",
        f"throughput: {v.requests_per_second:.1f} req/s, {v.rows_per_second:.1f} rows/s",
        f"latency at the client: p50 {_ms(v.latency_p50_s)} ms, p95 {_ms(v.latency_p95_s)} ms, "
        f"p99 {_ms(v.latency_p99_s)} ms; at the server: p50 {_ms(v.server_p50_s)} ms, "
        f"p99 {_ms(v.server_p99_s)} ms",
    ]
    for name in ("file_bytes", "parameters", "nonzero_parameters", "weight_sparsity",
                 "memory_bytes"):  # fmt: skip
        x: Sourced = getattr(v, name)
        shown = "not known" if x.value is None else f"{x.value:,.6g} ({x.source})"
        out.append(f"{name.replace('_', ' ')}: {shown}")
    if not v.is_baseline:
        if v.agreement.value is not None:
            rows = f" on {v.agreement_rows} rows" if v.agreement_rows else ""
            out.append(f"top-1 agreement: {v.agreement.value:.2%} ({v.agreement.source}{rows})")
        if v.cosine.value is not None:
            out.append(
                f"mean cosine similarity to the baseline ({v.cosine.source}): {v.cosine.value:.5f}"
            )
    for metric, value in v.manifest_quality.items():
        out.append(f"{metric} recorded in the manifest: {value:.4g}")
    return out


def markdown(c: Comparison) -> str:
    header, rows = table_rows(c)
    lines = [f"# {c.family}: sparse versus dense", ""]
    lines += [f"- **{v.model}**: {v.verdict}" for v in c.variants]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", *(_sources(c)), ""]
    for name, title in PLOTS.items():
        lines += [f"![{title}]({name})", ""]
    for v in c.variants:
        lines += [f"## {v.model}", "", *(f"- {d}" for d in _details(v)), ""]
    return "\n".join(lines)


def html_page(c: Comparison) -> str:
    header, rows = table_rows(c)
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{e(c.family)}: sparse versus dense</title>",
        "<style>body{font-family:sans-serif;max-width:72em;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .5em;"
        "text-align:right}td:first-child,td:last-child{text-align:left}"
        "img{max-width:48%;margin:.5%}</style></head><body>",
        f"<h1>{e(c.family)}: sparse versus dense</h1><ul>",
        *(f"<li><b>{e(v.model)}</b>: {e(v.verdict)}</li>" for v in c.variants),
        "</ul><table><tr>",
        *(f"<th>{e(h)}</th>" for h in header),
        "</tr>",
    ]
    for r in rows:
        parts += ["<tr>", *(f"<td>{e(x)}</td>" for x in r), "</tr>"]
    parts.append("</table>")
    parts += [f"<p>{e(line).replace('**', '')}</p>" for line in _sources(c)]
    parts += [f"<img src='{name}' alt='{e(title)}'>" for name, title in PLOTS.items()]
    for v in c.variants:
        parts += [f"<h2>{e(v.model)}</h2><ul>", *(f"<li>{e(d)}</li>" for d in _details(v)), "</ul>"]
    parts.append("</body></html>")
    return "\n".join(parts)


def _bars(
    path: Path,
    title: str,
    labels: Sequence[str],
    series: dict[str, Sequence[float | None]],
    ylabel: str,
) -> None:
    """Grouped bars; a missing value leaves a gap and says so under the plot."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    width = 0.8 / max(len(series), 1)
    missing = False
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
        heights = [0.0 if v is None else v for v in values]
        missing |= any(v is None for v in values)
        bars = ax.bar(xs, heights, width, label=name)
        ax.bar_label(bars, labels=["n/a" if v is None else f"{v:.3g}" for v in values],
                     fontsize=7)  # fmt: skip
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title + (" (n/a: not known)" if missing else ""), fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _value(x: Sourced, scale: float = 1.0) -> float | None:
    return None if x.value is None else x.value * scale


def plot(c: Comparison, out: Path) -> None:
    names = [v.variant for v in c.variants]
    vs = c.variants

    def ms(x: float | None) -> float | None:
        return None if x is None else x * 1000

    _bars(out / "latency.png", PLOTS["latency.png"], names, {
        "p50": [ms(v.latency_p50_s) for v in vs], "p95": [ms(v.latency_p95_s) for v in vs],
        "p99": [ms(v.latency_p99_s) for v in vs],
    }, "ms")  # fmt: skip
    _bars(out / "throughput.png", PLOTS["throughput.png"], names,
          {"requests/s": [v.requests_per_second for v in vs]}, "requests/s")  # fmt: skip
    _bars(out / "memory.png", PLOTS["memory.png"], names,
          {"MiB": [_value(v.memory_bytes, 2**-20) for v in vs]}, "MiB")  # fmt: skip
    _bars(out / "size.png", PLOTS["size.png"], names,
          {"KiB": [_value(v.file_bytes, 1 / 1024) for v in vs]}, "KiB")  # fmt: skip
    _bars(out / "parameters.png", PLOTS["parameters.png"], names, {
        "parameters": [_value(v.parameters) for v in vs],
        "non-zero": [_value(v.nonzero_parameters) for v in vs],
    }, "weights")  # fmt: skip
    accuracy = [v.manifest_quality.get("accuracy") for v in vs]
    quality: dict[str, Sequence[float | None]] = {
        "agreement with baseline %": [
            100.0 if v.is_baseline else _value(v.agreement, 100) for v in vs
        ]
    }
    if any(a is not None for a in accuracy):
        quality["accuracy in manifest %"] = [None if a is None else a * 100 for a in accuracy]
    _bars(out / "quality.png", PLOTS["quality.png"], names, quality, "%")


def write(c: Comparison, out: Path) -> list[Path]:
    """Write report.md, report.html, report.json and the plots into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    plot(c, out)
    (out / "report.md").write_text(markdown(c), encoding="utf-8")
    (out / "report.html").write_text(html_page(c), encoding="utf-8")
    (out / "report.json").write_text(json.dumps(dataclasses.asdict(c), indent=2) + "\n")
    return [out / "report.md", out / "report.html", out / "report.json",
            *(out / name for name in PLOTS)]  # fmt: skip
