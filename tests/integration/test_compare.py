"""`sparseserve compare` from a real run: the report's figures are the load run's and
the server's own metrics, checked here against a scrape of the same server. That server
shadows the pruned variant with the dense baseline, so agreement and cosine come from
its shadow series; a server without a policy (`--repository`) gives probe agreement.
The test family has no evaluation data, so its rows are random and the report says so;
`--data` and an `eval.npz` beside the baseline give real rows."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from sparseserve.client.server_process import ServerProcess
from sparseserve.compare.figures import MEMORY_RESOLUTION_BYTES
from sparseserve.compare.report import PLOTS
from sparseserve.compare.screenshot import find_browser, screenshot
from sparseserve.compare.server_metrics import MODEL_GAUGES
from sparseserve.compare.verdict import RANDOM_CAVEAT, SERVER_MEAN, SpeedEstimate, speed_estimate
from sparseserve.repository.eval_data import EVAL_DATA_FILENAME, write_eval_data
from sparseserve.repository.manifest import VariantManifest
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
        durations = {
            name: sum(values(run["after"], name, model=model))
            - sum(values(run["before"], name, model=model))
            for name in ("sparseserve_request_duration_seconds_sum",
                         "sparseserve_request_duration_seconds_count")
        }  # fmt: skip
        assert figures["server_mean_s"] == pytest.approx(
            durations["sparseserve_request_duration_seconds_sum"]
            / durations["sparseserve_request_duration_seconds_count"]
        )
        client = [figures[f"latency_{p}_s"] for p in ("p50", "p95", "p99")]
        assert 0 < client[0] <= client[1] <= client[2]


def test_model_figures_are_the_servers_gauges(run: dict) -> None:
    """Size, parameters, sparsity, sparse-kernel layers and memory are the server's
    gauges; the manifest adds only the accuracy it records."""
    for model, figures in run["variants"].items():
        for name, metric in MODEL_GAUGES.items():
            (expected,) = values(run["after"], metric, model=model)
            assert figures[name] == {"value": expected, "source": "server metrics"}, (model, name)
        # onnxruntime has no sparse kernel: a pruned variant's zeros are not skipped there.
        assert figures["sparse_kernel_layers"]["value"] == 0
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
    """The speed verdict is the rule applied to the server's own mean request duration
    of each round, and says so; memory is claimed only beyond its resolution; agreement
    on this family's random rows says it is no quality measure."""
    dense, pruned = run["variants"][DENSE], run["variants"][PRUNED]
    assert dense["verdict"] == "baseline"
    assert pruned["speedup_p50"] == pytest.approx(dense["latency_p50_s"] / pruned["latency_p50_s"])
    rounds = run["report"]["rounds"]
    means = dense["server_round_mean_s"], pruned["server_round_mean_s"]
    assert len(means[0]) == len(means[1]) == len(pruned["server_round_p50_s"]) == rounds
    assert all(m is not None and m > 0 for m in [*means[0], *means[1]])
    expected = speed_estimate(*means, SERVER_MEAN)
    assert expected is not None
    assert pruned["speed"] == pytest.approx(expected.__dict__)
    words = SpeedEstimate(**pruned["speed"]).words("dense")
    assert pruned["verdict"].startswith(words)
    assert SERVER_MEAN in pruned["verdict"]  # it names the latency it used, in any wording
    difference = abs(dense["memory_bytes"]["value"] - pruned["memory_bytes"]["value"])
    if difference < MEMORY_RESOLUTION_BYTES:
        assert "same memory (within 1 MiB)" in pruned["verdict"]
    # Same file size (zeros are stored).
    assert "no smaller" in pruned["verdict"]
    assert pruned["verdict"].endswith(
        f"{pruned['agreement']['value']:.1%} agreement {RANDOM_CAVEAT}"
    )
    # The terminal table, then a verdict per variant on a line of its own.
    assert re.search(rf"^  {re.escape(PRUNED)}\s+{re.escape(pruned['verdict'])}$",
                     run["stdout"], re.MULTILINE)  # fmt: skip
    assert max(len(line) for line in run["stdout"].splitlines() if "|" not in line) < 200


def test_random_rows_are_named_in_the_table_and_the_report(run: dict) -> None:
    assert run["report"]["random_data"] is True
    assert run["report"]["data"].startswith("random inputs")
    assert re.search(rf"^{re.escape(PRUNED)}\s.*\d+\.\d% \(random inputs\)", run["stdout"],
                     re.MULTILINE)  # fmt: skip
    page = (run["out"] / "report.html").read_text()
    assert "agreement below is on random rows and is not a quality measure" in page
    assert "not a quality measure" in (run["out"] / "report.md").read_text()


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
    # No shadow policy: agreement and cosine on the 256 random probe rows.
    pruned = report["variants"][1]
    assert pruned["agreement"]["source"] == pruned["cosine"]["source"] == "probe inputs"
    assert 0 <= pruned["agreement"]["value"] <= 1
    assert pruned["agreement_rows"] == 256
    assert report["random_data"] is True
    assert RANDOM_CAVEAT in pruned["verdict"]


def run_onnx(repository: Path, model: str, rows: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(repository / model / "1" / "model.onnx"))
    return session.run(None, {"input": rows})[0]


@pytest.fixture(scope="module")
def plain_server(family_repository: Path) -> Iterator[ServerProcess]:
    """A server without a traffic policy, for the comparisons that only change the rows."""
    with ServerProcess(family_repository) as server:
        yield server


def against(server: ServerProcess, repository: Path, out: Path, *extra: str) -> list[str]:
    return [
        "compare", "--family", FAMILY, "--url", server.grpc_url, "--metrics-url",
        server.metrics_url, "--repository", str(repository), "--output", str(out),
        "--duration", "0.5", "--rounds", "2", "--no-progress", *extra,
    ]  # fmt: skip


def compare_report(
    server: ServerProcess, repository: Path, out: Path, *extra: str
) -> tuple[dict, str]:
    result = sparseserve(*against(server, repository, out, *extra))
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads((out / "report.json").read_text()), result.stdout


def test_data_file_rows_drive_agreement(
    plain_server: ServerProcess, family_repository: Path, tmp_path: Path
) -> None:
    """--data: agreement is on the file's rows, exactly what the two models say on them."""
    rows = np.random.default_rng(7).normal(0.5, 2.0, (300, 64)).astype(np.float32)
    np.save(tmp_path / "rows.npy", rows)
    report, stdout = compare_report(plain_server, family_repository, tmp_path / "out",
                                    "--data", str(tmp_path / "rows.npy"))  # fmt: skip
    dense = run_onnx(family_repository, DENSE, rows).argmax(axis=1)
    pruned_classes = run_onnx(family_repository, PRUNED, rows).argmax(axis=1)
    pruned = report["variants"][1]
    assert pruned["agreement_rows"] == 300
    assert pruned["agreement"]["value"] == pytest.approx(float((dense == pruned_classes).mean()))
    assert report["random_data"] is False
    assert report["data"].startswith("300 rows of rows.npy, from --data")
    assert RANDOM_CAVEAT not in pruned["verdict"] and "random" not in stdout


def test_the_familys_evaluation_sample_is_used(
    plain_server: ServerProcess, family_repository: Path, tmp_path: Path
) -> None:
    """An eval.npz beside the baseline (as `sparseserve sparsify` writes it) drives the
    comparison without --data, and its labels give accuracy through the server (which
    serves the same models from the original repository)."""
    repository = tmp_path / "repository"
    shutil.copytree(family_repository, repository)
    rows = np.random.default_rng(3).random((200, 64), dtype=np.float32)
    labels = np.arange(200) % 10
    write_eval_data(repository / DENSE / EVAL_DATA_FILENAME, {"input": rows},
                    "two hundred test rows", labels)  # fmt: skip
    report, _ = compare_report(plain_server, repository, tmp_path / "out")
    assert report["random_data"] is False
    assert report["data"].startswith(
        "200 rows of two hundred test rows, from the family's evaluation sample"
    )
    for figures in report["variants"]:
        predicted = run_onnx(repository, figures["model"], rows).argmax(axis=1)
        assert figures["probe_accuracy"] == pytest.approx(float((predicted == labels).mean()))
    assert report["variants"][1]["agreement_rows"] == 200


@pytest.mark.slow
def test_data_that_does_not_fit_the_model_is_refused(
    plain_server: ServerProcess, family_repository: Path, tmp_path: Path
) -> None:
    np.save(tmp_path / "narrow.npy", np.zeros((10, 63), dtype=np.float32))
    np.savez(tmp_path / "named.npz", pixels=np.zeros((10, 64)), mask=np.ones((10, 64)))
    for name, message in (
        ("narrow.npy", "rows of 'input' have 63 values, the model wants 64 per row"),
        ("named.npz", "no array for input(s) ['input']; the model's inputs are ['input']"),
        ("missing.npz", "missing.npz: no such file"),
    ):
        result = sparseserve(*against(plain_server, family_repository, tmp_path / "out",
                                      "--data", str(tmp_path / name)))  # fmt: skip
        assert result.returncode == 2, result.stdout + result.stderr
        assert message in result.stderr, result.stderr
    assert plain_server.process is not None and plain_server.process.poll() is None


@pytest.mark.skipif(
    find_browser() is None and os.environ.get("SPARSESERVE_REQUIRE_BROWSER") != "1",
    reason="no Chromium on PATH (`make test` installs it as root; CI requires it)",
)
def test_the_report_screenshots_in_a_browser(run: dict, tmp_path: Path) -> None:
    """What `make report-screenshot` does: the page renders, its plots included."""
    out = screenshot(run["out"] / "report.html", tmp_path / "shot.png", height=3000)
    png = out.read_bytes()
    assert png.startswith(PNG_MAGIC)
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (1600, 3000)


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
    assert result.returncode == 1  # no wrong argument (that is 2): nothing answers there
    assert "no Open Inference Protocol server answers at --url 127.0.0.1:9" in result.stderr
