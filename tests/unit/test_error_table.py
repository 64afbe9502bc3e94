"""Every row of the error table, end to end: a real gRPC server with sparseserve's
error mapping (`add_mapping_errors`, as the server registers its servicers), a handler
that raises, and a real client that reads the status.

A new row in `sparseserve.errors.STATUS` is tested here without editing this file.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from functools import partial

import grpc
import pytest

from sparseserve import errors
from sparseserve.errors import STATUS, SparseServeError
from sparseserve.server.errors import add_mapping_errors

SERVICE = "sparseserve.test.Errors"
Behavior = Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]


def call_raising(behavior: Behavior, registered: bool = True) -> grpc.aio.AioRpcError | bytes:
    """Serve `behavior` as a unary RPC with sparseserve's error mapping on
    127.0.0.1:<free port>, call it once, and return the client's error (or the reply if
    there was none). It is registered the way generated `add_*_to_server` code does, as a
    generic and as a registered method handler (`registered=False`: only as a generic
    one, which is what serves a method when no registered handler has it)."""

    async def run() -> grpc.aio.AioRpcError | bytes:
        server = grpc.aio.server()
        add_mapping_errors(partial(add_to_server, registered=registered), behavior, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                try:
                    return await channel.unary_unary(f"/{SERVICE}/Call")(b"request", timeout=10)
                except grpc.aio.AioRpcError as exc:
                    return exc
        finally:
            await server.stop(None)

    return asyncio.run(run())


def add_to_server(behavior: Behavior, server: grpc.aio.Server, registered: bool) -> None:
    """What generated `add_*Servicer_to_server` code does, for one method."""
    handlers = {"Call": grpc.unary_unary_rpc_method_handler(behavior)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    if registered:
        server.add_registered_method_handlers(SERVICE, handlers)


def raising(error: BaseException) -> Behavior:
    async def behavior(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise error

    return behavior


@pytest.mark.parametrize(
    ("cls", "code"), list(STATUS.items()), ids=[cls.__name__ for cls in STATUS]
)
def test_each_error_reaches_the_client_with_its_status_and_message(
    cls: type[SparseServeError], code: str
) -> None:
    """The client sees exactly the table's status code and the error's own message."""
    message = f"{cls.__name__} happened: model 'm' said ü"
    result = call_raising(raising(cls(message)))
    assert isinstance(result, grpc.aio.AioRpcError)
    assert result.code() is grpc.StatusCode[code]
    assert result.details() == message


def test_unexpected_exception_is_internal_with_its_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug in a handler is INTERNAL with its message (not gRPC's bare UNKNOWN), and the
    traceback goes to the server log."""
    with caplog.at_level(logging.ERROR, logger="sparseserve.server.errors"):
        result = call_raising(raising(ValueError("bad thing 42")))
    assert isinstance(result, grpc.aio.AioRpcError)
    assert result.code() is grpc.StatusCode.INTERNAL
    assert "bad thing 42" in (result.details() or "")
    logged = [r for r in caplog.records if r.exc_info is not None]
    assert logged and logged[0].exc_info[0] is ValueError
    assert f"/{SERVICE}/Call" in logged[0].getMessage()


@pytest.mark.parametrize("registered", [True, False], ids=["registered", "generic"])
def test_both_ways_of_registering_map_errors(registered: bool) -> None:
    """Generated code registers each method twice (generic and registered handler);
    whichever of them serves the call, the error keeps its status and message."""
    result = call_raising(raising(errors.ModelNotFound("no model 'x'")), registered)
    assert isinstance(result, grpc.aio.AioRpcError)
    assert result.code() is grpc.StatusCode.NOT_FOUND
    assert result.details() == "no model 'x'"
    assert call_raising(lambda request, context: _reversed(request), registered) == b"tseuqer"


async def _reversed(request: bytes) -> bytes:
    return request[::-1]


def test_subclass_not_in_the_table_gets_its_parents_status() -> None:
    """A more specific error added later without a row still maps by inheritance."""

    class VersionNotFound(errors.ModelNotFound):
        pass

    result = call_raising(raising(VersionNotFound("no version 7")))
    assert isinstance(result, grpc.aio.AioRpcError)
    assert result.code() is grpc.StatusCode.NOT_FOUND
    assert result.details() == "no version 7"


def test_deliberate_abort_passes_through_unchanged() -> None:
    """A handler that aborts with its own status is not turned into INTERNAL."""

    async def behavior(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not yours")
        return b""

    result = call_raising(behavior)
    assert isinstance(result, grpc.aio.AioRpcError)
    assert result.code() is grpc.StatusCode.PERMISSION_DENIED
    assert result.details() == "not yours"


def test_successful_call_is_untouched() -> None:
    async def behavior(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request[::-1]

    assert call_raising(behavior) == b"tseuqer"


def test_every_domain_error_has_a_row() -> None:
    """Each SparseServeError defined in sparseserve.errors has its own, valid row."""
    defined = {
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, SparseServeError) and cls.__module__ == errors.__name__
    }
    assert defined - set(STATUS) == set()
    assert set(STATUS) <= defined
    for code in STATUS.values():
        assert code in grpc.StatusCode.__members__
        assert code != "OK"


def test_not_ready_is_unavailable_not_a_client_error() -> None:
    """DESIGN.md: "not ready" is UNAVAILABLE (retryable), never INVALID_ARGUMENT."""
    assert STATUS[errors.ModelNotReady] == "UNAVAILABLE"
    assert STATUS[errors.ShuttingDown] == "UNAVAILABLE"
