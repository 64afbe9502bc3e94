"""The one place where errors become gRPC statuses: an interceptor around every unary
RPC that turns `SparseServeError`s into the status of `sparseserve.errors.STATUS`."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from sparseserve.errors import SparseServeError, status_of

log = logging.getLogger(__name__)


def grpc_status(error: BaseException) -> grpc.StatusCode:
    return grpc.StatusCode[status_of(error)]


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps domain errors to statuses; an unexpected exception becomes INTERNAL with its
    message (and a logged traceback) instead of gRPC's bare UNKNOWN."""

    def __init__(self) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler  # streaming RPCs (health Watch, reflection) pass through
        wrapped = grpc.unary_unary_rpc_method_handler(
            _mapping_errors(handler.unary_unary, method),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        self._wrapped[method] = wrapped
        return wrapped


def _mapping_errors(
    behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]], method: str
) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except SparseServeError as exc:
            await context.abort(grpc_status(exc), str(exc))
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            log.exception("unexpected error in %s", method)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc}")

    return call
