"""The model the server benchmarks load, and how they set up the server and client for
it: mlp_small (64->256->256->10, FP32, batch 1) in a model repository, the server's
arguments, ready-to-send inputs, and an onnxruntime session configured like the
server's backend (the in-process reference)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tritonclient.grpc import InferInput

from sparseserve.testing import onnx_models

MODEL_NAME = "mlp_small"
MODEL_SIZES = (64, 256, 256, 10)
INPUT_NAME, OUTPUT_NAME = "input", "output"
BATCH = 1


def build_repository(root: Path, batching: str | None = None) -> Path:
    """A model repository holding only mlp_small (batched with `batching`, config.pbtxt
    text, if given); returns the model file."""
    if batching is not None:
        (root / MODEL_NAME).mkdir(parents=True, exist_ok=True)
        (root / MODEL_NAME / "config.pbtxt").write_text(batching)
    return onnx_models.mlp(root / MODEL_NAME / "1" / "model.onnx", sizes=MODEL_SIZES)


# sparseserve as grpc_floor.py and profile_server.py start it: one onnxruntime thread,
# the inference threads of a 2-core machine, no per-request logging.
SERVER_ARGS = ["--intra-op-threads", "1", "--inference-threads", "2", "--log-level", "WARNING"]


BATCHING_PBTXT = (
    "max_batch_size: 64\n"
    "dynamic_batching { max_queue_delay_microseconds: 500 }\n"
    "instance_group [{ count: 1 kind: KIND_CPU }]\n"
)


def random_inputs(count: int, seed: int) -> list[np.ndarray]:
    """`count` distinct batch-1 inputs, generated before any timing starts."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((BATCH, MODEL_SIZES[0])).astype(np.float32) for _ in range(count)]


def triton_inputs(arrays: Sequence[np.ndarray]) -> list[list[InferInput]]:
    """One ready-to-send tritonclient input list per array (reused across requests)."""
    requests = []
    for array in arrays:
        tensor = InferInput(INPUT_NAME, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        requests.append([tensor])
    return requests


def onnxruntime_session(model: Path, intra_op_threads: int) -> ort.InferenceSession:
    """A session configured like the server's onnxruntime backend."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
