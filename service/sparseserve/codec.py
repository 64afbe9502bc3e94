"""Tensors on the wire: the one datatype table of sparseserve, and the v2 tensor codec.

Wire facts (Open Inference Protocol): tensors are row-major and little-endian with no
padding; BOOL is one byte; a BYTES element is a 4-byte little-endian length followed by
its bytes; FP16 and BF16 travel only as raw bytes. Clients may send either
`raw_input_contents` (one entry per input, in input order) or typed `contents`, never
both; tritonclient reads results only from `raw_output_contents`, so answers are always
raw, in the order of `outputs`.
"""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import numpy.typing as npt

from sparseserve.errors import InvalidInput, RequestTooLarge


@dataclass(frozen=True, slots=True)
class Datatype:
    """One row of the datatype table: the same type in every vocabulary we speak."""

    name: str  # Open Inference Protocol datatype string
    numpy: np.dtype  # little-endian numpy dtype (object for BYTES)
    contents_field: str | None  # InferTensorContents field; None: raw bytes only
    onnx: str  # onnxruntime's type string
    config: str  # Triton model_config DataType enum name

    @property
    def itemsize(self) -> int:
        return self.numpy.itemsize


def _row(name: str, dtype: npt.DTypeLike, field: str | None, onnx: str, config: str) -> Datatype:
    return Datatype(name, np.dtype(dtype).newbyteorder("<"), field, onnx, config)


DATATYPES: tuple[Datatype, ...] = (
    _row("BOOL", np.bool_, "bool_contents", "tensor(bool)", "TYPE_BOOL"),
    _row("UINT8", np.uint8, "uint_contents", "tensor(uint8)", "TYPE_UINT8"),
    _row("UINT16", np.uint16, "uint_contents", "tensor(uint16)", "TYPE_UINT16"),
    _row("UINT32", np.uint32, "uint_contents", "tensor(uint32)", "TYPE_UINT32"),
    _row("UINT64", np.uint64, "uint64_contents", "tensor(uint64)", "TYPE_UINT64"),
    _row("INT8", np.int8, "int_contents", "tensor(int8)", "TYPE_INT8"),
    _row("INT16", np.int16, "int_contents", "tensor(int16)", "TYPE_INT16"),
    _row("INT32", np.int32, "int_contents", "tensor(int32)", "TYPE_INT32"),
    _row("INT64", np.int64, "int64_contents", "tensor(int64)", "TYPE_INT64"),
    _row("FP16", np.float16, None, "tensor(float16)", "TYPE_FP16"),
    _row("BF16", ml_dtypes.bfloat16, None, "tensor(bfloat16)", "TYPE_BF16"),
    _row("FP32", np.float32, "fp32_contents", "tensor(float)", "TYPE_FP32"),
    _row("FP64", np.float64, "fp64_contents", "tensor(double)", "TYPE_FP64"),
    _row("BYTES", np.object_, "bytes_contents", "tensor(string)", "TYPE_STRING"),
)

BY_NAME: Mapping[str, Datatype] = {d.name: d for d in DATATYPES}
BY_ONNX: Mapping[str, Datatype] = {d.onnx: d for d in DATATYPES}
# Keyed by kind and size, not by dtype: numpy has two int64 dtypes on Linux ('l' and 'q',
# onnxruntime returns the latter), and big-endian arrays must find their row too.
_BY_NUMPY: Mapping[tuple[str, int], Datatype] = {
    (d.numpy.kind, d.numpy.itemsize): d for d in DATATYPES if d.name != "BYTES"
}
BYTES = BY_NAME["BYTES"]


def datatype(name: str) -> Datatype:
    """The table row for a v2 datatype string, or `InvalidInput` naming the valid ones."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise InvalidInput(
            f"unknown datatype {name!r}; expected one of {', '.join(BY_NAME)}"
        ) from None


def datatype_of(array: np.ndarray) -> Datatype:
    """The table row for a numpy array (str/bytes/object arrays are BYTES)."""
    dtype = array.dtype
    if dtype.kind in "OSU":
        return BYTES
    try:
        return _BY_NUMPY[(dtype.kind, dtype.itemsize)]
    except KeyError:
        raise InvalidInput(f"numpy dtype {dtype} has no Open Inference Protocol datatype") from None


def element_count(shape: Sequence[int]) -> int:
    return math.prod(shape)


# The most BYTES elements one request may carry, over all its inputs. Each element
# becomes a Python object (about 40-90 bytes with its text copy), so 10M empty strings, a
# 40 MB message, would cost gigabytes and seconds of CPU. A server setting overrides it.
DEFAULT_MAX_BYTES_ELEMENTS = 1_000_000
# numpy (and so onnxruntime) cannot describe an array of more than 2**63-1 bytes, even
# one with no elements: a shape whose non-zero dimensions multiply beyond it is refused.
_MAX_ARRAY_BYTES = 2**63 - 1
_LENGTH = struct.Struct("<I")


def serialize_bytes(array: np.ndarray) -> bytes:
    """BYTES tensor -> wire form: each element as 4-byte LE length + bytes, row-major.

    The elements are Python objects, so turning each into `bytes` is one pass of Python;
    the length prefixes are computed and interleaved by numpy, not element by element."""
    items = [
        item.encode("utf-8") if isinstance(item, str) else bytes(item)
        for item in array.reshape(-1).tolist()
    ]
    if not items:
        return b""
    lengths = np.fromiter(map(len, items), dtype=np.int64, count=len(items))
    if lengths.max() >= 2**32:
        raise InvalidInput(f"a BYTES element of {int(lengths.max())} bytes exceeds 4 GiB")
    data = np.frombuffer(b"".join(items), dtype=np.uint8)
    ends = np.cumsum(lengths + 4)
    wire = np.empty(int(ends[-1]), dtype=np.uint8)
    # Byte k of element i's prefix lies at starts[i] + k; its data follows at + 4.
    prefix_at = (ends - lengths - 4)[:, None] + np.arange(4)
    wire[prefix_at] = lengths.astype("<u4").view(np.uint8).reshape(-1, 4)
    is_data = np.ones(wire.size, dtype=bool)
    is_data[prefix_at] = False
    wire[is_data] = data
    return wire.tobytes()


def deserialize_bytes(
    buffer: bytes | memoryview,
    shape: Sequence[int],
    name: str,
    max_elements: int = DEFAULT_MAX_BYTES_ELEMENTS,
) -> np.ndarray:
    """Wire form -> object array of `bytes`, checking that the buffer holds exactly
    `prod(shape)` length-prefixed elements. Raises `RequestTooLarge` for more than
    `max_elements` elements, before any work.

    Where every element has the same length (fixed-size keys, padded tokens, empty
    strings), numpy checks all the prefixes at once and cuts the elements without a
    Python loop. Otherwise the offsets are found by one scan, since each element's
    position depends on the lengths before it."""
    count = element_count(shape)
    if count > max_elements:
        raise RequestTooLarge(
            f"input {name!r}: {count} BYTES elements (shape {list(shape)}) exceed the "
            f"server's limit on BYTES elements per request (max_bytes_elements; "
            f"{max_elements} left for this input)"
        )
    size = len(buffer)
    if count == 0:
        if size:
            raise InvalidInput(
                f"input {name!r}: {size} bytes left over after 0 BYTES elements of shape "
                f"{list(shape)}"
            )
        return np.empty(shape, dtype=object)
    wire = np.frombuffer(buffer, dtype=np.uint8)
    if size >= 4:
        first = int(wire[:4].view("<u4")[0])
        if size == count * (4 + first):
            rows = wire.reshape(count, 4 + first)
            if (rows[:, :4].copy().view("<u4") == first).all():
                return _uniform_bytes(rows[:, 4:], count, first).reshape(shape)
    return _scan_bytes(buffer, count, name, shape).reshape(shape)


def _uniform_bytes(data: np.ndarray, count: int, length: int) -> np.ndarray:
    """`count` elements of `length` bytes each (the rows of `data`) as an object array."""
    if length == 0:
        return np.full(count, b"", dtype=object)
    # A void dtype keeps every byte (an "S" dtype would drop trailing NULs).
    return np.ascontiguousarray(data).view(f"V{length}").reshape(count).astype(object)


def _scan_bytes(
    buffer: bytes | memoryview, count: int, name: str, shape: Sequence[int]
) -> np.ndarray:
    data = buffer if isinstance(buffer, bytes) else bytes(buffer)
    end = len(data)
    unpack = _LENGTH.unpack_from
    items: list[bytes] = []
    append = items.append
    offset = 0
    for index in range(count):
        if offset + 4 > end:
            raise InvalidInput(
                f"input {name!r}: BYTES data holds {index} elements, shape {list(shape)} "
                f"needs {count}"
            )
        (length,) = unpack(data, offset)
        start = offset + 4
        offset = start + length
        if offset > end:
            raise InvalidInput(
                f"input {name!r}: BYTES element {index} claims {length} bytes, "
                f"only {end - start} remain"
            )
        append(data[start:offset])
    if offset != end:
        raise InvalidInput(
            f"input {name!r}: {end - offset} bytes left over after {count} BYTES elements "
            f"of shape {list(shape)}"
        )
    array = np.empty(count, dtype=object)
    array[:] = items
    return array


def decode_raw(
    name: str,
    dtype: Datatype,
    shape: Sequence[int],
    raw: bytes | memoryview,
    max_bytes_elements: int = DEFAULT_MAX_BYTES_ELEMENTS,
) -> np.ndarray:
    """Raw tensor bytes -> array; zero-copy (a read-only view on `raw`) for fixed-size types."""
    if dtype is BYTES:
        return deserialize_bytes(raw, shape, name, max_bytes_elements)
    expected = element_count(shape) * dtype.itemsize
    if len(raw) != expected:
        raise InvalidInput(
            f"input {name!r}: raw data has {len(raw)} bytes, but shape {list(shape)} of "
            f"{dtype.name} needs {expected}"
        )
    if dtype.numpy == np.bool_ and np.frombuffer(raw, dtype=np.uint8).max(initial=0) > 1:
        # numpy would keep the byte: a "true" of 7 would reach the model and come back as 7.
        raise InvalidInput(f"input {name!r}: BOOL raw data holds a byte other than 0 and 1")
    return np.frombuffer(raw, dtype=dtype.numpy).reshape(shape)


def decode_contents(
    name: str,
    dtype: Datatype,
    shape: Sequence[int],
    contents: object,
    max_bytes_elements: int = DEFAULT_MAX_BYTES_ELEMENTS,
) -> np.ndarray:
    """Typed `InferTensorContents` -> array, checking the element count against the shape."""
    if dtype.contents_field is None:
        raise InvalidInput(
            f"input {name!r}: {dtype.name} tensors travel only as raw_input_contents"
        )
    values = getattr(contents, dtype.contents_field)
    others = [field.name for field, _ in contents.ListFields()  # type: ignore[attr-defined]
              if field.name != dtype.contents_field]  # fmt: skip
    if others:
        raise InvalidInput(
            f"input {name!r} is {dtype.name}, whose values go in {dtype.contents_field}, "
            f"but the request also sets {', '.join(others)}"
        )
    count = element_count(shape)
    if len(values) != count:
        raise InvalidInput(
            f"input {name!r}: {dtype.contents_field} has {len(values)} elements, "
            f"shape {list(shape)} needs {count}"
        )
    if dtype is BYTES:
        if count > max_bytes_elements:
            raise RequestTooLarge(
                f"input {name!r}: {count} BYTES elements (shape {list(shape)}) exceed the "
                f"server's limit on BYTES elements per request (max_bytes_elements; "
                f"{max_bytes_elements} left for this input)"
            )
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    try:
        return np.asarray(values, dtype=dtype.numpy).reshape(shape)
    except OverflowError as exc:
        raise InvalidInput(f"input {name!r}: value out of range for {dtype.name}: {exc}") from None


def encode_raw(array: np.ndarray) -> tuple[Datatype, bytes]:
    """Array -> (datatype, raw little-endian row-major bytes)."""
    dtype = datatype_of(array)
    if dtype is BYTES:
        return dtype, serialize_bytes(array)
    if array.dtype != dtype.numpy or not array.flags.c_contiguous:
        array = np.ascontiguousarray(array, dtype=dtype.numpy)
    return dtype, array.tobytes()


# numpy's (and so every engine's here) limit on an array's dimensions.
MAX_RANK = 64


def validate_shape(name: str, shape: Sequence[int], itemsize: int = 1) -> tuple[int, ...]:
    """`shape` as a tuple, or `InvalidInput` if a dimension is negative or the array could
    not exist (its non-zero dimensions times `itemsize` pass 2**63-1 bytes, which numpy
    refuses even when another dimension is 0 and the array is empty)."""
    dims = tuple(shape)
    if len(dims) > MAX_RANK:
        raise InvalidInput(
            f"input {name!r}: shape has {len(dims)} dimensions; at most {MAX_RANK} are supported"
        )
    if any(d < 0 for d in dims):
        raise InvalidInput(f"input {name!r}: shape {list(dims)} has a negative dimension")
    if math.prod(d for d in dims if d) * max(itemsize, 1) > _MAX_ARRAY_BYTES:
        raise InvalidInput(
            f"input {name!r}: shape {list(dims)} is too large for any tensor: its non-zero "
            f"dimensions multiply beyond 2**63-1 bytes"
        )
    return dims


def bytes_payload(request: object) -> int:
    """How many bytes of BYTES tensor data `request` carries (raw or typed): the part of
    a request whose decoding costs Python work per element rather than one copy."""
    tensors = request.inputs  # type: ignore[attr-defined]
    raws = request.raw_input_contents  # type: ignore[attr-defined]
    total = 0
    for index, tensor in enumerate(tensors):
        if tensor.datatype != "BYTES":
            continue
        if raws:
            if index < len(raws):
                total += len(raws[index])
        else:
            total += 4 * len(tensor.contents.bytes_contents)
    return total


def decode_inputs(
    request: object, max_bytes_elements: int = DEFAULT_MAX_BYTES_ELEMENTS
) -> dict[str, np.ndarray]:
    """A v2 `ModelInferRequest` -> {input name: array}, checking the wire format only
    (the model's own expectations are checked by the DataPlane). At most
    `max_bytes_elements` BYTES elements over all inputs, or `RequestTooLarge`."""
    tensors = request.inputs  # type: ignore[attr-defined]
    raws = request.raw_input_contents  # type: ignore[attr-defined]
    _refuse_extensions(request)
    if raws and len(raws) != len(tensors):
        raise InvalidInput(
            f"request has {len(tensors)} inputs but {len(raws)} raw_input_contents; "
            "raw data must be given for every input, in input order"
        )
    arrays: dict[str, np.ndarray] = {}
    bytes_left = max_bytes_elements  # shared by all BYTES inputs of the request
    for index, tensor in enumerate(tensors):
        name = tensor.name
        if name in arrays:
            raise InvalidInput(f"input {name!r} appears more than once in the request")
        dtype = datatype(tensor.datatype)
        shape = validate_shape(name, tensor.shape, dtype.itemsize)
        if raws:
            if tensor.HasField("contents"):
                raise InvalidInput(
                    f"input {name!r} has typed contents, but the request also uses "
                    "raw_input_contents; use one or the other for all inputs"
                )
            array = decode_raw(name, dtype, shape, raws[index], bytes_left)
        else:
            array = decode_contents(name, dtype, shape, tensor.contents, bytes_left)
        if dtype is BYTES:
            bytes_left -= array.size
        arrays[name] = array
    return arrays


def refuse_extensions(
    kind: str, name: str, shared_memory: bool, classification: bool = False
) -> None:
    """Triton protocol extensions this server does not implement, named rather than
    ignored (gRPC and REST alike): an ignored `classification` returns raw scores where
    the client expects labels, an ignored shared-memory region reads as an empty tensor.
    `kind` is "input" or "output"."""
    if shared_memory:
        instead = (
            "send the data in the request"
            if kind == "input"
            else ("the output comes in the response")
        )
        raise InvalidInput(
            f"{kind} {name!r} names a shared-memory region; the shared-memory extension is "
            f"not supported: {instead}"
        )
    if classification:
        raise InvalidInput(
            f"{kind} {name!r}: the classification extension is not supported; request the "
            "output itself"
        )


def _refuse_extensions(request: object) -> None:
    for tensor in request.inputs:  # type: ignore[attr-defined]
        refuse_extensions("input", tensor.name, "shared_memory_region" in tensor.parameters)
    for output in request.outputs:  # type: ignore[attr-defined]
        refuse_extensions(
            "output", output.name, "shared_memory_region" in output.parameters,
            "classification" in output.parameters,
        )  # fmt: skip


def encode_outputs(response: object, outputs: Mapping[str, np.ndarray]) -> None:
    """Append `outputs` to a v2 `ModelInferResponse` as raw tensors, in mapping order."""
    tensors = response.outputs  # type: ignore[attr-defined]
    raws = response.raw_output_contents  # type: ignore[attr-defined]
    for name, array in outputs.items():
        dtype, raw = encode_raw(array)
        tensors.add(name=name, datatype=dtype.name, shape=array.shape)
        raws.append(raw)


# -- JSON tensors (the v2 REST protocol's `data`) ------------------------------------

# JSON value kinds (numpy's, as `np.array` infers them from JSON) each datatype accepts:
# integers never take floats (1.5 would silently become 1), BOOL only takes true/false.
_JSON_KINDS: Mapping[str, str] = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}
_JSON_KIND_NAMES: Mapping[str, str] = {"b": "true/false", "iu": "integers", "iuf": "numbers"}
_JSON_TYPES: Mapping[str, set[type]] = {"b": {bool}, "iu": {int}, "iuf": {int, float}}


def decode_json_data(
    name: str, dtype: Datatype, shape: Sequence[int], data: object, has_booleans: bool = True
) -> np.ndarray:
    """A REST tensor's JSON `data` (row-major, flat or nested) -> array, checking the
    element count against `shape` and that the values fit `dtype` (BYTES: strings).
    `has_booleans` False: the JSON it came from holds no true/false, so no value of a
    numeric tensor needs checking for one (a pass over every value, at C speed)."""
    if not isinstance(data, list):
        raise InvalidInput(
            f"input {name!r}: 'data' must be a JSON array, got {type(data).__name__}"
        )
    count = element_count(shape)
    if dtype is BYTES:
        flat = _flatten(data)
        if len(flat) != count:
            raise InvalidInput(
                f"input {name!r}: data has {len(flat)} elements, shape {list(shape)} needs {count}"
            )
        strings = [item for item in flat if isinstance(item, str)]
        if len(strings) != len(flat):
            raise InvalidInput(
                f"input {name!r}: BYTES data must be JSON strings (send other bytes as binary data)"
            )
        array = np.empty(count, dtype=object)
        try:
            array[:] = [item.encode("utf-8") for item in strings]
        except UnicodeEncodeError as exc:  # "\ud800": a JSON escape, but no character
            raise InvalidInput(
                f"input {name!r}: a BYTES string is not valid Unicode ({exc.reason}: "
                f"{exc.object[exc.start : exc.end]!r}); send such bytes as binary data"
            ) from None
        return array.reshape(shape)
    try:
        values = np.array(data)
    except (ValueError, OverflowError):  # ragged nesting
        raise InvalidInput(f"input {name!r}: data is not a regular (non-ragged) array") from None
    if values.size != count:
        raise InvalidInput(
            f"input {name!r}: data has {values.size} elements, shape {list(shape)} needs {count}"
        )
    # bfloat16 (ml_dtypes) is numpy kind "V"; its JSON values are numbers like FP16's.
    accepted = _JSON_KINDS.get(dtype.numpy.kind, "iuf")
    # Integers beyond int64 (UINT64's upper half, or out of any range): numpy infers
    # float64 (losing digits) or keeps Python ints; converting to the datatype itself is
    # exact and checks the range.
    if (
        values.dtype.kind in "fO"
        and dtype.numpy.kind in "iu"
        and all(isinstance(v, int) and not isinstance(v, bool) for v in _flatten(data))
    ):
        try:
            return np.array(data, dtype=dtype.numpy).reshape(shape)
        except OverflowError:
            raise InvalidInput(
                f"input {name!r}: a value is out of range for {dtype.name}"
            ) from None
    if count and (values.dtype.kind not in accepted or (has_booleans and accepted != "b")):
        # The JSON types themselves: numpy reads true/false among numbers as 1/0 and
        # makes objects of other mixtures; name the first value the datatype does not take.
        flat = data  # flattened at C speed, by the depth numpy found
        for _ in range(values.ndim - 1):
            flat = list(itertools.chain.from_iterable(flat))  # type: ignore[arg-type]
        allowed = _JSON_TYPES[accepted]
        if not set(map(type, flat)) <= allowed:
            bad = next(v for v in flat if type(v) not in allowed)
            raise InvalidInput(
                f"input {name!r}: {dtype.name} data must be JSON {_JSON_KIND_NAMES[accepted]}, "
                f"got {bad!r}"
            )
        if values.dtype.kind == "O":  # integers past int64, for a float datatype
            try:
                values = np.array(flat, dtype=np.float64)
            except OverflowError:
                raise InvalidInput(
                    f"input {name!r}: a value is out of range for {dtype.name}"
                ) from None
    if count and dtype.numpy.kind in "iu":
        limits = np.iinfo(dtype.numpy)
        low, high = int(values.min()), int(values.max())
        if low < limits.min or high > limits.max:
            raise InvalidInput(
                f"input {name!r}: value {low if low < limits.min else high} is out of range "
                f"for {dtype.name} [{limits.min}, {limits.max}]"
            )
    return values.astype(dtype.numpy, copy=False).reshape(shape)


def encode_json_data(name: str, array: np.ndarray) -> list[object]:
    """Array -> the flat row-major list of a REST tensor's JSON `data` (BYTES as text)."""
    flat = array.reshape(-1)
    dtype = datatype_of(array)
    if dtype is BYTES:
        try:
            return [item.decode("utf-8") if isinstance(item, bytes) else str(item) for item in flat]
        except UnicodeDecodeError:
            raise InvalidInput(
                f"output {name!r} holds bytes that are not UTF-8 text, which JSON cannot "
                "carry; request it with binary_data"
            ) from None
    if dtype.name == "BF16":  # ml_dtypes scalars are not JSON numbers
        flat = flat.astype(np.float32)
    return flat.tolist()


def _flatten(data: list[object]) -> list[object]:
    """Nested JSON arrays -> their elements in row-major order."""
    if not any(isinstance(item, list) for item in data):
        return data
    flat: list[object] = []
    for item in data:
        flat.extend(_flatten(item) if isinstance(item, list) else [item])
    return flat
