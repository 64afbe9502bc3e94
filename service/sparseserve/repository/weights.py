"""What is inside an ONNX file, read from its weights: per-layer parameters, zeros,
sparsity, the 2:4 pattern, quantized operators, and the bytes on disk.

This is how `sparseserve inspect` and `sparseserve manifest` see a model made anywhere
(SparseML, NNCF, llm-compressor, torch.onnx, onnxruntime's quantizer), manifest or not.

It reads the file with the `onnx` package: onnxruntime exposes no initializers, and
`onnx` is the reference reader of the format (external data files, sparse initializers,
every element type). Importing the server never imports this module: the registry
imports it at load, and only for a model whose manifest does not record its parameters
(`count_weights`, for the metrics).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from sparseserve.observability.stats import WeightCounts
from sparseserve.repository.manifest import LayerSparsity

# Operators that only appear in quantized graphs: onnxruntime's QOperator format
# (QLinear*), its dynamic quantization (MatMulInteger, DynamicQuantizeLinear), QDQ
# (QuantizeLinear/DequantizeLinear pairs around float ops) and the com.microsoft
# contrib ops its quantizer and llm-compressor-style exporters emit.
QUANTIZED_OPS = frozenset(
    {
        "QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
        "QLinearSigmoid", "QLinearLeakyRelu", "QLinearConcat", "QLinearSoftmax", "QGemm",
        "QAttention", "QEmbedLayerNormalization", "MatMulInteger", "ConvInteger",
        "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "QuantizeLinear", "DequantizeLinear",
        "MatMulIntegerToFloat", "MatMulNBits", "MatMulBnb4", "GatherBlockQuantized",
    }
)  # fmt: skip
_INTEGER_WEIGHTS = (np.int8, np.uint8, np.int16, np.uint16)
N, M = 2, 4  # the N:M pattern sparse tensor cores run: at most 2 non-zeros in 4


@dataclass(frozen=True, slots=True)
class WeightTensor:
    """One weight tensor (an initializer of rank >= 2: a matrix or a kernel)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    parameters: int
    nonzero: int
    follows_2_4: bool
    consumers: tuple[str, ...]  # op types that read it

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / self.parameters if self.parameters else 0.0

    @property
    def integer(self) -> bool:
        """Stored as (quantized) integers rather than floats."""
        return self.dtype in {np.dtype(t).name for t in _INTEGER_WEIGHTS}

    def as_layer(self) -> LayerSparsity:
        return LayerSparsity(
            name=self.name,
            shape=list(self.shape),
            parameters=self.parameters,
            nonzero=self.nonzero,
            sparsity=self.sparsity,
        )


@dataclass(frozen=True, slots=True)
class OnnxWeights:
    """Everything `weights_of` measured in one ONNX file."""

    path: Path
    file_bytes: int  # the .onnx file and any external data files it names
    producer: str
    opsets: dict[str, int]
    layers: list[WeightTensor]
    parameters: int  # every numeric initializer, biases and scales included
    nonzero_parameters: int
    sparse_initializers: int  # stored as ONNX sparse tensors (indices + values)
    quantized_ops: dict[str, int] = field(default_factory=dict)

    @property
    def layer_parameters(self) -> int:
        return sum(layer.parameters for layer in self.layers)

    @property
    def sparsity(self) -> float:
        """Fraction of the layer weights that are zero (biases and scales left out)."""
        total = self.layer_parameters
        return 1.0 - sum(layer.nonzero for layer in self.layers) / total if total else 0.0

    @property
    def follows_2_4(self) -> bool:
        """Every float layer keeps at most 2 non-zeros in each group of 4."""
        floats = [layer for layer in self.layers if not layer.integer]
        return bool(floats) and all(layer.follows_2_4 for layer in floats)

    @property
    def quantization(self) -> str | None:
        """A description of how the model is quantized, or None if it is not."""
        integers = [layer for layer in self.layers if layer.integer]
        if not self.quantized_ops and not integers:
            return None
        kinds = sorted({layer.dtype for layer in integers})
        ops = ", ".join(f"{op} x{count}" for op, count in sorted(self.quantized_ops.items()))
        return f"{'/'.join(kinds) or 'integer'} weights" + (f" ({ops})" if ops else "")


def weights_of(path: Path) -> OnnxWeights:
    """Measure the ONNX file at `path` (raise `ValueError` if it is not one)."""
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError, OSError, its own errors...
        raise ValueError(f"{path}: not a readable ONNX model ({exc})") from exc
    graph = model.graph
    consumers: dict[str, set[str]] = {}
    quantized: Counter[str] = Counter()
    constants: list[tuple[str, np.ndarray]] = []
    for node in _all_nodes(graph):
        if node.op_type in QUANTIZED_OPS:
            quantized[node.op_type] += 1
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
        if node.op_type == "Constant":  # some exporters keep weights in Constant nodes
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.HasField("t"):
                    constants.append((node.output[0], numpy_helper.to_array(attribute.t)))
    arrays = [(t.name, numpy_helper.to_array(t)) for t in graph.initializer] + constants
    arrays += [(s.values.name, _dense(s)) for s in graph.sparse_initializer]
    layers, parameters, nonzero = [], 0, 0
    for name, array in arrays:
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
            continue  # strings and the like hold no weights
        count = int(np.count_nonzero(array))
        parameters += array.size
        nonzero += count
        if array.ndim >= 2:
            layers.append(
                WeightTensor(
                    name=name,
                    shape=tuple(int(d) for d in array.shape),
                    dtype=array.dtype.name,
                    parameters=int(array.size),
                    nonzero=count,
                    follows_2_4=follows_n_m(array),
                    consumers=tuple(sorted(consumers.get(name, ()))),
                )
            )
    return OnnxWeights(
        path=path,
        file_bytes=_file_bytes(path, graph),
        producer=" ".join(p for p in (model.producer_name, model.producer_version) if p),
        opsets={o.domain or "ai.onnx": o.version for o in model.opset_import},
        layers=layers,
        parameters=parameters,
        nonzero_parameters=nonzero,
        sparse_initializers=len(graph.sparse_initializer),
        quantized_ops=dict(quantized),
    )


def count_weights(path: Path) -> WeightCounts:
    """The parameter counts of the ONNX file at `path`, as its manifest would record them
    (raise `ValueError` if it is not a readable ONNX model)."""
    weights = weights_of(path)
    return WeightCounts(
        parameters=weights.parameters,
        nonzero_parameters=weights.nonzero_parameters,
        weight_sparsity=weights.sparsity,
    )


def follows_n_m(array: np.ndarray, n: int = N, m: int = M) -> bool:
    """Whether at most `n` of every `m` consecutive weights are non-zero, in groups
    along the last axis or the first (a Gemm/MatMul weight is stored [in, out] or
    [out, in] depending on the exporter; a Conv kernel [out, in, kh, kw] is grouped
    along its input channels, the second axis)."""
    if array.size == 0 or array.ndim < 2:
        return False
    candidates = [array, np.moveaxis(array, 0, -1)]
    if array.ndim > 2:
        candidates.append(np.moveaxis(array, 1, -1))
    for grouped in candidates:
        if grouped.shape[-1] % m:
            continue
        groups = np.count_nonzero(grouped.reshape(-1, m), axis=1)
        if (groups <= n).all():
            return True
    return False


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node, including those in subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from _all_nodes(attribute.g)
            for subgraph in attribute.graphs:
                yield from _all_nodes(subgraph)


def _dense(sparse: onnx.SparseTensorProto) -> np.ndarray:
    """A sparse initializer as the dense tensor onnxruntime turns it into at load."""
    values = numpy_helper.to_array(sparse.values)
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
    shape = tuple(int(d) for d in sparse.dims)
    dense = np.zeros(shape, dtype=values.dtype)
    if indices.ndim == 2:  # [nnz, rank] coordinates
        dense[tuple(indices.T)] = values
    else:  # [nnz] positions in the flattened tensor
        dense.reshape(-1)[indices] = values
    return dense


def _file_bytes(path: Path, graph: onnx.GraphProto) -> int:
    """The model file plus the external data files its tensors name (each once)."""
    locations = {
        entry.value
        for tensor in graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    extra = sum((path.parent / name).stat().st_size for name in locations)
    return path.stat().st_size + extra
