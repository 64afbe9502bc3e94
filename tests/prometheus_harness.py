"""A real Prometheus for the monitoring tests, and the checker of PromQL queries.

Prometheus and promtool come from Debian's `prometheus` package, which `make test`
installs (as root). Without them the tests skip, saying so; with
SPARSESERVE_REQUIRE_PROMETHEUS=1 (CI) they fail instead.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
RULE_FILES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "sparseserve.json"


def binary(name: str) -> str:
    """The path of `prometheus` or `promtool`; skip (or fail, when required) without it."""
    found = shutil.which(name)
    if found:
        return found
    reason = (
        f"{name} is not installed: `make prometheus` installs Debian's prometheus package "
        "(needs root; `make test` runs it)"
    )
    if os.environ.get("SPARSESERVE_REQUIRE_PROMETHEUS") == "1":
        pytest.fail(reason + " and SPARSESERVE_REQUIRE_PROMETHEUS=1 requires it")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrometheusProcess:
    """`prometheus` on a free loopback port with a temporary storage directory, scraping
    `targets` ({deployment: "host:port"}) as the deploy scrape config does, every
    `interval`, and evaluating the deploy rule files at the same interval."""

    def __init__(self, targets: Mapping[str, str], interval: str = "1s"):
        self._tmp = tempfile.TemporaryDirectory(prefix="prometheus-")
        tmp = Path(self._tmp.name)
        config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
        config["global"] = {"scrape_interval": interval, "evaluation_interval": interval}
        config["rule_files"] = [str(path) for path in RULE_FILES]
        (job,) = config["scrape_configs"]
        del job["file_sd_configs"]  # compose's targets file; the test's targets instead
        job["static_configs"] = [
            {"targets": [target], "labels": {"deployment": deployment}}
            for deployment, target in targets.items()
        ]
        self.config_path = tmp / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.storage = tmp / "data"
        self.log_path = tmp / "prometheus.log"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> PrometheusProcess:
        self.port = _free_port()
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                binary("prometheus"),
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.storage}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"prometheus not ready in {timeout}s:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def api(self, path: str, **params: str) -> object:
        """GET /api/v1/<path>; the `data` of a successful answer."""
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """An instant query's result vector (raises on a PromQL error)."""
        data = self.api("query", query=expr)
        assert isinstance(data, dict)
        return data["result"]

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None:
            self._log.close()
        self._tmp.cleanup()

    def __enter__(self) -> PrometheusProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --- the checker ---------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count", "_created")


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression reads: identifiers outside strings that are
    sparseserve's (`sparseserve_...`), the process collector's (`process_...`),
    recording rules (they contain a colon) or `up`. Functions, keywords and label names
    are none of these."""
    bare = _STRING.sub('""', expr)
    return {
        name
        for name in _IDENTIFIER.findall(bare)
        if name.startswith(("sparseserve_", "process_")) or ":" in name or name == "up"
    }


def family(name: str) -> str:
    """A sample name's metric family: `x_bucket` -> `x` (counters keep `_total`)."""
    for suffix in _HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


_LEGEND_LABEL = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


@dataclass(frozen=True)
class Query:
    where: str  # 'panel "Throughput" A', 'rule variant:...'
    expr: str
    legend: str = ""  # a panel target's legendFormat: the labels it names must exist


def recording_rules(paths: Iterable[Path] = RULE_FILES) -> dict[str, str]:
    """{recorded name: expression} of every recording rule."""
    rules = {}
    for path in paths:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "record" in rule:
                    rules[rule["record"]] = rule["expr"]
    return rules


def dashboard_queries(
    dashboard: Mapping, variables: Mapping[str, str], rate_interval: str
) -> list[Query]:
    """Every panel target's expression with the template variables substituted as
    Grafana would (`$name` -> the value given here; `$__rate_interval`)."""

    def substitute(expr: str) -> str:
        expr = expr.replace("$__rate_interval", rate_interval)
        for name in sorted(variables, key=len, reverse=True):
            expr = expr.replace(f"${{{name}}}", variables[name]).replace(
                f"${name}", variables[name]
            )
        assert "$" not in expr, f"unsubstituted variable in {expr}"
        return expr

    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            where = f'panel "{panel["title"]}" {target["refId"]}'
            queries.append(Query(where, substitute(target["expr"]), target.get("legendFormat", "")))
    return queries


class QueryChecker:
    """Says what is wrong with queries against a Prometheus scraping a real server.

    A query may name only series the server exports (`exported`, sample names from
    its endpoint) or recording rules, and must return at least one finite value. Every
    label its legend names must be on every series it returns (a legend naming a label
    the series lack, say `model` on a shadow series, shows a blank in Grafana).
    """

    def __init__(
        self, prometheus: PrometheusProcess, exported: set[str], recorded: Mapping[str, str]
    ):
        self.prometheus = prometheus
        self.exported = {family(name) for name in exported} | exported
        self.recorded = recorded

    def problem(self, query: Query) -> str | None:
        unknown = sorted(
            name
            for name in metric_names(query.expr)
            if name not in self.exported
            and family(name) not in self.exported
            and name not in self.recorded
        )
        if unknown:
            return (
                f"{query.where} names {', '.join(unknown)}, which sparseserve does not export "
                f"(and no recording rule records): {query.expr}"
            )
        result = self.prometheus.query(query.expr)
        values = [float(sample["value"][1]) for sample in result]
        if not any(math.isfinite(v) for v in values):
            return (
                f"{query.where} returns no data ({len(values)} series, none finite): {query.expr}"
            )
        missing = sorted(
            {
                label
                for label in _LEGEND_LABEL.findall(query.legend)
                for sample in result
                if label not in sample["metric"]
            }
        )
        if missing:
            return (
                f"{query.where} has legend {query.legend!r}, but its series lack "
                f"{', '.join(missing)}: {query.expr}"
            )
        return None

    def problems(self, queries: Iterable[Query]) -> list[str]:
        return [p for p in (self.problem(q) for q in queries) if p is not None]
