"""Ask a running server's standard gRPC health service whether it serves.

Container health checks (Docker's HEALTHCHECK, compose's `healthcheck`) run a command
inside the container. The image carries no `grpc_health_probe` binary, but the server's
own dependencies already include the health service's stubs, so `sparseserve health`
does the check with them. Kubernetes needs none of this: its native `grpc` probe calls
the same service.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.ServingStatus.Name(health_pb2.HealthCheckResponse.SERVING)


class HealthCheckError(Exception):
    """The health service could not be asked, or does not know the service."""


def check_health(address: str, service: str = "", timeout: float = 2.0) -> str:
    """The status name (`SERVING`, `NOT_SERVING`, ...) of `service` at `address`.

    `service` "" is the server as a whole; a server also reports each gRPC service by
    its full name (sparseserve: `inference.GRPCInferenceService`).
    """
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            response = stub.Check(request, timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            if code is grpc.StatusCode.NOT_FOUND:
                raise HealthCheckError(
                    f"{address} has no health status for service {service!r}"
                ) from None
            raise HealthCheckError(
                f"cannot ask {address} for its health: {code.name} {exc.details()}"  # type: ignore[attr-defined]
            ) from None
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
