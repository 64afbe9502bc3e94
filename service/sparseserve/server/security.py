"""Who may call what, and over which transport: Triton's restricted protocols and TLS.

Restrictions: each RPC belongs to one of Triton's groups (`RPC_GROUPS`). A restricted
group answers only calls that carry the header `triton-grpc-protocol-<key>: <value>`;
any other call gets UNAVAILABLE "This protocol is restricted, expecting header
'triton-grpc-protocol-<key>'", as Triton answers, so `tritonclient`'s `headers=` works
unchanged. Handlers of restricted groups are wrapped once, when they are registered
(like the error mapping of `server.errors`); an unrestricted group, usually inference,
is not wrapped and costs nothing per call.

TLS: `server_credentials` builds grpc credentials that re-read the certificate files
whenever they change, on the next handshake, so that cert-manager's rotation needs no
restart; `ssl_context` builds the same server side for an HTTP port. Both check the
files first and fail with one line naming the file.

The parts an HTTP port shares are pure: `Restrictions` (group -> header and value;
Triton's HTTP flag uses the bare `<key>` as the header, `Restrictions.for_http`),
`header_allows`, `restricted_message`, `check_certificate_files` and `ssl_context`.
"""

from __future__ import annotations

import hmac
import inspect
import logging
import os
import ssl
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from sparseserve.client.health_check import ClientTls
from sparseserve.errors import ProtocolRestricted
from sparseserve.server.errors import MethodHandler, ServicerContext, grpc_status
from sparseserve.server.wire import release
from sparseserve.settings import GrpcTlsSettings, ProtocolRestriction, RestrictedGroup, Settings

log = logging.getLogger(__name__)

GRPC_HEADER_PREFIX = "triton-grpc-protocol-"

_V2 = "/inference.GRPCInferenceService/"
_V1 = "/sparseserve.v1.SparseServe/"
# Every RPC the server serves -> its group. Triton's own grouping for the v2 RPCs and the
# standard health service; sparseserve's additions are placed where a Triton operator
# would look for them (docs/deploy.md). A method missing here refuses to register, so a
# new RPC cannot slip in unrestricted.
RPC_GROUPS: Mapping[str, RestrictedGroup] = {
    _V2 + "ServerLive": RestrictedGroup.health,
    _V2 + "ServerReady": RestrictedGroup.health,
    _V2 + "ModelReady": RestrictedGroup.health,
    _V2 + "ServerMetadata": RestrictedGroup.metadata,
    _V2 + "ModelMetadata": RestrictedGroup.metadata,
    _V2 + "ModelInfer": RestrictedGroup.inference,
    _V2 + "ModelStreamInfer": RestrictedGroup.inference,
    _V2 + "ModelConfig": RestrictedGroup.model_config,
    _V2 + "ModelStatistics": RestrictedGroup.statistics,
    _V2 + "RepositoryIndex": RestrictedGroup.model_repository,
    _V2 + "RepositoryModelLoad": RestrictedGroup.model_repository,
    _V2 + "RepositoryModelUnload": RestrictedGroup.model_repository,
    "/grpc.health.v1.Health/Check": RestrictedGroup.health,
    "/grpc.health.v1.Health/Watch": RestrictedGroup.health,
    # Reflection describes the API (service and message definitions): metadata.
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": RestrictedGroup.metadata,
    _V1 + "Predict": RestrictedGroup.inference,
    # The family's variants with their manifests: metadata about models.
    _V1 + "ListVariants": RestrictedGroup.metadata,
    # How a family routes: configuration, beside ModelConfig.
    _V1 + "GetTrafficPolicy": RestrictedGroup.model_config,
}


class SecurityConfigError(ValueError):
    """A TLS file or restriction value the server cannot use; the message is one line
    that names the file."""


@dataclass(frozen=True)
class HeaderRequirement:
    """The header a restricted call must carry, and its value."""

    header: str
    value: str = ""  # never logged or put in a message

    def __repr__(self) -> str:
        return f"HeaderRequirement(header={self.header!r})"


class Restrictions:
    """The restricted groups of a server: group -> the header its calls must carry."""

    def __init__(self, by_group: Mapping[RestrictedGroup, HeaderRequirement]):
        self._by_group = dict(by_group)

    @classmethod
    def for_grpc(cls, restrictions: Sequence[ProtocolRestriction]) -> Restrictions:
        """gRPC's headers: `triton-grpc-protocol-<key>` (Triton's --grpc-restricted-protocol)."""
        return cls._resolve(restrictions, GRPC_HEADER_PREFIX)

    @classmethod
    def for_http(cls, restrictions: Sequence[ProtocolRestriction]) -> Restrictions:
        """HTTP's headers: the bare `<key>` (Triton's --http-restricted-api)."""
        return cls._resolve(restrictions, "")

    @classmethod
    def _resolve(cls, restrictions: Sequence[ProtocolRestriction], prefix: str) -> Restrictions:
        by_group = {}
        for restriction in restrictions:
            requirement = HeaderRequirement(prefix + restriction.key, _value_of(restriction))
            for group in restriction.groups:
                by_group[group] = requirement
        return cls(by_group)

    @property
    def groups(self) -> frozenset[RestrictedGroup]:
        return frozenset(self._by_group)

    def of_group(self, group: RestrictedGroup) -> HeaderRequirement | None:
        return self._by_group.get(group)

    def of_method(self, method: str) -> HeaderRequirement | None:
        """The requirement of a full method name (`/package.Service/Method`)."""
        group = RPC_GROUPS.get(method)
        if group is None:
            raise LookupError(
                f"RPC {method} has no restriction group: add it to "
                "sparseserve.server.security.RPC_GROUPS"
            )
        return self._by_group.get(group)

    def describe(self) -> str:
        """For the start-up log: which groups need which header (never the value)."""
        if not self._by_group:
            return "none"
        return ", ".join(
            f"{group.value} (header {requirement.header})"
            for group, requirement in sorted(self._by_group.items())
        )


def _value_of(restriction: ProtocolRestriction) -> str:
    if restriction.value is not None:
        return restriction.value.get_secret_value()
    assert restriction.value_file is not None
    path = restriction.value_file
    try:
        # A mounted Secret's file often ends with a newline the header cannot carry.
        value = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SecurityConfigError(
            f"value_file of the {restriction.group_names} restriction: {path}: {_reason(exc)}"
        ) from None
    if not value or not value.isascii() or not value.isprintable():
        raise SecurityConfigError(
            f"value_file of the {restriction.group_names} restriction: {path} must hold "
            "one line of printable ASCII"
        )
    return value


def restricted_message(header: str) -> str:
    """Triton's answer to a call without the header (the status is UNAVAILABLE)."""
    return f"This protocol is restricted, expecting header '{header}'"


def header_allows(
    metadata: Iterable[tuple[str, str | bytes]] | None, requirement: HeaderRequirement
) -> bool:
    """Whether the call's headers carry `requirement` (compared in constant time)."""
    expected = requirement.value.encode()
    for key, value in metadata or ():
        if key == requirement.header:
            given = value if isinstance(value, bytes) else value.encode()
            if hmac.compare_digest(given, expected):
                return True
    return False


class RestrictingServer:
    """Stands in for the grpc.aio server while generated `add_*_to_server` code
    registers a servicer: each handler of a restricted group is wrapped with its check,
    the others are passed on unchanged."""

    def __init__(self, server: Any, restrictions: Restrictions):
        self._server = server
        self._restrictions = restrictions

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_GenericRestricting(h, self._restrictions) for h in handlers)
        )

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, MethodHandler]
    ) -> None:
        wrapped = {
            name: restrict_handler(handler, f"/{service}/{name}", self._restrictions)
            for name, handler in handlers.items()
        }
        self._server.add_registered_method_handlers(service, wrapped)


class _GenericRestricting(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler, restrictions: Restrictions):
        self._inner = inner
        self._restrictions = restrictions
        self._wrapped: dict[str, MethodHandler | None] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> MethodHandler | None:
        """The guarded handler of the called method, or None if `inner` has none for it."""
        method = handler_call_details.method
        if method not in self._wrapped:
            handler = self._inner.service(handler_call_details)
            self._wrapped[method] = (
                None if handler is None else restrict_handler(handler, method, self._restrictions)
            )
        return self._wrapped[method]


def restrict_handler(
    handler: MethodHandler, method: str, restrictions: Restrictions
) -> MethodHandler:
    """`handler` checking its group's header first; unchanged if the group is open."""
    requirement = restrictions.of_method(method)
    if requirement is None:
        return handler
    error = ProtocolRestricted(restricted_message(requirement.header))
    code = grpc_status(error)

    async def refuse(context: ServicerContext) -> None:
        await context.abort(code, str(error))

    def guarded(behavior: Any) -> Any:
        if inspect.isasyncgenfunction(behavior):

            async def stream(request: Any, context: ServicerContext) -> Any:
                if not header_allows(context.invocation_metadata(), requirement):
                    await refuse(context)
                async for response in behavior(request, context):
                    yield response

            return stream

        async def call(request: Any, context: ServicerContext) -> Any:
            if header_allows(context.invocation_metadata(), requirement):
                return await behavior(request, context)
            # Refused unanswered: its bytes leave the request budget, and the abort's
            # traceback (kept by grpc.aio) must not hold the message.
            release(request)
            del request
            await refuse(context)

        return call

    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    behavior = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    return make(
        guarded(behavior),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


# --- TLS -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CertificateFiles:
    """The PEM contents of the TLS files, read together."""

    certificate_chain: bytes
    private_key: bytes
    root_certificates: bytes | None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


def _paths(tls: GrpcTlsSettings) -> list[tuple[str, Path]]:
    assert tls.server_cert is not None and tls.server_key is not None
    paths = [("--grpc-server-cert", tls.server_cert), ("--grpc-server-key", tls.server_key)]
    if tls.mutual and tls.root_cert is not None:
        paths.append(("--grpc-root-cert", tls.root_cert))
    return paths


def check_certificate_files(tls: GrpcTlsSettings) -> CertificateFiles:
    """Read and check the TLS files: each readable PEM of the right kind, an unencrypted
    key that matches the certificate, a CA bundle openssl can load. Raises
    SecurityConfigError with one line naming the file."""
    paths = dict(_paths(tls))
    contents: dict[str, bytes] = {}
    for flag, path in paths.items():
        try:
            contents[flag] = path.read_bytes()
        except OSError as exc:
            raise SecurityConfigError(f"{flag} {path}: {_reason(exc)}") from None
    cert, key = contents["--grpc-server-cert"], contents["--grpc-server-key"]
    if b"-----BEGIN CERTIFICATE-----" not in cert:
        raise SecurityConfigError(f"--grpc-server-cert {tls.server_cert}: not a PEM certificate")
    if b"PRIVATE KEY-----" not in key:
        raise SecurityConfigError(f"--grpc-server-key {tls.server_key}: not a PEM private key")
    if b"ENCRYPTED" in key:
        raise SecurityConfigError(
            f"--grpc-server-key {tls.server_key}: the key is encrypted; give it unencrypted"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(
            paths["--grpc-server-cert"], paths["--grpc-server-key"], password=_no_password
        )
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise SecurityConfigError(
            f"--grpc-server-key {tls.server_key} does not fit --grpc-server-cert "
            f"{tls.server_cert}: {_ssl_reason(exc)}"
        ) from None
    root = contents.get("--grpc-root-cert")
    if root is not None:
        if b"-----BEGIN CERTIFICATE-----" not in root:
            raise SecurityConfigError(
                f"--grpc-root-cert {tls.root_cert}: not a PEM certificate bundle"
            )
        try:
            context.load_verify_locations(cadata=root.decode("ascii", errors="replace"))
        except (ssl.SSLError, ValueError) as exc:
            raise SecurityConfigError(
                f"--grpc-root-cert {tls.root_cert}: {_ssl_reason(exc)}"
            ) from None
    return CertificateFiles(cert, key, root)


def _no_password() -> bytes:
    # Called only for an encrypted key; never prompt on a terminal.
    raise ValueError("the key is encrypted")


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return _reason(exc)


class ReloadingCertificates:
    """grpc's certificate-config fetcher: called by gRPC's core, on its own threads, at
    every new connection's handshake. It answers None (keep what is in use) while the
    files are unchanged, and a new configuration once they have changed and check
    out. A half-written rotation (key and certificate that do not match yet) is logged
    and skipped: the old certificate keeps serving until the files agree."""

    def __init__(self, tls: GrpcTlsSettings):
        self._tls = tls
        self._lock = threading.Lock()
        self._signature = self._stat()
        self.initial = check_certificate_files(tls)
        self._refused: tuple[Any, ...] | None = None
        self.reloads = 0

    def _stat(self) -> tuple[Any, ...]:
        signature: list[tuple[int, int, int] | None] = []
        for _, path in _paths(self._tls):
            try:
                st = os.stat(path)  # follows the symlinks a mounted Secret swaps
                signature.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError:
                signature.append(None)
        return tuple(signature)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            signature = self._stat()
            if signature == self._signature or signature == self._refused:
                return None
            try:
                files = check_certificate_files(self._tls)
            except SecurityConfigError as exc:
                self._refused = signature
                log.warning("TLS files changed but cannot be used yet, keeping the old: %s", exc)
                return None
            except Exception:  # never let a surprise here fail every handshake
                self._refused = signature
                log.exception("TLS files changed but could not be read, keeping the old")
                return None
            self._signature = signature
            self._refused = None
            self.reloads += 1
            log.info("TLS certificate files changed: new connections use the new ones")
            return configuration(files)


def configuration(files: CertificateFiles) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(files.private_key, files.certificate_chain)], root_certificates=files.root_certificates
    )


def server_credentials(tls: GrpcTlsSettings) -> grpc.ServerCredentials:
    """TLS credentials for the gRPC port that follow the files as they change; with
    `mutual`, clients must present a certificate that chains to `root_cert`."""
    fetcher = ReloadingCertificates(tls)
    return grpc.dynamic_ssl_server_credentials(
        configuration(fetcher.initial),
        # grpcio's stubs say the fetcher must return a configuration; grpc's docs and
        # code take None as "keep the one in use", which the fetcher relies on.
        fetcher,  # type: ignore[arg-type]
        require_client_authentication=tls.mutual,
    )


def ssl_context(tls: GrpcTlsSettings) -> ssl.SSLContext:
    """A server-side SSLContext from the same files, for an HTTP port (ALPN is the
    caller's). It does not follow rotation by itself: call it again for a new context."""
    check_certificate_files(tls)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    assert tls.server_cert is not None
    context.load_cert_chain(tls.server_cert, tls.server_key, password=_no_password)
    if tls.mutual:
        assert tls.root_cert is not None
        context.load_verify_locations(cafile=tls.root_cert)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def api_restricted_message(header: str) -> str:
    """Triton's HTTP answer (403) to a request of a restricted group without the header."""
    return f"This API is restricted, expecting header '{header}'"


class ReloadingSSLContext:
    """The REST port's TLS: an SSLContext from the gRPC port's files, whose certificate
    is replaced in place when the files change and check out (`refresh`), so new
    handshakes get the new one; a half-written rotation keeps the old, as on gRPC."""

    def __init__(self, tls: GrpcTlsSettings):
        self._tls = tls
        self._changes = ReloadingCertificates(tls)
        self.context = ssl_context(tls)

    def refresh(self) -> bool:
        """Load the files into the live context if they changed and check out."""
        if self._changes() is None:
            return False
        tls = self._tls
        assert tls.server_cert is not None
        try:
            self.context.load_cert_chain(tls.server_cert, tls.server_key, password=_no_password)
            if tls.mutual and tls.root_cert is not None:
                self.context.load_verify_locations(cafile=tls.root_cert)
        except (ssl.SSLError, OSError, ValueError) as exc:  # changed again since the check
            log.warning("REST TLS files changed but could not be loaded: %s", _ssl_reason(exc))
            return False
        return True


def health_check_access(
    settings: Settings,
    *,
    ssl: bool = False,
    root_cert: Path | None = None,
    client_cert: Path | None = None,
    client_key: Path | None = None,
    server_name: str | None = None,
) -> tuple[ClientTls | None, list[tuple[str, str]]]:
    """How `sparseserve health`, run beside a server with `settings`, reaches its health
    service: TLS as the server serves it (verified against `root_cert`, else the
    server's CA bundle, else its own certificate; with mutual TLS it presents the
    server's own certificate unless given one), and the health group's header if the
    group is restricted."""
    requirement = Restrictions.for_grpc(settings.grpc_restricted_protocols).of_group(
        RestrictedGroup.health
    )
    metadata = [] if requirement is None else [(requirement.header, requirement.value)]
    served = settings.grpc_tls
    if not (ssl or served.enabled):
        return None, metadata
    mutual = served.mutual
    tls = ClientTls(
        root_cert=root_cert or served.root_cert or served.server_cert,
        client_cert=client_cert or (served.server_cert if mutual else None),
        client_key=client_key or (served.server_key if mutual else None),
        server_name=server_name,
    )
    return tls, metadata
