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

import asyncio
import json
import logging
import resource
import ssl
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_urldispatcher import AbstractRoute
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import json_format
from google.protobuf.message import Message

from sparseserve.dataplane import DataPlane
from sparseserve.errors import ApiRestricted, InvalidInput, SparseServeError
from sparseserve.protocol import grpc_service_pb2 as pb
from sparseserve.server import http_infer
from sparseserve.server.errors import ClientMistakeQuiet, http_status
from sparseserve.server.security import (
    HeaderRequirement,
    Restrictions,
    api_restricted_message,
    header_allows,
)
from sparseserve.server.v2_servicer import CODEC_THREAD_MIN_BYTES, V2Servicer
from sparseserve.server.wire import ZERO_COPY_MIN_BYTES, RequestBytesBudget
from sparseserve.settings import RestrictedGroup

if TYPE_CHECKING:
    # What a message's DESCRIPTOR is under protobuf's default (upb) runtime.
    from google._upb._message import Descriptor as UpbDescriptor

log = logging.getLogger(__name__)


# aiohttp's own log of each connection (it would be "aiohttp.server"). aiohttp logs each
# request it cannot parse (a bad request line, chunk or header) as an ERROR with a
# traceback: 28 bytes from any client, 550 bytes of log, for a mistake already answered 400.
connection_log = logging.getLogger(f"{__name__}.connections")


def _unparseable(record: logging.LogRecord) -> bool:
    return record.exc_info is not None and isinstance(record.exc_info[1], HttpProcessingError)


connection_log.addFilter(
    ClientMistakeQuiet(_unparseable, connection_log, "a request that cannot be parsed")
)

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
        budget: RequestBytesBudget | None = None,
        max_connections: int = 1000,
    ):
        self._budget = budget
        self._max_connections = max_connections
        self._listener: asyncio.Server | None = None
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
            self.app,
            access_log=None,
            shutdown_timeout=max(shutdown_timeout, 1e-3),
            auto_decompress=False,  # `_read` inflates, within the body limit
            logger=connection_log,
        )
        await runner.setup()
        handlers = runner.server
        assert handlers is not None  # set up above
        limit = self._max_connections

        def connection() -> asyncio.Protocol:
            # aiohttp's own Site has no bound on connections: a client holding thousands
            # open (each sending a header line now and then) would take every file
            # descriptor of the process, and gRPC's port with them.
            if len(handlers.connections) >= limit:
                return _Refused(limit)
            return handlers()

        _descriptor_room(limit)
        loop = asyncio.get_running_loop()
        # A TLS handshake may not hold a connection longer than this (asyncio's: 60 s).
        handshake = None if self._ssl_context is None else 10.0
        self._listener = await loop.create_server(
            connection, host or None, port, ssl=self._ssl_context, reuse_address=True,
            ssl_handshake_timeout=handshake,
        )  # fmt: skip
        self._runner = runner
        return int(self._listener.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening, let in-flight requests finish (up to the shutdown timeout)."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
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
                hint = _NOT_FOUND_HINTS.get(request.path.rstrip("/"), "")
                return error_response(
                    404, f"no v2 REST route {request.method} {request.path}{hint}"
                )
            return error_response(exc.status, f"{exc.reason}: {request.method} {request.path}")
        except ConnectionResetError:  # the client went away mid-request: nobody to answer
            # A line, not aiohttp's ERROR and traceback: a client may do this at will.
            log.debug("client closed the connection during %s %s", request.method, request.path)
            return web.Response(status=400)  # for aiohttp's bookkeeping; never delivered
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
        body = _json_body(await self._read(request))
        ready = body.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidInput("'ready' must be true or false")
        answer = await self._servicer.RepositoryIndex(pb.RepositoryIndexRequest(ready=ready), None)
        # Triton answers the list itself; index rows always carry all four fields.
        return _json([_message_dict(row) for row in answer.models])

    async def load(self, request: web.Request) -> web.Response:
        load = pb.RepositoryModelLoadRequest(model_name=request.match_info["model"])
        _repository_parameters(_json_body(await self._read(request)), load)
        await self._servicer.RepositoryModelLoad(load, None)
        return web.Response(status=200)

    async def unload(self, request: web.Request) -> web.Response:
        unload = pb.RepositoryModelUnloadRequest(model_name=request.match_info["model"])
        _repository_parameters(_json_body(await self._read(request)), unload)
        await self._servicer.RepositoryModelUnload(unload, None)
        return web.Response(status=200)

    # -- inference --------------------------------------------------------------------

    async def infer(self, request: web.Request) -> web.StreamResponse:
        """An inference request. A body of 64 KiB or more (as gRPC counts messages)
        counts against the server's request budget (`max_inflight_request_bytes`, shared
        with gRPC) once it has arrived, decompressed, until it is answered, its JSON part
        at JSON_WEIGHT times its size. A Content-Length past `max_http_body_bytes` is
        refused before any of the body is read."""
        length = request.content_length
        if length is not None and length > self._max_body_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=self._max_body_bytes, actual_size=length)
        lengths = request.headers.getall(http_infer.HEADER_LENGTH, [])
        if len(lengths) > 1:  # each could frame the body differently: pick none
            raise InvalidInput(
                f"{http_infer.HEADER_LENGTH} is given {len(lengths)} times; give it once: "
                "the length of the JSON header at the start of the body"
            )
        header_length = lengths[0] if lengths else None
        body = await self._read(request)
        cost = 0
        if self._budget is not None and len(body) >= ZERO_COPY_MIN_BYTES:
            cost = request_cost(len(body), header_length)
            self._budget.reserve(cost)
        try:
            return await self._infer(request, body, header_length)
        finally:
            if cost:
                assert self._budget is not None
                self._budget.give_back(cost)

    async def _read(self, request: web.Request) -> bytes:
        """The request's body, inflated if it came gzip- or deflate-encoded (as
        tritonclient.http sends it with `request_compression_algorithm`; Triton takes
        these two). Inflated here, not by aiohttp, to stop at `max_http_body_bytes`: a
        1 MB gzip body can hold a GiB, which aiohttp inflated in full, on the event
        loop, even after refusing it. Inflated on the codec thread."""
        body = await request.read()  # as sent: at most max_http_body_bytes
        encodings = request.headers.getall("Content-Encoding", [])
        encoding = ",".join(encodings).strip().lower()
        encoding = {"x-gzip": "gzip"}.get(encoding, encoding)  # RFC 9110's alias
        if encoding in ("", "identity"):
            return body
        if encoding not in ("gzip", "deflate"):
            raise InvalidInput(
                f"Content-Encoding {encoding!r} is not supported; send the body as is, or "
                "gzip- or deflate-encoded"
            )
        if not body:
            return body
        # On the codec thread whatever its size: 64 KB of gzip can hold 64 MiB.
        return await self._dataplane.in_codec_thread(inflate, body, encoding, self._max_body_bytes)

    async def _infer(
        self, request: web.Request, body: bytes, header_length: str | None
    ) -> web.StreamResponse:
        name, version = _model(request)
        # A large body is parsed and decoded on the codec thread, as gRPC's are.
        large = len(body) >= CODEC_THREAD_MIN_BYTES
        if large:
            parsed = await self._dataplane.in_codec_thread(
                http_infer.parse_request, body, header_length
            )
        else:
            parsed = http_infer.parse_request(body, header_length)
        answer = await self._dataplane.infer(
            name,
            version,
            lambda: http_infer.decode_inputs(parsed),
            parsed.outputs,
            decode_in_thread=large,
        )
        model = answer.model
        # The variant that answered, also when the request named its family.
        payload, answer_header_length = http_infer.encode_response(
            parsed, model.name, model.version_label, answer.outputs
        )
        if answer_header_length is None:
            response = web.Response(body=payload, content_type=http_infer.JSON_CONTENT_TYPE)
        else:
            response = web.Response(
                body=payload,
                content_type=http_infer.BINARY_CONTENT_TYPE,
                headers={http_infer.HEADER_LENGTH: str(answer_header_length)},
            )
        if answer.shadow is not None:
            # Shadow runs start once the answer has been sent, never before.
            await response.prepare(request)
            await response.write_eof()
            self._dataplane.after_sent(answer)
        return response


# Decoding a JSON tensor costs several times its text: a number of two characters
# ("0,") becomes a Python object in a list, then an array element (a 59 MB body of zeros
# took the process from 126 to 773 MB). The budget counts a body's JSON at this weight.
JSON_WEIGHT = 8


def request_cost(body_bytes: int, header_length: str | None) -> int:
    """What a REST inference body counts against the request budget: its JSON part at
    JSON_WEIGHT, binary tensor data (after `Inference-Header-Content-Length`) as is."""
    json_bytes = body_bytes
    if header_length is not None and header_length.isascii() and header_length.isdigit():
        json_bytes = min(int(header_length[:19]), body_bytes)  # int() refuses 4,301 digits
    return json_bytes * JSON_WEIGHT + (body_bytes - json_bytes)


# File descriptors the rest of the server needs beside its REST connections: gRPC's
# connections, model files, logs, the metrics port.
OTHER_DESCRIPTORS = 1024


def _descriptor_room(connections: int) -> None:
    """Raise the soft limit on open files (up to the hard one) so that `connections`
    REST connections leave the rest of the server OTHER_DESCRIPTORS; warn where the hard
    limit does not allow it. (A connection counts once aiohttp has set it up, so a burst
    of accepts may pass the cap by one loop pass's worth, at most 100 here.)"""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + OTHER_DESCRIPTORS
    if soft < want and (hard == resource.RLIM_INFINITY or hard > soft):
        soft = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft < want:
        log.warning(
            "this process may open %d files (ulimit -n), and max_http_connections %d would "
            "leave gRPC and the models fewer than %d: raise the limit or lower the setting",
            soft, connections, OTHER_DESCRIPTORS,
        )  # fmt: skip


class _Refused(asyncio.Protocol):
    """A connection past `max_http_connections`: answered 503 and closed at once."""

    _logged_at = 0.0

    def __init__(self, limit: int):
        self._limit = limit

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        error = f"server has {self._limit} HTTP connections open (max_http_connections)"
        body = f'{{"error": "{error}"}}'
        assert isinstance(transport, asyncio.Transport)
        transport.write(
            b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        transport.close()
        now = time.monotonic()
        if now - _Refused._logged_at > 60:  # once a minute, not once a connection
            _Refused._logged_at = now
            log.warning("REST: %d connections open (max_http_connections); refusing more",
                        self._limit)  # fmt: skip


def error_response(status: int, message: str) -> web.Response:
    """A JSON error body, as Triton and KServe answer errors."""
    return _json({"error": message}, status)


# Members of one gzip body: `cat a.gz b.gz` makes a few; 200,000 empty ones held the codec
# thread for 14 s (the rest of the body is copied at each).
MAX_GZIP_MEMBERS = 64


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """`body` gzip- or deflate-decoded (deflate: zlib-wrapped as RFC 9110 says, or raw, as
    some clients send it; gzip: one member or several), refused with 413 once it passes
    `limit` bytes and with 400 if it is not whole streams of that encoding. Never
    inflates more than `limit` + 1 bytes."""
    if encoding == "gzip":
        wbits = 16 + zlib.MAX_WBITS
    else:
        wbits = zlib.MAX_WBITS if body[:1] and body[0] & 0x0F == 8 else -zlib.MAX_WBITS
    parts: list[bytes] = []
    size, rest = 0, body
    while rest:  # gzip may hold several members, one after another (RFC 1952)
        if len(parts) == MAX_GZIP_MEMBERS:  # each costs a copy of the rest: quadratic
            raise InvalidInput(
                f"request body holds more than {MAX_GZIP_MEMBERS} gzip members; compress it as one"
            )
        decompressor = zlib.decompressobj(wbits)
        try:
            part = decompressor.decompress(rest, limit + 1 - size)
        except zlib.error as exc:
            raise InvalidInput(f"request body is not valid {encoding} data: {exc}") from None
        size += len(part)
        if size > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
        if not decompressor.eof:
            raise InvalidInput(
                f"request body is not a whole {encoding} stream (Content-Encoding: {encoding})"
            )
        parts.append(part)
        rest = decompressor.unused_data
        if rest and encoding != "gzip":
            raise InvalidInput(f"request body has data after its {encoding} stream")
    return b"".join(parts)


# Where a newcomer looks first, and where it is.
_NOT_FOUND_HINTS = {
    "/v2/models": "; the models are listed by POST /v2/repository/index",
    "/metrics": "; metrics are on the metrics port (8002 unless metrics_port says otherwise)",
    "": "; try GET /v2 (server metadata) or GET /v2/health/ready",
}


def _model(request: web.Request) -> tuple[str, str]:
    info = request.match_info
    return info.get("model", ""), info.get("version", "")


def _json_body(text: bytes) -> dict[str, Any]:
    """The request's JSON object ({} for an empty body, as tritonclient may send)."""
    if not text.strip():
        return {}
    try:
        body = json.loads(text)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidInput("request body is JSON nested too deeply to read") from None
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
