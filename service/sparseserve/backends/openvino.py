"""CPU inference with OpenVINO: one compiled model per loaded model version.

OpenVINO reads the same `model.onnx` as onnxruntime, or the IR pair `model.xml` +
`model.bin` of Triton's OpenVINO backend. Each execution runs on an `InferRequest` of
its own, taken from a pool that grows to the number of executions in flight (at most
the registry's inference threads, plus one inline run): the compiled model's shared
request is never used, as two runs on it at once would overwrite each other's tensors.
`InferRequest.infer` releases the GIL, so runs go to the registry's thread pool as the
onnxruntime backend's do, and runs measured at warm-up to be shorter than the hand-off
(`onnxruntime.inline_max_us`) run on the event loop.

Precision is the variant's, never OpenVINO's default: INFERENCE_PRECISION_HINT is set
to f32 (OpenVINO's own default on CPUs with AMX or AVX512-BF16 is bf16) or, for a bf16
variant, to bf16, which only a CPU that computes bf16 can honour. After compiling, the
precision the compiled model reports is read back and the load refused if it is not the
one asked for: OpenVINO silently compiles f32 when asked for bf16 on a CPU without it.

Inputs whose dynamic dimensions disagree (multi_io's a [2, 4] + b [3, 4]) must never
reach a compiled model: OpenVINO 2026.4 answers them with outputs of a wrong shape when
one thread runs the inference, and they leave the infer request (with one thread, the
compiled model) in a state where later valid requests get wrong answers or abort the
process ("pure virtual method called"). A model with more than one input of dynamic
shape therefore keeps a weightless copy of its graph, and each new combination of input
shapes goes through OpenVINO's shape inference on it once before it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import Executor, Future
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

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
from sparseserve.codec import BY_NAME, Datatype
from sparseserve.errors import InferenceFailed, InvalidInput, ModelLoadError
from sparseserve.repository.manifest import Precision
from sparseserve.repository.store import ModelRepository
from sparseserve.settings import OpenVinoSettings, PerformanceHint

if TYPE_CHECKING:
    import openvino

log = logging.getLogger(__name__)

# config.pbtxt `parameters` of Triton's OpenVINO backend that sparseserve applies (HINT_BF16
# is read with the variant's precision, in sparseserve.repository.store).
PERFORMANCE_HINT = "PERFORMANCE_HINT"
NUM_STREAMS = "NUM_STREAMS"
INFERENCE_NUM_THREADS = "INFERENCE_NUM_THREADS"
SPARSE_RATE = "CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE"
# OpenVINO's names for the precisions a variant can ask for.
_HINT = {Precision.fp32: "f32", Precision.bf16: "bf16"}
_PRECISION = {"f32": Precision.fp32, "bf16": Precision.bf16}
# The OPTIMIZATION_CAPABILITIES entry of a CPU that computes each precision.
_CAPABILITY = {Precision.fp32: "FP32", Precision.bf16: "BF16"}
# Run-time errors that only the inputs' dimensions cause (the signature checks ranks and
# static dimensions, not how dynamic ones must agree): the client's fault.
_CLIENT_FAULTS = ("shape infer", "mismatch", "Can not clone with new dims", "incompatible")
# OpenVINO's source locations: "Exception from src/x.cpp:224:" and "Check 'c' failed at
# src/y.cpp:52:". The reason is for the client, where in OpenVINO it failed is not.
_ENGINE_SOURCE = re.compile(r"Exception from \S+:\d+:\s*|Check '.*?' failed at \S+:\d+:\s*")
# How many timed runs give the warm-up median.
WARMUP_RUNS = 7
# Combinations of input shapes remembered as checked, per model (then it starts over).
CHECKED_SHAPES_MAX = 4096
# Constants with more elements than this are weights, not shapes: the shape-checking copy
# of a graph replaces them with a broadcast zero of the same shape.
_WEIGHT_ELEMENTS = 64


@cache
def _core() -> openvino.Core:
    """One OpenVINO Core per process: it holds the plugins and their caches."""
    import openvino

    return openvino.Core()


def cpu_capabilities() -> tuple[str, ...]:
    """OpenVINO's OPTIMIZATION_CAPABILITIES of this CPU, e.g. ('FP32', 'INT8', 'BIN',
    'EXPORT_IMPORT'); 'BF16' only where the CPU computes bfloat16 (AVX512-BF16, AMX)."""
    return tuple(_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


class OpenVinoBackend(Backend):
    name = "openvino"
    platform = "openvino"

    def __init__(
        self,
        files: ModelFiles,
        settings: OpenVinoSettings,
        intra_op_threads: int,
        inline_max_us: float,
        executor: Executor,
    ):
        self._files = files
        self._settings = settings
        self._intra_op_threads = intra_op_threads
        self._inline_max_us = inline_max_us
        self._executor = executor
        self._compiled: openvino.CompiledModel | None = None
        self._idle: list[openvino.InferRequest] = []  # requests no execution holds
        # The weightless graph that checks input shapes (None: one dynamic input or none),
        # and the combinations of input shapes it passed.
        self._shape_model: openvino.Model | None = None
        self._checked_shapes: set[tuple[tuple[str, tuple[int, ...]], ...]] = set()
        self._timer: tuple[openvino.InferRequest, dict[str, np.ndarray]] | None = None
        self._graph_names: frozenset[str] = frozenset()  # the file's tensor names
        self._us_per_element = float("inf")  # from warm-up; inf: never run inline

    async def load(self) -> ModelSignature:
        config = compile_config(self._files, self._settings, self._intra_op_threads)
        self._check_cpu()
        loop = asyncio.get_running_loop()
        compiled = await loop.run_in_executor(self._executor, self._compile, config)
        self.precision = self._compiled_precision(compiled)
        signature = compiled_signature(compiled, self._files, self._graph_names)
        self._compiled = compiled
        feeds = warmup_inputs(signature)
        names = list(signature.output_names)
        await self.infer(feeds, names)
        # Read after a run: where an input shape is dynamic, OpenVINO picks each layer's
        # kernel when it first sees a shape, and until then names it "undef".
        self.sparse_kernel_layers = sparse_kernel_layers(compiled)
        # A request of its own for timing: `auto` times it on a worker thread while the
        # pool belongs to the event loop.
        self._timer = (compiled.create_infer_request(), feeds)
        seconds = await loop.run_in_executor(self._executor, _time_runs, self._timer[0], feeds)
        self.warmup_seconds = seconds
        self._us_per_element = seconds * 1e6 / max(1, sum(a.size for a in feeds.values()))
        log.info(
            "openvino compiled %s version %d: %s, %d layers on a sparse kernel, config %s",
            self._files.name, self._files.version, self.precision.value,
            self.sparse_kernel_layers, config,
        )  # fmt: skip
        return signature

    def _check_cpu(self) -> None:
        precision = self._files.precision
        capabilities = cpu_capabilities()
        if _CAPABILITY[precision] not in capabilities:
            raise ModelLoadError(
                f"model {self._files.name!r} is a {precision.value} variant, and this CPU "
                f"cannot compute {precision.value}: OpenVINO's OPTIMIZATION_CAPABILITIES "
                f"{list(capabilities)} lack {_CAPABILITY[precision]} (bf16 needs AVX512_BF16 "
                "or AMX-BF16, e.g. Intel Sapphire Rapids or AMD Zen 4); serve its fp32 "
                "variant here"
            )

    def _compile(self, config: dict[str, Any]) -> openvino.CompiledModel:
        core = _core()
        try:
            model = read_model(core, self._files.path)
            self._graph_names = graph_names(model)
            dynamic = [port for port in model.inputs if port.get_partial_shape().is_dynamic]
            if len(dynamic) > 1:
                self._shape_model = weightless_copy(model)
            return core.compile_model(model, "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError for everything
            raise ModelLoadError(
                f"openvino cannot load {self._files.path}: {_engine_message(exc)}"
            ) from exc

    def _compiled_precision(self, compiled: openvino.CompiledModel) -> Precision:
        """What the compiled model computes in, refusing the load if that is not the
        variant's precision (OpenVINO falls back to f32 without a word)."""
        reported = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        wanted = self._files.precision
        precision = _PRECISION.get(reported)
        if precision is not wanted:
            raise ModelLoadError(
                f"model {self._files.name!r} is a {wanted.value} variant, but OpenVINO "
                f"compiled it in {reported} on this CPU (capabilities "
                f"{list(cpu_capabilities())}); it is not served in a precision it was not "
                "measured in"
            )
        return precision

    async def infer(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> ExecutionRecord:
        if self._compiled is None:
            raise InferenceFailed(f"model {self._files.name!r} is not loaded")
        names = list(outputs)
        feeds = dict(inputs)
        if self._shape_model is not None:
            # By name: a request may list its inputs in any order.
            shapes = tuple((name, feeds[name].shape) for name in sorted(feeds))
            if shapes not in self._checked_shapes:
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(self._executor, self._check_shapes, feeds)
                if len(self._checked_shapes) >= CHECKED_SHAPES_MAX:
                    self._checked_shapes.clear()
                self._checked_shapes.add(shapes)
        request = self._take()
        started = time.perf_counter_ns()
        job: Future[list[np.ndarray]] | None = None
        try:
            if self._us_per_element * sum(a.size for a in feeds.values()) <= self._inline_max_us:
                results = _run_request(request, feeds, names)
            else:
                job = self._executor.submit(_run_request, request, feeds, names)
                results = await _wait(job)
        except Exception as exc:
            raise engine_failure(self._files.name, _engine_message(exc), _CLIENT_FAULTS) from exc
        finally:
            if job is not None and not job.done():
                # Cancelled again while its run went on (a shutdown's cut, then grpc's
                # stop): the request is busy until the run ends, and only then reusable.
                loop = asyncio.get_running_loop()
                job.add_done_callback(lambda _: _on_loop(loop, self._give_back, request))
            else:
                self._give_back(request)
        return ExecutionRecord(
            dict(zip(names, results, strict=True)), self.name, time.perf_counter_ns() - started
        )

    def run_once(self, feeds: Mapping[str, np.ndarray]) -> float:
        assert self._timer is not None
        request, _ = self._timer
        started = time.perf_counter()
        request.infer(dict(feeds))
        return time.perf_counter() - started

    def _check_shapes(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Raise `InvalidInput` unless OpenVINO's shape inference accepts these input
        shapes together (see the module docstring for why this runs first)."""
        assert self._shape_model is not None
        graph = self._shape_model.clone()
        try:
            graph.reshape({name: list(array.shape) for name, array in feeds.items()})
        except Exception as exc:  # OpenVINO raises RuntimeError for everything
            raise InvalidInput(
                f"model {self._files.name!r} cannot run on these input shapes "
                f"({', '.join(f'{n} {list(a.shape)}' for n, a in feeds.items())}): "
                f"{_engine_message(exc)}"
            ) from exc

    def _give_back(self, request: openvino.InferRequest) -> None:
        if self._compiled is not None:  # after unload, the request goes with the model
            self._idle.append(request)

    def _take(self) -> openvino.InferRequest:
        """A request no execution holds: the pool only grows while more run at once."""
        if self._idle:
            return self._idle.pop()
        assert self._compiled is not None
        return self._compiled.create_infer_request()

    async def unload(self) -> None:
        # In-flight runs hold their request, which holds the compiled model; the last one
        # to finish frees it.
        self._compiled = None
        self._idle.clear()
        self._shape_model = None
        self._timer = None


def compile_config(
    files: ModelFiles, settings: OpenVinoSettings, intra_op_threads: int
) -> dict[str, Any]:
    """OpenVINO's compile properties for one model: the server's settings, overridden by
    the Triton OpenVINO-backend keys in the model's config.pbtxt `parameters`, and the
    variant's precision. Raise `ModelLoadError` naming a parameter whose value is wrong."""
    threads = settings.inference_num_threads
    config: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": _HINT[files.precision],
        PERFORMANCE_HINT: settings.performance_hint.value,
        INFERENCE_NUM_THREADS: intra_op_threads if threads is None else threads,
    }
    if settings.num_streams:
        config[NUM_STREAMS] = settings.num_streams
    if settings.sparse_weights_decompression_rate is not None:
        config[SPARSE_RATE] = settings.sparse_weights_decompression_rate
    parameters = files.config.parameters if files.config is not None else {}

    def parameter(key: str) -> str | None:
        return parameters[key].string_value.strip() if key in parameters else None

    def bad(key: str, value: str, expected: str) -> ModelLoadError:
        return ModelLoadError(
            f"model {files.name!r}: config.pbtxt parameter {key} is {value!r}; expected {expected}"
        )

    if (hint := parameter(PERFORMANCE_HINT)) is not None:
        if hint.upper() not in PerformanceHint.__members__:
            raise bad(PERFORMANCE_HINT, hint, "LATENCY or THROUGHPUT")
        config[PERFORMANCE_HINT] = hint.upper()
    if (streams := parameter(NUM_STREAMS)) is not None:
        if streams.upper() in ("AUTO", "NUMA"):
            config[NUM_STREAMS] = streams.upper()
        elif streams.isdigit() and int(streams) > 0:
            config[NUM_STREAMS] = int(streams)
        else:
            raise bad(NUM_STREAMS, streams, "a positive integer, AUTO or NUMA")
    if (count := parameter(INFERENCE_NUM_THREADS)) is not None:
        if not count.isdigit():
            raise bad(INFERENCE_NUM_THREADS, count, "a non-negative integer")
        config[INFERENCE_NUM_THREADS] = int(count)
    if (rate := parameter(SPARSE_RATE)) is not None:
        try:
            value = float(rate)
        except ValueError:
            value = -1.0
        if not 0.0 < value <= 1.0:
            raise bad(SPARSE_RATE, rate, "a fraction in (0, 1]")
        config[SPARSE_RATE] = value
    return config


def weightless_copy(model: openvino.Model) -> openvino.Model:
    """A copy of `model` for shape inference only: every weight (a constant of more than
    a few elements) becomes a broadcast zero of its shape, so the copy keeps no weights
    alive. Small constants stay: shape inference reads their values (Reshape targets,
    Gather indices)."""
    import openvino.opset13 as ops

    copy = model.clone()
    for op in copy.get_ordered_ops():
        if op.get_type_name() != "Constant" or not op.get_output_partial_shape(0).is_static:
            continue
        shape = [int(d) for d in op.get_output_shape(0)]
        if int(np.prod(shape)) > _WEIGHT_ELEMENTS:
            zero = ops.constant(np.zeros((), dtype=op.get_element_type().to_dtype()))
            filled = ops.broadcast(zero, ops.constant(np.array(shape, np.int64)))
            op.output(0).replace(filled.output(0))
    return copy


def layer_kernels(compiled: openvino.CompiledModel) -> list[str]:
    """The kernel OpenVINO's CPU plugin runs each layer of the compiled model on (its
    runtime model's rt_info `primitiveType`, "brgemm_avx512_amx_I8" say). Where an input
    shape is dynamic, a layer's kernel is chosen when the model first runs: until then it
    is named "undef..."."""
    kernels = []
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if "primitiveType" in info:
            kernels.append(str(info["primitiveType"].astype(str)))
    return kernels


def sparse_kernel_layers(compiled: openvino.CompiledModel) -> int:
    """Layers of the compiled model that run on a kernel skipping zero weights: one whose
    name says "sparse" (int8 FullyConnected with enough zeros, AMX only). Never seen to
    run: on an AMX Xeon OpenVINO 2026.4.1 ran a 90%-zero int8 MLP on the dense
    `brgemm_avx512_amx_i8` with the sparse setting on (bench/openvino_kernels.py). Read
    it after a run (`layer_kernels`)."""
    return sum("sparse" in kernel for kernel in layer_kernels(compiled))


# OpenVINO element type name -> protocol datatype. BYTES is left out: OpenVINO takes
# strings only as fixed-width numpy arrays, which drop trailing NUL bytes, so an element
# would not reach the model as sent. bf16 tensors: numpy has no bfloat16 of its own.
_BY_ELEMENT: Mapping[str, Datatype] = {
    element: BY_NAME[name]
    for element, name in (
        ("boolean", "BOOL"), ("u8", "UINT8"), ("u16", "UINT16"), ("u32", "UINT32"),
        ("u64", "UINT64"), ("i8", "INT8"), ("i16", "INT16"), ("i32", "INT32"),
        ("i64", "INT64"), ("f16", "FP16"), ("f32", "FP32"), ("f64", "FP64"),
    )
}  # fmt: skip


def graph_names(model: openvino.Model) -> frozenset[str]:
    """The names the model file gives its inputs and outputs."""
    return frozenset(name for port in [*model.inputs, *model.outputs] for name in port.get_names())


def compiled_signature(
    compiled: openvino.CompiledModel, files: ModelFiles, names: Collection[str] = ()
) -> ModelSignature:
    """The compiled model's inputs and outputs as the protocol describes them, each by
    its name in `names` (`graph_names` of the model as read): compiling may give a port
    more names, and OpenVINO's `get_any_name` then returned another (an fp16 variant's
    input `pixels` became `graph_input_cast_0`, and clients' requests were refused)."""

    def specs(ports: Sequence[openvino.ConstOutput]) -> tuple[TensorSpec, ...]:
        result = []
        for port in ports:
            name = min(port.get_names() & set(names), default=port.get_any_name())
            element = port.get_element_type().get_type_name()
            datatype = _BY_ELEMENT.get(element)
            if datatype is None:
                raise ModelLoadError(
                    f"{files.path}: tensor {name!r} has type {element}, which "
                    "the openvino backend cannot exchange (strings and bf16 tensors); serve "
                    "it with onnxruntime or cast it to a supported type"
                )
            shape = port.get_partial_shape()
            dims = tuple(d.get_length() if d.is_static else -1 for d in shape)
            result.append(TensorSpec(name, datatype, dims))
        return tuple(result)

    return ModelSignature(specs(compiled.inputs), specs(compiled.outputs))


def _run_request(
    request: openvino.InferRequest, feeds: dict[str, np.ndarray], names: list[str]
) -> list[np.ndarray]:
    """One execution; the results are copies, as the request is used again after."""
    results = request.infer(feeds, share_inputs=False, share_outputs=False)
    return [results[name] for name in names]


def _on_loop(loop: asyncio.AbstractEventLoop, call: Callable[..., None], *args: Any) -> None:
    """`call(*args)` on `loop`, from another thread; nothing once the loop is closed."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(call, *args)


async def _wait(job: Future[list[np.ndarray]]) -> list[np.ndarray]:
    """Await a run on the thread pool. If the caller is cancelled, a run that has not
    started is dropped; one that has cannot be stopped (a synchronous InferRequest has
    no cancel), so we wait for it: the request goes back to the pool, and the model's
    in-flight count falls, only once its thread is free again."""
    return await await_run(job)


def _time_runs(request: openvino.InferRequest, feeds: dict[str, np.ndarray]) -> float:
    """Median wall time of back-to-back runs (after warm-up), in seconds."""
    times = []
    for _ in range(WARMUP_RUNS):
        started = time.perf_counter()
        request.infer(feeds)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


# Field numbers of onnx.proto: ModelProto.graph, GraphProto.sparse_initializer.
_MODEL_GRAPH, _GRAPH_SPARSE_INITIALIZER = 7, 15


def read_model(core: openvino.Core, path: Path) -> openvino.Model:
    """OpenVINO's model of the file `path`. An ONNX file holding sparse initializers (what
    sparsify's `export.sparse_storage` writes for a pruned variant) is read through a
    dense copy: OpenVINO 2026.4's ONNX reader refuses them ("Check 'false' failed at
    src/frontends/common/src/frontend.cpp:47"), and its sparse kernel works on dense
    weights with zeros anyway."""
    if path.suffix != ".onnx":
        return core.read_model(str(path))
    data = path.read_bytes()  # read once: checked, and densified if it must be
    if not has_sparse_initializers(data):
        return core.read_model(str(path))
    with tempfile.TemporaryDirectory(prefix="sparseserve-openvino-") as tmp:
        dense = Path(tmp) / path.name
        dense.write_bytes(densified(data))
        return core.read_model(str(dense))


def has_sparse_initializers(model: bytes) -> bool:
    """Whether an ONNX model's graph stores any weight as a sparse tensor."""
    try:
        for graph in protowire.messages(memoryview(model), _MODEL_GRAPH):
            if any(True for _ in protowire.messages(graph, _GRAPH_SPARSE_INITIALIZER)):
                return True
    except ValueError:
        return False  # not an ONNX file OpenVINO can read either: its reader will say why
    return False


def densified(model: bytes) -> bytes:
    """The ONNX model with each sparse initializer stored as the dense tensor it stands
    for (zeros where it has no value), under the same name."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_model_from_string(model)
    graph = proto.graph
    for sparse in graph.sparse_initializer:
        values = numpy_helper.to_array(sparse.values)
        indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
        dims = tuple(sparse.dims)
        dense = np.zeros(int(np.prod(dims)), dtype=values.dtype)
        # Indices are either linear ([NNZ]) or one coordinate per dimension ([NNZ, rank]).
        flat = indices if indices.ndim == 1 else np.ravel_multi_index(tuple(indices.T), dims)
        dense[flat] = values
        graph.initializer.append(numpy_helper.from_array(dense.reshape(dims), sparse.values.name))
    del graph.sparse_initializer[:]
    return bytes(proto.SerializeToString())


def _engine_message(error: Exception) -> str:
    return " ".join(_ENGINE_SOURCE.sub("", str(error)).split())


def describe_compiled(path: Path) -> str:
    """What `sparseserve inspect --openvino` prints: the newest version of the model
    directory `path` (or the model file `path`) compiled as the server compiles it, with
    default settings and its config.pbtxt's parameters, and what OpenVINO reports."""
    if path.is_dir():
        source = ModelRepository(path.resolve().parent).read(path.resolve().name)
        version = max(source.versions)
        files = ModelFiles(
            source.name, version, source.versions[version], source.config, source.precision
        )
    else:
        files = ModelFiles(path.stem, 1, path)
    config = compile_config(files, OpenVinoSettings(), intra_op_threads=1)
    capabilities = cpu_capabilities()
    lines = [f"openvino on this CPU (OPTIMIZATION_CAPABILITIES {', '.join(capabilities)}):"]
    if _CAPABILITY[files.precision] not in capabilities:
        lines.append(
            f"  cannot serve it: a {files.precision.value} variant, and the CPU lacks "
            f"{_CAPABILITY[files.precision]}"
        )
        return "\n".join(lines)
    core = _core()
    try:
        model = read_model(core, files.path)
        compiled = core.compile_model(model, "CPU", config)
    except Exception as exc:  # OpenVINO raises RuntimeError for everything
        lines.append(f"  cannot compile {files.path.name}: {_engine_message(exc)}")
        return "\n".join(lines)
    precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    lines.append(f"  computes in:  {precision} (asked: {config['INFERENCE_PRECISION_HINT']})")
    try:  # one run first: the kernels of a dynamic shape are chosen when it runs
        signature = compiled_signature(compiled, files, graph_names(model))
        compiled.create_infer_request().infer(warmup_inputs(signature))
    except Exception as exc:  # OpenVINO raises RuntimeError for everything
        lines.append(f"  cannot run it: {_engine_message(exc)}")
        return "\n".join(lines)
    sparse = sparse_kernel_layers(compiled)
    rate = config.get(SPARSE_RATE)
    lines.append(
        f"  sparse kernel: {sparse} layers"
        + ("" if rate else f" ({SPARSE_RATE} not set: the sparse kernel is off)")
        + ("" if sparse else "; the kernel needs int8 layers and AMX (Sapphire Rapids on)")
    )
    return "\n".join(lines)
