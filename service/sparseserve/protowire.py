"""A serialized protobuf message walked field by field, without parsing it: for the
places that must not copy what they skip (a large ModelInferRequest's raw tensors, an
ONNX model's weights), and that the serving path reads without the `onnx` package."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

VARINT, I64, LEN, I32 = 0, 1, 2, 5


class Field(NamedTuple):
    """One field of a message: `data[start:end]` is the whole field (key and value), and
    `data[value:end]` its value (for LEN fields, the bytes after the length)."""

    number: int
    wire_type: int
    start: int
    value: int
    end: int


def fields(data: bytes | memoryview) -> Iterator[Field]:
    """The fields of one message, in order. Raises ValueError on a malformed message."""
    position, end = 0, len(data)
    while position < end:
        start = position
        key, position = varint(data, position)
        number, wire_type = key >> 3, key & 7
        value = position
        if wire_type == VARINT:
            _, position = varint(data, position)
        elif wire_type == I64:
            position += 8
        elif wire_type == I32:
            position += 4
        elif wire_type == LEN:
            length, value = varint(data, position)
            position = value + length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type} at byte {start}")
        if position > end:
            raise ValueError(f"field {number} runs past the end of the message")
        yield Field(number, wire_type, start, value, position)


def messages(data: memoryview, number: int) -> Iterator[memoryview]:
    """The length-delimited fields numbered `number` of one message, as views of `data`."""
    for field in fields(data):
        if field.number == number and field.wire_type == LEN:
            yield data[field.value : field.end]


def varint(data: bytes | memoryview, position: int) -> tuple[int, int]:
    """The varint at `position`, and the position after it."""
    value = shift = 0
    while True:
        if position >= len(data) or shift > 63:
            raise ValueError(f"malformed varint at byte {position}")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
