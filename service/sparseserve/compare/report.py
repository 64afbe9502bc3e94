"""report.md + report.html + PNG plots (+ report.json) from one `Comparison`.

Every number is written with its source (load run, server metrics, shadow traffic,
probe inputs; the manifest only for quality measured when the variant was built), so a
reader can tell a measurement from a claim.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
from collections.abc import Callable
from pathlib import Path

from sparseserve.compare import plots
from sparseserve.compare.figures import Comparison, Sourced, VariantFigures
from sparseserve.compare.verdict import SAME_WITHIN

# The report's plots: file name -> caption.
PLOTS = {name: caption for name, (caption, _) in plots.PLOTS.items()}


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:.3f}"


def _number(x: Sourced, render: Callable[[float], str]) -> str:
    return "—" if x.value is None else render(x.value)


def _agreement(v: VariantFigures, random_data: bool) -> str:
    if v.is_baseline:
        return "baseline"
    shown = _number(v.agreement, lambda x: f"{x:.1%}")
    return f"{shown} (random inputs)" if random_data and v.agreement.known else shown


def table_rows(c: Comparison) -> tuple[list[str], list[list[str]]]:
    """The summary table: a header and one row per variant."""
    header = [
        "variant", "req/s", "p50 ms", "p95 ms", "p99 ms", "server p50 ms", "server mean ms",
        "file KiB",
        "parameters", "non-zero", "sparsity", "sparse-kernel layers", "memory MiB",
        "agreement", "accuracy",
        "verdict",
    ]  # fmt: skip
    rows = []
    for v in c.variants:
        rows.append([
            v.model, f"{v.requests_per_second:.0f}", _ms(v.latency_p50_s), _ms(v.latency_p95_s),
            _ms(v.latency_p99_s), _ms(v.server_p50_s), _ms(v.server_mean_s),
            _number(v.file_bytes, lambda x: f"{x / 1024:.1f}"),
            _number(v.parameters, lambda x: f"{x:,.0f}"),
            _number(v.nonzero_parameters, lambda x: f"{x:,.0f}"),
            _number(v.weight_sparsity, lambda x: f"{x:.1%}"),
            _number(v.sparse_kernel_layers, lambda x: f"{x:.0f}"),
            _number(v.memory_bytes, lambda x: f"{x / 2**20:.1f}"),
            _agreement(v, c.random_data),
            "—" if v.probe_accuracy is None else f"{v.probe_accuracy:.1%}",
            v.verdict,
        ])  # fmt: skip
    return header, rows


# The columns a terminal shows (about 130 characters); report.md has them all.
TERMINAL_COLUMNS = ("variant", "req/s", "p50 ms", "p99 ms", "server mean ms", "file KiB",
                    "non-zero", "sparsity", "sparse-kernel layers", "memory MiB", "agreement",
                    "accuracy")  # fmt: skip


def text_table(c: Comparison) -> str:
    """The summary as aligned plain text, for a terminal: the main columns, then each
    variant's verdict on a line of its own (a verdict is a sentence: at the end of a row
    it pushed the table past 250 characters)."""
    header, rows = table_rows(c)
    keep = [header.index(name) for name in TERMINAL_COLUMNS]
    cells = [[row[i] for i in keep] for row in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(keep))]
    lines = []
    for r in cells:
        padded = (
            x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(r, widths, strict=True))
        )
        lines.append("  ".join(padded))
        if r is cells[0]:
            lines.append("-" * len(lines[0]))
    verdict = header.index("verdict")
    baseline = next((row[0] for row in rows if row[verdict] == "baseline"), c.baseline)
    lines.append(f"verdicts against {baseline}:")
    for row in rows:
        if row[verdict] != "baseline":
            lines.append(f"  {row[0]:<{widths[0]}}  {row[verdict]}")
    return "\n".join(lines)


def _sources(c: Comparison) -> list[str]:
    lines = [
        f"Family **{c.family}**, baseline **{c.baseline}**; server {c.url} "
        f"(metrics {c.metrics_url}); started {c.started}; client machine: {c.machine}.",
        f"Rows sent (probe and load): {c.data}.",
        f"Load: {c.concurrency} concurrent requests of batch {c.batch}, "
        f"{c.duration_seconds:g} s per variant in {c.rounds} rounds, the variants taking turns.",
        "Latency and req/s: measured at the client during the load run. Server p50: the "
        "server's own request-duration histogram over the run (bucket-interpolated, as "
        "PromQL's histogram_quantile); server mean: its sum over its count. File size, "
        "parameters, sparsity, sparse-kernel layers (how many layers the engine runs "
        "on a sparse kernel: OpenVINO's AMX int8 one; 0 on onnxruntime), memory: the "
        "server's per-model gauges; memory is measured to about 1 MiB.",
        "Speed verdict: the ratio of the baseline's server-side mean request duration to "
        "the variant's in each round (exact, from the histogram's sum and count: its "
        "buckets are too coarse for a p50 ratio; the client p50 if the server exports no "
        "histogram; the verdict says which), the ratios' geometric mean and Student-t 95% "
        "confidence interval over the "
        f"rounds. Faster or slower only when the interval excludes 1 and the ratio is "
        f"beyond {SAME_WITHIN - 1:.0%}; as fast when the whole interval is within "
        f"{SAME_WITHIN - 1:.0%}; otherwise undecided in this run.",
        "Agreement and cosine: top-1 agreement and mean cosine similarity with the "
        "baseline from the server's shadow series over this run when a shadow policy "
        "compared rows, else on the probe rows this run sent to every variant (the "
        "same rows to each). Accuracy: on the probe rows, through the server, when the "
        "data has labels; the manifest's as recorded when the variant was built.",
    ]
    if c.random_data:
        lines.append(
            "The rows were random: agreement on random inputs is not a quality measure "
            "(a pruned model can disagree on noise and agree on real data). Give real "
            "rows with --data, or build the family with `sparseserve sparsify`, which "
            "writes eval.npz beside the baseline."
        )
    return lines + [f"Note: {n}." for n in c.notes]


def _details(v: VariantFigures) -> list[str]:
    out = [
        f"requests: {v.requests_ok} ok and {v.requests_failed} failed in the load; "
        f"{v.requests_sent} sent in all (warm-up and probes included), "
        f"{v.server_requests:.0f} counted by the server ({v.server_errors:.0f} errors)",
        f"throughput: {v.requests_per_second:.1f} req/s, {v.rows_per_second:.1f} rows/s",
        f"latency at the client: p50 {_ms(v.latency_p50_s)} ms, p95 {_ms(v.latency_p95_s)} ms, "
        f"p99 {_ms(v.latency_p99_s)} ms; at the server: p50 {_ms(v.server_p50_s)} ms, "
        f"p99 {_ms(v.server_p99_s)} ms, mean {_ms(v.server_mean_s)} ms",
        "server mean per round, ms: " + (", ".join(_ms(x) for x in v.server_round_mean_s) or "—"),
    ]
    if v.speed is not None and not v.is_baseline:
        s = v.speed
        out.append(
            f"speed versus the baseline ({s.latency}): {s.ratio:.3f}x, 95% CI "
            f"{s.low:.3f}-{s.high:.3f}x over {s.rounds} rounds"
        )
    for name in ("file_bytes", "parameters", "nonzero_parameters", "weight_sparsity",
                 "sparse_kernel_layers", "memory_bytes"):  # fmt: skip
        x: Sourced = getattr(v, name)
        shown = "not known" if x.value is None else f"{x.value:,.6g} ({x.source})"
        out.append(f"{name.replace('_', ' ')}: {shown}")
    if not v.is_baseline and v.agreement.value is not None:
        rows = f" on {v.agreement_rows} rows" if v.agreement_rows else ""
        out.append(f"top-1 agreement: {v.agreement.value:.2%} ({v.agreement.source}{rows})")
    if not v.is_baseline and v.cosine.value is not None:
        out.append(
            f"mean cosine similarity to the baseline ({v.cosine.source}): {v.cosine.value:.5f}"
        )
    if v.probe_accuracy is not None:
        out.append(f"accuracy on the probe rows, through the server: {v.probe_accuracy:.2%}")
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


STYLESHEET = (
    "body{font-family:sans-serif;font-size:16px;max-width:100em;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse;font-size:14px;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:.25em .5em;text-align:right}"
    "td:first-child,th:first-child{text-align:left;white-space:nowrap}"
    "th{background:#f3f3f3}.caveat{background:#fff3cd;border:1px solid #e0c060;"
    "padding:.6em 1em}figure{margin:1.5em 0}img{width:100%;max-width:1600px;"
    "border:1px solid #eee}figcaption{font-weight:bold;margin-bottom:.3em}"
)


def html_page(c: Comparison) -> str:
    header, rows = table_rows(c)
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{e(c.family)}: sparse versus dense</title>",
        f"<style>{STYLESHEET}</style></head><body>",
        f"<h1>{e(c.family)}: sparse versus dense</h1>",
    ]
    if c.random_data:
        parts.append(
            "<p class='caveat'><b>Random inputs.</b> No evaluation data was given or found: "
            "agreement below is on random rows and is not a quality measure. Pass "
            "<code>--data rows.npz</code> or a repository built by "
            "<code>sparseserve sparsify</code>.</p>"
        )
    # The verdicts head the page; the table leaves them out to stay one line a variant.
    parts += [
        "<ul>",
        *(f"<li><b>{e(v.model)}</b>: {e(v.verdict)}</li>" for v in c.variants),
        "</ul><table><tr>",
        *(f"<th>{e(h)}</th>" for h in header[:-1]),
        "</tr>",
    ]
    for r in rows:
        parts += ["<tr>", *(f"<td>{e(x)}</td>" for x in r[:-1]), "</tr>"]
    parts.append("</table>")
    parts += [f"<p>{e(line).replace('**', '')}</p>" for line in _sources(c)]
    parts += [
        f"<figure><figcaption>{e(title)}</figcaption><img src='{name}' alt='{e(title)}'></figure>"
        for name, title in PLOTS.items()
    ]
    for v in c.variants:
        parts += [f"<h2>{e(v.model)}</h2><ul>", *(f"<li>{e(d)}</li>" for d in _details(v)), "</ul>"]
    parts.append("</body></html>")
    return "\n".join(parts)


def _finite(value: object) -> object:
    """`value` with every infinite or NaN float as None: strict JSON has no Infinity
    (one round's speed interval is 0..inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def write(c: Comparison, out: Path) -> list[Path]:
    """Write report.md, report.html, report.json and the plots into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    plots.save(c, out)
    (out / "report.md").write_text(markdown(c), encoding="utf-8")
    (out / "report.html").write_text(html_page(c), encoding="utf-8")
    figures = _finite(dataclasses.asdict(c))
    (out / "report.json").write_text(json.dumps(figures, indent=2, allow_nan=False) + "\n")
    return [out / "report.md", out / "report.html", out / "report.json",
            *(out / name for name in PLOTS)]  # fmt: skip
