"""The restriction and TLS parts of `sparseserve.server.security` that need no server
process: every RPC has a group, each kind of handler is guarded, the HTTP flavour of
the headers, the settings' syntax, and the client side the health check derives."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sparseserve.api import service_pb2
from sparseserve.protocol import grpc_service_pb2
from sparseserve.server.app import SERVICES
from sparseserve.server.security import (
    RPC_GROUPS,
    HeaderRequirement,
    RestrictingServer,
    Restrictions,
    SecurityConfigError,
    header_allows,
    health_check_access,
    restrict_handler,
    restricted_message,
    ssl_context,
)
from sparseserve.settings import GrpcTlsSettings, ProtocolRestriction, RestrictedGroup, Settings
from tests.tls_certs import TestCA


def served_methods() -> set[str]:
    """Every RPC the server registers, from the services' own descriptors."""
    descriptors = [
        grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
        service_pb2.DESCRIPTOR.services_by_name["SparseServe"],
        health_pb2.DESCRIPTOR.services_by_name["Health"],
    ]
    methods = {f"/{d.full_name}/{m.name}" for d in descriptors for m in d.methods}
    return methods | {f"/{reflection.SERVICE_NAME}/ServerReflectionInfo"}


def test_every_served_rpc_has_exactly_the_groups_table_entry() -> None:
    assert set(RPC_GROUPS) == served_methods()
    assert "" in SERVICES  # the health entry the probes ask for


def test_triton_groups_for_the_v2_rpcs() -> None:
    v2 = "/inference.GRPCInferenceService/"
    assert RPC_GROUPS[v2 + "RepositoryModelUnload"] is RestrictedGroup.model_repository
    assert RPC_GROUPS[v2 + "ModelStreamInfer"] is RestrictedGroup.inference
    assert RPC_GROUPS["/grpc.health.v1.Health/Check"] is RestrictedGroup.health


def test_an_rpc_without_a_group_refuses_to_register() -> None:
    with pytest.raises(LookupError, match=r"/x\.Y/Z has no restriction group"):
        Restrictions({}).of_method("/x.Y/Z")


def restriction(text: str) -> ProtocolRestriction:
    return ProtocolRestriction.model_validate(text)


def test_grpc_and_http_headers() -> None:
    """gRPC prefixes Triton's `triton-grpc-protocol-`; HTTP uses the bare key."""
    rules = [restriction("model-repository,statistics:Admin-Key=v:w=x")]
    grpc_side = Restrictions.for_grpc(rules).of_group(RestrictedGroup.statistics)
    http_side = Restrictions.for_http(rules).of_group(RestrictedGroup.model_repository)
    assert grpc_side == HeaderRequirement("triton-grpc-protocol-admin-key", "v:w=x")
    assert http_side == HeaderRequirement("admin-key", "v:w=x")
    assert Restrictions.for_grpc(rules).of_group(RestrictedGroup.inference) is None
    assert "v:w=x" not in repr(grpc_side) + Restrictions.for_grpc(rules).describe()


def test_header_allows_only_the_exact_value() -> None:
    requirement = HeaderRequirement("triton-grpc-protocol-k", "v")
    assert header_allows([("triton-grpc-protocol-k", "v")], requirement)
    assert header_allows([("other", "x"), ("triton-grpc-protocol-k", b"v")], requirement)
    assert not header_allows([("triton-grpc-protocol-k", "v2")], requirement)
    assert not header_allows([("k", "v")], requirement)
    assert not header_allows(None, requirement)


def test_value_file_is_read_and_checked(tmp_path: Path) -> None:
    secret = tmp_path / "value"
    secret.write_text("from-a-secret\n")
    rule = ProtocolRestriction(groups=["health"], key="k", value_file=secret)
    assert Restrictions.for_grpc([rule]).of_group(RestrictedGroup.health).value == "from-a-secret"
    with pytest.raises(SecurityConfigError, match="missing: no such file"):
        Restrictions.for_grpc([rule.model_copy(update={"value_file": tmp_path / "missing"})])
    with pytest.raises(ValueError, match="exactly one of value and value_file"):
        ProtocolRestriction(groups=["health"], key="k")


async def watch_and_check(restrictions: Restrictions, metadata: tuple) -> list[str]:
    """Serve the standard health service through RestrictingServer and call both its
    RPCs: Check (unary) and Watch (a response stream written with context.write)."""
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, RestrictingServer(server, restrictions))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    outcomes = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="")
            for call in (
                lambda: stub.Check(request, metadata=metadata, timeout=5),
                lambda: anext(aiter(stub.Watch(request, metadata=metadata, timeout=5))),
            ):
                try:
                    await call()
                    outcomes.append("OK")
                except grpc.aio.AioRpcError as exc:
                    outcomes.append(f"{exc.code().name} {exc.details()}")
    finally:
        await server.stop(None)
    return outcomes


def test_unary_and_streaming_handlers_are_guarded() -> None:
    rules = Restrictions.for_grpc([restriction("health:probe=p")])
    refused = f"UNAVAILABLE {restricted_message('triton-grpc-protocol-probe')}"
    assert asyncio.run(watch_and_check(rules, ())) == [refused, refused]
    allowed = (("triton-grpc-protocol-probe", "p"),)
    assert asyncio.run(watch_and_check(rules, allowed)) == ["OK", "OK"]
    assert asyncio.run(watch_and_check(Restrictions({}), ())) == ["OK", "OK"]


@pytest.mark.parametrize(
    "text",
    ["model-repository", "model-repository:k", ":k=v", "models:k=v", "health:k=", "health:-bin=v"],
)
def test_triton_syntax_errors(text: str) -> None:
    with pytest.raises(ValueError):
        Settings(grpc_restricted_protocols=[text])


def test_tls_settings_need_their_files() -> None:
    with pytest.raises(ValueError, match="needs --grpc-server-cert and --grpc-server-key"):
        GrpcTlsSettings(enabled=True)
    mutual = GrpcTlsSettings(mutual=True, server_cert="c", server_key="k", root_cert="r")
    assert mutual.enabled  # --grpc-use-ssl-mutual implies --grpc-use-ssl, as in Triton


def test_ssl_context_for_an_http_port(tmp_path: Path) -> None:
    ca = TestCA()
    cert, key = ca.server().write(tmp_path, "server")
    root = ca.write(tmp_path / "ca.crt")
    plain = ssl_context(GrpcTlsSettings(enabled=True, server_cert=cert, server_key=key))
    assert plain.verify_mode is ssl.CERT_NONE
    mutual = ssl_context(
        GrpcTlsSettings(mutual=True, server_cert=cert, server_key=key, root_cert=root)
    )
    assert mutual.verify_mode is ssl.CERT_REQUIRED
    _, other_key = ca.server().write(tmp_path, "other")
    with pytest.raises(SecurityConfigError, match="does not fit"):
        ssl_context(GrpcTlsSettings(enabled=True, server_cert=cert, server_key=other_key))


def test_health_check_access_follows_the_server_settings() -> None:
    """TLS as the server serves it, its own certificate as the client's under mutual
    TLS, and the health group's header when that group is restricted."""
    plain = Settings()
    assert health_check_access(plain) == (None, [])
    served = Settings(
        grpc_tls={"mutual": True, "server_cert": "s.crt", "server_key": "s.key", "root_cert": "ca"},
        grpc_restricted_protocols=["health,metadata:probe=p", "model-repository:admin=a"],
    )
    tls, metadata = health_check_access(served, server_name="sparseserve")
    assert tls is not None
    assert (tls.root_cert, tls.client_cert, tls.client_key) == (
        Path("ca"),
        Path("s.crt"),
        Path("s.key"),
    )
    assert tls.channel_options() == [("grpc.ssl_target_name_override", "sparseserve")]
    assert metadata == [("triton-grpc-protocol-probe", "p")]


def test_open_groups_keep_their_handlers_unwrapped() -> None:
    """No per-call cost where nothing is restricted: the very same handler is registered."""
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    rules = Restrictions.for_grpc([restriction("model-repository:k=v")])
    infer = "/inference.GRPCInferenceService/ModelInfer"
    unload = "/inference.GRPCInferenceService/RepositoryModelUnload"
    assert restrict_handler(handler, infer, rules) is handler
    assert restrict_handler(handler, unload, rules) is not handler
