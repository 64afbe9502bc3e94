"""A serialized protobuf message walked field by field, without parsing it: for the
places that must not copy what they skip (a large ModelInferRequest's raw tensors, an
ONNX model's weights), and that the serving path reads without the `onnx` package."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5
MAX_GROUP_DEPTH = 100  # protobuf's own recursion limit


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
        if wire_type == LEN:
            length, value = varint(data, position)
            position = value + length
        else:
            position = _skip(data, position, number, wire_type, start)
        if position > end:
            raise ValueError(f"field {number} runs past the end of the message")
        yield Field(number, wire_type, start, value, position)


def _skip(data: bytes | memoryview, position: int, number: int, wire_type: int, start: int) -> int:
    """The position after the value of a field that is not length-delimited. A group
    (wire types 3 and 4, which protobuf still parses as unknown fields) runs to its
    matching end; groups may nest, as deep as protobuf allows."""
    if wire_type == VARINT:
        return varint(data, position)[1]
    if wire_type == I64:
        return position + 8
    if wire_type == I32:
        return position + 4
    if wire_type != SGROUP:
        raise ValueError(f"unsupported protobuf wire type {wire_type} at byte {start}")
    open_groups = [number]
    while open_groups:
        if len(open_groups) > MAX_GROUP_DEPTH or position >= len(data):
            raise ValueError(f"group {number} at byte {start} is malformed or never ends")
        key, position = varint(data, position)
        inner, inner_type = key >> 3, key & 7
        if inner_type == EGROUP:
            if inner != open_groups.pop():
                raise ValueError(f"group {number} at byte {start} ends with another group's end")
        elif inner_type == SGROUP:
            open_groups.append(inner)
        elif inner_type == LEN:
            length, position = varint(data, position)
            position += length
        else:
            position = _skip(data, position, inner, inner_type, start)
    return position


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
