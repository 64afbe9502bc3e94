"""The body of a v2 REST inference request and of its answer: JSON tensors, and Triton's
binary tensor data extension (docs/protocol/extension_binary_data.md in Triton's repo).

With the extension, a body is a JSON header followed by raw tensors. The header's length
is the `Inference-Header-Content-Length` HTTP header; an input whose `parameters` hold
`binary_data_size: N` takes the next N bytes of what follows, in input order, in the
same wire form as gRPC's `raw_input_contents`. An output is answered the same way when
its own `binary_data` parameter says so, or, if it has none, when the request's
`binary_data_output` parameter does (tritonclient.http sets the latter whenever it asks
for no outputs by name). Tensor values themselves go through `sparseserve.codec`, the
one datatype table and converter of the project.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sparseserve import codec
from sparseserve.errors import InvalidInput

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"


@dataclass(slots=True)
class RestInferRequest:
    """A parsed inference request: its JSON header and the binary data after it."""

    inputs: list[dict[str, Any]]
    binary: memoryview
    id: str | None = None
    # Requested output names, in request order, and which of them are answered as binary.
    outputs: list[str] = field(default_factory=list)
    binary_outputs: set[str] = field(default_factory=set)
    # Answer every output as binary (for outputs that do not say themselves).
    binary_by_default: bool = False
    # Whether the JSON holds a true or false anywhere: if not, no number in it can be
    # a boolean, and the tensors' values need no check for one.
    has_booleans: bool = True


def parse_request(body: bytes, header_length: str | None) -> RestInferRequest:
    """Split `body` into its JSON header and binary data and check the header's shape
    (the tensors themselves are decoded later, by `decode_inputs`)."""
    if header_length is None:
        json_part, binary = body, memoryview(b"")
    else:
        try:
            length = int(header_length)
        except ValueError:
            length = -1
        if not 0 <= length <= len(body):
            raise InvalidInput(
                f"{HEADER_LENGTH} is {header_length!r}, but the body has {len(body)} bytes; "
                "it must be the length of the JSON header at the start of the body"
            )
        json_part, binary = body[:length], memoryview(body)[length:]
    has_booleans = b"true" in json_part or b"false" in json_part  # C speed, ~1 ms a 10 MB
    try:
        header = json.loads(json_part)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidInput("request body is JSON nested too deeply to read") from None
    if not isinstance(header, dict):
        raise InvalidInput(
            f"request body must be a JSON object with 'inputs', got {type(header).__name__}"
        )
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not all(isinstance(t, dict) for t in inputs):
        raise InvalidInput("request needs 'inputs': a JSON array of tensor objects")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput(f"'id' must be a string, got {type(request_id).__name__}")
    parameters = _parameters(header, "request")
    binary_by_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_by_default, bool):
        raise InvalidInput("request parameter 'binary_data_output' must be true or false")
    request = RestInferRequest(
        inputs, binary, request_id, binary_by_default=binary_by_default, has_booleans=has_booleans
    )
    outputs = header.get("outputs", [])
    if not isinstance(outputs, list):
        raise InvalidInput("'outputs' must be a JSON array of {\"name\": ...} objects")
    for output in outputs:
        name = output.get("name") if isinstance(output, dict) else None
        if not isinstance(name, str):
            raise InvalidInput(f"each requested output needs a 'name' string, got {output!r}")
        output_parameters = _parameters(output, f"output {name!r}")
        codec.refuse_extensions(
            "output", name, "shared_memory_region" in output_parameters,
            bool(output_parameters.get("classification")),
        )  # fmt: skip
        as_binary = output_parameters.get("binary_data", binary_by_default)
        if not isinstance(as_binary, bool):
            raise InvalidInput(f"output {name!r}: parameter 'binary_data' must be true or false")
        request.outputs.append(name)
        if as_binary:
            request.binary_outputs.add(name)
    return request


def decode_inputs(request: RestInferRequest) -> dict[str, np.ndarray]:
    """The request's tensors as arrays, checking the wire format only (the model's own
    expectations are checked by the DataPlane, as for gRPC)."""
    arrays: dict[str, np.ndarray] = {}
    binary, offset = request.binary, 0
    for tensor in request.inputs:
        name = tensor.get("name")
        if not isinstance(name, str):
            raise InvalidInput(f"each input needs a 'name' string, got {tensor.get('name')!r}")
        if name in arrays:
            raise InvalidInput(f"input {name!r} appears more than once in the request")
        datatype = tensor.get("datatype")
        if not isinstance(datatype, str):
            raise InvalidInput(f"input {name!r} needs a 'datatype' string, e.g. \"FP32\"")
        dtype = codec.datatype(datatype)
        shape = tensor.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in shape
        ):
            raise InvalidInput(f"input {name!r} needs a 'shape': a JSON array of integers")
        shape = codec.validate_shape(name, shape)
        parameters = _parameters(tensor, f"input {name!r}")
        codec.refuse_extensions("input", name, "shared_memory_region" in parameters)
        size = parameters.get("binary_data_size")
        if size is None:
            if "data" not in tensor:
                raise InvalidInput(
                    f"input {name!r} has neither 'data' nor a 'binary_data_size' parameter"
                )
            arrays[name] = codec.decode_json_data(
                name, dtype, shape, tensor["data"], request.has_booleans
            )
            continue
        if "data" in tensor:
            raise InvalidInput(
                f"input {name!r} has both 'data' and a 'binary_data_size' parameter; use one"
            )
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidInput(f"input {name!r}: binary_data_size must be a non-negative integer")
        if offset + size > len(binary):
            raise InvalidInput(
                f"input {name!r}: binary_data_size is {size}, but only {len(binary) - offset} "
                "bytes of binary data remain after the JSON header"
            )
        arrays[name] = codec.decode_raw(name, dtype, shape, binary[offset : offset + size])
        offset += size
    if offset != len(binary):
        raise InvalidInput(
            f"{len(binary) - offset} bytes of binary data follow the JSON header but no "
            "input claims them (each binary input needs a 'binary_data_size' parameter)"
        )
    return arrays


def encode_response(
    request: RestInferRequest, model_name: str, model_version: str, outputs: Mapping[str, Any]
) -> tuple[bytes, int | None]:
    """The answer's body and, when binary tensors follow the JSON, the JSON's length
    (for the `Inference-Header-Content-Length` header)."""
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, array in outputs.items():
        dtype = codec.datatype_of(array)
        tensor: dict[str, Any] = {"name": name, "datatype": dtype.name, "shape": list(array.shape)}
        if name in request.binary_outputs or (
            request.binary_by_default and name not in request.outputs
        ):
            _, raw = codec.encode_raw(array)
            tensor["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            tensor["data"] = codec.encode_json_data(name, array)
        tensors.append(tensor)
    answer: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        answer["id"] = request.id
    answer["outputs"] = tensors
    header = json.dumps(answer).encode()
    if not blobs:
        return header, None
    return b"".join((header, *blobs)), len(header)


def _parameters(obj: dict[str, Any], what: str) -> dict[str, Any]:
    parameters = obj.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidInput(f"{what}: 'parameters' must be a JSON object")
    return parameters
