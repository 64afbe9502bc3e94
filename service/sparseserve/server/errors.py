"""The one place where errors become gRPC statuses: every unary handler of sparseserve's
services is wrapped, once, when it is registered, so that `SparseServeError`s become the
status of `sparseserve.errors.STATUS`, and an unexpected exception becomes INTERNAL with
its message (and a logged traceback) instead of gRPC's bare UNKNOWN.

This is done at registration rather than with a `grpc.aio.ServerInterceptor`, which
grpc.aio runs as a coroutine chain on every call, while a wrapper made once costs
nothing per call. The saving measured on a do-nothing ModelInfer is within noise (-3 to
+15 µs per request over three runs, bench/results/grpc_floor.md); the price is a little
more code, since generated code registers each method both as a generic and as a
registered handler, and both must be wrapped.

The same wrapper counts each call in and out of the server's `Drain` (when given one),
so that shutdown knows what still runs and refuses what arrives once it has begun
(see `sparseserve.server.drain`)."""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc

from sparseserve.errors import ShuttingDown, SparseServeError, status_of
from sparseserve.server.drain import SHUTTING_DOWN, Drain

log = logging.getLogger(__name__)

Behavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
StreamBehavior = Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]


def grpc_status(error: BaseException) -> grpc.StatusCode:
    return grpc.StatusCode[status_of(error)]


def add_mapping_errors(
    add_to_server: Callable[[Any, Any], None],
    servicer: Any,
    server: grpc.aio.Server,
    drain: Drain | None = None,
    answered_while_draining: frozenset[str] = frozenset(),
) -> None:
    """Register `servicer` with its generated `add_*Servicer_to_server` function, each
    handler wrapped so that domain errors reach the client with their status, and each
    call counted by `drain`: refused once it has begun, except the methods (full names,
    `/package.Service/Method`) in `answered_while_draining`."""
    add_to_server(servicer, _MappingErrors(server, drain, answered_while_draining))


def _wrap_handler(
    handler: grpc.RpcMethodHandler, method: str, drain: Drain | None
) -> grpc.RpcMethodHandler:
    """`handler` with its errors mapped to statuses and its calls counted by `drain`.
    A streaming handler that is no async generator is left as it is."""
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _mapping_errors(handler.unary_unary, method, drain),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.stream_stream is not None and inspect.isasyncgenfunction(handler.stream_stream):
        return grpc.stream_stream_rpc_method_handler(
            _mapping_stream_errors(handler.stream_stream, method, drain),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler


class _MappingErrors:
    """Stands in for the server while generated code registers a servicer's handlers."""

    def __init__(
        self, server: grpc.aio.Server, drain: Drain | None, answered_while_draining: frozenset[str]
    ):
        self._server = server
        self._drain = drain
        self._exempt = answered_while_draining

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        return _wrap_handler(handler, method, None if method in self._exempt else self._drain)

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_GenericMappingErrors(h, self.wrap) for h in handlers)
        )

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]
    ) -> None:
        self._server.add_registered_method_handlers(
            service, {m: self.wrap(h, f"/{service}/{m}") for m, h in handlers.items()}
        )


class _GenericMappingErrors(grpc.GenericRpcHandler):
    """A generic handler whose handlers map errors (wrapped once per method)."""

    def __init__(
        self,
        inner: grpc.GenericRpcHandler,
        wrap: Callable[[grpc.RpcMethodHandler, str], grpc.RpcMethodHandler],
    ):
        self._inner = inner
        self._wrap = wrap
        self._wrapped: dict[str, grpc.RpcMethodHandler | None] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method not in self._wrapped:
            handler = self._inner.service(handler_call_details)
            self._wrapped[method] = None if handler is None else self._wrap(handler, method)
        return self._wrapped[method]


def _mapping_errors(behavior: Behavior, method: str, drain: Drain | None) -> Behavior:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if drain is not None:  # one closure for both: an extra await layer costs ~1 µs
            try:
                drain.admit()
            except ShuttingDown as exc:
                await context.abort(grpc_status(exc), str(exc))
        try:
            return await behavior(request, context)
        except SparseServeError as exc:
            await context.abort(grpc_status(exc), str(exc))
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            log.exception("unexpected error in %s", method)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc}")
        finally:
            if drain is not None:
                drain.release()

    return call


def _mapping_stream_errors(
    behavior: StreamBehavior, method: str, drain: Drain | None
) -> StreamBehavior:
    """The stream-stream form of `_mapping_errors`. With a drain, the stream's requests
    end when the drain starts; once the handler has answered those it read, the stream
    ends with UNAVAILABLE "server is shutting down" rather than an OK that would tell
    the client every request it sent was answered."""

    async def call(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if drain is not None:
            try:
                drain.admit()
            except ShuttingDown as exc:
                await context.abort(grpc_status(exc), str(exc))
            requests = drain.requests_until_drain(requests)
        try:
            async for response in behavior(requests, context):
                yield response
            if drain is not None and requests.cut:
                raise ShuttingDown(SHUTTING_DOWN)
        except SparseServeError as exc:
            await context.abort(grpc_status(exc), str(exc))
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            log.exception("unexpected error in %s", method)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc}")
        finally:
            if drain is not None:
                drain.release()

    return call
