"""Small synthetic ONNX models, built with the onnx helper API, for tests and benchmarks.

Each builder writes one model file and returns its path; weights come from a seeded
generator so that a model is the same on every machine.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # old enough for every onnxruntime we support

# v2 datatype -> ONNX element type, for the identity model (BF16 is not exchangeable
# through onnxruntime's Python API, see sparseserve.backends.onnxruntime).
ELEMENT_TYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def _save(graph: onnx.GraphProto, path: Path, check: bool = True) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    if check:
        onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def mlp(
    path: Path,
    sizes: Sequence[int] = (64, 256, 256, 10),
    seed: int = 0,
    sparsity: float = 0.0,
    pattern_2_4: bool = False,
) -> Path:
    """Dense ReLU MLP: input "input" FP32 [batch, sizes[0]] -> output "output".
    `sparsity` > 0: that fraction of each weight matrix, the smallest in magnitude, is
    zero (a magnitude-pruned variant of the same seed's dense model). `pattern_2_4`: the
    2 smallest of every 4 weights feeding one output are zero (2:4 semi-structured)."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    current = "input"
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        w = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        if sparsity > 0:
            w[np.abs(w) < np.quantile(np.abs(w), sparsity)] = 0.0
        if pattern_2_4:  # groups of 4 consecutive inputs (rows of this [in, out] weight)
            groups = w.T.reshape(fan_out, fan_in // 4, 4).copy()
            smallest = np.argsort(np.abs(groups), axis=2)[..., :2]
            np.put_along_axis(groups, smallest, 0.0, axis=2)
            w = np.ascontiguousarray(groups.reshape(fan_out, fan_in).T)
        b = (rng.standard_normal(fan_out) * 0.01).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        last = i == len(sizes) - 2
        out = "output" if last else f"h{i}"
        nodes.append(
            helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [out if last else f"z{i}"])
        )
        if not last:
            nodes.append(helper.make_node("Relu", [f"z{i}"], [out]))
        current = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", sizes[0]])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", sizes[-1]])],
        inits,
    )
    return _save(graph, path)


def static_int8_mlp(
    path: Path, sizes: Sequence[int] = (64, 256, 256, 10), sparsity: float = 0.0, seed: int = 0
) -> Path:
    """`mlp` (with `sparsity` of each weight matrix zero), then static int8 weights and
    activations by onnxruntime's QDQ quantization, calibrated on random rows: the kind
    of file OpenVINO runs on its int8 kernels. Its batch dimension stays dynamic."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Rows(CalibrationDataReader):  # type: ignore[misc]  # onnxruntime has no stubs
        def __init__(self) -> None:
            rng = np.random.default_rng(seed + 1)
            self.feeds = iter(
                [{"input": rng.standard_normal((16, sizes[0])).astype(np.float32)}
                 for _ in range(4)]
            )  # fmt: skip

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    float_model = mlp(path.with_name(path.stem + "-float.onnx"), sizes, seed, sparsity)
    path.parent.mkdir(parents=True, exist_ok=True)
    quantize_static(str(float_model), str(path), Rows(), quant_format=QuantFormat.QDQ)
    float_model.unlink()
    return path


def add_constant(path: Path, value: float, width: int | None = 4, batch: int | None = None) -> Path:
    """y = x + value, FP32 [batch, width]: tells which version of a model answered.
    `width` or `batch` None: that dimension is dynamic."""
    shape = [batch or "batch", width or "width"]
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"])],
        "add_constant",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(np.array(value, dtype=np.float32), "c")],
    )
    return _save(graph, path)


def multi_io(path: Path) -> Path:
    """Two inputs, three outputs: "a" FP32 [b,4] and "b" INT64 [b,4] give
    "sum" = a + b (FP32), "doubled" = 2b (INT64) and "negated" = -a (FP32)."""
    nodes = [
        helper.make_node("Cast", ["b"], ["b_float"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["a", "b_float"], ["sum"]),
        helper.make_node("Add", ["b", "b"], ["doubled"]),
        helper.make_node("Neg", ["a"], ["negated"]),
    ]
    graph = helper.make_graph(
        nodes,
        "multi_io",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("b", TensorProto.INT64, ["batch", 4]),
        ],
        [
            helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("doubled", TensorProto.INT64, ["batch", 4]),
            helper.make_tensor_value_info("negated", TensorProto.FLOAT, ["batch", 4]),
        ],
    )
    return _save(graph, path)


def bytes_identity(path: Path) -> Path:
    """s BYTES [n] -> Identity -> t: a request whose cost is all decoding and encoding."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["t"])],
        "bytes_identity",
        [helper.make_tensor_value_info("s", TensorProto.STRING, ["n"])],
        [helper.make_tensor_value_info("t", TensorProto.STRING, ["n"])],
    )
    return _save(graph, path)


def identity_all_types(path: Path) -> Path:
    """For every datatype DT: input "in_DT" [any, any] -> Identity -> output "out_DT"."""
    nodes, inputs, outputs = [], [], []
    for name, element in ELEMENT_TYPES.items():
        nodes.append(helper.make_node("Identity", [f"in_{name}"], [f"out_{name}"]))
        inputs.append(helper.make_tensor_value_info(f"in_{name}", element, ["n", "m"]))
        outputs.append(helper.make_tensor_value_info(f"out_{name}", element, ["n", "m"]))
    return _save(helper.make_graph(nodes, "identity_all_types", inputs, outputs), path)


def slow(path: Path, width: int = 512, depth: int = 32, seed: int = 0) -> Path:
    """`depth` MatMul+Tanh layers on x FP32 [batch, width]: run time grows with the batch,
    so a test can make a request last as long as it needs."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    nodes, current = [], "x"
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", [current, "w"], [f"m{i}"]))
        out = "y" if i == depth - 1 else f"t{i}"
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [out]))
        current = out
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        [numpy_helper.from_array(w, "w")],
    )
    return _save(graph, path)


def lookup(path: Path, table: Sequence[float] = (10.0, 20.0, 30.0, 40.0)) -> Path:
    """y[i] = table[index[i]]: "index" INT64 [batch] -> "y" FP32 [batch]. An index outside
    the table makes onnxruntime fail at run time, after the request passed validation."""
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "index"], ["y"], axis=0)],
        "lookup",
        [helper.make_tensor_value_info("index", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch"])],
        [numpy_helper.from_array(np.asarray(table, dtype=np.float32), "table")],
    )
    return _save(graph, path)


def failing(path: Path, width: int = 64) -> Path:
    """Loads and warms up (on zeros), then fails at run time on inputs >= 1: "input" FP32
    [batch, width] is cast to indices into a one-entry table (output "output", same
    shape), so any element of 1 or more is an index out of range."""
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["input"], ["index"], to=TensorProto.INT64),
            helper.make_node("Gather", ["table", "index"], ["output"], axis=0),
        ],
        "failing",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", width])],
        [numpy_helper.from_array(np.zeros(1, dtype=np.float32), "table")],
    )
    return _save(graph, path)


def any_rank(path: Path) -> Path:
    """Input "x" FP32 with no declared rank -> Identity -> "y"; input "s" FP32 scalar
    (rank 0) -> Neg -> "t". onnxruntime reports both input shapes as []. ONNX's checker
    insists on a shape for graph inputs, though the format and onnxruntime allow none, so
    it is skipped here."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Neg", ["s"], ["t"])],
        "any_rank",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("t", TensorProto.FLOAT, []),
        ],
    )
    return _save(graph, path, check=False)
