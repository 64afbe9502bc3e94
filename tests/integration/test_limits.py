"""Limits that protect the server: message size, requests in flight per model, client
deadlines. Each refuses or ends the offending request with the status gRPC clients
expect, and the server goes on serving."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from sparseserve.server.process import ServerProcess

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
# `slow` runs 32 MatMul+Tanh layers of 512x512 with one onnxruntime thread: measured on
# the 2-core build machine, 1024 rows take ~140 ms and 2048 rows ~260 ms.
SLOW_ROWS = 1024
SLOW_WIDTH = 512


def infer_input(name: str, array: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    return tensor


def mlp_rows(rows: int) -> list[triton.InferInput]:
    return [infer_input("input", np.ones((rows, 64), dtype=np.float32))]


def slow_rows(rows: int) -> list[triton.InferInput]:
    x = np.random.default_rng(rows).standard_normal((rows, SLOW_WIDTH)).astype(np.float32)
    return [infer_input("x", x)]


def assert_serves(client: triton.InferenceServerClient) -> None:
    assert client.infer("mlp", mlp_rows(2)).as_numpy("output").shape == (2, 10)
    assert client.infer("slow", slow_rows(4)).as_numpy("y").shape == (4, SLOW_WIDTH)


# -- message size ---------------------------------------------------------------------


def test_request_over_the_message_limit_is_resource_exhausted(
    repository: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """With --max-message-bytes 1 MiB, a 2 MiB request is refused by gRPC with
    RESOURCE_EXHAUSTED, a request under the limit passes, and the server serves on."""
    server = start_server(repository, "--max-message-bytes", str(MiB))
    with triton.InferenceServerClient(server.grpc_url) as client:
        rows_2mib = 2 * MiB // (64 * 4)
        with pytest.raises(InferenceServerException) as info:
            client.infer("mlp", mlp_rows(rows_2mib))
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert str(MiB) in info.value.message()

        under_limit = (MiB - 4096) // (64 * 4)
        assert client.infer("mlp", mlp_rows(under_limit)).as_numpy("output").shape == (
            under_limit,
            10,
        )
        assert_serves(client)


def test_default_limit_is_above_grpcs_4_mib(client: triton.InferenceServerClient) -> None:
    """tritonclient sends messages of any size; gRPC servers refuse more than 4 MiB
    unless told otherwise. An 8 MiB request must pass with the default settings."""
    rows = 8 * MiB // (64 * 4)
    assert client.infer("mlp", mlp_rows(rows)).as_numpy("output").shape == (rows, 10)


# -- requests in flight ---------------------------------------------------------------


def test_requests_over_the_inflight_limit_are_refused_then_served_again(
    repository: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """With --max-inflight-per-model 1, concurrent slow requests: the one that got in is
    answered, the others are refused at once with RESOURCE_EXHAUSTED naming the limit
    (not queued), and once the burst is over the model serves again."""
    server = start_server(repository, "--max-inflight-per-model", "1", "--inference-threads", "2")
    burst = 10
    inputs = slow_rows(SLOW_ROWS)

    async def fire() -> list[object]:
        async with triton_aio.InferenceServerClient(server.grpc_url) as client:
            return await asyncio.gather(
                *(client.infer("slow", inputs) for _ in range(burst)), return_exceptions=True
            )

    results = asyncio.run(fire())
    answered = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert answered, "no request of the burst was served"
    assert refused, "the in-flight limit of 1 refused nothing"
    for error in refused:
        assert isinstance(error, InferenceServerException), repr(error)
        assert error.status() == "StatusCode.RESOURCE_EXHAUSTED", error.message()
        assert "slow" in error.message() and "limit 1" in error.message()
    for result in answered:
        assert result.as_numpy("y").shape == (SLOW_ROWS, SLOW_WIDTH)  # type: ignore[attr-defined]

    with triton.InferenceServerClient(server.grpc_url) as client:
        assert_serves(client)
        (stats,) = client.get_inference_statistics("slow").model_stats
        assert stats.inference_stats.fail.count == len(refused)


# -- deadlines ------------------------------------------------------------------------


def test_client_deadline_is_deadline_exceeded_and_the_server_serves_on(
    client: triton.InferenceServerClient,
) -> None:
    """A client that gives a ~260 ms request 50 ms gets DEADLINE_EXCEEDED; the server,
    still finishing the abandoned work, answers the next requests."""
    with pytest.raises(InferenceServerException) as info:
        client.infer("slow", slow_rows(2 * SLOW_ROWS), client_timeout=0.05)
    assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert_serves(client)
