"""`sparseserve compare` from a real run: the report's figures are the load run's and
the server's own metrics, checked here against a scrape of the same server. That server
shadows the pruned variant with the dense baseline, so agreement and cosine come from
its shadow series; a server without a policy (`--repository`) gives probe agreement."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sparseserve.compare.figures import MEMORY_RESOLUTION_BYTES
from sparseserve.compare.report import PLOTS
from sparseserve.compare.server_metrics import MODEL_GAUGES
from sparseserve.repository.manifest import VariantManifest
from sparseserve.server.process import ServerProcess
from tests.integration.test_prometheus import SHADOW_POLICY
from tests.scrape import scrape, values
from tests.variants import DENSE, FAMILY, PRUNED, build_family

pytestmark = pytest.mark.integration

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LOAD = ("--duration", "1.5", "--rounds", "3", "--concurrency", "2", "--no-progress")


def sparseserve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sparseserve", *args], capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


@pytest.fixture(scope="module")
def family_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_family(tmp_path_factory.mktemp("compare-repository"))


@pytest.fixture(scope="module")
def run(family_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """One comparison against a running server that shadows the pruned variant with the
    dense baseline; the server is scraped before and after it."""
    out = tmp_path_factory.mktemp("report")
    policy = tmp_path_factory.mktemp("traffic") / "policy.yaml"
    policy.write_text(SHADOW_POLICY)
    with ServerProcess(family_repository, "--traffic-policy", str(policy)) as server:
        before = scrape(server)
        result = sparseserve(
            "compare", "--family", FAMILY, "--url", server.grpc_url,
            "--metrics-url", server.metrics_url, "--repository", str(family_repository),
            "--output", str(out), *LOAD,
        )  # fmt: skip
        after = scrape(server)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "report.json").read_text())
    yield {
        "out": out,
        "stdout": result.stdout,
        "report": report,
        "variants": {v["model"]: v for v in report["variants"]},
        "before": before,
        "after": after,
        "repository": family_repository,
    }


def test_the_report_files_are_written(run: dict) -> None:
    out: Path = run["out"]
    markdown = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    for name in PLOTS:
        assert (out / name).read_bytes().startswith(PNG_MAGIC), name
        assert f"]({name})" in markdown
        assert f"src='{name}'" in page
    assert f"# {FAMILY}: sparse versus dense" in markdown
    assert set(run["variants"]) == {DENSE, PRUNED}
    assert run["report"]["baseline"] == "dense"


def test_request_counts_match_the_server(run: dict) -> None:
    """Every request the run sent (warm-up, probes, load) is the server's count, and the
    report's server-side count is what the scrape says."""
    for model, figures in run["variants"].items():
        sent = sum(values(run["after"], "sparseserve_requests_total", model=model)) - sum(
            values(run["before"], "sparseserve_requests_total", model=model)
        )
        assert figures["requests_ok"] > 50
        assert figures["requests_failed"] == 0
        assert figures["requests_sent"] == sent
        assert figures["server_requests"] == sent
        assert figures["server_errors"] == 0


def test_server_latency_lies_in_the_scraped_median_bucket(run: dict) -> None:
    """The report's server p50 falls in the bucket of the scraped histogram (this run's
    observations) that holds the median request."""
    for model, figures in run["variants"].items():
        counts: dict[float, float] = {}
        for sample in run["after"]:
            if sample.name == "sparseserve_request_duration_seconds_bucket" and (
                sample.labels["model"] == model
            ):
                counts[float(sample.labels["le"])] = sample.value
        for sample in run["before"]:
            if sample.name == "sparseserve_request_duration_seconds_bucket" and (
                sample.labels["model"] == model
            ):
                counts[float(sample.labels["le"])] -= sample.value
        bounds = sorted(counts)
        half = counts[math.inf] / 2
        upper = next(b for b in bounds if counts[b] >= half)
        lower = max([0.0, *(b for b in bounds if b < upper)])
        assert lower <= figures["server_p50_s"] <= upper, (model, lower, upper)
        client = [figures[f"latency_{p}_s"] for p in ("p50", "p95", "p99")]
        assert 0 < client[0] <= client[1] <= client[2]


def test_model_figures_are_the_servers_gauges(run: dict) -> None:
    """Size, parameters, sparsity and memory are the server's gauges; the manifest adds
    only the accuracy it records."""
    for model, figures in run["variants"].items():
        for name, metric in MODEL_GAUGES.items():
            (expected,) = values(run["after"], metric, model=model)
            assert figures[name] == {"value": expected, "source": "server metrics"}, (model, name)
        manifest = VariantManifest.read(run["repository"] / model / "sparseserve.yaml")
        assert figures["manifest_quality"] == {q.metric: q.value for q in manifest.quality}


def _shadow_delta(run: dict, name: str) -> float:
    key = {"family": FAMILY, "variant": "pruned80", "baseline": "dense"}
    return sum(values(run["after"], name, **key)) - sum(values(run["before"], name, **key))


def test_agreement_and_cosine_are_the_servers_shadow_series(run: dict) -> None:
    """With a shadow policy, agreement and cosine are the shadow counters' increase over
    the run (compare waits for the shadow queue to drain before its last scrape)."""
    pruned = run["variants"][PRUNED]
    rows = _shadow_delta(run, "sparseserve_shadow_compared_rows_total")
    agreed = _shadow_delta(run, "sparseserve_shadow_top1_agreements_total")
    cosine = _shadow_delta(run, "sparseserve_shadow_cosine_sum") / _shadow_delta(
        run, "sparseserve_shadow_cosine_count"
    )
    assert rows > 256  # the probe rows and the load's
    assert pruned["agreement_rows"] == rows
    assert pruned["agreement"] == {
        "value": pytest.approx(agreed / rows),
        "source": "shadow traffic",
    }
    assert pruned["cosine"] == {"value": pytest.approx(cosine), "source": "shadow traffic"}
    assert run["variants"][DENSE]["agreement"] == {"value": None, "source": None}
    print(f"agreement {agreed / rows:.4f} on {rows:g} shadowed rows, cosine {cosine:.4f}")


def test_verdicts_say_what_the_numbers_say(run: dict) -> None:
    dense, pruned = run["variants"][DENSE], run["variants"][PRUNED]
    assert dense["verdict"] == "baseline"
    speedup = dense["latency_p50_s"] / pruned["latency_p50_s"]
    assert pruned["speedup_p50"] == pytest.approx(speedup)
    # A difference is claimed only when every round of the turns agrees on its side.
    rounds = pruned["round_speedups"]
    assert len(rounds) == run["report"]["rounds"]
    if speedup >= 1.1 and all(r > 1 for r in rounds):
        assert pruned["verdict"].startswith(f"{speedup:.1f}x faster")
    elif speedup <= 1 / 1.1 and all(r < 1 for r in rounds):
        assert pruned["verdict"].startswith(f"{1 / speedup:.1f}x slower than dense")
    else:
        assert pruned["verdict"].startswith("no faster than dense")
    # Memory is claimed only beyond the measurement's resolution.
    difference = abs(dense["memory_bytes"]["value"] - pruned["memory_bytes"]["value"])
    if difference < MEMORY_RESOLUTION_BYTES:
        assert "x less memory" not in pruned["verdict"]
        assert "x more memory" not in pruned["verdict"]
    # Same file size (zeros are stored).
    assert "no smaller" in pruned["verdict"]
    assert f"{pruned['agreement']['value']:.1%} agreement" in pruned["verdict"]
    assert re.search(rf"^{re.escape(PRUNED)}\s.*{re.escape(pruned['verdict'])}$",
                     run["stdout"], re.MULTILINE)  # fmt: skip


def test_compare_starts_its_own_server_on_a_repository(
    family_repository: Path, tmp_path: Path
) -> None:
    result = sparseserve(
        "compare", "--family", FAMILY, "--repository", str(family_repository),
        "--output", str(tmp_path), "--duration", "0.5", "--rounds", "1", "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert [v["model"] for v in report["variants"]] == [DENSE, PRUNED]
    assert all(v["requests_ok"] > 0 for v in report["variants"])
    # No shadow policy: agreement and cosine on the 256 probe rows.
    pruned = report["variants"][1]
    assert pruned["agreement"]["source"] == pruned["cosine"]["source"] == "probe inputs"
    assert 0 <= pruned["agreement"]["value"] <= 1
    assert pruned["agreement_rows"] == 256


def test_progress_bar_on_stderr(family_repository: Path, tmp_path: Path) -> None:
    result = sparseserve(
        "compare", "--family", FAMILY, "--repository", str(family_repository),
        "--output", str(tmp_path), "--duration", "0.4", "--rounds", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert re.search(rf"\[#+\] 100%  {re.escape(PRUNED)} \(round 2/2\)", result.stderr)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--family", "no-such-family"), "no ready variant of family 'no-such-family'; "
                                         f"families served: {FAMILY}"),
        (("--family", FAMILY, "--baseline", "int4"), "--baseline 'int4' is not a variant"),
        (("--family", FAMILY, "--concurrency", "0"), "concurrency must be 1..256, got 0"),
    ],
)  # fmt: skip
def test_bad_requests_get_a_clear_error(
    family_repository: Path, tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    result = sparseserve(
        "compare", *args, "--repository", str(family_repository), "--output", str(tmp_path),
        "--duration", "0.2", "--rounds", "1", "--no-progress",
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr


def test_an_unreachable_server_is_named(tmp_path: Path) -> None:
    result = sparseserve(
        "compare", "--family", FAMILY, "--url", "127.0.0.1:9",
        "--metrics-url", "http://127.0.0.1:9/metrics", "--output", str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 2
    assert "no Open Inference Protocol server answers at --url 127.0.0.1:9" in result.stderr
