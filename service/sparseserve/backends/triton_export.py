"""`sparseserve export-triton`: a Triton model repository for a GPU Triton Inference
Server, with a `config.pbtxt` per model.

By default the export is a separate repository (`<repository>-triton`): each model's
files are hard-linked there (copied across filesystems) beside the new config, and the
source repository is not changed. The config matters to sparseserve too — it reads
`max_batch_size`, `dynamic_batching` and `instance_group` from the same file — so
writing it into the repository sparseserve serves (`in_place`) also turns on dynamic
batching on the CPU for every batchable model and sets how many batches of it run at
once. That is only done when asked.

What each config says, and why:

- `platform: "onnxruntime_onnx"`, inputs and outputs with datatypes and dims as
  onnxruntime reads them from the newest version's file.
- A model whose every input and output has a dynamic leading dimension gets
  `max_batch_size` > 0, that dimension dropped from `dims` (as Triton requires), and
  `dynamic_batching {}`: on a GPU, batching is what fills the device. sparseserve reads
  the same block, so the CPU server batches the model too (see README, Dynamic
  batching). Other models get `max_batch_size: 0` and their full shapes.
- `instance_group [{ kind: KIND_GPU, count: N }]`.
- int8 variants (manifest `quantization` set) and 2:4 variants (manifest `method` or
  recipe mentioning 2:4) get the TensorRT execution accelerator: INT8 precision for the
  former, TensorRT's sparse kernels (`trt_sparsity_enable`) with FP16 for the latter —
  the two cases where a GPU turns compression into speed. Unstructured sparsity gets no
  accelerator: dense kernels run its zeros like any other number.

A variant Triton would not compute as it was measured is skipped, with the reason
(`dispatch.triton_refusal`): a bf16 variant (Triton's onnxruntime backend has no bf16
mode), an OpenVINO IR or a model configured for the openvino backend (Triton runs those
on its CPU). sparseserve serves them on its own CPU engines. Each written model's line
says what TensorRT will compute in, where it is set: FP16 for 2:4 variants is a precision
the variant was not measured in, and the line says so.

An existing `config.pbtxt` is kept (a hand-written config is the user's decision; in a
separate export it is copied as it is) unless `force`; then it is rewritten, keeping
only its `version_policy` and `default_model_filename`, which decide which files are
served, not how they run.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort
from google.protobuf import text_format

from sparseserve.backends.base import ModelFiles, ModelSignature
from sparseserve.backends.dispatch import triton_refusal
from sparseserve.backends.onnxruntime import session_signature
from sparseserve.errors import ModelLoadError
from sparseserve.protocol import model_config_pb2 as mc
from sparseserve.repository.manifest import VariantManifest
from sparseserve.repository.store import CONFIG_FILENAME, ModelRepository, ModelSource

DEFAULT_MAX_BATCH_SIZE = 64


@dataclass(frozen=True, slots=True)
class ExportResult:
    model: str
    action: str  # "written", "kept" (exists, no --force), "skipped" (see above) or "failed"
    detail: str = ""


def default_output(root: Path) -> Path:
    """Where a separate export goes by default: `<repository>-triton`, beside it."""
    resolved = root.resolve()
    return resolved.with_name(f"{resolved.name}-triton")


def export_repository(
    root: Path,
    output: Path | None = None,
    *,
    force: bool = False,
    gpu_instances: int = 1,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
) -> list[ExportResult]:
    """Export every model of the repository at `root` for Triton: into `output` (its
    files linked or copied, with a config.pbtxt each), or, with `output` None, by
    writing config.pbtxt into `root` itself. Raise `ValueError` if `root` is not a
    directory or `output` lies inside it."""
    if not root.is_dir():
        raise ValueError(f"model repository {root} does not exist or is not a directory")
    if output is not None:
        inside = output.resolve().is_relative_to(root.resolve())
        if inside:
            raise ValueError(
                f"--output {output} is inside the repository {root}: sparseserve would take "
                "it for a model (use a sibling, such as the default "
                f"{default_output(root)}, or --in-place)"
            )
        output.mkdir(parents=True, exist_ok=True)
    repository = ModelRepository(root)
    results = []
    for name in repository.names():
        source_config = repository.path(name) / CONFIG_FILENAME
        target = repository.path(name) if output is None else output / name
        path = target / CONFIG_FILENAME
        keep = source_config.exists() and not force
        try:
            source = repository.read(name)
            refusal = triton_refusal(newest_files(source))
            if refusal is not None:
                detail = f"(it is {refusal}; sparseserve serves it on the CPU)"
                results.append(ExportResult(name, "skipped", detail))
                continue
            config = None if keep else triton_config(source, gpu_instances, max_batch_size)
        except ModelLoadError as exc:
            results.append(ExportResult(name, "failed", str(exc)))
            continue
        if output is not None:
            _mirror_model(source.directory, target)
        if config is None:
            detail = "(use --force to rewrite it)"
            results.append(ExportResult(name, "kept", f"{path} exists {detail}"))
            continue
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text_format.MessageToString(config), encoding="utf-8")
        tmp.replace(path)  # atomic: a polling server never reads half a config
        results.append(ExportResult(name, "written", f"{path} {computes_in(config)}".rstrip()))
    return results


def _mirror_model(source: Path, target: Path) -> None:
    """Make `target` a copy of the model directory `source`: its files hard-linked
    where the filesystem allows (no second copy of the weights), copied otherwise.
    What was in `target` before goes, so removed versions do not linger."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, copy_function=_link_or_copy)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(source, target)


def newest_files(source: ModelSource) -> ModelFiles:
    """The newest served version of a model, with its config and precision."""
    version = max(source.served_versions())
    return ModelFiles(
        source.name, version, source.versions[version], source.config, source.precision
    )


def computes_in(config: mc.ModelConfig) -> str:
    """What a written config's TensorRT accelerator computes in, for its output line."""
    for accelerator in config.optimization.execution_accelerators.gpu_execution_accelerator:
        mode = accelerator.parameters.get("precision_mode")
        if mode == "FP16":
            return "(TensorRT FP16: computes in fp16, not the fp32 the variant was measured in)"
        if mode:
            return f"(TensorRT {mode})"
    return ""


def triton_config(source: ModelSource, gpu_instances: int, max_batch_size: int) -> mc.ModelConfig:
    """The Triton ModelConfig for one model directory (see the module docstring)."""
    signature = _read_signature(newest_files(source))
    config = mc.ModelConfig(name=source.name, platform="onnxruntime_onnx")
    if source.config is not None:  # keep which files are served
        if source.config.HasField("version_policy"):
            config.version_policy.CopyFrom(source.config.version_policy)
        config.default_model_filename = source.config.default_model_filename
    batched = not signature.batch_dimension_problem()
    if batched:
        config.max_batch_size = max_batch_size
        config.dynamic_batching.SetInParent()
    describe_tensors(config, signature, batched=batched)
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=gpu_instances)
    accelerator = tensorrt_parameters(source.manifest)
    if accelerator:
        gpu = config.optimization.execution_accelerators.gpu_execution_accelerator.add()
        gpu.name = "tensorrt"
        gpu.parameters.update(accelerator)
    return config


def tensorrt_parameters(manifest: VariantManifest | None) -> dict[str, str]:
    """TensorRT options for variants a GPU makes faster; empty for the others."""
    if manifest is None:
        return {}
    if manifest.quantization:
        return {"precision_mode": "INT8", "max_workspace_size_bytes": str(1 << 30)}
    recipe = json.dumps(manifest.recipe or {})
    if "2:4" in manifest.method or "2:4" in recipe:
        return {
            "precision_mode": "FP16",  # TensorRT's sparse kernels are FP16/INT8 ones
            "trt_sparsity_enable": "1",
            "max_workspace_size_bytes": str(1 << 30),
        }
    return {}


def _read_signature(files: ModelFiles) -> ModelSignature:
    try:
        session = ort.InferenceSession(str(files.path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped exceptions
        raise ModelLoadError(f"onnxruntime cannot read {files.path}: {exc}") from exc
    return session_signature(session, files)


def describe_tensors(
    config: mc.ModelConfig, signature: ModelSignature, batched: bool = False
) -> None:
    """Add the signature's inputs and outputs that `config` does not list (all of them,
    where it lists none). `batched`: leave the batch dimension out of `dims`, as Triton
    wants when `max_batch_size` > 0."""
    skip = 1 if batched else 0
    for specs, configs in ((signature.inputs, config.input), (signature.outputs, config.output)):
        listed = {tensor.name for tensor in configs}
        for spec in specs:
            if spec.name not in listed:
                configs.add(
                    name=spec.name,
                    data_type=mc.DataType.Value(spec.datatype.config),
                    dims=spec.shape[skip:],
                )
