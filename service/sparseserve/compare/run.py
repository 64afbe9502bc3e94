"""One comparison: find a family's variants, drive load through them, gather the numbers.

Against a running server (`url`, `metrics_url`) or one started here on a repository
(`ServerProcess`, as the demo does).
"""

from __future__ import annotations

import asyncio
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from sparseserve.client.health_check import ClientTls
from sparseserve.compare import figures as f
from sparseserve.compare.loadgen import (
    MAX_PROBE_ROWS,
    RANDOM_PROBE_ROWS,
    LoadGenerator,
    LoadSettings,
    Progress,
    VariantLoad,
)
from sparseserve.compare.server_metrics import (
    MODEL_GAUGES,
    REQUEST_DURATION,
    Histogram,
    ServedVariant,
    ShadowTotals,
    Snapshot,
    scrape,
)
from sparseserve.compare.verdict import CLIENT_P50, SERVER_MEAN, speed_estimate, verdict
from sparseserve.repository.eval_data import (
    EVAL_DATA_FILENAME,
    EvalData,
    EvalDataError,
    read_eval_data,
)
from sparseserve.repository.manifest import MANIFEST_FILENAME, ManifestError, VariantManifest


class CompareError(ValueError):
    """The comparison cannot run as asked (unknown family, no baseline...)."""


class ServerUnreachable(CompareError):
    """No server answers where the comparison was told to look: not a wrong argument
    (exit code 1, as for every failure that is not one)."""


@dataclass(frozen=True)
class Target:
    """Where the server is: its gRPC address and its metrics endpoint."""

    url: str
    metrics_url: str
    repository: Path | None = None  # for manifests, when known
    tls: ClientTls | None = None  # how to reach a TLS port
    headers: Mapping[str, str] | None = None  # a restricted group's header


def family_variants(snapshot: Snapshot, family: str) -> list[ServedVariant]:
    """The ready variants of `family` (the newest version of each model)."""
    served = snapshot.variants()
    newest: dict[str, ServedVariant] = {}
    for v in served:
        if v.family == family:
            current = newest.get(v.model)
            if current is None or _version_key(v.version) > _version_key(current.version):
                newest[v.model] = v
    if not newest:
        families = sorted({v.family for v in served})
        raise CompareError(
            f"the server has no ready variant of family {family!r}; "
            f"families served: {', '.join(families) or 'none'}"
        )
    return sorted(newest.values(), key=lambda v: v.model)


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (-1, version)


def _manifests(repository: Path | None, models: Sequence[str]) -> dict[str, VariantManifest]:
    found: dict[str, VariantManifest] = {}
    if repository is None:
        return found
    for model in models:
        path = repository / model / MANIFEST_FILENAME
        if path.exists():
            try:
                found[model] = VariantManifest.read(path)
            except ManifestError:
                continue  # the server reports such a model unavailable; it is not served
    return found


def find_baseline(
    snapshot: Snapshot, family: str, variants: Sequence[ServedVariant], asked: str | None
) -> str:
    """The baseline variant: as asked, else the one the server labels
    `sparseserve_model_info{is_baseline="true"}`."""
    names = [v.variant for v in variants]
    if asked is not None:
        if asked not in names:
            raise CompareError(f"--baseline {asked!r} is not a variant of {family}: {names}")
        return asked
    labelled = snapshot.baseline_variant(family)
    if labelled is not None and labelled in names:
        return labelled
    raise CompareError(
        f"the server serves no baseline of {family} (no ready variant has "
        f'sparseserve_model_info{{is_baseline="true"}}): pass --baseline, one of {names}'
    )


def settled_scrape(metrics_url: str, timeout: float = 5.0, pause: float = 0.2) -> Snapshot:
    """A scrape taken once the server's shadow runs have stopped changing: shadow jobs
    run after their answers, so some may still wait in the queue when the load ends.
    Gives up waiting after `timeout` (a server shadowing other clients' traffic never
    settles) and returns the last scrape."""
    snapshot = scrape(metrics_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(pause)
        later = scrape(metrics_url)
        if later.shadow_runs() == snapshot.shadow_runs():
            return later
        snapshot = later
    return snapshot


def family_eval_data(
    repository: Path | None, baseline_model: str, models: Sequence[str]
) -> EvalData | None:
    """The evaluation sample `sparseserve sparsify` wrote for the family: `eval.npz`
    beside the baseline's manifest (else beside any variant's), or None."""
    if repository is None:
        return None
    for model in [baseline_model, *(m for m in models if m != baseline_model)]:
        path = repository / model / EVAL_DATA_FILENAME
        if path.is_file():
            try:
                return read_eval_data(path)
            except EvalDataError as exc:
                raise CompareError(f"the family's evaluation data is unreadable: {exc}") from exc
    return None


def describe_data(data: EvalData | None, given: bool) -> str:
    """What the probe and load rows are, for the report."""
    if data is None:
        return (
            f"random inputs ({RANDOM_PROBE_ROWS} seeded rows, uniform in [0, 1) for floats): "
            "no evaluation data was given (--data) or found beside the family's manifests "
            f"({EVAL_DATA_FILENAME}), so agreement on them is not a quality measure"
        )
    where = "--data" if given else "the family's evaluation sample"
    probed = min(data.rows, MAX_PROBE_ROWS)
    path = f" ({data.path})" if data.path is not None else ""
    return f"{data.rows} rows of {data.description}, from {where}{path}; {probed} probe rows"


def compare(
    target: Target,
    family: str,
    settings: LoadSettings,
    baseline: str | None = None,
    data: EvalData | None = None,
    progress: bool = True,
) -> f.Comparison:
    """Run the comparison against a running server and return its numbers. `data`: the
    rows to send (else the family's evaluation sample, else random rows)."""
    before = scrape(target.metrics_url)
    variants = family_variants(before, family)
    models = [v.model for v in variants]
    manifests = _manifests(target.repository, models)
    base = find_baseline(before, family, variants, baseline)
    base_model = next(v.model for v in variants if v.variant == base)
    given = data is not None
    if data is None:
        data = family_eval_data(target.repository, base_model, models)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    bar = Progress(settings.duration_seconds * len(models)) if progress else None
    slices: list[Snapshot] = []  # before the first slice of load and after each
    generator = LoadGenerator(target.url, settings, bar, target.tls, target.headers)
    loads = asyncio.run(
        generator.run(models, data, lambda: slices.append(scrape(target.metrics_url)))
    )
    after = settled_scrape(target.metrics_url)

    rows = [
        _figures(v, loads[v.model], before, after, manifests.get(v.model), v.variant == base)
        for v in variants
    ]
    for index, row in enumerate(rows):
        rounds = _server_rounds(slices, index, len(rows), row.model)
        row.server_round_p50_s = [r.quantile(0.5) for r in rounds]
        row.server_round_mean_s = [r.sum / r.count if r.count > 0 else None for r in rounds]
        row.client_round_p50_s = loads[row.model].round_quantiles(0.5)
    baseline_row = next(r for r in rows if r.is_baseline)
    baseline_load = loads[baseline_row.model]
    labels = None if data is None else data.labels
    notes = []
    for row, v in zip(rows, variants, strict=True):
        shadow = after.shadow(family, v.variant, base).minus(before.shadow(family, v.variant, base))
        _versus_baseline(row, baseline_row, loads[v.model], baseline_load, shadow, labels)
        row.verdict = verdict(row, base, random_data=data is None)
    for name, metric in MODEL_GAUGES.items():
        if not after.exports(metric):
            notes.append(
                f"this server does not export {metric}: {name.replace('_', ' ')} is not known"
            )
    return f.Comparison(
        family=family,
        baseline=base,
        url=target.url,
        metrics_url=target.metrics_url,
        concurrency=settings.concurrency,
        duration_seconds=settings.duration_seconds,
        rounds=settings.rounds,
        batch=settings.batch,
        started=started,
        machine=f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        variants=rows,
        data=describe_data(data, given),
        random_data=data is None,
        notes=notes,
    )


def _server_rounds(
    slices: Sequence[Snapshot], index: int, models: int, model: str
) -> list[Histogram]:
    """The server's request durations for `model` in each of its slices. The models
    take turns, so the slice of model `index` in round r lies between scrapes
    r*models+index and the next one."""
    return [
        slices[start + 1]
        .histogram(REQUEST_DURATION, model)
        .minus(slices[start].histogram(REQUEST_DURATION, model))
        for start in range(index, len(slices) - 1, models)
    ]


def _figures(
    served: ServedVariant,
    load: VariantLoad,
    before: Snapshot,
    after: Snapshot,
    manifest: VariantManifest | None,
    is_baseline: bool,
) -> f.VariantFigures:
    row = f.VariantFigures(
        model=served.model,
        version=served.version,
        variant=served.variant,
        backend=served.backend,
        is_baseline=is_baseline,
        requests_ok=load.ok,
        requests_failed=load.failed,
        requests_sent=load.sent,
        requests_per_second=load.requests_per_second,
        rows_per_second=load.requests_per_second * load.rows_per_request,
    )
    if load.ok:
        row.latency_p50_s = load.latency_quantile(0.50)
        row.latency_p95_s = load.latency_quantile(0.95)
        row.latency_p99_s = load.latency_quantile(0.99)
    codes_after, codes_before = after.requests(served.model), before.requests(served.model)
    deltas = {c: n - codes_before.get(c, 0.0) for c, n in codes_after.items()}
    row.server_requests = sum(deltas.values())
    row.server_errors = sum(n for c, n in deltas.items() if c != "OK")
    histogram = after.histogram(REQUEST_DURATION, served.model).minus(
        before.histogram(REQUEST_DURATION, served.model)
    )
    row.server_p50_s = histogram.quantile(0.50)
    row.server_p99_s = histogram.quantile(0.99)
    if histogram.count > 0:
        row.server_mean_s = histogram.sum / histogram.count

    for name, metric in MODEL_GAUGES.items():
        value = after.gauge(metric, served.model, served.version)
        if value is not None:
            setattr(row, name, f.Sourced(value, f.FROM_METRICS))
    if manifest is not None:  # measured on labelled data at build time: the server cannot
        row.manifest_quality = {q.metric: q.value for q in manifest.quality}
    return row


def _versus_baseline(
    row: f.VariantFigures,
    base: f.VariantFigures,
    load: VariantLoad,
    base_load: VariantLoad,
    shadow: ShadowTotals,
    labels: np.ndarray | None,
) -> None:
    """Speedup, size and memory ratios; agreement and cosine from the shadow rows the
    server compared during the run (variant against this baseline), else from the
    probe outputs; accuracy on the probe rows when their labels are known."""
    if row.latency_p50_s and base.latency_p50_s:
        row.speedup_p50 = base.latency_p50_s / row.latency_p50_s
    server = [*row.server_round_mean_s, *base.server_round_mean_s]
    if server and all(m is not None for m in server):
        row.speed = speed_estimate(base.server_round_mean_s, row.server_round_mean_s, SERVER_MEAN)
    else:  # a server without the histogram: the client's round trip is all there is
        row.speed = speed_estimate(base.client_round_p50_s, row.client_round_p50_s, CLIENT_P50)
    if row.file_bytes.value and base.file_bytes.value:
        row.size_ratio = base.file_bytes.value / row.file_bytes.value
    if row.memory_bytes.value and base.memory_bytes.value:
        row.memory_ratio = base.memory_bytes.value / row.memory_bytes.value
        difference = abs(base.memory_bytes.value - row.memory_bytes.value)
        row.memory_resolved = difference >= f.MEMORY_RESOLUTION_BYTES
    ours, theirs = load.probe_output, base_load.probe_output
    if ours is not None and labels is not None and ours.ndim == 2 and ours.shape[1] > 1:
        row.probe_accuracy = float((ours.argmax(axis=1) == labels[: len(ours)]).mean())
    if row.is_baseline:
        return
    if shadow.rows > 0:
        row.agreement_rows = int(shadow.rows)
        if shadow.agreements is not None:
            row.agreement = f.Sourced(shadow.agreements / shadow.rows, f.FROM_SHADOW)
        if shadow.cosine_count > 0:
            row.cosine = f.Sourced(shadow.cosine_sum / shadow.cosine_count, f.FROM_SHADOW)
        return
    if ours is None or theirs is None or ours.shape != theirs.shape:
        return
    ours2, theirs2 = ours.reshape(len(ours), -1), theirs.reshape(len(theirs), -1)
    row.agreement_rows = len(ours2)
    if ours2.shape[1] > 1:  # a class per column: top-1 agreement
        agree = float((ours2.argmax(axis=1) == theirs2.argmax(axis=1)).mean())
        row.agreement = f.Sourced(agree, f.FROM_PROBE)
    dot = (ours2 * theirs2).sum(axis=1)
    norms = np.linalg.norm(ours2, axis=1) * np.linalg.norm(theirs2, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = float(np.nanmean(np.where(norms > 0, dot / norms, np.nan)))
    row.cosine = f.Sourced(cosine, f.FROM_PROBE)


def check_server(
    url: str,
    tls: ClientTls | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 5.0,
) -> None:
    """Raise `CompareError` in one line unless a v2 server answers ServerLive at `url`
    (over TLS with `tls`, sending `headers`)."""
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    try:
        if tls is None:
            client = triton.InferenceServerClient(url)
        else:
            client = triton.InferenceServerClient(
                url, ssl=True, creds=tls.credentials(), channel_args=tls.tritonclient_channel_args()
            )
        with client:
            live = client.is_server_live(headers=dict(headers or {}), client_timeout=timeout)
    except (InferenceServerException, ValueError, OSError) as exc:
        reason = " ".join(str(exc).split())
        raise ServerUnreachable(
            f"no Open Inference Protocol server answers at --url {url}: {reason}"
        ) from exc
    if not live:
        raise ServerUnreachable(f"the server at --url {url} says it is not live")


def run_and_report(
    family: str,
    out: Path,
    settings: LoadSettings,
    url: str | None = None,
    metrics_url: str | None = None,
    repository: Path | None = None,
    baseline: str | None = None,
    data: EvalData | None = None,
    progress: bool = True,
    tls: ClientTls | None = None,
    headers: Mapping[str, str] | None = None,
) -> f.Comparison:
    """Compare `family` on the server at `url` (over TLS with `tls`, sending `headers`
    with every call), or on one started on `repository`, and write the report into
    `out`. `data`: the rows to send (see `compare`)."""
    from sparseserve.compare import report

    if repository is not None and not repository.is_dir():
        raise CompareError(f"model repository {repository} does not exist or is not a directory")
    if url is not None:
        metrics_url = metrics_address(url, metrics_url)
        check_server(url, tls, headers)
        target = Target(url, metrics_url, repository, tls, headers)
        comparison = compare(target, family, settings, baseline, data, progress)
    elif repository is not None:
        from sparseserve.client.server_process import ServerProcess

        with ServerProcess(repository.resolve(), "--log-level", "WARNING") as server:
            target = Target(server.grpc_url, server.metrics_url, repository)
            comparison = compare(target, family, settings, baseline, data, progress)
    else:
        raise CompareError("say which server: --url and --metrics-url, or --repository")
    report.write(comparison, out)
    return comparison


def metrics_address(url: str, metrics_url: str | None) -> str:
    """The metrics endpoint to read: `metrics_url` as given, completed where it is only
    `host:port` (http:// and /metrics added), or, when none is given, the default metrics
    port (8002) on the gRPC address's host."""
    if metrics_url is None:
        host = url.rsplit(":", 1)[0] if ":" in url else url
        return f"http://{host}:8002/metrics"
    if "://" not in metrics_url:
        metrics_url = f"http://{metrics_url}"
    scheme, rest = metrics_url.split("://", 1)
    if "/" not in rest:
        metrics_url = f"{scheme}://{rest}/metrics"
    return metrics_url


def print_comparisons(
    url: str,
    metrics_url: str,
    repository: Path,
    families: Sequence[str],
    out_root: Path,
    settings: LoadSettings,
    data: EvalData | None = None,
) -> None:
    """Compare each family on a running server and print its table (for `make demo`)."""
    from sparseserve.compare.report import text_table

    for family in families:
        out = out_root / family
        comparison = run_and_report(
            family, out, settings, url=url, metrics_url=metrics_url, repository=repository,
            data=data, progress=False,
        )  # fmt: skip
        print(f"\n{family}: {settings.concurrency} concurrent requests, "
              f"{settings.duration_seconds:g} s per variant ({out / 'report.html'})")  # fmt: skip
        print(text_table(comparison))
