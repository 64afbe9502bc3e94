"""Short runs execute on the event loop, long ones on the thread pool: both paths give
the same answers, and a long run never stalls the server's other requests."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton

pytestmark = pytest.mark.integration


def _infer(url: str, model: str, name: str, x: np.ndarray) -> np.ndarray:
    with triton.InferenceServerClient(url) as client:
        tensor = triton.InferInput(name, list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer(model, [tensor])
        return result.as_numpy(result.get_response().outputs[0].name)


@pytest.mark.parametrize("inline_max_us", ["0", "1000000000"], ids=["thread-pool", "inline"])
def test_both_paths_match_onnxruntime_bit_for_bit(
    repository: Path, start_server, inline_max_us: str
) -> None:
    server = start_server(
        repository, "--load-model", "mlp",
        env={"SPARSESERVE_ONNXRUNTIME__INLINE_MAX_US": inline_max_us},
    )  # fmt: skip
    session = ort.InferenceSession(str(repository / "mlp" / "1" / "model.onnx"))
    rng = np.random.default_rng(3)
    for batch in (1, 5, 64):
        x = rng.standard_normal((batch, 64)).astype(np.float32)
        expected = session.run(None, {"input": x})[0]
        assert np.array_equal(_infer(server.grpc_url, "mlp", "input", x), expected)


def test_a_long_run_does_not_stall_short_requests(repository: Path, start_server) -> None:
    """With the default threshold the big `slow` request goes to the thread pool, so
    small requests keep being answered while it runs."""
    server = start_server(repository, "--load-model", "mlp", "--load-model", "slow")
    done = threading.Event()
    x_slow = np.ones((4096, 512), np.float32)  # about a second of work here

    def long_request() -> None:
        _infer(server.grpc_url, "slow", "x", x_slow)
        done.set()

    thread = threading.Thread(target=long_request)
    thread.start()
    answered_meanwhile = 0
    x = np.ones((1, 64), np.float32)
    with triton.InferenceServerClient(server.grpc_url) as client:
        tensor = triton.InferInput("input", [1, 64], "FP32")
        tensor.set_data_from_numpy(x)
        time.sleep(0.05)  # let the long request start
        while not done.is_set():
            client.infer("mlp", [tensor])
            answered_meanwhile += 1
    thread.join()
    assert answered_meanwhile >= 5, "short requests waited for the long run"
