"""What `cpu_engine: auto` times the engines on: one sample with every dynamic dimension
after the first at 128, the size requests have, not the warm-up's 1 (at one token
OpenVINO looked 2.7x faster on MiniLM's static-int8 variant; at 128 it is slower)."""

from __future__ import annotations

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
