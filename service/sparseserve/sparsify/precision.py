"""The `precision` step: a variant that runs at bf16 while its ONNX file stays fp32.

bf16 is an engine setting, not a file format. OpenVINO computes in bf16 when a model is
compiled with ``INFERENCE_PRECISION_HINT=bf16`` on a CPU with bf16 instructions
(AVX512_BF16 or AMX); onnxruntime's CPU kernels have none. So the step leaves the file
as it is, the manifest records ``precision: bf16``, and the pipeline measures the
variant's quality on OpenVINO at bf16 (`run_openvino`), as the server will run it.

OpenVINO takes the hint on any CPU and, where the CPU has no bf16, compiles f32 without a
word. A measurement made there would be fp32's, recorded as bf16. So the CPU's
capabilities are checked before the build starts (`bf16_unavailable`), and the compiled
model's precision is read back before every measurement: anything but bf16 is refused.
A variant whose step says ``optional: true`` is skipped instead, with a warning, on a
CPU without bf16: no model and no manifest is written for it.

In YAML the step is ``precision: bf16`` or ``precision: {dtype: bf16, optional: true}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from sparseserve.sparsify.recipe import (
    Feed,
    Stage,
    StepConfig,
    StepContext,
    StepReport,
    register_step,
)

# Precisions a variant can record (the manifest's `precision`), as OpenVINO names them.
OPENVINO_PRECISION = {"fp32": "f32", "bf16": "bf16"}


class PrecisionUnavailable(RuntimeError):
    """This machine cannot run (and so cannot measure) a variant at its precision."""


class PrecisionConfig(StepConfig):
    """Run the variant at `dtype` (bf16) on OpenVINO; the file stays fp32."""

    step = "precision"
    stage = Stage.onnx
    shorthand = "dtype"
    dtype: Literal["bf16"]
    optional: bool = False  # on a CPU without bf16: skip the variant instead of failing

    def label(self) -> str:
        return f"{self.dtype} (OpenVINO)"


def bf16_unavailable() -> str | None:
    """Why OpenVINO cannot compute bf16 on this CPU, or None if it can."""
    import openvino

    core = openvino.Core()
    capabilities = [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
    if "BF16" in capabilities:
        return None
    name = str(core.get_property("CPU", "FULL_DEVICE_NAME"))
    return (
        f"this CPU ({name}) does not compute bf16: OpenVINO {openvino.get_version()} lists "
        f"its capabilities as {', '.join(capabilities)}, without BF16 (AVX512_BF16 or AMX "
        "is needed); OpenVINO would silently run it at f32"
    )


def run_openvino(onnx_model: bytes, batches: Sequence[Feed], dtype: str = "fp32") -> np.ndarray:
    """The model's first output for every batch, run on OpenVINO's CPU plugin at `dtype`
    (fp32 or bf16), concatenated. Raise `PrecisionUnavailable` if OpenVINO compiled the
    model at another precision than asked."""
    import openvino

    wanted = OPENVINO_PRECISION[dtype]
    core = openvino.Core()
    compiled = core.compile_model(
        core.read_model(onnx_model), "CPU", {"INFERENCE_PRECISION_HINT": wanted}
    )
    # Read back: on a CPU without bf16 OpenVINO compiles f32 when asked for bf16.
    actual = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    if actual != wanted:
        raise PrecisionUnavailable(
            f"OpenVINO compiled the model at {actual} when asked for {wanted}: its "
            f"outputs would not be {dtype}'s"
        )
    request = compiled.create_infer_request()
    outputs = [np.array(request.infer(dict(feed))[0]) for feed in batches]
    return np.concatenate(outputs)


@register_step(PrecisionConfig)
def _precision(
    onnx_model: bytes, config: PrecisionConfig, context: StepContext
) -> tuple[bytes, StepReport]:
    import openvino

    reason = bf16_unavailable()
    if reason is not None:
        raise PrecisionUnavailable(f"precision {config.dtype}: {reason}")
    core = openvino.Core()
    report: StepReport = {
        "precision": config.dtype,
        "engine": f"OpenVINO {openvino.get_version()}",
        "cpu": str(core.get_property("CPU", "FULL_DEVICE_NAME")),
    }
    return onnx_model, report
