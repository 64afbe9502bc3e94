"""CPU inference with onnxruntime: one `InferenceSession` per loaded model version.

`session.run` releases the GIL, so it runs on the registry's thread pool and the event
loop stays free to decode and answer other requests meanwhile. The exception is a run
so short that handing it to a thread would cost more than running it: handing over costs
the event loop ~30 µs of CPU and four context switches per request (measured, see
bench/results), while the digits MLP runs in ~10 µs. Warm-up measures each model, and a
request whose estimated run time is under `inline_max_us` runs on the event loop itself.
"""

from __future__ import annotations

import asyncio
import os
import re
import statistics
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, Future

import numpy as np
import onnxruntime as ort

from sparseserve import protowire
from sparseserve.backends.base import (
    Backend,
    ExecutionRecord,
    ModelFiles,
    ModelSignature,
    TensorSpec,
    await_run,
    engine_failure,
    warmup_inputs,
)
from sparseserve.codec import BY_ONNX, BYTES
from sparseserve.errors import InferenceFailed, InvalidInput, ModelLoadError
from sparseserve.repository.manifest import Precision
from sparseserve.settings import GraphOptimization, OnnxRuntimeSettings

_OPTIMIZATION = {
    GraphOptimization.disable: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    GraphOptimization.basic: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    GraphOptimization.extended: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    GraphOptimization.all: ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
# onnxruntime's Python binding cannot hand bfloat16 results back as numpy arrays.
_UNSUPPORTED = {"tensor(bfloat16)"}
# Strings are converted to `str` one by one (~0.2 µs each) before a run, which the
# warm-up estimate of a run's cost does not see: more than this many never run inline.
INLINE_MAX_STRINGS = 256
# Run-time errors that only the inputs' dimensions cause (the signature checks ranks and
# static dimensions, but not how dynamic ones must agree): the client's fault.
_CLIENT_FAULTS = (
    "Attempting to broadcast",
    "Incompatible dimensions",
    "cannot be reshaped to the requested shape",
    "Invalid rank for input",
    "Got invalid dimensions for input",
    "dimension mismatch",
    "Shape mismatch",
)
# What onnxruntime puts before the reason: its source path and line, the C++ function,
# and the failed check ("/onnxruntime_src/...h:563 void f(...) axis == 1 was false.").
_ENGINE_SOURCE = re.compile(r"\S*/onnxruntime\S*:\d+ .*? was false\. |\S*/onnxruntime\S*:\d+ ")
# A C++ signature left after it ("onnxruntime::Model::Model(onnx::ModelProto&&, ...) ").
_ENGINE_SIGNATURE = re.compile(r"(?:const )?onnxruntime::[\w:~]+\((?:[^()]|\([^()]*\))*\)\s*")


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    platform = "onnxruntime_onnx"

    def __init__(self, files: ModelFiles, settings: OnnxRuntimeSettings, executor: Executor):
        self._files = files
        self._settings = settings
        self._executor = executor
        self._session: ort.InferenceSession | None = None
        self._string_inputs: frozenset[str] = frozenset()
        # Run time per input element measured at warm-up; inf: never run inline.
        self._us_per_element = float("inf")
        self._warmup: tuple[list[str], dict[str, np.ndarray]] = ([], {})

    async def load(self) -> ModelSignature:
        refuse_unservable(self._files)
        loop = asyncio.get_running_loop()
        session = await loop.run_in_executor(self._executor, self._create_session)
        signature = session_signature(session, self._files)
        self._string_inputs = frozenset(s.name for s in signature.inputs if s.datatype is BYTES)
        if any(spec.shape == () for spec in signature.inputs):
            signature = await loop.run_in_executor(
                self._executor, self._find_unknown_ranks, session, signature
            )
        self._session = session
        feeds = warmup_inputs(signature)
        names = list(signature.output_names)
        await self.infer(feeds, names)
        self._warmup = (names, feeds)
        seconds = await loop.run_in_executor(self._executor, _time_runs, session, names, feeds)
        self._us_per_element = seconds * 1e6 / max(1, _elements(feeds))
        self.warmup_seconds = seconds
        return signature

    def _create_session(self) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self._settings.intra_op_threads
        options.inter_op_num_threads = self._settings.inter_op_threads
        options.graph_optimization_level = _OPTIMIZATION[self._settings.graph_optimization]
        options.log_severity_level = 3  # errors only: warnings would flood the server log
        path = self._files.path
        try:
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped exceptions
            reason = _engine_message(exc)
            if not path.exists():  # removed since the repository was read
                reason = "no such file (removed since the repository was read?)"
            elif not os.access(path, os.R_OK):  # onnxruntime: "system error number 13"
                reason = f"permission denied (not readable by this process, uid {os.getuid()})"
            raise ModelLoadError(f"onnxruntime cannot load {path}: {reason}") from exc

    async def infer(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> ExecutionRecord:
        session = self._session
        if session is None:
            raise InferenceFailed(f"model {self._files.name!r} is not loaded")
        feeds = dict(inputs)
        names = list(outputs)
        started = time.perf_counter_ns()
        try:
            if (
                self._us_per_element * _elements(feeds) <= self._settings.inline_max_us
                and sum(feeds[name].size for name in self._string_inputs) <= INLINE_MAX_STRINGS
            ):
                results = session.run(names, self._with_text(feeds))
            else:
                # Strings are converted on the inference thread too: one Python object per
                # element, too slow for the event loop when there are many.
                run_options = ort.RunOptions()
                job = self._executor.submit(self._run_session, session, names, feeds, run_options)
                results = await _run(job, run_options)
        except InvalidInput:
            raise
        except ort.capi.onnxruntime_pybind11_state.InvalidArgument as exc:
            raise InvalidInput(
                f"model {self._files.name!r} rejected the inputs: {_engine_message(exc)}"
            ) from exc
        except Exception as exc:
            raise engine_failure(self._files.name, _engine_message(exc), _CLIENT_FAULTS) from exc
        return ExecutionRecord(
            dict(zip(names, results, strict=True)), self.name, time.perf_counter_ns() - started
        )

    def run_once(self, feeds: Mapping[str, np.ndarray]) -> float:
        assert self._session is not None
        names, _ = self._warmup
        started = time.perf_counter()
        self._session.run(names, dict(feeds))
        return time.perf_counter() - started

    def _find_unknown_ranks(
        self, session: ort.InferenceSession, signature: ModelSignature
    ) -> ModelSignature:
        """onnxruntime reports the shape of a scalar input and of an input with no
        declared rank alike, as [] (and does not check a scalar's rank at run time). The
        model file tells them apart: an input of unknown rank has a type with no shape.
        Such an input accepts any shape."""
        try:
            unranked = inputs_without_rank(self._files.path.read_bytes())
        except (OSError, IndexError, ValueError, ModelLoadError):
            unranked = set()  # onnxruntime read the file; ranks as it reports them
        inputs = tuple(
            TensorSpec(spec.name, spec.datatype, (-1,), rank_known=False)
            if spec.shape == () and spec.name in unranked
            else spec
            for spec in signature.inputs
        )
        return ModelSignature(inputs, signature.outputs)

    def _with_text(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name in self._string_inputs:
            feeds[name] = _as_text(name, feeds[name])
        return feeds

    def _run_session(
        self,
        session: ort.InferenceSession,
        names: list[str],
        feeds: dict[str, np.ndarray],
        run_options: ort.RunOptions,
    ) -> list[np.ndarray]:
        outputs: list[np.ndarray] = session.run(names, self._with_text(feeds), run_options)
        return outputs

    async def unload(self) -> None:
        # Dropping the last reference frees the session; in-flight runs hold their own.
        self._session = None


def refuse_unservable(files: ModelFiles) -> None:
    """Raise `ModelLoadError` for a variant onnxruntime cannot serve as it is meant to
    be: a bf16 variant (onnxruntime's CPU kernels compute fp32, so it would silently
    answer other numbers) or an OpenVINO IR file."""
    if files.precision is not Precision.fp32:
        raise ModelLoadError(
            f"model {files.name!r} is a {files.precision.value} variant and onnxruntime "
            "computes only fp32 on the CPU; serve it with the openvino engine (cpu_engine "
            'openvino or auto, or config.pbtxt backend: "openvino") on a CPU with bf16'
        )
    if files.path.suffix != ".onnx":
        raise ModelLoadError(
            f"onnxruntime cannot load {files.path.name} (model {files.name!r}): it reads "
            "ONNX files; an OpenVINO IR model.xml needs the openvino engine"
        )


async def _run(job: Future[list[np.ndarray]], run_options: ort.RunOptions) -> list[np.ndarray]:
    """Await a `session.run` on the thread pool; a cancelled caller's run is told to
    terminate (`base.await_run`)."""
    return await await_run(job, lambda: setattr(run_options, "terminate", True))


# Field numbers of onnx.proto: ModelProto.graph, GraphProto.input, ValueInfoProto.name
# and .type, TypeProto.tensor_type, TypeProto.Tensor.shape.
_MODEL_GRAPH, _GRAPH_INPUT, _VALUE_NAME, _VALUE_TYPE, _TYPE_TENSOR, _TENSOR_SHAPE = (
    7, 11, 1, 2, 1, 2,
)  # fmt: skip


def inputs_without_rank(model: bytes) -> set[str]:
    """Names of the graph inputs of an ONNX model whose tensor type declares no shape.
    Reads the protobuf fields it needs and skips the rest (weights included) without
    copying, so that the serving path needs no `onnx` package."""
    messages = protowire.messages
    names = set()
    try:
        for graph in messages(memoryview(model), _MODEL_GRAPH):
            for value in messages(graph, _GRAPH_INPUT):
                name = b"".join(bytes(n) for n in messages(value, _VALUE_NAME)).decode()
                for type_ in messages(value, _VALUE_TYPE):
                    for tensor in messages(type_, _TYPE_TENSOR):
                        if not any(True for _ in messages(tensor, _TENSOR_SHAPE)):
                            names.add(name)
    except ValueError as exc:
        raise ModelLoadError(f"malformed model file: {exc}") from None
    return names


def _engine_message(error: Exception) -> str:
    """onnxruntime's message without its source paths and C++ signatures: the node and
    the reason are for the client; where in onnxruntime it failed is not."""
    message = str(error)
    if "Status Message: " in message:
        head, _, reason = message.partition("Status Message: ")
        node = head.partition("while running ")[2].strip()
        message = f"{node}: {reason}" if node else reason
    return _ENGINE_SIGNATURE.sub("", _ENGINE_SOURCE.sub("", message)).strip()


def _elements(feeds: Mapping[str, np.ndarray]) -> int:
    return sum(array.size for array in feeds.values())


def _time_runs(
    session: ort.InferenceSession, names: list[str], feeds: dict[str, np.ndarray], runs: int = 7
) -> float:
    """Median wall time of `runs` back-to-back runs (after warm-up), in seconds."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(names, feeds)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def session_signature(session: ort.InferenceSession, files: ModelFiles) -> ModelSignature:
    def specs(args: Sequence[ort.NodeArg]) -> tuple[TensorSpec, ...]:
        result = []
        for arg in args:
            if arg.type in _UNSUPPORTED or arg.type not in BY_ONNX:
                raise ModelLoadError(
                    f"{files.path}: tensor {arg.name!r} has type {arg.type}, which the "
                    "onnxruntime backend cannot exchange; cast it to a supported type"
                )
            shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
            result.append(TensorSpec(arg.name, BY_ONNX[arg.type], shape))
        return tuple(result)

    return ModelSignature(specs(session.get_inputs()), specs(session.get_outputs()))


def _as_text(name: str, array: np.ndarray) -> np.ndarray:
    """onnxruntime string tensors take `str`; it would turn `bytes` into "b'...'"."""
    flat = array.reshape(-1).tolist()
    text = np.empty(len(flat), dtype=object)
    try:
        text[:] = [item.decode("utf-8") if isinstance(item, bytes) else str(item) for item in flat]
    except UnicodeDecodeError as exc:
        index = next(i for i, item in enumerate(flat) if not _is_utf8(item))
        raise InvalidInput(
            f"input {name!r}: onnxruntime string tensors hold UTF-8 text; element {index} "
            f"is not valid UTF-8 ({exc.reason})"
        ) from None
    return text.reshape(array.shape)


def _is_utf8(item: object) -> bool:
    try:
        if isinstance(item, bytes):
            item.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
