"""What `cpu_engine: auto` times the engines on: one sample with every dynamic dimension
after the first at 128, the size requests have, not the warm-up's 1 (at one token
OpenVINO looked 2.7x faster on MiniLM's static-int8 variant; at 128 it is slower)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sparseserve.backends.base import (
    TIMING_DYNAMIC_SIZE,
    ModelSignature,
    TensorSpec,
    timing_inputs,
    warmup_inputs,
)
from sparseserve.backends.dispatch import time_engines
from sparseserve.codec import BY_NAME


def signature(*inputs: tuple[str, str, tuple[int, ...]]) -> ModelSignature:
    specs = tuple(TensorSpec(name, BY_NAME[dtype], shape) for name, dtype, shape in inputs)
    return ModelSignature(specs, (TensorSpec("y", BY_NAME["FP32"], (-1,)),))


def test_dynamic_dimensions_after_the_first_are_128() -> None:
    text = signature(("input_ids", "INT64", (-1, -1)), ("mask", "INT64", (-1, -1)),
                     ("pixels", "FP32", (-1, 3, -1, -1)), ("scale", "FP32", ()))  # fmt: skip
    feeds = timing_inputs(text)
    assert {name: array.shape for name, array in feeds.items()} == {
        "input_ids": (1, TIMING_DYNAMIC_SIZE),
        "mask": (1, TIMING_DYNAMIC_SIZE),
        "pixels": (1, 3, 128, 128),
        "scale": (),
    }
    assert feeds["input_ids"].dtype == np.int64 and not feeds["pixels"].any()
    assert warmup_inputs(text)["input_ids"].shape == (1, 1)  # the warm-up stays small


class Engine:
    """An engine that takes only shapes up to `largest` elements per input."""

    def __init__(self, largest: int):
        self.largest = largest
        self.sizes: list[int] = []

    def run_once(self, feeds: dict[str, np.ndarray]) -> float:
        size = max(array.size for array in feeds.values())
        if size > self.largest:
            raise RuntimeError(f"{size} elements: too many")
        self.sizes.append(size)
        return 0.001


def test_engines_are_timed_at_128_or_on_the_warm_up_where_they_cannot_run_it() -> None:
    text = signature(("input_ids", "INT64", (-1, -1)))
    big, small = Engine(10_000), Engine(10_000)
    assert set(time_engines({"a": big, "b": small}, text, "m")) == {"a", "b"}  # type: ignore[dict-item]
    assert set(big.sizes) == {128} and len(big.sizes) > 1
    limited = Engine(1)  # a model whose dynamic dimension must stay small
    time_engines({"a": Engine(10_000), "b": limited}, text, "m")  # type: ignore[dict-item]
    assert set(limited.sizes) == {1}


def test_a_batched_model_is_timed_at_the_rows_its_batcher_aims_for_too() -> None:
    """A model the server batches (its config.pbtxt's dynamic_batching, or batching on
    for every model) is timed at one row and at the batcher's target rows; others at one
    row. Rows past the element cap are not timed (None), nor sizes an engine cannot run."""
    from google.protobuf import text_format

    from sparseserve.backends.base import ModelFiles
    from sparseserve.backends.dispatch import timing_batches
    from sparseserve.protocol import model_config_pb2
    from sparseserve.settings import BatchingSettings

    def files(text: str | None) -> ModelFiles:
        config = None
        if text is not None:
            config = model_config_pb2.ModelConfig()
            text_format.Parse(text, config)
        return ModelFiles("m", 1, Path("m/1/model.onnx"), config)

    rows = signature(("x", "FP32", (-1, 64)))
    off, on = BatchingSettings(), BatchingSettings(enabled=True, max_batch_size=16)
    batched = "max_batch_size: 32\ndynamic_batching { max_queue_delay_microseconds: 500 }\n"
    assert timing_batches(files(batched), rows, off) == (1, 32)
    preferred = "max_batch_size: 32\ndynamic_batching { preferred_batch_size: [8, 16] }\n"
    assert timing_batches(files(preferred), rows, off) == (1, 16)
    assert timing_batches(files("max_batch_size: 32\n"), rows, off) == (1,)  # client batches
    assert timing_batches(files("max_batch_size: 32\n"), rows, on) == (1, 32)
    assert timing_batches(files(None), rows, on) == (1, 16)  # the settings' size
    assert timing_batches(files(None), rows, off) == (1,)
    assert timing_batches(files("dynamic_batching {}\n"), rows, off) == (1,)  # refused
    fixed = signature(("x", "FP32", (1, 64)))  # no batch dimension: never batched
    assert timing_batches(files(batched), fixed, on) == (1,)

    text = signature(("input_ids", "INT64", (-1, -1)))
    assert timing_inputs(text, batch=32)["input_ids"].shape == (32, TIMING_DYNAMIC_SIZE)
    engine = Engine(10_000)
    assert time_engines({"a": engine}, text, "m", batch=32) is not None  # type: ignore[dict-item]
    assert set(engine.sizes) == {32 * 128}
    assert time_engines({"a": Engine(100)}, text, "m", batch=32) is None  # type: ignore[dict-item]
    images = signature(("pixels", "FP32", (-1, 3, -1, -1)))  # 32 x 3 x 128 x 128: too many
    assert time_engines({"a": Engine(1 << 30)}, images, "m", batch=32) is None  # type: ignore[dict-item]


def test_batched_timing_is_bounded_by_what_one_row_costs() -> None:
    """Timing at N rows costs about N one-row runs per engine and round: the rows are cut
    to what BATCH_TIMING_SECONDS allows (a 2 s MiniLM row at 64 rows would add a minute
    to every load)."""
    from sparseserve.backends.dispatch import BATCH_TIMING_SECONDS, TIMING_ROUNDS, affordable_rows

    two = {"onnxruntime": 0.001, "openvino": 0.0008}
    assert affordable_rows(two, 32) == 32  # 1 ms a row: 32 rows cost 0.64 s
    per_row = 0.025 * (TIMING_ROUNDS + 1) * 2
    minilm = {"onnxruntime": 0.025, "openvino": 0.02}
    assert affordable_rows(minilm, 64) == int(BATCH_TIMING_SECONDS / per_row) < 64
    assert affordable_rows({"onnxruntime": 2.0, "openvino": 2.0}, 64) == 0  # not timed


def test_another_engine_serves_only_if_it_beats_onnxruntime_at_every_size() -> None:
    from sparseserve.backends.dispatch import choose_engine

    ort, ov = "onnxruntime", "openvino"
    assert choose_engine({1: {ort: 1.0, ov: 0.7}}, 0.03) == ov
    assert choose_engine({1: {ort: 1.0, ov: 0.98}}, 0.03) == ort  # within the margin
    # Faster at one row, slower at 32 rows (the AMX Xeon's fp32 MLP): onnxruntime.
    assert choose_engine({1: {ort: 1.0, ov: 0.77}, 32: {ort: 10.0, ov: 10.4}}, 0.03) == ort
    assert choose_engine({1: {ort: 1.0, ov: 0.77}, 32: {ort: 10.0, ov: 7.0}}, 0.03) == ov
    assert choose_engine({1: {ort: 0.5, ov: 0.7}, 32: {ort: 10.0, ov: 7.0}}, 0.03) == ort
    assert choose_engine({1: {ov: 0.7}}, 0.03) == ov  # a bf16 variant: OpenVINO alone
