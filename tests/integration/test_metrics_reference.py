"""Every series docs/metrics.md lists is exported, with exactly the documented labels,
after real traffic: family requests, a shadow comparison, a request that fails, one for
an unknown model, and a model dispatched to "Triton" (a second real sparseserve on a
loopback port, as in test_dispatch.py; `--assume-gpus 1` stands in for the GPU).

The list of names comes from the document itself, so a series documented but not
exported (or exported under another name) fails here.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from prometheus_client.samples import Sample
from tritonclient.utils import InferenceServerException

from sparseserve.client.server_process import ServerProcess
from sparseserve.observability.memory import directory_bytes
from tests import routing_repository
from tests.routing_repository import FAMILY, pixels
from tests.scrape import scrape, value, values

pytestmark = pytest.mark.integration

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
LABELS = {"model", "version", "family", "variant", "backend"}
SHADOW = {"family", "variant", "baseline"}
# Labels beyond a section's label set, as the document describes them.
EXTRA = {
    "sparseserve_requests_total": {"code"},
    "sparseserve_model_info": {"baseline", "is_baseline", "method", "quantization", "precision"},
    "sparseserve_engine_candidate_latency_seconds": {"engine"},
    "sparseserve_shadow_runs_total": {"outcome"},
    "sparseserve_unroutable_requests_total": {"code"},
    "sparseserve_backend_up": {"backend"},
    "sparseserve_hardware_info": {"gpu_source", "execution_providers", "cpu_features"},
}
# Series of a section with labels of their own (a model that failed to load has no
# family, variant or backend).
OWN_LABELS = {"sparseserve_model_load_failed": {"model", "version"}}
SECTION_LABELS = {"Per-model series": LABELS, "Shadow comparison": SHADOW, "Server series": set()}
REQUESTS = 6
ROWS = 4


def documented() -> list[tuple[str, str, str]]:
    """(section, name, type) of every series in the document's tables."""
    rows, section = [], ""
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if section not in SECTION_LABELS or not line.startswith("| `") or len(cells) < 2:
            continue
        for name in re.findall(r"`([a-z0-9_]+)`", cells[0]):
            rows.append((section, name, cells[1]))
    return rows


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Sample]]:
    root = routing_repository.build(tmp_path_factory.mktemp("metrics-repository"))
    (root / "broken" / "1").mkdir(parents=True)  # sparseserve_model_load_failed
    (root / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx model")
    policy = tmp_path_factory.mktemp("policy") / "traffic.yaml"
    policy.write_text(
        "families:\n  fam:\n    default: dense\n    shadow: {variants: [pruned50], fraction: 1}\n"
    )
    upstream = ServerProcess(root, "--no-metrics", "--load-model", "fam.pruned50")
    with upstream:
        env = {
            "SPARSESERVE_DISPATCH": "cpu",
            "SPARSESERVE_DISPATCH_OVERRIDES": json.dumps({"fam.pruned50": "triton"}),
            "SPARSESERVE_BATCHING__ENABLED": "true",
            # Measured on both CPU engines at load: the candidate latency series.
            "SPARSESERVE_CPU_ENGINE_OVERRIDES": json.dumps({"fam.dense": "auto"}),
        }
        args = ("--traffic-policy", str(policy), "--triton-url", upstream.grpc_url)
        with ServerProcess(root, *args, "--assume-gpus", "1", env=env) as server:
            with triton.InferenceServerClient(server.grpc_url) as client:
                for seed in range(REQUESTS):
                    tensor = triton.InferInput("input", [ROWS, 64], "FP32")
                    tensor.set_data_from_numpy(pixels(ROWS, seed))
                    assert client.infer(FAMILY, [tensor]).get_response().model_name == "fam.dense"
                    client.infer("fam.pruned50", [tensor])  # served by "Triton"
                bad = triton.InferInput("input", [1, 63], "FP32")
                bad.set_data_from_numpy(np.zeros((1, 63), np.float32))
                for name in (FAMILY, "no-such-model"):
                    with pytest.raises(InferenceServerException):
                        client.infer(name, [bad])
            deadline = time.monotonic() + 20
            while True:
                found = scrape(server)
                compared = value(
                    found, "sparseserve_shadow_runs_total", family=FAMILY, variant="pruned50",
                    baseline="dense", outcome="compared",
                )  # fmt: skip
                if compared == REQUESTS or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            found.append(Sample("repository", {"path": str(root)}, 0))
            yield found


@pytest.mark.parametrize(
    ("section", "name", "kind"), documented(), ids=[name for _, name, _ in documented()]
)
def test_every_documented_series_is_exported_with_its_labels(
    samples: list[Sample], section: str, name: str, kind: str
) -> None:
    suffixes = {"histogram": ("_bucket", "_count", "_sum"), "counter": ("",), "gauge": ("",)}
    for suffix in suffixes.get(kind, ("",)):
        found = [s for s in samples if s.name == name + suffix]
        assert found, f"{name}{suffix} ({kind}, documented in {section}) is not exported"
        expected = OWN_LABELS.get(name) or SECTION_LABELS.get(section, set()) | EXTRA.get(
            name, set()
        )
        if name.startswith("process_"):
            continue  # prometheus_client's own, unlabelled
        for sample in found:
            assert set(sample.labels) - {"le"} == expected, sample


def test_the_document_lists_every_series_the_server_exports(samples: list[Sample]) -> None:
    listed = {name for _, name, _ in documented()}
    exported = {
        re.sub(r"_(bucket|count|sum|created)$", "", s.name)
        for s in samples
        if s.name.startswith("sparseserve_")
    }
    # A counter's `_created` sample drops its `_total`.
    assert {n for n in exported if n not in listed and f"{n}_total" not in listed} == set()


def test_model_series_say_what_each_variant_is_and_costs(samples: list[Sample]) -> None:
    root = Path(next(s.labels["path"] for s in samples if s.name == "repository"))
    dense = {"model": "fam.dense", "family": FAMILY, "variant": "dense"}
    pruned = {"model": "fam.pruned50", "family": FAMILY, "variant": "pruned50"}
    weights = routing_repository.parameters(routing_repository.SIZES)
    info = {s.labels["model"]: s.labels for s in samples if s.name == "sparseserve_model_info"}
    assert (info["fam.pruned50"]["baseline"], info["fam.pruned50"]["is_baseline"]) == (
        "dense", "false",
    )  # fmt: skip
    assert info["fam.pruned50"]["method"] == "magnitude"
    assert (info["fam.dense"]["baseline"], info["fam.dense"]["is_baseline"]) == ("", "true")
    assert value(samples, "sparseserve_model_parameters", **pruned) == weights
    assert value(samples, "sparseserve_model_nonzero_parameters", **pruned) == weights // 2
    assert value(samples, "sparseserve_model_weight_sparsity", **pruned) == 0.5
    assert value(samples, "sparseserve_model_file_bytes", **dense) == directory_bytes(
        root / "fam.dense" / "1"
    )
    # The heavy variant's weights alone are 8 MiB: its load grew the process by more.
    heavy = routing_repository.parameters(routing_repository.HEAVY_SIZES) * 4
    assert value(samples, "sparseserve_model_memory_bytes", model="fam.heavy") > heavy
    # No manifest: counted from its weights at load (one scalar initializer, no matrix).
    assert value(samples, "sparseserve_model_parameters", model="solo") == 1
    assert values(samples, "sparseserve_model_weight_sparsity", model="solo") == [0.0]


def test_batch_sizes_and_backends(samples: list[Sample]) -> None:
    dense = {"model": "fam.dense", "backend": "onnxruntime"}
    executions = value(samples, "sparseserve_executions_total", **dense)
    assert executions >= 1
    assert value(samples, "sparseserve_batch_size_count", **dense) == executions
    rows = value(samples, "sparseserve_inferences_total", **dense)
    assert value(samples, "sparseserve_batch_size_sum", **dense) == rows == REQUESTS * ROWS
    assert value(samples, "sparseserve_batch_size_bucket", **dense, le="2.0") == 0
    assert value(samples, "sparseserve_backend_up", backend="onnxruntime") == 1
    assert value(samples, "sparseserve_backend_up", backend="triton") == 1
    triton = {"model": "fam.pruned50", "backend": "triton"}
    # The backend ran each request once and each shadow run once: they are executions
    # (but no requests: requests_total counts the clients' only).
    assert value(samples, "sparseserve_backend_executions_total", **triton) == 2 * REQUESTS
    assert value(samples, "sparseserve_requests_total", **triton, code="OK") == REQUESTS


def test_shadow_series_count_the_comparison(samples: list[Sample]) -> None:
    pair = {"family": FAMILY, "variant": "pruned50", "baseline": "dense"}
    assert value(samples, "sparseserve_shadow_runs_total", **pair, outcome="compared") == REQUESTS
    assert value(samples, "sparseserve_shadow_compared_rows_total", **pair) == REQUESTS * ROWS
    agreements = value(samples, "sparseserve_shadow_top1_agreements_total", **pair)
    assert 0 < agreements <= REQUESTS * ROWS
    assert value(samples, "sparseserve_shadow_cosine_count", **pair) == REQUESTS * ROWS
    assert value(samples, "sparseserve_shadow_cosine_bucket", **pair, le="+Inf") == REQUESTS * ROWS
