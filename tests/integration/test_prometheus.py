"""The monitoring as deployed, tested with the real thing: promtool checks the scrape
config and the rules (and runs their unit tests), and a real Prometheus scrapes two
real sparseserve deployments under tritonclient load while every recording rule and
every Grafana panel query is asserted to return data.

The two deployments: "sparse" serves both variants of a family on the CPU (batching
on), and its traffic policy shadows every request the pruned variant answers with the
dense baseline (the shadow series: agreement, cosine, largest difference); "dense"
serves only the dense variant, dispatched to a "Triton" that is the sparse deployment's
server (Triton itself cannot run here, its protocol can; this gives the dispatch
series: who served, fallbacks, circuit breaker).
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from sparseserve.client.server_process import ServerProcess
from tests.prometheus_harness import (
    DASHBOARD,
    DEPLOY,
    ROOT,
    PrometheusProcess,
    Query,
    QueryChecker,
    binary,
    dashboard_queries,
    family,
    recording_rules,
)
from tests.scrape import scrape, values
from tests.variants import DENSE, FAMILY, PRUNED, build_family

pytestmark = pytest.mark.integration

DEPLOYMENTS = ("sparse", "dense")
# Grafana's multi-value form of the template variables, every value selected.
VARIABLES = {"deployment": "(sparse|dense)", "family": f"({FAMILY})", "variant": "(dense|pruned80)"}
RATE_INTERVAL = "30s"
# The sparse deployment's traffic policy: every request the pruned variant answers is
# run on the dense baseline too (docs/traffic.md), which gives the shadow series with
# variant="pruned80", baseline="dense".
SHADOW_POLICY = f"""\
families:
  {FAMILY}:
    shadow: {{variants: [dense], fraction: 1.0}}
"""
SETTLE_SECONDS = 90


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary("promtool"), *args], capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def test_promtool_accepts_the_scrape_config() -> None:
    result = promtool("check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 rule files found" in result.stdout


def test_promtool_accepts_the_rules() -> None:
    files = sorted(str(p) for p in (DEPLOY / "prometheus" / "rules").glob("*.yml"))
    assert [Path(f).name for f in files] == ["sparseserve.alerts.yml", "sparseserve.rules.yml"]
    result = promtool("check", "rules", *files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass() -> None:
    """Speedup, memory and size ratios, error ratio, agreement and every alert, on
    synthetic series with known answers (tests/prometheus/sparseserve.rules.test.yml)."""
    result = promtool("test", "rules", str(ROOT / "tests/prometheus/sparseserve.rules.test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_a_wrong_expectation_fails_the_rule_unit_tests(tmp_path: Path) -> None:
    """The unit tests can fail: the same file with one expected value changed does."""
    text = (ROOT / "tests/prometheus/sparseserve.rules.test.yml").read_text()
    text = text.replace("../../deploy", str(DEPLOY)).replace("value: 0.99\n", "value: 0.97\n")
    (tmp_path / "wrong.test.yml").write_text(text)
    result = promtool("test", "rules", str(tmp_path / "wrong.test.yml"))
    assert result.returncode != 0
    assert "ratio_rate5m" in result.stdout + result.stderr


class Load:
    """tritonclient traffic in a thread until stopped: good requests of both variants
    (batches of 1 and 4 rows of random inputs, so that the shadow comparison sees
    different answers), some invalid ones, and some for a model that does not exist, so
    that every status series has samples."""

    def __init__(self, url: str, models: tuple[str, ...]):
        self.url = url
        self.models = models
        self.stop = threading.Event()
        self.sent = 0
        self.rng = np.random.default_rng(0)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _request(self, client: triton.InferenceServerClient, model: str, rows: int, width: int):
        tensor = triton.InferInput("input", [rows, width], "FP32")
        tensor.set_data_from_numpy(self.rng.random((rows, width), dtype=np.float32))
        client.infer(model, [tensor])

    def _run(self) -> None:
        with triton.InferenceServerClient(self.url) as client:
            while not self.stop.is_set():
                for model in self.models:
                    self._request(client, model, 1 + 3 * (self.sent % 2), 64)
                self.sent += 1
                if self.sent % 10 == 0:
                    for model, width in ((self.models[-1], 63), ("no-such-model", 64)):
                        with contextlib.suppress(InferenceServerException):
                            self._request(client, model, 1, width)
                time.sleep(0.01)  # a few hundred requests a second: enough, and gentle


@dataclass
class Stack:
    prometheus: PrometheusProcess
    servers: dict[str, ServerProcess]
    exported: set[str]
    checker: QueryChecker
    dashboard: dict
    settled: list[str]  # problems left when the stack stopped waiting


# What the tests below expect beyond "every query returns data", as queries that return
# data once it holds: the stack waits for these too. (A query returns data as soon as one
# deployment has it; these ask for each.)
SETTLED = [
    Query("both deployments", "count(deployment:sparseserve_request_duration_seconds:p99) == 2"),
    Query(
        "both variants", 'count(variant:sparseserve_requests:rate1m{deployment="sparse"} > 0) == 2'
    ),
    Query("shadow rows", "sum(sparseserve_shadow_compared_rows_total) > 100"),
]


def all_queries(dashboard: dict) -> list[Query]:
    rules = [Query(f"rule {name}", name) for name in recording_rules()]
    return rules + dashboard_queries(dashboard, VARIABLES, RATE_INTERVAL) + SETTLED


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    binary("prometheus")
    repository = build_family(tmp_path_factory.mktemp("monitoring-repository"))
    (repository / "broken" / "1").mkdir(parents=True)  # sparseserve_model_load_failed
    (repository / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx model")
    policy = tmp_path_factory.mktemp("traffic") / "policy.yaml"
    policy.write_text(SHADOW_POLICY)
    batching = {
        "SPARSESERVE_BATCHING__ENABLED": "true",
        # Measured on both CPU engines at load: the candidate latency series.
        "SPARSESERVE_CPU_ENGINE_OVERRIDES": json.dumps({PRUNED: "auto"}),
    }
    with ServerProcess(
        repository, "--traffic-policy", str(policy), env=batching
    ) as sparse, ServerProcess(
        repository, "--load-model", DENSE, "--dispatch", "triton", "--triton-url", sparse.grpc_url
    ) as dense:  # fmt: skip
        servers = {"sparse": sparse, "dense": dense}
        loads = [Load(sparse.grpc_url, (DENSE, PRUNED)), Load(dense.grpc_url, (DENSE,))]
        for load in loads:
            load.thread.start()
        targets = {name: f"127.0.0.1:{s.metrics_port}" for name, s in servers.items()}
        try:
            with PrometheusProcess(targets) as prometheus:
                dashboard = json.loads(DASHBOARD.read_text())
                deadline = time.monotonic() + SETTLE_SECONDS
                while True:
                    # Scraped anew each time: a series appears with its first sample
                    # (a shadow series with the first shadow run).
                    exported = {s.name for server in servers.values() for s in scrape(server)}
                    checker = QueryChecker(prometheus, exported, recording_rules())
                    problems = checker.problems(all_queries(dashboard))
                    if not problems or time.monotonic() > deadline:
                        break
                    time.sleep(1.0)
                yield Stack(prometheus, servers, exported, checker, dashboard, problems)
        finally:
            for load in loads:
                load.stop.set()
                load.thread.join(10)


def test_every_recording_rule_returns_data(stack: Stack) -> None:
    queries = [Query(f"rule {name}", name) for name in recording_rules()]
    assert len(queries) == 24
    problems = stack.checker.problems(queries)
    assert problems == [], "\n".join(problems)


def test_every_dashboard_query_returns_data(stack: Stack) -> None:
    queries = dashboard_queries(stack.dashboard, VARIABLES, RATE_INTERVAL)
    assert len(queries) == 37
    problems = stack.checker.problems(queries)
    assert problems == [], "\n".join(problems)


def test_the_dashboard_compares_both_deployments(stack: Stack) -> None:
    """Per-deployment panels have a series for each deployment, and the per-variant
    panels show both variants of the sparse deployment."""
    p99 = stack.prometheus.query(
        'deployment:sparseserve_request_duration_seconds:p99{deployment=~"(sparse|dense)"}'
    )
    assert {s["metric"]["deployment"] for s in p99} == set(DEPLOYMENTS)
    rate = stack.prometheus.query('variant:sparseserve_requests:rate1m{deployment="sparse"}')
    assert {s["metric"]["variant"] for s in rate} == {"dense", "pruned80"}
    assert all(float(s["value"][1]) > 0 for s in rate)


def test_template_variables_list_what_is_served(stack: Stack) -> None:
    """Each `label_values(metric{...}, label)` variable query, with the variables it
    depends on substituted, lists the deployments, the family and its variants."""
    expected = {
        "deployment": set(DEPLOYMENTS),
        "family": {FAMILY},
        "variant": {"dense", "pruned80"},
    }
    for variable in stack.dashboard["templating"]["list"]:
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]["query"])
        assert match, variable["query"]
        selector, label = match.groups()
        for name, value in VARIABLES.items():
            selector = selector.replace(f"${name}", value)
        values = stack.prometheus.api(f"label/{label}/values", **{"match[]": selector})
        assert set(values) == expected[variable["name"]], (variable["name"], values)


def test_every_rule_evaluates_without_error(stack: Stack) -> None:
    """Prometheus loaded every recording and alerting rule and evaluates them cleanly."""
    data = stack.prometheus.api("rules")
    rules = [rule for group in data["groups"] for rule in group["rules"]]
    assert len([r for r in rules if r["type"] == "alerting"]) == 6
    assert len([r for r in rules if r["type"] == "recording"]) == 24
    broken = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert broken == []


def test_a_query_of_a_metric_the_service_does_not_export_fails_the_check(stack: Stack) -> None:
    """The checker itself: a dashboard with one more panel, whose query names a metric
    sparseserve does not export, is reported, naming it."""
    dashboard = json.loads(json.dumps(stack.dashboard))
    typo = 'sum by (variant) (rate(sparseserve_request_total{variant=~"$variant"}[5m]))'
    dashboard["panels"].append({"title": "Typo", "targets": [{"refId": "A", "expr": typo}]})
    problems = stack.checker.problems(dashboard_queries(dashboard, VARIABLES, RATE_INTERVAL))
    assert len(problems) == 1
    assert 'panel "Typo" A names sparseserve_request_total' in problems[0]


def test_a_query_without_data_fails_the_check(stack: Stack) -> None:
    """An exported metric with a selector that matches nothing is reported too."""
    query = Query("panel x", 'sparseserve_model_ready{family="no-such-family"}')
    (problem,) = stack.checker.problems([query])
    assert "returns no data" in problem


def test_a_legend_naming_a_label_the_series_lack_fails_the_check(stack: Stack) -> None:
    """Shadow series are labelled family, variant and baseline, not model: a legend
    naming `model` on them is reported."""
    expr = "sum by (deployment, family, variant, baseline) (sparseserve_shadow_compared_rows_total)"
    query = Query('panel "Rows"', expr, "{{deployment}} {{ model }} vs {{baseline}}")
    (problem,) = stack.checker.problems([query])
    assert "its series lack model" in problem
    assert stack.checker.problems([Query('panel "Rows"', expr, "{{variant}}")]) == []


def test_every_documented_series_is_exported(stack: Stack) -> None:
    """Every sparseserve series docs/metrics.md documents is exported by these two
    deployments, so every query over one of them above was checked against data."""
    documented = set(
        re.findall(r"`(sparseserve_[a-z0-9_]+)", (ROOT / "docs/metrics.md").read_text())
    )
    exported = {family(name) for name in stack.exported} | stack.exported
    assert len(documented) >= 28
    assert documented - exported == set()


def test_agreement_is_the_servers_shadow_counters(stack: Stack) -> None:
    """The agreement rule compares the pruned variant with the dense baseline, labelled
    so, and its value is what the sparse server's own shadow counters say (the rule is
    a rate over the run so far, the counters a total: equal up to sampling)."""
    (sample,) = stack.prometheus.query("variant:sparseserve_shadow_top1_agreement:ratio_rate5m")
    labels = {k: v for k, v in sample["metric"].items() if k not in ("__name__", "job")}
    assert labels == {
        "deployment": "sparse", "family": FAMILY, "variant": "pruned80", "baseline": "dense"
    }  # fmt: skip
    samples = scrape(stack.servers["sparse"])
    agreed = sum(values(samples, "sparseserve_shadow_top1_agreements_total"))
    compared = sum(values(samples, "sparseserve_shadow_compared_rows_total"))
    assert compared > 100
    assert float(sample["value"][1]) == pytest.approx(agreed / compared, abs=0.05)
    assert values(samples, "sparseserve_shadow_runs_total", outcome="compared")[0] > 0
    print(f"agreement {float(sample['value'][1]):.4f} (rule), {agreed / compared:.4f} "
          f"({agreed:g} of {compared:g} rows, counters)")  # fmt: skip


def test_the_stack_settled(stack: Stack) -> None:
    """Everything passed within the settling time (the other tests say what failed)."""
    assert stack.settled == []
