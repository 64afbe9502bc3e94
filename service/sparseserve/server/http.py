"""The Open Inference Protocol (KServe v2 / Triton) over HTTP/REST, so that curl, HTTP
probes and `tritonclient.http` work: a thin adapter over the same DataPlane and the same
control-plane calls as the gRPC servicer, on the same asyncio event loop as grpc.aio.

aiohttp rather than uvicorn + starlette: one library that owns its server on the event
loop it is started on (uvicorn wants to own the loop or run a `Server` task beside it,
plus an ASGI layer per request), and tritonclient.http's aio client is built on it too.

Metadata, config, statistics and repository calls go through `V2Servicer` itself, with
its protobuf requests (it converts them and calls the `ControlPlane`), and its answers
are written as JSON: the REST bodies are the v2 messages in JSON form, so one encoder
serves both protocols, they cannot drift, and a family name works wherever it works
over gRPC. Errors are the domain errors
mapped by `sparseserve.server.errors` (the gRPC status table, then `HTTP_STATUS`), with a
JSON body `{"error": "..."}`, as Triton answers them.

Each route belongs to a `RouteGroup` (Triton's names for `--http-restricted-api`), and
`HttpServer` takes a check per group and an SSL context, so access control and TLS can
be plugged in without touching the routes.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import json_format
from google.protobuf.message import Message

from sparseserve.dataplane import DataPlane
from sparseserve.errors import ApiRestricted, InvalidInput, SparseServeError
from sparseserve.protocol import grpc_service_pb2 as pb
from sparseserve.server import http_infer
from sparseserve.server.errors import http_status
from sparseserve.server.security import (
    HeaderRequirement,
    Restrictions,
    api_restricted_message,
    header_allows,
)
from sparseserve.server.v2_servicer import V2Servicer
from sparseserve.settings import RestrictedGroup

if TYPE_CHECKING:
    # What a message's DESCRIPTOR is under protobuf's default (upb) runtime.
    from google._upb._message import Descriptor as UpbDescriptor

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Raises a SparseServeError (or an aiohttp HTTPException) to refuse a request.
RouteCheck = Callable[[web.Request], Awaitable[None]]

_INT64_TYPES = frozenset(
    {
        pb_descriptor.FieldDescriptor.TYPE_INT64,
        pb_descriptor.FieldDescriptor.TYPE_UINT64,
        pb_descriptor.FieldDescriptor.TYPE_SINT64,
        pb_descriptor.FieldDescriptor.TYPE_FIXED64,
        pb_descriptor.FieldDescriptor.TYPE_SFIXED64,
    }
)


class RouteGroup(StrEnum):
    """What a route does, in Triton's names for its restricted-API groups."""

    health = "health"
    metadata = "metadata"
    inference = "inference"
    model_config = "model-config"
    model_repository = "model-repository"
    statistics = "statistics"


def restriction_checks(restrictions: Restrictions) -> dict[RouteGroup, RouteCheck]:
    """Triton's --http-restricted-api: a check for each restricted route group, refusing
    (403) a request without the header `<key>: <value>`, compared in constant time."""
    checks: dict[RouteGroup, RouteCheck] = {}
    for group in RouteGroup:
        requirement = restrictions.of_group(RestrictedGroup(group.value))
        if requirement is not None:
            checks[group] = _header_check(requirement)
    return checks


def _header_check(requirement: HeaderRequirement) -> RouteCheck:
    refusal = api_restricted_message(requirement.header)

    async def check(request: web.Request) -> None:
        given = [(requirement.header, v) for v in request.headers.getall(requirement.header, [])]
        if not header_allows(given, requirement):
            raise ApiRestricted(refusal)

    return check


class HttpServer:
    """The v2 REST endpoint. `await start(host, port)` returns the bound port;
    `await stop(grace)` lets in-flight requests finish within `grace` seconds."""

    def __init__(
        self,
        dataplane: DataPlane,
        servicer: V2Servicer,
        is_ready: Callable[[], bool],
        max_body_bytes: int,
        route_checks: Mapping[RouteGroup, RouteCheck] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ):
        self._dataplane = dataplane
        self._servicer = servicer
        self._is_ready = is_ready
        self._max_body_bytes = max_body_bytes
        self._route_checks = dict(route_checks or {})
        self._ssl_context = ssl_context
        self._groups: dict[AbstractRoute, RouteGroup] = {}
        self._runner: web.AppRunner | None = None
        self.app = self._build_app()

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=self._max_body_bytes, middlewares=[self._errors])
        model = "/v2/models/{model}"
        versioned = "/v2/models/{model}/versions/{version}"
        routes: list[tuple[str, str, Handler, RouteGroup]] = [
            ("GET", "/v2/health/live", self.server_live, RouteGroup.health),
            ("GET", "/v2/health/ready", self.server_ready, RouteGroup.health),
            ("GET", "/v2", self.server_metadata, RouteGroup.metadata),
            # Before "/v2/models/{model}", which would take "stats" for a model name.
            ("GET", "/v2/models/stats", self.model_statistics, RouteGroup.statistics),
            ("POST", "/v2/repository/index", self.repository_index, RouteGroup.model_repository),
            ("POST", "/v2/repository/models/{model}/load", self.load, RouteGroup.model_repository),
            (
                "POST",
                "/v2/repository/models/{model}/unload",
                self.unload,
                RouteGroup.model_repository,
            ),
        ]
        for prefix in (model, versioned):
            routes += [
                ("GET", prefix, self.model_metadata, RouteGroup.metadata),
                ("GET", f"{prefix}/ready", self.model_ready, RouteGroup.health),
                ("GET", f"{prefix}/config", self.model_config, RouteGroup.model_config),
                ("GET", f"{prefix}/stats", self.model_statistics, RouteGroup.statistics),
                ("POST", f"{prefix}/infer", self.infer, RouteGroup.inference),
            ]
        for method, path, handler, group in routes:
            self._groups[app.router.add_route(method, path, handler)] = group
            if method == "GET":  # HEAD too (curl -I, some probes), checked as its GET
                self._groups[app.router.add_route("HEAD", path, handler)] = group
        return app

    def route_group(self, request: web.Request) -> RouteGroup | None:
        """The group of the route `request` matched (None: no route matched)."""
        return self._groups.get(request.match_info.route)

    async def start(self, host: str, port: int, shutdown_timeout: float) -> int:
        """Listen on `host:port` (0: any free port) and return the bound port."""
        # aiohttp reads a timeout of 0 as "no timeout" (wait for every handler), the
        # opposite of a grace period of 0; the smallest positive one cuts at once.
        runner = web.AppRunner(
            self.app, access_log=None, shutdown_timeout=max(shutdown_timeout, 1e-3)
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=self._ssl_context)
        await site.start()
        self._runner = runner
        return int(runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop listening, let in-flight requests finish (up to the shutdown timeout)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- errors -----------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            group = self.route_group(request)
            check = self._route_checks.get(group) if group is not None else None
            if check is not None:
                await check(request)
            return await handler(request)
        except SparseServeError as exc:
            return error_response(http_status(exc), str(exc))
        except web.HTTPRequestEntityTooLarge:
            return error_response(
                413,
                f"request body is larger than this server accepts ({self._max_body_bytes} "
                "bytes, setting max_http_body_bytes)",
            )
        except web.HTTPException as exc:  # aiohttp's own: no such route, wrong method
            if exc.status < 400:
                raise
            if exc.status == 404:
                return error_response(404, f"no v2 REST route {request.method} {request.path}")
            return error_response(exc.status, f"{exc.reason}: {request.method} {request.path}")
        except ConnectionResetError:  # the client went away: nobody to answer
            raise
        except Exception as exc:
            log.exception("unexpected error in %s %s", request.method, request.path)
            return error_response(500, f"internal error: {exc}")

    # -- health -----------------------------------------------------------------------
    # True is 200 and false is 400 with no other meaning, as the v2 spec and Triton say
    # (tritonclient.http reads only the status); the body says why.

    async def server_live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def server_ready(self, request: web.Request) -> web.Response:
        if self._is_ready():
            return web.Response(status=200)
        return error_response(400, "server is not ready: loading its models or shutting down")

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        try:
            self._servicer.control.model(name, version)
        except SparseServeError as exc:
            return error_response(400, str(exc))
        return web.Response(status=200)

    # -- metadata, config, statistics -------------------------------------------------

    async def server_metadata(self, request: web.Request) -> web.Response:
        return _message(await self._servicer.ServerMetadata(pb.ServerMetadataRequest(), None))

    async def model_metadata(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        answer = await self._servicer.ModelMetadata(
            pb.ModelMetadataRequest(name=name, version=version), None
        )
        return _message(answer)

    async def model_config(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        answer = await self._servicer.ModelConfig(
            pb.ModelConfigRequest(name=name, version=version), None
        )
        return _message(answer.config)  # Triton answers the config itself, unwrapped

    async def model_statistics(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        answer = await self._servicer.ModelStatistics(
            pb.ModelStatisticsRequest(name=name, version=version), None
        )
        return _message(answer)

    # -- repository -------------------------------------------------------------------

    async def repository_index(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        ready = body.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidInput("'ready' must be true or false")
        answer = await self._servicer.RepositoryIndex(pb.RepositoryIndexRequest(ready=ready), None)
        # Triton answers the list itself; index rows always carry all four fields.
        return _json([_message_dict(row) for row in answer.models])

    async def load(self, request: web.Request) -> web.Response:
        load = pb.RepositoryModelLoadRequest(model_name=request.match_info["model"])
        _repository_parameters(await _json_body(request), load)
        await self._servicer.RepositoryModelLoad(load, None)
        return web.Response(status=200)

    async def unload(self, request: web.Request) -> web.Response:
        unload = pb.RepositoryModelUnloadRequest(model_name=request.match_info["model"])
        _repository_parameters(await _json_body(request), unload)
        await self._servicer.RepositoryModelUnload(unload, None)
        return web.Response(status=200)

    # -- inference --------------------------------------------------------------------

    async def infer(self, request: web.Request) -> web.StreamResponse:
        name, version = _model(request)
        body = await request.read()
        parsed = http_infer.parse_request(body, request.headers.get(http_infer.HEADER_LENGTH))
        answer = await self._dataplane.infer(
            name, version, lambda: http_infer.decode_inputs(parsed), parsed.outputs
        )
        model = answer.model
        # The variant that answered, also when the request named its family.
        payload, header_length = http_infer.encode_response(
            parsed, model.name, model.version_label, answer.outputs
        )
        if header_length is None:
            response = web.Response(body=payload, content_type=http_infer.JSON_CONTENT_TYPE)
        else:
            response = web.Response(
                body=payload,
                content_type=http_infer.BINARY_CONTENT_TYPE,
                headers={http_infer.HEADER_LENGTH: str(header_length)},
            )
        if answer.shadow is not None:
            # Shadow runs start once the answer has been sent, never before.
            await response.prepare(request)
            await response.write_eof()
            self._dataplane.after_sent(answer)
        return response


def error_response(status: int, message: str) -> web.Response:
    """A JSON error body, as Triton and KServe answer errors."""
    return _json({"error": message}, status)


def _model(request: web.Request) -> tuple[str, str]:
    info = request.match_info
    return info.get("model", ""), info.get("version", "")


async def _json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object ({} for an empty body, as tritonclient may send)."""
    text = await request.read()
    if not text.strip():
        return {}
    try:
        body = json.loads(text)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidInput(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _repository_parameters(
    body: dict[str, Any], request: pb.RepositoryModelLoadRequest | pb.RepositoryModelUnloadRequest
) -> None:
    """Copy a load/unload body's `parameters` into the gRPC request, whose servicer
    decides which it accepts."""
    parameters = body.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidInput("'parameters' must be a JSON object")
    for key, value in parameters.items():
        slot = request.parameters[key]
        if isinstance(value, bool):
            slot.bool_param = value
        elif isinstance(value, int):
            slot.int64_param = value
        elif isinstance(value, str):
            slot.string_param = value
        else:
            raise InvalidInput(f"parameter {key!r} must be a boolean, integer or string")


def _json(value: object, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(value).encode(), status=status, content_type=http_infer.JSON_CONTENT_TYPE
    )


def _message(message: Message) -> web.Response:
    return _json(_message_dict(message))


def _message_dict(message: Message) -> dict[str, Any]:
    """A protobuf message as Triton writes it in JSON: proto field names, fields at their
    default included, and 64-bit integers as JSON numbers (protobuf's JSON mapping makes
    them strings, which tritonclient and perf_analyzer do not expect)."""
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _int64_as_numbers(data, message.DESCRIPTOR)
    return data


def _int64_as_numbers(
    data: dict[str, Any], descriptor: pb_descriptor.Descriptor | UpbDescriptor
) -> None:
    for field in descriptor.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        if field.type in _INT64_TYPES:
            data[field.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
        elif field.message_type is not None:
            entry = field.message_type
            if entry.GetOptions().map_entry:
                value_field = entry.fields_by_name["value"]
                if value_field.message_type is not None:
                    for item in value.values():
                        _int64_as_numbers(item, value_field.message_type)
                elif value_field.type in _INT64_TYPES:
                    data[field.name] = {k: int(v) for k, v in value.items()}
            elif isinstance(value, list):
                for item in value:
                    _int64_as_numbers(item, entry)
            else:
                _int64_as_numbers(value, entry)
