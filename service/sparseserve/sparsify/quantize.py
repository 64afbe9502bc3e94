"""The `quantize` step, run on the exported ONNX model with onnxruntime's quantizer.

- ``dynamic`` (default): int8 weights, activations quantized on the fly per batch; no
  calibration. Per-channel weight scales by default: on MiniLM per-channel kept cosine
  0.994 to float where per-tensor fell to 0.967.
- ``static``: int8 weights and activations as QDQ pairs, activation ranges calibrated
  (MinMax) on rows of the recipe's data source.
- ``fp16``: weights and compute in float16; inputs and outputs stay float32, so clients
  do not change.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path

import numpy as np
import onnx
from pydantic import Field

from sparseserve.sparsify.recipe import (
    Feed,
    RecipeError,
    Rows,
    Stage,
    StepConfig,
    StepContext,
    StepReport,
    feeds,
    head,
    register_step,
    row_count,
)

# 7-bit weights. onnxruntime's x86 int8 kernels multiply u8 activations by s8 weights in
# pairs summed into int16 (vpmaddubsw), which saturates on CPUs without VNNI (AVX2 only,
# as an AMD EPYC VM here exposes): the same int8 model then answered up to 13% of the
# largest logit away from float there, against under 1% on a VNNI CPU. With weights in
# [-64, 63] no pair can saturate, so an int8 variant answers alike on every x86 CPU and
# its manifest's measured quality holds wherever it is served (onnxruntime's own advice
# for such CPUs). The cost is one bit of weight resolution.
REDUCE_RANGE = True


class QuantMode(StrEnum):
    dynamic = "dynamic"
    static = "static"
    fp16 = "fp16"


class QuantizeConfig(StepConfig):
    """Quantize the exported model (see the module docstring for the modes)."""

    step = "quantize"
    stage = Stage.onnx
    mode: QuantMode = QuantMode.dynamic
    per_channel: bool = True
    calibration_samples: int = Field(256, ge=1, le=100_000)
    calibration_batch: int = Field(32, ge=1, le=4096)

    def label(self) -> str:
        if self.mode is QuantMode.fp16:
            return "fp16"
        granularity = "per-channel" if self.per_channel else "per-tensor"
        kind = "int8 dynamic" if self.mode is QuantMode.dynamic else "int8 static QDQ"
        return f"{kind} {granularity}"


class _CalibrationRows:
    """onnxruntime's CalibrationDataReader protocol over batches of the recipe's data."""

    def __init__(self, batches: list[Feed]) -> None:
        self._batches: Iterator[Feed] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """The quantizer warns, through the root logger, that a pre-processing pass is
    advised; these exported graphs (shapes known, constants folded) do not need it."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_model(
    onnx_model: bytes,
    config: QuantizeConfig,
    calibration: Rows | None = None,
    input_name: str = "input",
) -> bytes:
    """Return the quantized model; `calibration` rows (or batches of named inputs) are
    needed for static mode."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if config.mode is QuantMode.fp16:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model: onnx.ModelProto = convert_float_to_float16(
            onnx.load_from_string(onnx_model), keep_io_types=True
        )
        return model.SerializeToString()
    with _quiet_root_logger(), tempfile.TemporaryDirectory(prefix="sparseserve-q-") as tmp:
        source, target = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        source.write_bytes(onnx_model)
        if config.mode is QuantMode.dynamic:
            quantize_dynamic(
                source,
                target,
                per_channel=config.per_channel,
                reduce_range=REDUCE_RANGE,
                weight_type=QuantType.QInt8,
            )
        else:
            if calibration is None or row_count(calibration) == 0:
                raise RecipeError("quantize: static mode needs calibration rows")
            rows = head(calibration, config.calibration_samples)
            quantize_static(
                source,
                target,
                _CalibrationRows(feeds(rows, input_name, config.calibration_batch)),
                quant_format=QuantFormat.QDQ,
                per_channel=config.per_channel,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                reduce_range=REDUCE_RANGE,
                calibrate_method=CalibrationMethod.MinMax,
            )
        return target.read_bytes()


@register_step(QuantizeConfig)
def _quantize(
    onnx_model: bytes, config: QuantizeConfig, context: StepContext
) -> tuple[bytes, StepReport]:
    calibration = context.data.x_calibration if context.data is not None else None
    quantized = quantize_model(onnx_model, config, calibration, context.input_name)
    report: StepReport = {"bytes_before": len(onnx_model), "bytes_after": len(quantized)}
    if config.mode is QuantMode.static and calibration is not None:
        report["calibration_samples"] = row_count(head(calibration, config.calibration_samples))
    return quantized, report
