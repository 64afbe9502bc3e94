"""The OpenVINO engine's pieces that need no server: what it is told to compile with
(server settings, Triton's config.pbtxt parameters, the variant's precision), where a
variant's precision comes from, and how the layers on a sparse kernel are counted."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from sparseserve.backends.base import ModelFiles
from sparseserve.backends.openvino import (
    compile_config,
    compiled_signature,
    cpu_capabilities,
    describe_compiled,
    has_sparse_initializers,
    read_model,
    sparse_kernel_layers,
    weightless_copy,
)
from sparseserve.errors import ModelLoadError
from sparseserve.protocol import model_config_pb2
from sparseserve.repository.inspect import describe_serving
from sparseserve.repository.manifest import Precision
from sparseserve.repository.store import ModelRepository
from sparseserve.settings import OpenVinoSettings
from sparseserve.testing import onnx_models

# fp32 asked for in so many words: OpenVINO's default on a CPU with AMX-BF16 is bf16, whose
# answers differ from onnxruntime's by ~1e-2 (seen on the GPU machine's Xeon host).
FP32 = {"INFERENCE_PRECISION_HINT": "f32"}


def files(config_text: str = "", precision: Precision = Precision.fp32) -> ModelFiles:
    config = model_config_pb2.ModelConfig()
    text_format.Parse(config_text, config)
    return ModelFiles("m", 1, Path("m/1/model.onnx"), config, precision)


def parameter(key: str, value: str) -> str:
    return f'parameters: {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n'


def test_fp32_is_asked_for_explicitly_with_the_servers_threads() -> None:
    """OpenVINO's default precision on AMX CPUs is bf16: fp32 must be asked for."""
    config = compile_config(files(), OpenVinoSettings(), intra_op_threads=3)
    assert config == {
        "INFERENCE_PRECISION_HINT": "f32",
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": 3,
        "NUM_STREAMS": 1,
    }
    bf16 = compile_config(files(precision=Precision.bf16), OpenVinoSettings(), 1)
    assert bf16["INFERENCE_PRECISION_HINT"] == "bf16"


def test_triton_parameters_override_the_settings() -> None:
    text = (
        parameter("PERFORMANCE_HINT", "throughput")
        + parameter("NUM_STREAMS", "AUTO")
        + parameter("INFERENCE_NUM_THREADS", "2")
        + parameter("CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE", "0.8")
    )
    settings = OpenVinoSettings(num_streams=4, inference_num_threads=8)
    config = compile_config(files(text), settings, 1)
    assert config["PERFORMANCE_HINT"] == "THROUGHPUT"
    assert config["NUM_STREAMS"] == "AUTO"
    assert config["INFERENCE_NUM_THREADS"] == 2
    assert config["CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE"] == 0.8


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("PERFORMANCE_HINT", "FAST", "LATENCY or THROUGHPUT"),
        ("NUM_STREAMS", "0", "a positive integer, AUTO or NUMA"),
        ("INFERENCE_NUM_THREADS", "-1", "a non-negative integer"),
        ("CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE", "1.5", "a fraction in (0, 1]"),
        ("CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE", "most", "a fraction in (0, 1]"),
    ],
)
def test_a_parameter_with_a_wrong_value_is_a_load_error_naming_it(
    key: str, value: str, expected: str
) -> None:
    with pytest.raises(ModelLoadError) as info:
        compile_config(files(parameter(key, value)), OpenVinoSettings(), 1)
    assert key in str(info.value) and repr(value) in str(info.value)
    assert expected in str(info.value)


# -- where a variant's precision comes from -------------------------------------------


def model_dir(root: Path, manifest: str | None = None, config: str | None = None) -> Path:
    onnx_models.mlp(root / "m" / "1" / "model.onnx")
    if manifest is not None:
        (root / "m" / "sparseserve.yaml").write_text(f"family: f\nvariant: v\n{manifest}")
    if config is not None:
        (root / "m" / "config.pbtxt").write_text(config)
    return root


@pytest.mark.parametrize(
    ("manifest", "config", "precision"),
    [
        (None, None, Precision.fp32),
        ("", None, Precision.fp32),
        ("precision: bf16\n", None, Precision.bf16),
        (None, parameter("HINT_BF16", "YES"), Precision.bf16),
        ("", parameter("HINT_BF16", "yes"), Precision.bf16),
        ("precision: bf16\n", parameter("HINT_BF16", "YES"), Precision.bf16),
        (None, parameter("HINT_BF16", "NO"), Precision.fp32),
    ],
)
def test_precision_comes_from_the_manifest_or_tritons_hint(
    tmp_path: Path, manifest: str | None, config: str | None, precision: Precision
) -> None:
    source = ModelRepository(model_dir(tmp_path, manifest, config)).read("m")
    assert source.precision is precision


@pytest.mark.parametrize(
    ("manifest", "config", "words"),
    [
        (
            "precision: fp32\n",
            parameter("HINT_BF16", "YES"),
            ["fp32", "HINT_BF16", "remove HINT_BF16, or make a bf16 variant"],
        ),
        (None, parameter("HINT_BF16", "maybe"), ["HINT_BF16", "'maybe'", "YES or NO"]),
        ("precision: fp16\n", None, ["precision"]),
    ],
)
def test_a_precision_that_contradicts_itself_or_is_unknown_is_a_load_error(
    tmp_path: Path, manifest: str | None, config: str | None, words: list[str]
) -> None:
    with pytest.raises(ModelLoadError) as info:
        ModelRepository(model_dir(tmp_path, manifest, config)).read("m")
    assert all(word in str(info.value) for word in words), info.value


def test_a_version_holding_openvino_ir_is_found(tmp_path: Path) -> None:
    """Triton's OpenVINO layout: <version>/model.xml (+ model.bin), no model.onnx."""
    (tmp_path / "ir" / "1").mkdir(parents=True)
    (tmp_path / "ir" / "1" / "model.xml").write_text("<net/>")
    (tmp_path / "ir" / "1" / "model.bin").write_bytes(b"")
    source = ModelRepository(tmp_path).read("ir")
    assert source.versions == {1: tmp_path / "ir" / "1" / "model.xml"}


# -- what the compiled model says -----------------------------------------------------


def test_the_signature_and_sparse_kernel_count_of_a_real_compiled_model(tmp_path: Path) -> None:
    import openvino

    path = onnx_models.multi_io(tmp_path / "model.onnx")
    compiled = openvino.Core().compile_model(str(path), "CPU", FP32)
    signature = compiled_signature(compiled, ModelFiles("m", 1, path))
    assert [(s.name, s.datatype.name, s.shape) for s in signature.inputs] == [
        ("a", "FP32", (-1, 4)),
        ("b", "INT64", (-1, 4)),
    ]
    assert sparse_kernel_layers(compiled) == 0  # fp32 layers: never the int8 sparse kernel


@dataclass
class Layer:
    """A runtime-model layer as OpenVINO reports it: its rt_info."""

    info: dict[str, str] = field(default_factory=dict)

    def get_rt_info(self) -> dict[str, Text]:
        return {key: Text(value) for key, value in self.info.items()}


@dataclass
class Text:
    value: str

    def astype(self, kind: type) -> str:
        return self.value


@dataclass
class CompiledStandIn:
    """What an AMX machine's compiled model reports (no such CPU here): layer kernels."""

    layers: list[Layer]

    def get_runtime_model(self) -> CompiledStandIn:
        return self

    def get_ops(self) -> list[Layer]:
        return self.layers


def test_layers_on_the_sparse_kernel_are_counted_by_their_primitive_type() -> None:
    """The names OpenVINO's CPU plugin gives its kernels: brgemm_sparse_avx512_amx is the
    one that skips zero weights (AMX, int8)."""
    compiled = CompiledStandIn(
        [
            Layer({"layerType": "FullyConnected", "primitiveType": "brgemm_sparse_avx512_amx_I8"}),
            Layer({"layerType": "FullyConnected", "primitiveType": "brgemm_avx512_amx_I8"}),
            Layer({"layerType": "FullyConnected", "primitiveType": "brgemm_sparse_avx512_amx_I8"}),
            Layer({"layerType": "Input"}),
        ]
    )
    assert sparse_kernel_layers(compiled) == 2  # type: ignore[arg-type]


def test_the_sparse_kernel_count_is_read_after_a_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a dynamic batch, OpenVINO names a layer's kernel only once a shape has run
    ("undef_i8" before): counted at compile time, the sparse kernel would read 0 even
    where it runs. The server's backend and `inspect` count after a run."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import openvino

    from sparseserve.backends import openvino as backend_module

    def int8_compute(kernels: list[str]) -> list[str]:  # not "unknown_i8": constants
        return [k for k in kernels if k.lower().endswith("_i8") and not k.startswith("unknown")]

    path = onnx_models.static_int8_mlp(tmp_path / "1" / "model.onnx", sparsity=0.9)
    compiled = openvino.Core().compile_model(str(path), "CPU", FP32)
    int8_layers = int8_compute(backend_module.layer_kernels(compiled))
    assert int8_layers and all(k.startswith("undef") for k in int8_layers)

    counted: list[list[str]] = []  # the kernels each count saw

    def recording(compiled: openvino.CompiledModel) -> int:
        counted.append(backend_module.layer_kernels(compiled))
        return sparse_kernel_layers(compiled)

    monkeypatch.setattr(backend_module, "sparse_kernel_layers", recording)

    async def load() -> None:
        with ThreadPoolExecutor(1) as executor:
            backend = backend_module.OpenVinoBackend(
                ModelFiles("m", 1, path), OpenVinoSettings(), 1, 0.0, executor
            )
            await backend.load()
            await backend.unload()

    asyncio.run(load())
    assert "sparse kernel: 0 layers" in describe_compiled(path)  # the setting is off by default
    assert len(counted) == 2  # the backend's load, then inspect's
    for kernels in counted:
        assert len(int8_compute(kernels)) >= len(int8_layers)
        assert not any(k.startswith("undef") for k in kernels), kernels


def test_the_shape_checking_copy_keeps_no_weights(tmp_path: Path) -> None:
    import openvino

    model = openvino.Core().read_model(str(onnx_models.mlp(tmp_path / "model.onnx")))
    copy = weightless_copy(model)
    constants = [
        int(np.prod(list(op.get_output_shape(0))))
        for op in copy.get_ordered_ops()
        if op.get_type_name() == "Constant"
    ]
    assert constants and max(constants) <= 64  # the 64x256 and 256x256 weights are gone
    copy.reshape({"input": [5, 64]})
    assert list(copy.outputs[0].get_partial_shape().to_shape()) == [5, 10]


# -- inspect ---------------------------------------------------------------------------


def test_inspect_says_the_precision_the_engine_pin_and_what_openvino_compiles(
    tmp_path: Path,
) -> None:
    root = model_dir(tmp_path, "precision: fp32\n", 'backend: "openvino"\n')
    serving = describe_serving(root / "m")
    assert serving == [
        "  precision:    fp32 (manifest)",
        "  engine:       config.pbtxt backend 'openvino'",
    ]
    report = describe_compiled(root / "m")
    assert "computes in:  f32 (asked: f32)" in report
    assert "sparse kernel: 0 layers" in report
    (root / "m" / "config.pbtxt").write_text(parameter("HINT_BF16", "YES"))
    (root / "m" / "sparseserve.yaml").write_text("family: f\nvariant: v\n")
    assert describe_serving(root / "m")[0] == "  precision:    bf16 (config.pbtxt HINT_BF16)"
    if "BF16" not in cpu_capabilities():
        assert "cannot serve it: a bf16 variant, and the CPU lacks BF16" in describe_compiled(
            root / "m"
        )


def test_a_file_of_sparse_initializers_is_read_through_a_dense_copy(tmp_path: Path) -> None:
    """sparsify's `export.sparse_storage` writes pruned weights as ONNX sparse
    initializers, which OpenVINO 2026.4's reader refuses: the server reads them densified
    and answers as onnxruntime does on the sparse file itself."""
    import onnx
    import onnxruntime
    import openvino
    from onnx import numpy_helper

    dense_path = onnx_models.mlp(tmp_path / "dense.onnx", sizes=(16, 32, 4))
    proto = onnx.load(str(dense_path))
    first = proto.graph.initializer[0]
    weights = numpy_helper.to_array(first).copy()
    weights[np.abs(weights) < np.quantile(np.abs(weights), 0.8)] = 0  # 80% zeros
    where = np.flatnonzero(weights)
    sparse = onnx.helper.make_sparse_tensor(
        numpy_helper.from_array(weights.flatten()[where], first.name),
        numpy_helper.from_array(where.astype(np.int64), ""),
        list(weights.shape),
    )
    del proto.graph.initializer[0]
    proto.graph.sparse_initializer.append(sparse)
    path = tmp_path / "model.onnx"
    onnx.save(proto, str(path))
    assert has_sparse_initializers(path.read_bytes())
    assert not has_sparse_initializers(dense_path.read_bytes())
    core = openvino.Core()
    with pytest.raises(RuntimeError):  # what the server would meet without the copy
        core.read_model(str(path))
    compiled = core.compile_model(read_model(core, path), "CPU", FP32)
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    expected = onnxruntime.InferenceSession(str(path)).run(None, {"input": x})[0]
    got = compiled.create_infer_request().infer({"input": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert not list(tmp_path.glob("sparseserve-openvino-*"))


def test_a_run_cancelled_twice_keeps_its_infer_request_until_the_run_ends(
    tmp_path: Path,
) -> None:
    """A caller cancelled while its run is on the thread pool waits for the run; cancelled
    again (a shutdown's cut, then grpc's stop), it stops waiting, but its InferRequest is
    still busy in the thread: it must not go back to the pool before the run ends (it
    did: the next execution took the busy request, to wait behind the abandoned run or
    write over its inputs)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from sparseserve.backends.openvino import OpenVinoBackend

    path = onnx_models.slow(tmp_path / "1" / "model.onnx", width=512, depth=32)

    async def main() -> tuple[float, float]:
        with ThreadPoolExecutor(2) as executor:
            backend = OpenVinoBackend(
                ModelFiles("slow", 1, path), OpenVinoSettings(), 1, 0.0, executor
            )
            await backend.load()
            one = np.ones((1, 512), np.float32)
            want = (await backend.infer({"x": one}, ["y"])).outputs["y"]
            long = asyncio.create_task(
                backend.infer({"x": np.ones((8192, 512), np.float32)}, ["y"])
            )
            await asyncio.sleep(0.2)  # running in a pool thread
            assert not long.done(), "the run ended before the cancels; it must span them"
            long.cancel()
            await asyncio.sleep(0.01)
            long.cancel()
            with pytest.raises(asyncio.CancelledError):
                await long
            assert backend._idle == [], "a busy InferRequest is back in the pool"
            got = (await backend.infer({"x": one}, ["y"])).outputs["y"]  # a new request
            started = time.monotonic()
            while len(backend._idle) < 2 and time.monotonic() - started < 30:
                await asyncio.sleep(0.05)
            pool = len(backend._idle)  # the busy one is back once its run ended
            await backend.unload()
            return float(np.abs(got - want).max()), float(np.abs(want).max()), pool

    difference, scale, pool = asyncio.run(main())
    assert scale > 0 and difference <= 1e-6
    assert pool == 2
