"""ONNX export, compact storage of sparse weights, and writing a variant into the repository.

Exporter: the legacy TorchScript exporter (``dynamo=False``) by default. On the digits
models bench/exporters.py measured both exports equally fast in onnxruntime (ratio
1.00), the dynamo files 9-20% larger and ~80x slower to export (2 s vs 0.03 s), see
bench/results/exporters.md; on MiniLM the legacy export also ran ~10% faster.
``export.exporter: dynamo`` selects the other (it needs onnxscript).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper
from torch import nn

from sparseserve.repository.manifest import MANIFEST_FILENAME, LayerSparsity, VariantManifest
from sparseserve.sparsify.recipe import Exporter, Feed

INDEX_BYTES = 8  # ONNX sparse tensors index with int64


@contextlib.contextmanager
def _exporter_warnings_silenced() -> Iterator[None]:
    # torch 2.13 deprecates the legacy exporter, and the dynamo one warns about optional
    # packages (torchvision) and its own internals; none is actionable here, and pytest
    # turns warnings into errors. The dynamo exporter also logs a warning per torchvision
    # operator it cannot register.
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            # Shape arithmetic (in transformers) that tracing records as constants: every
            # export is checked against torch on batches of other shapes before it is used.
            # (torch.jit exports TracerWarning without listing it in its __all__.)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # type: ignore[attr-defined]
            yield
    finally:
        logger.setLevel(level)


def export_onnx(
    model: nn.Module,
    example: Mapping[str, np.ndarray | torch.Tensor],
    output_name: str,
    *,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    exporter: Exporter = Exporter.legacy,
    opset: int = 17,
) -> bytes:
    """Serialize `model` (eval mode) to one self-contained ONNX file.

    `example` holds one tensor per input, in the order `model` takes them positionally
    (real rows are best: tracing follows the branches they take). `dynamic_axes` names
    each input's varying axes, such as ``{0: "batch", 1: "sequence"}``; by default only
    the batch varies. The output's batch axis always varies.
    """
    model.eval()
    names = list(example)
    args = tuple(torch.as_tensor(value) for value in example.values())
    axes = {name: dict((dynamic_axes or {}).get(name, {0: "batch"})) for name in names}
    with _exporter_warnings_silenced():
        if exporter is Exporter.dynamo:
            # torch.export warns about its own internals (pytree APIs, axis renaming).
            warnings.simplefilter("ignore")
            dims: dict[str, torch.export.Dim] = {}
            shapes = tuple(
                {axis: dims.setdefault(dim, torch.export.Dim(dim)) for axis, dim in axes[n].items()}
                for n in names
            )
            program = torch.onnx.export(
                model,
                args,
                dynamo=True,
                verbose=False,
                opset_version=max(opset, 18),  # the dynamo exporter's lowest opset
                input_names=names,
                output_names=[output_name],
                dynamic_shapes=shapes,
            )
            assert program is not None  # dynamo=True always returns the program
            return program.model_proto.SerializeToString()
        buffer = io.BytesIO()
        torch.onnx.export(
            model,
            args,
            buffer,  # type: ignore[arg-type]  # torch's annotation omits file objects
            dynamo=False,
            opset_version=opset,
            input_names=names,
            output_names=[output_name],
            dynamic_axes={**axes, output_name: {0: "batch"}},
        )
        return buffer.getvalue()


def onnx_session(model: bytes | Path, threads: int = 0) -> ort.InferenceSession:
    """A CPU onnxruntime session; `threads` intra-op threads (0: onnxruntime's default)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_onnx(onnx_model: bytes | Path, batches: Feed | Sequence[Feed]) -> np.ndarray:
    """The model's first output for every batch of named inputs, concatenated."""
    session = onnx_session(onnx_model)
    batches = [batches] if isinstance(batches, Mapping) else batches
    return np.concatenate([session.run(None, dict(feed))[0] for feed in batches])


def device_of(model: nn.Module) -> torch.device:
    """Where `model`'s parameters are (the CPU for a model without any)."""
    return next(model.parameters(), torch.empty(0)).device


@torch.no_grad()
def run_torch(model: nn.Module, batches: Feed | Sequence[Feed]) -> np.ndarray:
    """`model`'s output (eval mode) for every batch, inputs passed positionally in the
    order of each batch (as the export passes them), concatenated; run where the model's
    parameters are (a CPU or a GPU), returned on the CPU."""
    was_training = model.training
    model.eval()
    device = device_of(model)  # a GPU-trained student's
    try:
        batches = [batches] if isinstance(batches, Mapping) else batches
        outputs = [
            model(*(torch.from_numpy(value).to(device) for value in feed.values())).cpu()
            for feed in batches
        ]
    finally:
        model.train(was_training)
    return torch.cat(outputs).numpy()


def max_relative_difference(actual: np.ndarray, expected: np.ndarray) -> float:
    """Largest |a - e| / max(|e|, 1): relative for large values, absolute for small."""
    return float((np.abs(actual - expected) / np.maximum(np.abs(expected), 1.0)).max())


def sparse_storage(onnx_model: bytes) -> tuple[bytes, list[str]]:
    """Move float initializers to ONNX sparse initializers where that is smaller.

    A sparse tensor stores each non-zero value with an int64 index, so it pays only
    above ~67% zeros for float32. onnxruntime densifies sparse initializers when it
    loads the model: the file shrinks, memory and speed stay as dense.
    """
    model = onnx.load_from_string(onnx_model)
    moved = []
    for initializer in list(model.graph.initializer):
        array = numpy_helper.to_array(initializer)
        if array.dtype not in (np.float32, np.float16) or array.ndim < 2:
            continue
        flat = array.flatten()
        nonzero = np.flatnonzero(flat)
        if len(nonzero) * (array.itemsize + INDEX_BYTES) >= array.nbytes:
            continue
        values = numpy_helper.from_array(flat[nonzero], initializer.name)
        indices = numpy_helper.from_array(nonzero.astype(np.int64), f"{initializer.name}.indices")
        model.graph.sparse_initializer.append(
            helper.make_sparse_tensor(values, indices, list(array.shape))
        )
        model.graph.initializer.remove(initializer)
        moved.append(initializer.name)
    return model.SerializeToString(), moved


def weight_sparsity(model: nn.Module) -> list[LayerSparsity]:
    """Shape and sparsity of every Linear, Conv2d and Embedding weight."""
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.Conv2d | nn.Embedding):
            weight = module.weight.detach()
            nonzero = int(weight.count_nonzero())
            layers.append(
                LayerSparsity(
                    name=f"{name}.weight",
                    shape=list(weight.shape),
                    parameters=weight.numel(),
                    nonzero=nonzero,
                    sparsity=1.0 - nonzero / weight.numel(),
                )
            )
    return layers


def write_variant(
    repository: Path, name: str, onnx_model: bytes, manifest: VariantManifest, version: int = 1
) -> Path:
    """Write ``<repository>/<name>/<version>/model.onnx`` and its manifest; return the dir."""
    model_dir = repository / name
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    # A polling server must never load half a model.onnx, so the file appears by rename
    # and last, after the manifest that describes it.
    partial = version_dir / f".model.onnx.{os.getpid()}.tmp"
    try:
        partial.write_bytes(onnx_model)
        manifest.write(model_dir / MANIFEST_FILENAME)
        os.replace(partial, version_dir / "model.onnx")
    finally:
        partial.unlink(missing_ok=True)
    return model_dir
