"""Ask a running server's standard gRPC health service whether it serves.

Container health checks (Docker's HEALTHCHECK, compose's `healthcheck`) run a command
inside the container. The image carries no `grpc_health_probe` binary, but the server's
own dependencies already include the health service's stubs, so `sparseserve health`
does the check with them. Kubernetes' native `grpc` probe calls the same service, but
speaks only plaintext and sends no headers: with TLS on the gRPC port (or the health
group restricted), the chart's probes run this command instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.ServingStatus.Name(health_pb2.HealthCheckResponse.SERVING)


class HealthCheckError(Exception):
    """The health service could not be asked, or does not know the service."""


@dataclass(frozen=True)
class ClientTls:
    """How a client reaches a server's TLS port: the CA to verify it with (None: the
    system's), its own certificate for mutual TLS, and the name to expect in the
    server's certificate when it differs from the address (a probe dialling 127.0.0.1)."""

    root_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        """grpc channel credentials from the files (read now)."""
        try:
            return grpc.ssl_channel_credentials(
                root_certificates=_read(self.root_cert),
                private_key=_read(self.client_key),
                certificate_chain=_read(self.client_cert),
            )
        except OSError as exc:
            raise HealthCheckError(f"cannot read {exc.filename}: {exc.strerror}") from None

    def channel_options(self) -> list[tuple[str, str]]:
        if self.server_name is None:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]

    def tritonclient_channel_args(self) -> list[tuple[str, str | int]]:
        """tritonclient's `channel_args` with these options: they replace its own, so its
        message limit (the 32-bit maximum) is kept here."""
        limit = 2**31 - 1
        return [
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
            *self.channel_options(),
        ]


def _read(path: Path | None) -> bytes | None:
    return None if path is None else path.read_bytes()


def check_health(
    address: str,
    service: str = "",
    timeout: float = 2.0,
    tls: ClientTls | None = None,
    metadata: Sequence[tuple[str, str]] = (),
) -> str:
    """The status name (`SERVING`, `NOT_SERVING`, ...) of `service` at `address`.

    `service` "" is the server as a whole; a server also reports each gRPC service by
    its full name (sparseserve: `inference.GRPCInferenceService`). `tls`: connect over
    TLS; `metadata`: headers to send, such as a restricted health group's.
    """
    if tls is None:
        channel = grpc.insecure_channel(address)
    else:
        channel = grpc.secure_channel(address, tls.credentials(), options=tls.channel_options())
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            # types-grpcio-health-checking's HealthStub declares no methods.
            response = stub.Check(  # type: ignore[attr-defined]
                request, timeout=timeout, metadata=tuple(metadata) or None
            )
        except grpc.RpcError as exc:
            code = exc.code()
            if code is grpc.StatusCode.NOT_FOUND:
                raise HealthCheckError(
                    f"{address} has no health status for service {service!r}"
                ) from None
            raise HealthCheckError(
                f"cannot ask {address} for its health: {code.name} {exc.details()}"
            ) from None
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
