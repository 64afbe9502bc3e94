"""The one place where errors become gRPC statuses (and, for the REST adapter, HTTP
statuses, derived from the gRPC status by one more table): every handler of sparseserve's
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
(see `sparseserve.server.drain`), and gives a large request's bytes back to the request
budget (`sparseserve.server.wire`) once it is answered."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol, TypeAlias, cast

import grpc

from sparseserve.errors import ShuttingDown, SparseServeError, status_of
from sparseserve.server.drain import GRACE_ENDED, SHUTTING_DOWN, Drain
from sparseserve.server.wire import RefusedMessage, release, safe_deserializer

log = logging.getLogger(__name__)


class ClientMistakeQuiet(logging.Filter):
    """A library's ERROR-with-traceback about what a client did at will becomes one DEBUG
    line (dropped unless `debug_log` shows DEBUG): `matches` picks those records."""

    def __init__(
        self, matches: Callable[[logging.LogRecord], bool], debug_log: logging.Logger, said: str
    ) -> None:
        super().__init__()
        self._matches, self._debug_log, self._said = matches, debug_log, said

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._matches(record):
            return True
        if not self._debug_log.isEnabledFor(logging.DEBUG):
            return False
        error = f": {record.exc_info[1]!r}" if record.exc_info else ""
        record.msg, record.args = f"{self._said}: {record.getMessage()}{error}", None
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.exc_info = record.exc_text = None
        return True


# grpc.aio logs an ERROR with a traceback when a handler's answer cannot be sent because
# its client cancelled the call ("ExecuteBatchError raised in core by servicer method"):
# each cancelled stream with answers unsent wrote one.
logging.getLogger("grpc._cython.cygrpc").addFilter(
    ClientMistakeQuiet(
        lambda record: "ExecuteBatchError" in str(record.msg),
        log,
        "a client went away before its answer",
    )
)

# Requests and responses are protobuf messages whose stubs are untyped (docs/typing.md),
# so the handlers, contexts and behaviours here are over Any. The aliases are strings
# because grpcio's classes are generic only in its stubs, not at run time.
MethodHandler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
ServicerContext: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Behavior = Callable[[Any, ServicerContext], Awaitable[Any]]
StreamBehavior = Callable[[Any, ServicerContext], AsyncIterator[Any]]
Deserializer = Callable[[bytes], Any]


class HandlerRegistry(Protocol):
    """What generated `add_*Servicer_to_server` code calls: a grpc.aio server, or a
    stand-in that wraps handlers on their way to it."""

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None: ...

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, MethodHandler]
    ) -> None: ...


# gRPC status code name -> HTTP status, the pairs google.rpc.Code documents; Triton's HTTP
# endpoint agrees wherever it has the code (400 invalid, 403 restricted API, 404 not found,
# 503 unavailable, 500 internal). Overload is 429 (Triton says 503 "exceeds maximum queue
# size"): a client or proxy can tell "slow down" from "this replica is down". Every code in
# `sparseserve.errors.STATUS` has a row (tested).
HTTP_STATUS: dict[str, int] = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "INTERNAL": 500,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
}


# An error's details travel in the grpc-message trailer, percent-encoded (a non-ASCII
# character up to 9 bytes), and a trailer past 16 KiB makes the client drop the status
# for RESOURCE_EXHAUSTED "Stream removed". Messages echo what the client sent (a model
# name of 20,000 characters): the middle of a longer one is cut, keeping how it starts
# and what it says was expected.
MAX_DETAILS = 1000


def status_details(message: str) -> str:
    """`message`, its middle cut to keep it within MAX_DETAILS characters."""
    if len(message) <= MAX_DETAILS:
        return message
    head, tail = MAX_DETAILS * 3 // 5, MAX_DETAILS * 2 // 5
    cut = len(message) - head - tail
    return f"{message[:head]}[... {cut} characters cut ...]{message[-tail:]}"


def grpc_status(error: BaseException) -> grpc.StatusCode:
    return grpc.StatusCode[status_of(error)]


def http_status(error: BaseException) -> int:
    """The HTTP status the REST adapter answers `error` with (500 if unmapped)."""
    return HTTP_STATUS.get(status_of(error), 500)


def add_mapping_errors(
    add_to_server: Callable[[Any, Any], None],
    servicer: Any,
    server: HandlerRegistry,
    drain: Drain | None = None,
    answered_while_draining: frozenset[str] = frozenset(),
    deserializers: Mapping[str, Deserializer] | None = None,
) -> None:
    """Register `servicer` with its generated `add_*Servicer_to_server` function, each
    handler wrapped so that domain errors reach the client with their status, and each
    call counted by `drain`: refused once it has begun, except the methods (full names,
    `/package.Service/Method`) in `answered_while_draining`.

    Every handler's deserializer is wrapped too (`wire.safe_deserializer`): a message
    that does not parse reaches the handler as a `RefusedMessage`, which unary handlers
    answer with INVALID_ARGUMENT (grpc.aio's own answer would be UNKNOWN), and streaming
    handlers answer in the stream. `deserializers` replaces the deserializer of the
    methods it names (e.g. `{"ModelInfer": budget.admit}`); such a method's request is
    `wire.release`d once its unary handler returns."""
    add_to_server(
        servicer, _MappingErrors(server, drain, answered_while_draining, deserializers or {})
    )


def _wrap_handler(
    handler: MethodHandler,
    method: str,
    drain: Drain | None,
    deserializer: Deserializer | None,
) -> MethodHandler:
    """`handler` with a safe deserializer, its errors mapped to statuses and its calls
    counted by `drain` (unary, and stream-stream async generators); other streaming
    handlers answer errors in their messages and keep their behaviour."""
    name = method.rsplit("/", 1)[-1]
    parse = deserializer or safe_deserializer(handler.request_deserializer, f"{name} request")
    serialize = handler.response_serializer
    # grpcio's stubs type a handler's behaviours as the sync API's (a `grpc.ServicerContext`,
    # a plain return); under grpc.aio they are coroutine functions (or async generators)
    # that take a `grpc.aio.ServicerContext`, hence the casts.
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _mapping_errors(cast(Behavior, handler.unary_unary), method, drain), parse, serialize
        )
    if handler.stream_stream is not None and inspect.isasyncgenfunction(handler.stream_stream):
        return grpc.stream_stream_rpc_method_handler(
            _mapping_stream_errors(cast(StreamBehavior, handler.stream_stream), method, drain),
            parse,
            serialize,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(handler.unary_stream, parse, serialize)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(handler.stream_unary, parse, serialize)
    # grpc's handler constructors set exactly one of the four behaviours.
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(handler.stream_stream, parse, serialize)


class _MappingErrors:
    """Stands in for the server while generated code registers a servicer's handlers."""

    def __init__(
        self,
        server: HandlerRegistry,
        drain: Drain | None,
        answered_while_draining: frozenset[str],
        deserializers: Mapping[str, Deserializer],
    ):
        self._server = server
        self._drain = drain
        self._exempt = answered_while_draining
        self._deserializers = deserializers

    def wrap(self, handler: MethodHandler, method: str) -> MethodHandler:
        drain = None if method in self._exempt else self._drain
        deserializer = self._deserializers.get(method.rsplit("/", 1)[-1])
        return _wrap_handler(handler, method, drain, deserializer)

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_GenericMappingErrors(h, self.wrap) for h in handlers)
        )

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, MethodHandler]
    ) -> None:
        self._server.add_registered_method_handlers(
            service, {m: self.wrap(h, f"/{service}/{m}") for m, h in handlers.items()}
        )


class _GenericMappingErrors(grpc.GenericRpcHandler):
    """A generic handler whose handlers map errors (wrapped once per method)."""

    def __init__(
        self,
        inner: grpc.GenericRpcHandler,
        wrap: Callable[[MethodHandler, str], MethodHandler],
    ):
        self._inner = inner
        self._wrap = wrap
        self._wrapped: dict[str, MethodHandler | None] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> MethodHandler | None:
        """The wrapped handler of the called method, or None if `inner` has none for it."""
        method = handler_call_details.method
        if method not in self._wrapped:
            handler = self._inner.service(handler_call_details)
            self._wrapped[method] = None if handler is None else self._wrap(handler, method)
        return self._wrapped[method]


def _mapping_errors(behavior: Behavior, method: str, drain: Drain | None) -> Behavior:
    # One closure for the drain, the error mapping and the budget: an extra await layer
    # costs ~1 µs per call.
    async def call(request: Any, context: ServicerContext) -> Any:
        admitted = False
        try:
            if drain is not None:
                drain.admit()  # raises ShuttingDown once the drain has begun
                admitted = True
            if isinstance(request, RefusedMessage):
                raise request.error
            return await behavior(request, context)
        except SparseServeError as exc:
            code, details = grpc_status(exc), status_details(str(exc))
        except grpc.aio.AbortError:
            raise
        except asyncio.CancelledError:
            if drain is not None and drain.was_cut:
                code, details = grpc.StatusCode.UNAVAILABLE, GRACE_ENDED
            elif _being_cancelled():
                raise  # the client went away, or grpc.aio stops
            else:
                code, details = _stray_cancel(method)
        except Exception as exc:
            log.exception("unexpected error in %s", method)
            code, details = grpc.StatusCode.INTERNAL, status_details(f"internal error: {exc}")
        finally:
            release(request)
            if drain is not None and admitted:
                drain.release()
        # Abort outside the except block and without the request: grpc.aio keeps the
        # AbortError alive after the call, and with it its traceback, the error it would
        # chain and their frames. Aborting inside the block kept every refused request's
        # message in memory, even through gc.collect() (bench/request_memory.py).
        del request
        await context.abort(code, details)

    return call


def _mapping_stream_errors(
    behavior: StreamBehavior, method: str, drain: Drain | None
) -> StreamBehavior:
    """The stream-stream form of `_mapping_errors`. With a drain, the stream's requests
    end when the drain starts; once the handler has answered those it read, the stream
    ends with UNAVAILABLE "server is shutting down" rather than an OK that would tell
    the client every request it sent was answered."""

    async def call(requests: Any, context: ServicerContext) -> AsyncIterator[Any]:
        if drain is not None:
            try:
                drain.admit()
            except ShuttingDown as exc:
                await context.abort(grpc_status(exc), status_details(str(exc)))
            requests = drain.requests_until_drain(requests)
        try:
            async for response in behavior(requests, context):
                yield response
            if drain is not None and requests.cut:
                raise ShuttingDown(SHUTTING_DOWN)
        except SparseServeError as exc:
            await context.abort(grpc_status(exc), status_details(str(exc)))
        except grpc.aio.AbortError:
            raise
        except asyncio.CancelledError:
            if drain is not None and drain.was_cut:
                await context.abort(grpc.StatusCode.UNAVAILABLE, GRACE_ENDED)
            elif _being_cancelled():
                raise
            else:
                await context.abort(*_stray_cancel(method))
        except Exception as exc:
            log.exception("unexpected error in %s", method)
            await context.abort(grpc.StatusCode.INTERNAL, status_details(f"internal error: {exc}"))
        finally:
            if drain is not None:
                drain.release()

    return call


def _being_cancelled() -> bool:
    """Whether this call's own task is being cancelled (its client went away, its
    deadline passed, grpc.aio stops), rather than a CancelledError having come up from
    something it awaited (a future another task cancelled, a connection closed under
    a call to an upstream)."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def _stray_cancel(method: str) -> tuple[grpc.StatusCode, str]:
    """A CancelledError nobody asked this call for: re-raised, grpc.aio would take the
    call for cancelled and never answer it (its client waits out its deadline)."""
    log.error("unexpected cancellation in %s", method, exc_info=True)
    return grpc.StatusCode.INTERNAL, "internal error: an operation it waited for was cancelled"
