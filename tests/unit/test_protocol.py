"""The committed gRPC stubs: up to date with protos/, and wire-compatible with tritonclient.

sparseserve's protocol definitions are written independently of upstream's, so nothing
but these tests guarantees that a field number is right. Every message, field and enum
value we declare is compared against the copy that tritonclient ships (which is
generated from Triton's own grpc_service.proto / model_config.proto).
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from tritonclient.grpc import _utils as triton_utils
from tritonclient.grpc import service_pb2 as triton_service_pb2

from sparseserve.api import service_pb2
from sparseserve.protocol import grpc_service_pb2, model_config_pb2
from sparseserve.protocol._pool import POOL

ROOT = Path(__file__).resolve().parents[2]
PROTO_SRC = ROOT / "protos"
# The v2 protocol (wire-compatible with Triton's) and sparseserve's own API.
PROTO_PKGS = (Path("sparseserve") / "protocol", Path("sparseserve") / "api")

# The `protos` target in the Makefile post-processes the generated *_pb2.py with this sed
# script; _apply_pool_rewrite() below is its Python twin. test_makefile_sed_unchanged
# fails when the two drift apart.
MAKEFILE_SED = (
    "s/^from google.protobuf import descriptor_pool as _descriptor_pool$$"
    "/from sparseserve.protocol._pool import POOL as _POOL/; "
    "s/_descriptor_pool.Default()/_POOL/"
)


def _apply_pool_rewrite(text: str) -> str:
    text = re.sub(
        r"^from google\.protobuf import descriptor_pool as _descriptor_pool$",
        "from sparseserve.protocol._pool import POOL as _POOL",
        text,
        flags=re.MULTILINE,
    )
    # sed's "." matches any character; the generated code only ever has the literal.
    return re.sub(r"_descriptor_pool.Default\(\)", "_POOL", text)


# --------------------------------------------------------------- generated code --


def test_makefile_sed_unchanged() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert f"sed -i '{MAKEFILE_SED}'" in makefile, (
        "the pool rewrite in the Makefile's `protos` target changed; update MAKEFILE_SED "
        "and _apply_pool_rewrite() in this test to match"
    )


def test_generated_stubs_are_up_to_date(tmp_path: Path) -> None:
    pinned = re.search(r'"grpcio-tools==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pinned, "pyproject.toml no longer pins grpcio-tools"
    installed = importlib.metadata.version("grpcio-tools")
    assert installed == pinned.group(1), (
        f"grpcio-tools {installed} is installed but the stubs are generated with "
        f"{pinned.group(1)}; install the pinned version"
    )

    shutil.copytree(PROTO_SRC, tmp_path / "protos")
    out = tmp_path / "out"
    out.mkdir()
    sources = sorted(
        str(p.relative_to(tmp_path))
        for package in PROTO_PKGS
        for p in (tmp_path / "protos" / package).glob("*.proto")
    )
    assert sources, "no .proto files found"
    # The same invocation as `make protos`, relative paths included: protoc records the
    # source path (relative to -I) in the generated code.
    protoc = [sys.executable, "-m", "grpc_tools.protoc", "-Iprotos"]
    protoc += ["--python_out=out", "--grpc_python_out=out", *sources]
    result = subprocess.run(protoc, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    for package in PROTO_PKGS:
        for pb2 in (out / package).glob("*_pb2.py"):
            pb2.write_text(_apply_pool_rewrite(pb2.read_text()))

    def stubs(root: Path) -> dict[str, bytes]:
        return {
            str(p.relative_to(root)): p.read_bytes()
            for package in PROTO_PKGS
            for p in (root / package).glob("*_pb2*.py")
        }

    generated, committed = stubs(out), stubs(ROOT / "service")
    assert {str(Path(name).parent) for name in generated} == {str(p) for p in PROTO_PKGS}
    assert sorted(committed) == sorted(generated), "generated file set differs; run `make protos`"
    stale = [name for name in sorted(generated) if generated[name] != committed[name]]
    assert not stale, f"{stale} out of date with protos/; run `make protos`"


def test_stubs_use_private_pool() -> None:
    assert grpc_service_pb2.DESCRIPTOR.pool is POOL
    assert model_config_pb2.DESCRIPTOR.pool is POOL
    assert service_pb2.DESCRIPTOR.pool is POOL
    assert triton_service_pb2.DESCRIPTOR.pool is descriptor_pool.Default()
    assert grpc_service_pb2.ModelInferRequest is not triton_service_pb2.ModelInferRequest


# -------------------------------------------------------- field-by-field upstream --


def _walk(desc: Descriptor) -> Iterator[Descriptor]:
    yield desc
    for nested in desc.nested_types:
        yield from _walk(nested)


def _our_messages() -> list[Descriptor]:
    return [
        d
        for module in (model_config_pb2, grpc_service_pb2)
        for top in module.DESCRIPTOR.message_types_by_name.values()
        for d in _walk(top)
    ]


def _our_enums() -> list[EnumDescriptor]:
    top = [
        e
        for module in (model_config_pb2, grpc_service_pb2)
        for e in module.DESCRIPTOR.enum_types_by_name.values()
    ]
    return top + [e for d in _our_messages() for e in d.enum_types]


def _label(field: FieldDescriptor) -> str:
    # FieldDescriptor.label is deprecated (and warns) in newer protobuf releases.
    if hasattr(field, "is_repeated"):
        if field.is_repeated:
            return "repeated"
        return "required" if field.is_required else "optional"
    return {3: "repeated", 2: "required", 1: "optional"}[field.label]


def _signature(field: FieldDescriptor) -> dict[str, object]:
    return {
        "name": field.name,
        "number": field.number,
        "type": field.type,
        "label": _label(field),
        "has_presence": field.has_presence,
        "message_type": field.message_type.full_name if field.message_type else None,
        "enum_type": field.enum_type.full_name if field.enum_type else None,
        "oneof": field.containing_oneof.name if field.containing_oneof else None,
    }


@pytest.mark.parametrize("ours", _our_messages(), ids=lambda d: d.full_name)
def test_message_fields_match_upstream(ours: Descriptor) -> None:
    upstream = descriptor_pool.Default().FindMessageTypeByName(ours.full_name)
    assert ours.GetOptions().map_entry == upstream.GetOptions().map_entry
    for field in ours.fields:
        theirs = upstream.fields_by_number.get(field.number)
        assert theirs is not None, f"{ours.full_name}: field {field.number} is not upstream"
        assert _signature(field) == _signature(theirs), f"{ours.full_name}.{field.name}"


@pytest.mark.parametrize("ours", _our_enums(), ids=lambda e: e.full_name)
def test_enum_values_match_upstream(ours: EnumDescriptor) -> None:
    upstream = descriptor_pool.Default().FindEnumTypeByName(ours.full_name)
    assert [(v.name, v.number) for v in ours.values] == [
        (v.name, v.number) for v in upstream.values
    ]


def test_rpcs_match_upstream() -> None:
    ours = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    upstream = descriptor_pool.Default().FindServiceByName("inference.GRPCInferenceService")
    assert ours.full_name == upstream.full_name
    for method in ours.methods:
        theirs = upstream.methods_by_name[method.name]
        assert (
            method.input_type.full_name,
            method.output_type.full_name,
            method.client_streaming,
            method.server_streaming,
        ) == (
            theirs.input_type.full_name,
            theirs.output_type.full_name,
            theirs.client_streaming,
            theirs.server_streaming,
        )


# ------------------------------------------------------------------- round trip --


def test_infer_request_from_tritonclient_round_trips() -> None:
    dense = tritonclient.grpc.InferInput("INPUT0", [2, 3], "FP32")
    dense.set_data_from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3))
    text = tritonclient.grpc.InferInput("TEXT", [2], "BYTES")
    text.set_data_from_numpy(np.array([b"ab", b"cde"], dtype=np.object_))
    # The request exactly as tritonclient's InferenceServerClient.infer() builds it.
    request = triton_utils._get_inference_request(
        model_name="model",
        inputs=[dense, text],
        model_version="1",
        request_id="req-7",
        outputs=[tritonclient.grpc.InferRequestedOutput("OUTPUT0", class_count=2)],
        sequence_id=5,
        sequence_start=True,
        sequence_end=False,
        priority=2,
        timeout=1000,
        parameters={"custom": "value"},
    )
    request.parameters["big"].uint64_param = 2**64 - 1
    request.parameters["ratio"].double_param = 0.5
    wire = request.SerializeToString(deterministic=True)

    ours = grpc_service_pb2.ModelInferRequest.FromString(wire)

    assert (ours.model_name, ours.model_version, ours.id) == ("model", "1", "req-7")
    assert [(t.name, t.datatype, list(t.shape)) for t in ours.inputs] == [
        ("INPUT0", "FP32", [2, 3]),
        ("TEXT", "BYTES", [2]),
    ]
    assert list(ours.raw_input_contents) == [
        np.arange(6, dtype=np.float32).tobytes(),
        b"\x02\x00\x00\x00ab\x03\x00\x00\x00cde",
    ]
    assert not ours.inputs[0].HasField("contents")
    params = ours.parameters
    assert params["sequence_id"].int64_param == 5
    assert params["sequence_start"].bool_param is True
    assert params["sequence_end"].bool_param is False
    assert params["priority"].uint64_param == 2
    assert params["timeout"].int64_param == 1000
    assert params["custom"].string_param == "value"
    assert params["big"].WhichOneof("parameter_choice") == "uint64_param"
    assert params["big"].uint64_param == 2**64 - 1
    assert params["ratio"].double_param == 0.5
    assert [o.name for o in ours.outputs] == ["OUTPUT0"]
    assert ours.outputs[0].parameters["classification"].int64_param == 2

    back = triton_service_pb2.ModelInferRequest.FromString(
        ours.SerializeToString(deterministic=True)
    )
    assert back == request
    assert back.SerializeToString(deterministic=True) == wire
