"""The Prometheus endpoint, scraped over HTTP and parsed with prometheus_client's own
parser after known traffic: every number an operator would graph matches the requests
that were sent."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from prometheus_client.samples import Sample
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from sparseserve.client.server_process import ServerProcess
from tests.scrape import scrape, value, values

pytestmark = pytest.mark.integration

MLP_LABELS = {
    "model": "mlp",
    "version": "1",
    "family": "mlp",
    "variant": "dense",
    "backend": "onnxruntime",
}
GOOD_BATCHES = (1, 2, 5, 8)  # N = 4 good requests, 16 rows
BAD_REQUESTS = 3  # M wrong-shape requests
UNKNOWN_MODEL_REQUESTS = 2


def mlp_input(rows: int, width: int = 64) -> list[triton.InferInput]:
    tensor = triton.InferInput("input", [rows, width], "FP32")
    tensor.set_data_from_numpy(np.ones((rows, width), dtype=np.float32))
    return [tensor]


@dataclass
class Scraped:
    server: ServerProcess
    samples: list[Sample]


@pytest.fixture(scope="module")
def scraped(repository: Path) -> Iterator[Scraped]:
    """A dedicated server, sent known traffic, then scraped once."""
    with ServerProcess(repository) as server:
        with triton.InferenceServerClient(server.grpc_url) as client:
            for rows in GOOD_BATCHES:
                client.infer("mlp", mlp_input(rows))
            for _ in range(BAD_REQUESTS):
                with pytest.raises(InferenceServerException):
                    client.infer("mlp", mlp_input(2, width=63))
            for _ in range(UNKNOWN_MODEL_REQUESTS):
                with pytest.raises(InferenceServerException):
                    client.infer("no_such_model", mlp_input(1))
        yield Scraped(server, scrape(server))
    assert server.returncode == 0, server.log()


def test_requests_are_counted_by_status_code(scraped: Scraped) -> None:
    samples = scraped.samples
    total = "sparseserve_requests_total"
    assert value(samples, total, **MLP_LABELS, code="OK") == len(GOOD_BATCHES)
    assert value(samples, total, **MLP_LABELS, code="INVALID_ARGUMENT") == BAD_REQUESTS


def test_request_duration_histogram_counts_the_successes(scraped: Scraped) -> None:
    samples = scraped.samples
    name = "sparseserve_request_duration_seconds"
    assert value(samples, f"{name}_count", **MLP_LABELS) == len(GOOD_BATCHES)
    assert value(samples, f"{name}_bucket", **MLP_LABELS, le="+Inf") == len(GOOD_BATCHES)
    assert value(samples, f"{name}_sum", **MLP_LABELS) > 0
    compute = "sparseserve_compute_duration_seconds"
    assert value(samples, f"{compute}_count", **MLP_LABELS) == len(GOOD_BATCHES)


def test_inferences_count_rows_and_executions_count_runs(scraped: Scraped) -> None:
    """inferences / executions is the average batch size, as in Triton."""
    samples = scraped.samples
    assert value(samples, "sparseserve_inferences_total", **MLP_LABELS) == sum(GOOD_BATCHES)
    assert value(samples, "sparseserve_executions_total", **MLP_LABELS) == len(GOOD_BATCHES)


def test_every_model_series_carries_the_full_label_set(scraped: Scraped) -> None:
    """model, version, family, variant and backend on every per-model series; `mlp`
    takes family and variant from its sparseserve.yaml. (A model that failed to load has
    only its name and version: the test repository's broken files, a version's or the
    model's own, in sparseserve_model_load_failed.)"""
    failed = [s for s in scraped.samples if s.name == "sparseserve_model_load_failed"]
    assert {(s.labels["model"], s.labels["version"]) for s in failed} == {
        ("corrupt", "1"), ("truncated", "1"), ("bad_manifest", "")
    }  # fmt: skip
    per_model = [
        s
        for s in scraped.samples
        if "model" in s.labels and s.name != "sparseserve_model_load_failed"
    ]
    assert per_model
    for sample in per_model:
        assert set(MLP_LABELS) <= set(sample.labels), sample
    mlp = [s for s in per_model if s.labels["model"] == "mlp"]
    assert {(s.labels["family"], s.labels["variant"], s.labels["backend"]) for s in mlp} == {
        ("mlp", "dense", "onnxruntime")
    }


def test_model_ready_is_one_for_every_loaded_version(scraped: Scraped) -> None:
    ready = {
        (s.labels["model"], s.labels["version"]): s.value
        for s in scraped.samples
        if s.name == "sparseserve_model_ready"
    }
    loaded = {
        ("mlp", "1"), ("multi_io", "1"), ("identity", "1"), ("slow", "1"),
        ("versioned", "1"), ("versioned", "2"), ("versioned", "3"), ("latest", "3"),
    }  # fmt: skip
    assert {key for key, v in ready.items() if v == 1} == loaded
    assert not {name for name, _ in ready} & {"corrupt", "truncated", "bad_manifest"}


def test_requests_for_unknown_models_are_counted_as_unroutable(scraped: Scraped) -> None:
    samples = scraped.samples
    unroutable = "sparseserve_unroutable_requests_total"
    assert value(samples, unroutable, code="NOT_FOUND") == UNKNOWN_MODEL_REQUESTS
    assert not values(samples, "sparseserve_requests_total", model="no_such_model")


def test_process_metrics_are_exported(scraped: Scraped) -> None:
    samples = scraped.samples
    assert value(samples, "process_resident_memory_bytes") > 10 * 1024 * 1024
    assert value(samples, "process_cpu_seconds_total") > 0


def _raw_length_mismatch(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = service_pb2.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="input", datatype="FP32", shape=[2, 64])
    request.raw_input_contents.append(b"\0" * 100)
    stub.ModelInfer(request, timeout=10)


def _unknown_datatype(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = service_pb2.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="input", datatype="FLOAT32", shape=[1, 64])
    request.raw_input_contents.append(b"\0" * 256)
    stub.ModelInfer(request, timeout=10)


@pytest.mark.parametrize(
    "send_malformed",
    [_raw_length_mismatch, _unknown_datatype],
    ids=["raw-length-mismatch", "unknown-datatype"],
)
def test_a_malformed_request_is_counted_somewhere(
    repository: Path,
    start_server: Callable[..., ServerProcess],
    send_malformed: Callable[[service_pb2_grpc.GRPCInferenceServiceStub], None],
) -> None:
    """A request refused while its tensors are decoded is still an error an operator
    must see: in the model's request count or, before routing, as unroutable."""
    server = start_server(repository)
    with (
        grpc.insecure_channel(server.grpc_url) as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        send_malformed(service_pb2_grpc.GRPCInferenceServiceStub(channel))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    samples = scrape(server)
    counted = value(
        samples, "sparseserve_requests_total", **MLP_LABELS, code="INVALID_ARGUMENT"
    ) + value(samples, "sparseserve_unroutable_requests_total", code="INVALID_ARGUMENT")
    assert counted == 1
