"""The `quantize` step, run on the exported ONNX model with onnxruntime's quantizer.

- ``dynamic`` (default): int8 weights, activations quantized on the fly per batch; no
  calibration. Per-channel weight scales by default: on MiniLM per-channel kept cosine
  0.994 to float where per-tensor fell to 0.967.
- ``static``: int8 weights and activations as QDQ pairs, activation ranges calibrated
  (MinMax) on rows of the recipe's data source.
- ``fp16``: weights and compute in float16; inputs and outputs stay float32, so clients
  do not change.
- ``static-nncf``: int8 weights and activations as QDQ pairs placed and calibrated by
  NNCF's post-training quantization (OpenVINO's toolkit), with its `preset`:
  ``transformer`` (NNCF's transformer model type: attention's Softmax, LayerNorm and
  the residual adds stay float), ``mixed`` (symmetric weights, asymmetric activations)
  or ``performance`` (symmetric both). The QDQ file runs on onnxruntime and OpenVINO
  alike; OpenVINO fuses the pairs into int8 kernels, where it is fastest.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path

import numpy as np
import onnx
from pydantic import Field, model_validator

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
    static_nncf = "static-nncf"


class NncfPreset(StrEnum):
    """How NNCF quantizes (mode ``static-nncf``)."""

    transformer = "transformer"  # model_type TRANSFORMER with the mixed preset: encoders
    mixed = "mixed"  # symmetric weights, asymmetric activations
    performance = "performance"  # symmetric weights and activations: fastest kernels


class OverflowFix(StrEnum):
    """Which weights NNCF keeps to 7 bits (mode ``static-nncf``); see `REDUCE_RANGE`."""

    enable = "enable"  # every Conv/MatMul: the same answers on every x86 CPU
    first_layer = "first_layer"  # only the layers that read a model input (NNCF's default)
    disable = "disable"  # full 8 bits: best on VNNI/AMX CPUs, saturates on AVX2 only


class QuantizeConfig(StepConfig):
    """Quantize the exported model (see the module docstring for the modes)."""

    step = "quantize"
    stage = Stage.onnx
    mode: QuantMode = QuantMode.dynamic
    per_channel: bool = True
    calibration_samples: int = Field(256, ge=1, le=100_000)
    calibration_batch: int = Field(32, ge=1, le=4096)
    preset: NncfPreset | None = Field(
        None, description="static-nncf only: transformer, mixed (default) or performance."
    )
    overflow_fix: OverflowFix | None = Field(
        None, description="static-nncf only: which weights stay 7-bit (default enable)."
    )
    keep_float: tuple[str, ...] = Field(
        (),
        description="dynamic and static only: nodes whose ONNX name contains one of these "
        "strings stay float (e.g. '/layer.0/': a BERT layer); each must match a node.",
    )

    @model_validator(mode="after")
    def _nncf_fields_with_nncf(self) -> QuantizeConfig:
        nncf = self.mode is QuantMode.static_nncf
        for name in ("preset", "overflow_fix"):
            if getattr(self, name) is not None and not nncf:
                raise ValueError(f"{name}: only mode static-nncf takes it, not {self.mode}")
        if nncf and not self.per_channel:
            raise ValueError("per_channel: static-nncf quantizes weights per channel")
        if self.keep_float and self.mode not in (QuantMode.dynamic, QuantMode.static):
            raise ValueError(f"keep_float: only modes dynamic and static take it, not {self.mode}")
        if any(not pattern for pattern in self.keep_float):
            raise ValueError("keep_float: an empty string would match every node")
        return self

    @property
    def nncf_preset(self) -> NncfPreset:
        return self.preset or NncfPreset.mixed

    @property
    def nncf_overflow_fix(self) -> OverflowFix:
        return self.overflow_fix or OverflowFix.enable

    def label(self) -> str:
        if self.mode is QuantMode.fp16:
            return "fp16"
        if self.mode is QuantMode.static_nncf:
            return f"int8 static QDQ (NNCF {self.nncf_preset})"
        granularity = "per-channel" if self.per_channel else "per-tensor"
        kind = "int8 dynamic" if self.mode is QuantMode.dynamic else "int8 static QDQ"
        kept = f", float: {', '.join(self.keep_float)}" if self.keep_float else ""
        return f"{kind} {granularity}{kept}"


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
    if config.mode is QuantMode.static_nncf:
        return _quantize_with_nncf(onnx_model, config, calibration, input_name)
    original = onnx.load_from_string(onnx_model) if config.keep_float else None
    exclude = float_nodes(original, config.keep_float) if original is not None else []
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
                nodes_to_exclude=exclude,
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
                nodes_to_exclude=exclude,
            )
        quantized = target.read_bytes()
    if original is not None:
        _check_kept_float(original, quantized, exclude)
    return quantized


def _check_kept_float(original: onnx.ModelProto, quantized: bytes, kept: list[str]) -> None:
    """onnxruntime's quantizer skips `nodes_to_exclude` by name, after its own rewrites:
    in dynamic mode a Gemm becomes a renamed MatMul and Add first and is quantized
    anyway. A node meant to stay float must come out as it went in."""
    before = {node.name: node.op_type for node in original.graph.node}
    floats = float_node_types(onnx.load_from_string(quantized))
    lost = [name for name in kept if floats.get(name) != before[name]]
    if lost:
        raise RecipeError(
            f"quantize: keep_float: onnxruntime's quantizer rewrote {', '.join(lost[:4])} "
            "instead of keeping it float (in dynamic mode it splits Gemm nodes before it "
            "looks at names); name MatMul or Conv nodes, or use mode static"
        )


def float_node_types(model: onnx.ModelProto) -> dict[str, str]:
    """The op type of each of `model`'s nodes that computes in float: not a quantized
    op, and none of its inputs from a DequantizeLinear (a QDQ pair's float side)."""
    dequantized = {
        output
        for node in model.graph.node
        if node.op_type == "DequantizeLinear"
        for output in node.output
    }
    return {
        node.name: node.op_type
        for node in model.graph.node
        if not node.op_type.endswith(("Integer", "QuantizeLinear"))
        and not any(name in dequantized for name in node.input)
    }


def float_nodes(model: onnx.ModelProto, patterns: tuple[str, ...]) -> list[str]:
    """The names of `model`'s nodes that contain one of `patterns`; a pattern that
    matches none is a recipe error, so a typo never quantizes what it meant to keep."""
    names = [node.name for node in model.graph.node]
    for pattern in patterns:
        if not any(pattern in name for name in names):
            sample = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise RecipeError(
                f"quantize: keep_float {pattern!r} matches no node name of the model "
                f"(its {len(names)} nodes: {sample})"
            )
    return [name for name in names if any(pattern in name for pattern in patterns)]


def calibration_rows(rows: Rows, input_name: str) -> list[Feed]:
    """Every calibration sample as its own one-row batch of named inputs. NNCF collects
    its statistics per item; items of one row keep padded text batches of different
    lengths apart and leave its batch-axis heuristics out of it."""
    return [
        {name: array[row : row + 1] for name, array in feed.items()}
        for feed in feeds(rows, input_name)
        for row in range(len(next(iter(feed.values()))))
    ]


def _quantize_with_nncf(
    onnx_model: bytes, config: QuantizeConfig, calibration: Rows | None, input_name: str
) -> bytes:
    """NNCF post-training quantization of the ONNX model, calibrated on `calibration`."""
    if calibration is None or row_count(calibration) == 0:
        raise RecipeError("quantize: static-nncf mode needs calibration rows")
    # Imported here: NNCF takes seconds to import and only this mode needs it.
    import nncf
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
    )
    from nncf.quantization.advanced_parameters import OverflowFix as NncfOverflowFix

    items = calibration_rows(head(calibration, config.calibration_samples), input_name)
    items = items[: config.calibration_samples]
    preset = config.nncf_preset
    overflow_fix = {
        OverflowFix.enable: NncfOverflowFix.ENABLE,
        OverflowFix.first_layer: NncfOverflowFix.FIRST_LAYER,
        OverflowFix.disable: NncfOverflowFix.DISABLE,
    }[config.nncf_overflow_fix]
    with _quiet_nncf():
        quantized = nncf.quantize(
            onnx.load_from_string(onnx_model),
            nncf.Dataset(items),
            preset=(
                nncf.QuantizationPreset.PERFORMANCE
                if preset is NncfPreset.performance
                else nncf.QuantizationPreset.MIXED
            ),
            model_type=nncf.ModelType.TRANSFORMER if preset is NncfPreset.transformer else None,
            subset_size=len(items),
            advanced_parameters=AdvancedQuantizationParameters(overflow_fix=overflow_fix),
        )
    return bytes(quantized.SerializeToString())


@contextlib.contextmanager
def _quiet_nncf() -> Iterator[None]:
    """NNCF logs its progress at INFO; the step's own report says what it did."""
    nncf_log = logging.getLogger("nncf")
    level = nncf_log.level
    nncf_log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        nncf_log.setLevel(level)


@register_step(QuantizeConfig)
def _quantize(
    onnx_model: bytes, config: QuantizeConfig, context: StepContext
) -> tuple[bytes, StepReport]:
    calibration = context.data.x_calibration if context.data is not None else None
    started = time.perf_counter()
    quantized = quantize_model(onnx_model, config, calibration, context.input_name)
    report: StepReport = {"bytes_before": len(onnx_model), "bytes_after": len(quantized)}
    if config.keep_float:
        report["float_nodes"] = len(
            float_nodes(onnx.load_from_string(onnx_model), config.keep_float)
        )
    if config.mode is QuantMode.static and calibration is not None:
        report["calibration_samples"] = row_count(head(calibration, config.calibration_samples))
    if config.mode is QuantMode.static_nncf and calibration is not None:
        report["calibration_samples"] = min(row_count(calibration), config.calibration_samples)
        report["preset"] = str(config.nncf_preset)
        report["overflow_fix"] = str(config.nncf_overflow_fix)
    report["seconds"] = round(time.perf_counter() - started, 3)
    return quantized, report
