"""The backend interface and the name -> implementation table.

Implementations are listed as ``"module:Class"`` strings and imported only when chosen,
so an optional backend's dependencies (tritonclient, CUDA) are never imported by a server
that does not use it.
"""

from __future__ import annotations

import asyncio
import importlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from sparseserve.codec import BYTES, Datatype, datatype_of
from sparseserve.errors import InferenceFailed, InvalidInput, ModelLoadError, SparseServeError
from sparseserve.repository.manifest import Precision

R = TypeVar("R")

if TYPE_CHECKING:
    from sparseserve.observability.stats import DispatchStats
    from sparseserve.protocol.model_config_pb2 import ModelConfig


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A model input or output as the protocol describes it (-1: dynamic dimension)."""

    name: str
    datatype: Datatype
    shape: tuple[int, ...]
    # False: the model declares no rank for this tensor (ONNX allows it), so any shape
    # is accepted; `shape` is then (-1,), which is how metadata describes it.
    rank_known: bool = True

    def accepts_shape(self, shape: Sequence[int]) -> bool:
        if not self.rank_known:
            return True
        return len(shape) == len(self.shape) and all(
            want in (-1, got) for want, got in zip(self.shape, shape, strict=True)
        )


@dataclass(frozen=True, slots=True)
class ModelSignature:
    """What a loaded model takes and gives, and the checks every request goes through."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    output_names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "output_names", tuple(spec.name for spec in self.outputs))

    def validate(self, model: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Raise `InvalidInput` naming what was expected unless `arrays` fits the inputs."""
        for spec in self.inputs:
            array = arrays.get(spec.name)
            if array is None:
                self._check_names(model, arrays)
                raise InvalidInput(
                    f"model {model!r} is missing input {spec.name!r}; expected inputs: "
                    f"{_describe(self.inputs)}"
                )
            if array.dtype != spec.datatype.numpy:
                got = datatype_of(array)
                if got is not spec.datatype:
                    raise InvalidInput(
                        f"input {spec.name!r} of model {model!r} expects datatype "
                        f"{spec.datatype.name}, got {got.name}"
                    )
            if not spec.accepts_shape(array.shape):
                raise InvalidInput(
                    f"input {spec.name!r} of model {model!r} expects shape {list(spec.shape)} "
                    f"(-1: any size), got {list(array.shape)}"
                )
        if len(arrays) != len(self.inputs):
            self._check_names(model, arrays)

    def batch_dimension_problem(self) -> str:
        """Why the leading dimension is not a batch dimension of every tensor ("" if it
        is): batching needs a dynamic (-1) leading dimension on every input and output."""
        for kind, specs in (("input", self.inputs), ("output", self.outputs)):
            for spec in specs:
                if not spec.rank_known or not spec.shape or spec.shape[0] != -1:
                    return (
                        f"{kind} {spec.name!r} has shape {list(spec.shape)}; every input and "
                        "output needs a dynamic (-1) leading dimension to batch on"
                    )
        return ""

    def _check_names(self, model: str, arrays: Mapping[str, np.ndarray]) -> None:
        known = {spec.name for spec in self.inputs}
        for name in arrays:
            if name not in known:
                raise InvalidInput(
                    f"model {model!r} has no input {name!r}; expected inputs: "
                    f"{_describe(self.inputs)}"
                )

    def select_outputs(self, model: str, requested: Sequence[str]) -> Sequence[str]:
        """The output names to compute: all, in model order, or exactly those requested."""
        if not requested:
            return self.output_names
        known = self.output_names
        seen: set[str] = set()
        for name in requested:
            if name not in known:
                raise InvalidInput(
                    f"model {model!r} has no output {name!r}; expected outputs: "
                    f"{_describe(self.outputs)}"
                )
            if name in seen:
                raise InvalidInput(f"output {name!r} is requested more than once")
            seen.add(name)
        return requested


def warmup_inputs(signature: ModelSignature) -> dict[str, np.ndarray]:
    """One all-zero (or empty-string) sample per input; dynamic dimensions become 1."""
    return timing_inputs(signature, dynamic_size=1)


# The largest input `timing_inputs` makes: a gRPC message's limit (2 GiB), past which no
# request could carry the input either (a model declaring a fixed dimension of 2**40
# had the warm-up ask numpy for 4 TiB).
MAX_SAMPLE_BYTES = 2**31 - 1

# What `timing_inputs` gives each dynamic dimension after the first: a text model's
# sequence of 128 tokens, an image's side of 128 pixels.
TIMING_DYNAMIC_SIZE = 128


def timing_inputs(
    signature: ModelSignature, dynamic_size: int = TIMING_DYNAMIC_SIZE, batch: int = 1
) -> dict[str, np.ndarray]:
    """The inputs `auto` times engines on: all-zero (or empty-string) inputs, a dynamic
    first dimension at `batch`, every dynamic dimension after it `dynamic_size` (1:
    `warmup_inputs`). Timed at the warm-up's single token, OpenVINO ran MiniLM's
    static-int8 variant 2.7x faster than onnxruntime; at 128 tokens it ran 0.85x as
    fast, and `auto` had served it on the slower engine."""
    feeds = {}
    for spec in signature.inputs:
        shape = tuple(
            d if d != -1 else (batch if i == 0 else dynamic_size) for i, d in enumerate(spec.shape)
        )
        size = math.prod(shape) * spec.datatype.itemsize
        if size > MAX_SAMPLE_BYTES:
            raise ModelLoadError(
                f"input {spec.name!r} of shape {list(spec.shape)} needs {size:,} bytes for "
                f"{'one row' if batch == 1 else f'{batch} rows'}, more than any request can "
                f"carry ({MAX_SAMPLE_BYTES:,}); is a fixed dimension meant to be dynamic (-1)?"
            )
        if spec.datatype is BYTES:
            feeds[spec.name] = np.full(shape, b"", dtype=object)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=spec.datatype.numpy)
    return feeds


def config_mismatches(signature: ModelSignature, config: ModelConfig) -> list[str]:
    """Where config.pbtxt's inputs and outputs contradict the model's, each in a phrase
    (empty: they agree). ModelConfig reports config.pbtxt's tensors, and clients build
    requests from them, so a config that names, types or shapes a tensor otherwise than
    the model does is refused, as Triton's onnxruntime backend refuses it: dims leave out
    the batch dimension where `max_batch_size` > 0, which needs every input's and
    output's first dimension dynamic; a `reshape` is compared instead of the dims it
    reshapes; a dimension the model leaves dynamic (-1) may be fixed by the config. The
    config may list some tensors only (ModelConfig adds the others). Stricter than
    Triton's OpenVINO backend, which reshapes an IR to the configured batch and dims:
    sparseserve serves the file's own shapes, so the config must describe them."""
    from sparseserve.protocol.model_config_pb2 import DataType

    problems = []
    skip = 1 if config.max_batch_size > 0 else 0
    if skip and (why := signature.batch_dimension_problem()):
        problems.append(
            f"max_batch_size is {config.max_batch_size}, but {why} (set max_batch_size: 0 for "
            "a model of fixed shapes; sparseserve does not reshape a model to a batch)"
        )
    for kind, specs, configured in (
        ("input", signature.inputs, config.input),
        ("output", signature.outputs, config.output),
    ):
        by_name = {spec.name: spec for spec in specs}
        for tensor in configured:
            spec = by_name.get(tensor.name)
            if spec is None:
                problems.append(
                    f"{kind} {tensor.name!r} is not one of the model's {kind}s {list(by_name)}"
                )
                continue
            if tensor.data_type not in DataType.values():
                problems.append(f"{kind} {tensor.name!r} has data_type {tensor.data_type}, "
                                "no type of Triton's")  # fmt: skip
                continue
            datatype = DataType.Name(tensor.data_type)
            if tensor.data_type and datatype != spec.datatype.config:
                problems.append(
                    f"{kind} {tensor.name!r} is {spec.datatype.config} in the model, "
                    f"{datatype} in config.pbtxt"
                )
            if not spec.rank_known or (skip and spec.shape[:1] != (-1,)):
                continue  # any dims; or refused above for its batch dimension
            dims = list(tensor.reshape.shape if tensor.HasField("reshape") else tensor.dims)
            model = list(spec.shape[skip:])
            if not (
                len(dims) == len(model)
                and all(want in (-1, got) for want, got in zip(model, dims, strict=True))
            ):
                problems.append(
                    f"{kind} {tensor.name!r} has dims {model} in the model "
                    f"{'(batch dimension left out, max_batch_size > 0) ' if skip else ''}"
                    f"(-1: any), {dims} in config.pbtxt"
                )
    return problems


def _describe(specs: Sequence[TensorSpec]) -> str:
    return ", ".join(f"{s.name} {s.datatype.name}{list(s.shape)}" for s in specs)


async def await_run(job: Future[R], stop: Callable[[], None] | None = None) -> R:
    """Await a run on the thread pool. If the caller is cancelled (deadline passed,
    client gone, shutdown grace over), a run that has not started is dropped, and one
    that has is told to `stop` (where the engine can) and waited for, so that the
    model's in-flight count only falls once its thread is free again. The run's outcome
    is then retrieved: a run stopped on purpose is no error for asyncio to log as
    "Future exception was never retrieved"."""
    wrapped = asyncio.wrap_future(job)
    try:
        return await asyncio.shield(wrapped)
    except asyncio.CancelledError:
        wrapped.add_done_callback(_retrieve)
        if not job.cancel():
            if stop is not None:
                stop()
            await asyncio.wait([wrapped])
        raise


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def engine_failure(model: str, message: str, client_faults: Sequence[str]) -> SparseServeError:
    """What an engine's error during a run means for the client: its input shapes
    (`InvalidInput`) when the engine's `message`, already stripped of source paths, names
    one of `client_faults`, else a failure of the model (`InferenceFailed`)."""
    if any(fault in message for fault in client_faults):
        return InvalidInput(f"model {model!r} cannot run on these input shapes: {message}")
    return InferenceFailed(f"model {model!r} failed: {message}")


@dataclass(slots=True)  # not frozen: its __init__ runs once per execution, frozen's is slower
class ExecutionRecord:
    """What one backend execution gave and who ran it: `backend` is the name of the
    backend that actually computed `outputs` (a dispatching backend passes on the record
    of the one it handed the execution to), `compute_ns` how long that took."""

    outputs: dict[str, np.ndarray]
    backend: str
    compute_ns: int


class Backend(ABC):
    """Runs one version of one model. `load` before `infer`; `unload` when done."""

    name: str = "base"  # the `backend` metric label and ModelConfig.backend
    platform: str = ""  # Triton's platform string, e.g. "onnxruntime_onnx"
    # What the loaded model computes in, as the engine reports it after compiling.
    precision: Precision = Precision.fp32
    # Layers the engine runs on a kernel that skips zero weights (OpenVINO's sparse
    # kernel); 0 where the engine has none.
    sparse_kernel_layers: int = 0
    # Median time of one warm-up run after load, in seconds (None: not measured).
    warmup_seconds: float | None = None
    # With cpu_engine auto: each candidate engine's median run at one row, in seconds.
    candidate_seconds: Mapping[str, float] = MappingProxyType({})

    @abstractmethod
    async def load(self) -> ModelSignature:
        """Load and warm up the model; return its signature. Raise `ModelLoadError`."""

    @abstractmethod
    async def infer(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> ExecutionRecord:
        """Run the model on validated inputs; return the named outputs in that order,
        with who ran them and for how long."""

    @abstractmethod
    async def unload(self) -> None:
        """Release the model's resources. In-flight calls have finished when this runs."""

    def run_once(self, feeds: Mapping[str, np.ndarray]) -> float:
        """Run the loaded model once on `feeds` (`timing_inputs`), blocking (on a worker
        thread), and return the seconds it took: how `auto` compares engines, run after
        run in turn. Backends that cannot be timed so raise NotImplementedError."""
        raise NotImplementedError(f"{self.name} cannot be timed")

    def dispatch_stats(self) -> DispatchStats | None:
        """For a backend that hands executions to others: who ran them. None: itself."""
        return None


# Name -> "module:Class". Optional implementations are resolved only when used.
BACKENDS: Mapping[str, str] = {
    "onnxruntime": "sparseserve.backends.onnxruntime:OnnxRuntimeBackend",
    "openvino": "sparseserve.backends.openvino:OpenVinoBackend",
    "triton": "sparseserve.backends.triton:TritonBackend",
}


def backend_class(name: str) -> type[Backend]:
    """Import and return the backend registered as `name`."""
    try:
        target = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}") from None
    module_name, _, class_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise TypeError(f"{target} is not a Backend")
    return cls


@dataclass(frozen=True, slots=True)
class ModelFiles:
    """Where one version of a model lives on disk."""

    name: str
    version: int
    path: Path  # the model file itself, e.g. <repo>/<name>/<version>/model.onnx
    config: ModelConfig | None = None  # the model's config.pbtxt, if it has one
    precision: Precision = Precision.fp32  # what the variant must be computed in
