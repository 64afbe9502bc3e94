"""Every row of the error table over HTTP, end to end: the real REST adapter on a free
port with a route check that raises each domain error, called by a real HTTP client.
A new error class in `sparseserve.errors.STATUS` fails here until it has an HTTP status.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from sparseserve import errors
from sparseserve.errors import STATUS, SparseServeError
from sparseserve.server.errors import HTTP_STATUS
from sparseserve.server.http import HttpServer, RouteGroup

# What a REST client must see for each error (Triton's codes where Triton has them).
EXPECTED_HTTP: dict[type[Exception], int] = {
    SparseServeError: 500,
    errors.ModelNotFound: 404,
    errors.InvalidModelName: 400,
    errors.ModelNotReady: 503,
    errors.InvalidInput: 400,
    errors.Overloaded: 429,
    errors.ModelLoadError: 400,
    errors.OperationNotAllowed: 400,
    errors.BackendUnavailable: 503,
    errors.InferenceFailed: 500,
    errors.ShuttingDown: 503,
    errors.RequestTooLarge: 429,
    errors.ProtocolRestricted: 503,  # gRPC's (Triton's UNAVAILABLE); REST answers ApiRestricted
    errors.ApiRestricted: 403,  # Triton's --http-restricted-api answer
    RuntimeError: 500,  # not ours: internal, with its message
}


def test_every_status_code_has_an_http_status() -> None:
    assert set(STATUS.values()) <= set(HTTP_STATUS)
    assert set(STATUS) <= set(EXPECTED_HTTP)


async def _call(
    checks: dict[RouteGroup, object], method: str, path: str
) -> tuple[int, dict[str, object] | None]:
    # The health routes used here touch neither the data plane nor the servicer.
    server = HttpServer(None, None, lambda: True, 1 << 20, route_checks=checks)  # type: ignore[arg-type]
    port = await server.start("127.0.0.1", 0, shutdown_timeout=1.0)
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, f"http://127.0.0.1:{port}{path}") as response,
        ):
            body = await response.json() if response.content_length else None
            return response.status, body
    finally:
        await server.stop()


@pytest.mark.parametrize("error_class", list(EXPECTED_HTTP), ids=lambda c: c.__name__)
def test_each_error_reaches_the_client_with_its_http_status(error_class: type[Exception]) -> None:
    async def refuse(request: web.Request) -> None:
        raise error_class(f"refused by {error_class.__name__}")

    status, body = asyncio.run(_call({RouteGroup.health: refuse}, "GET", "/v2/health/live"))
    assert status == EXPECTED_HTTP[error_class]
    assert body is not None and f"refused by {error_class.__name__}" in str(body["error"])


def test_a_route_check_applies_to_its_group_only() -> None:
    async def refuse(request: web.Request) -> None:
        raise errors.OperationNotAllowed("inference is restricted")

    checks = {RouteGroup.inference: refuse}
    assert asyncio.run(_call(checks, "GET", "/v2/health/live")) == (200, None)
    assert asyncio.run(_call({RouteGroup.health: refuse}, "HEAD", "/v2/health/live"))[0] == 400
    status, body = asyncio.run(_call(checks, "POST", "/v2/models/m/infer"))
    assert (status, body) == (400, {"error": "inference is restricted"})
