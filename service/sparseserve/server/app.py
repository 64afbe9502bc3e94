"""The server process: build the parts, serve gRPC, REST and metrics, and shut down cleanly.

Shutdown (SIGTERM on every Kubernetes rollout, SIGINT, or SIGHUP when the terminal
that started it closes: its default would kill the process with requests in flight; a
process started under `nohup` keeps ignoring it), see
`SparseServeServer.stop`:
the drain begins (new gRPC calls are answered UNAVAILABLE "server is shutting down",
health turns NOT_SERVING and REST readiness false, streams end once their requests are
answered) while the gRPC port stays open; calls in flight finish within the grace
period; only then does the gRPC server stop. The REST port stops taking connections at
once and lets its requests in flight finish within the same grace period. Then models
are unloaded, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from sparseserve.api import service_pb2, service_pb2_grpc
from sparseserve.backends.dispatch import Dispatcher
from sparseserve.backends.hardware import probe_hardware
from sparseserve.controlplane import ControlPlane
from sparseserve.dataplane import DataPlane
from sparseserve.errors import ModelNotFound, SparseServeError, StartupError
from sparseserve.observability.metrics import Metrics
from sparseserve.protocol import grpc_service_pb2, grpc_service_pb2_grpc
from sparseserve.protocol._pool import POOL
from sparseserve.registry import ModelRegistry
from sparseserve.repository.store import ModelRepository
from sparseserve.routing.router import Router
from sparseserve.routing.shadow import ShadowRunner
from sparseserve.routing.traffic import PolicyFile
from sparseserve.server.drain import Drain
from sparseserve.server.errors import add_mapping_errors
from sparseserve.server.http import HttpServer, RouteGroup, restriction_checks
from sparseserve.server.metrics_http import start_metrics_server
from sparseserve.server.predict_servicer import PredictServicer
from sparseserve.server.security import (
    ReloadingSSLContext,
    RestrictingServer,
    Restrictions,
    server_credentials,
)
from sparseserve.server.v2_servicer import V2Servicer
from sparseserve.server.wire import RequestBytesBudget
from sparseserve.settings import GrpcTlsSettings, ModelControl, Settings, unknown_environment

log = logging.getLogger(__name__)

V2_SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
V1_SERVICE = service_pb2.DESCRIPTOR.services_by_name["SparseServe"].full_name
# How often the REST port's certificate files are checked for a rotation.
HTTP_TLS_CHECK_SECONDS = 2.0
SERVICES = ("", V2_SERVICE, V1_SERVICE)  # what the health service reports on
# Answered truthfully during the drain (live, not ready), like the health service, so
# that probes see the drain instead of an error.
ANSWERED_WHILE_DRAINING = frozenset({f"/{V2_SERVICE}/ServerLive", f"/{V2_SERVICE}/ServerReady"})
# After the drain, calls still open are ones it does not count (health Watch and
# reflection streams, refusals being sent): the gRPC server's own grace for them.
TRANSPORT_GRACE_SECONDS = 0.5
# Once nothing runs, the port stays open until calls stop arriving for DRAIN_QUIET_SECONDS
# (each refused "shutting down"), for at most DRAIN_SETTLE_SECONDS: calls the transport
# had taken but no handler yet would otherwise be cancelled by the stop (Drain.settle).
DRAIN_QUIET_SECONDS = 0.1
DRAIN_SETTLE_SECONDS = 1.0
# How long calls cut at the end of the grace period may take to send their UNAVAILABLE
# (an onnxruntime run stops within a few ms of being told to; an OpenVINO run cannot be
# stopped and is waited for by grpc.aio's stop instead).
CUT_SECONDS = 1.0


class SparseServeServer:
    """One sparseserve server. `await start()`, then `await stop()`."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._executor = ThreadPoolExecutor(
            max_workers=settings.inference_thread_count, thread_name_prefix="inference"
        )
        self.hardware = probe_hardware(settings.assume_gpus)
        self.registry = ModelRegistry(
            ModelRepository(settings.repository),
            settings,
            self._executor,
            Dispatcher(settings, self.hardware, self._executor),
        )
        traffic = settings.traffic
        self.router = Router(self.registry, PolicyFile(traffic.policy_file))
        self.shadows = ShadowRunner(
            self.registry, traffic.shadow_queue_size, traffic.shadow_concurrency
        )
        self.metrics = Metrics(
            self.registry, hardware=self.hardware, shadow=lambda: self.shadows.stats
        )
        # Large BYTES tensors are decoded and encoded here, off the event loop.
        self._codec_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="codec")
        self.dataplane = DataPlane(
            self.registry,
            self.metrics,
            settings.max_inflight_per_model,
            router=self.router,
            shadows=self.shadows,
            codec_executor=self._codec_executor,
        )
        self.request_budget = RequestBytesBudget(settings.max_inflight_request_bytes)
        self._health = health.aio.HealthServicer()
        self.control = ControlPlane(self.registry, self.router, lambda: self._ready)
        self._v2 = V2Servicer(self.dataplane, self.control, settings.max_bytes_elements)
        self._drain = Drain()
        self._server: grpc.aio.Server | None = None
        self._http_server: HttpServer | None = None
        self._metrics_server: WSGIServer | None = None
        self._poller: asyncio.Task[None] | None = None
        self._policy_watcher: asyncio.Task[None] | None = None
        self._http_tls: ReloadingSSLContext | None = None
        self._http_tls_watcher: asyncio.Task[None] | None = None
        self._ready = False
        self.grpc_port = 0
        self.http_port: int | None = None
        self.metrics_port: int | None = None

    @property
    def ready(self) -> bool:
        return self._ready

    async def start(self) -> None:
        """Bind the ports (so liveness answers while models load), load the startup
        models, then report ready. Raise `StartupError` if the repository is missing,
        a port is taken, or (with `exit_on_error`) a named startup model does not load."""
        settings = self.settings
        repository = self.registry.repository
        if not repository.root.is_dir():
            given = str(settings.repository)
            shown = given if given == str(repository.root) else f"{given} ({repository.root})"
            raise StartupError(
                f"model repository {shown} does not exist or is not a directory: "
                "pass --repository DIR (`make demo` builds ./models)"
            )
        limit = settings.max_message_bytes
        # Read and check the TLS files and restriction values before binding anything.
        restrictions = Restrictions.for_grpc(settings.grpc_restricted_protocols)
        tls = settings.grpc_tls
        credentials = server_credentials(tls) if tls.enabled else None
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
                ("grpc.max_concurrent_streams", settings.max_grpc_streams_per_connection),
            ],
        )
        # Every service registers through the restricting stand-in: handlers of
        # restricted groups check their header, the others are registered as they are.
        restricted = RestrictingServer(server, restrictions)
        add_mapping_errors(
            grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server,
            self._v2,
            restricted,
            self._drain,
            ANSWERED_WHILE_DRAINING,
            deserializers={
                "ModelInfer": self.request_budget.admit,
                "ModelStreamInfer": self.request_budget.admit_stream,
            },
        )
        add_mapping_errors(
            service_pb2_grpc.add_SparseServeServicer_to_server,
            PredictServicer(self.dataplane, self.control, settings.max_bytes_elements),
            restricted,
            self._drain,
            deserializers={"Predict": self.request_budget.admit_predict},
        )
        # The stand-in has the two registration methods generated code calls, not the
        # whole grpc.aio.Server the health stubs ask for.
        health_pb2_grpc.add_HealthServicer_to_server(self._health, restricted)  # type: ignore[arg-type]
        _add_reflection(restricted)
        grpc_host = settings.grpc_address or settings.host
        address = f"{_bind_host(grpc_host)}:{settings.grpc_port}"
        _check_port_free(grpc_host, settings.grpc_port, "gRPC", "--grpc-port")
        if settings.allow_http:
            _check_port_free(settings.host, settings.http_port, "REST", "--http-port")
        try:
            if credentials is None:
                self.grpc_port = server.add_insecure_port(address)
            else:
                self.grpc_port = server.add_secure_port(address, credentials)
        except RuntimeError as exc:  # what grpc raises when the bind fails
            raise StartupError(f"cannot listen for gRPC on {address}: {exc}") from exc
        if settings.metrics_port is not None:
            # Bound before gRPC starts, so a taken port leaves nothing running to stop.
            try:
                self._metrics_server = start_metrics_server(
                    self.metrics.registry, settings.host, settings.metrics_port
                )
            except OSError as exc:
                raise StartupError(
                    f"cannot listen for metrics on {settings.host}:{settings.metrics_port}: "
                    f"{exc.strerror or exc} (--metrics-port picks another port, 0 any free "
                    "one; --no-metrics serves none)"
                ) from exc
            self.metrics_port = self._metrics_server.server_port
        for service in SERVICES:
            await self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self._server = server
        http_restrictions = Restrictions.for_http(settings.http_restricted_apis)
        if settings.allow_http:
            # REST shares the gRPC port's certificate files (and follows their rotation)
            # and is restricted by its own flag, as in Triton.
            if tls.enabled:
                self._http_tls = ReloadingSSLContext(tls)
                self._http_tls_watcher = asyncio.create_task(self._watch_http_tls())
            self._http_server = HttpServer(
                self.dataplane,
                self._v2,
                lambda: self._ready,
                settings.max_http_body_bytes,
                route_checks=restriction_checks(http_restrictions),
                ssl_context=None if self._http_tls is None else self._http_tls.context,
                budget=self.request_budget,
                max_connections=settings.max_http_connections,
            )
            try:
                self.http_port = await self._http_server.start(
                    settings.host, settings.http_port, settings.shutdown_grace_seconds
                )
            except OSError as exc:  # taken since the check above
                raise StartupError(
                    f"cannot listen for REST on {settings.host}:{settings.http_port}: "
                    f"{exc.strerror or exc} (--http-port picks another port, 0 any free one; "
                    "--allow-http false serves none)"
                ) from exc
        log.info(
            "sparseserve listening: gRPC %s:%d (%s), REST %s, metrics %s; repository %s, "
            "model control %s",
            settings.grpc_address or settings.host, self.grpc_port, _transport(tls),
            f"{self.http_port} ({'HTTPS' if tls.enabled else 'HTTP'})" if self.http_port
            else "off", self.metrics_port or "off", self.registry.repository.root,
            settings.model_control.value,
        )  # fmt: skip
        log.info("restricted RPC groups: %s", restrictions.describe())
        if settings.allow_http:
            log.info("restricted REST route groups: %s", http_restrictions.describe())
        on_disk = set(repository.names())
        for mistake in self._setting_mistakes(restrictions, http_restrictions, on_disk):
            log.warning("%s", mistake)
        if not on_disk:
            log.warning(
                "model repository %s holds no models: add <model>/<version>/model.onnx "
                "directories (README, Model repository); nothing is served until then",
                repository.root,
            )
        log.info("hardware: %s", self.hardware.summary())
        log.info(
            "dispatch %s (overrides: %s), fallback to onnxruntime %s, Triton %s",
            settings.dispatch.value,
            dict(settings.dispatch_overrides) or "none",
            "on" if settings.dispatch_fallback else "off",
            settings.triton.url or "not configured",
        )
        if settings.cpu_engine_overrides:
            log.info("cpu engine %s, overrides: %s", settings.cpu_engine.value,
                     {k: v.value for k, v in settings.cpu_engine_overrides.items()})  # fmt: skip
        failures = await self.registry.load_startup_models()
        if failures and settings.exit_on_error:
            raise StartupError(_startup_failure(failures, repository.names()))
        if settings.model_control is ModelControl.poll:
            self._poller = asyncio.create_task(self._poll_forever())
        self.shadows.start()
        if settings.traffic.policy_file is not None:
            self._report_policy()
            self._policy_watcher = asyncio.create_task(self._watch_policy())
        for service in SERVICES:
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._ready = True
        log.info("sparseserve ready: %d model versions loaded", len(list(self.registry.loaded())))

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_interval_seconds)
            try:
                await self.registry.poll()
            except Exception:  # a bad pass must not end polling
                log.exception("repository poll failed")

    async def _watch_http_tls(self) -> None:
        """gRPC's core checks the certificate files at every handshake; the REST port's
        SSLContext is checked here, every few seconds, and reloaded in place."""
        assert self._http_tls is not None
        while True:
            await asyncio.sleep(HTTP_TLS_CHECK_SECONDS)
            try:
                if self._http_tls.refresh():
                    log.info("REST TLS: new connections use the new certificate files")
            except Exception:  # a bad pass must not end watching
                log.exception("REST TLS certificate check failed")

    async def _watch_policy(self) -> None:
        """Hot reload: apply the policy file whenever it changes (a bad file is logged
        and leaves the policy in force as it was)."""
        while True:
            await asyncio.sleep(self.settings.traffic.reload_interval_seconds)
            try:
                if self.router.policy.refresh():
                    self._report_policy()
            except Exception:  # a bad pass must not end watching
                log.exception("traffic policy check failed")

    def _setting_mistakes(
        self, grpc: Restrictions, http: Restrictions, on_disk: set[str]
    ) -> Iterator[str]:
        """What the start warns of in the settings and the environment: each looks like a
        mistake that would otherwise do nothing, or the wrong thing, without a word."""
        settings, root = self.settings, self.registry.repository.root
        yield from unknown_environment(os.environ)
        if settings.allow_http:
            on_rest = {group.value for group in RouteGroup}  # groups REST has routes in
            if open_on_rest := sorted(g for g in grpc.groups - http.groups if g.value in on_rest):
                groups = ",".join(group.value for group in open_on_rest)
                yield (
                    f"{groups} restricted on gRPC but open on REST (port {self.http_port}), as "
                    f"in Triton: add --http-restricted-api {groups}:<key>=<value>, or "
                    "--allow-http false"
                )
        if hint := _repository_mistake(root):
            yield hint
        for setting in ("dispatch_overrides", "cpu_engine_overrides"):
            for name in sorted(set(getattr(settings, setting)) - on_disk):
                variants = sorted(n for n in on_disk if n.startswith(f"{name}."))
                hint = f" (a family? name its variants, e.g. {variants[0]})" if variants else ""
                yield f"{setting} names {name!r}, which is no model in the repository {root}{hint}"

    def _report_policy(self) -> None:
        """Warn of each entry of the policy in force that does not apply (a variant that
        is not loaded), which GetTrafficPolicy reports too: requests for a family whose
        default is missing are refused UNAVAILABLE."""
        for name, family in sorted(self.router.families().items()):
            for problem in family.problems:
                log.warning("traffic policy, family %s: %s", name, problem)

    async def stop(self, close_transport: bool = True) -> None:
        """Drain and stop; safe to call more than once. With `close_transport` false
        the gRPC port is left for the process's exit to close (see `serve`).

        The drain comes before grpc.aio's `server.stop(grace)`, which would refuse new
        calls at the transport (connection refused, or an UNAVAILABLE no handler sees)
        and cancel what still runs when its grace ends (CANCELLED, which clients do not
        retry). Instead the port stays open while the calls in flight finish: new ones
        get UNAVAILABLE "server is shutting down" from `Drain`, health NOT_SERVING (so
        load balancers move away), streams end once their requests are answered. Then
        the transport stops, with nothing of ours left running unless the grace period
        ran out first."""
        if self._server is None:
            return
        loop = asyncio.get_running_loop()
        began = loop.time()
        self._ready = False
        self._drain.start()
        await self._health.enter_graceful_shutdown()
        for task in (self._poller, self._policy_watcher, self._http_tls_watcher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        grace = self.settings.shutdown_grace_seconds
        log.info(
            "sparseserve stopping: draining %d calls in flight, up to %.1fs",
            self._drain.active, grace,
        )  # fmt: skip

        async def drain_grpc() -> None:
            assert self._server is not None
            if await self._drain.wait(max(0.0, grace - (loop.time() - began))):
                log.info("drained in %.2fs", loop.time() - began)
            else:
                log.warning(
                    "%d calls still running after the %.1fs grace period; cancelling them",
                    self._drain.active, grace,
                )  # fmt: skip
                # Ours first: each ends UNAVAILABLE (retryable), its engine run stopped.
                self._drain.cut()
                await self._drain.wait(CUT_SECONDS)
            left = max(0.0, grace - (loop.time() - began))
            if not await self._drain.settle(DRAIN_QUIET_SECONDS, min(left, DRAIN_SETTLE_SECONDS)):
                log.info(
                    "calls still arriving after %.1fs of refusals; closing", DRAIN_SETTLE_SECONDS
                )
            left = max(0.0, grace - (loop.time() - began))
            # Calls still running past the grace are cancelled by grpc.aio's stop (which
            # also ends their onnxruntime runs); with none, the caller may leave the
            # port to the process's exit.
            if close_transport or self._drain.active:
                await self._server.stop(min(left, TRANSPORT_GRACE_SECONDS))

        # Both protocols drain at once, each within the grace period.
        await asyncio.gather(drain_grpc(), self._stop_http())
        self._server = None
        await self.shadows.stop()
        await self.registry.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None
        self._executor.shutdown(wait=True)
        self._codec_executor.shutdown(wait=True)
        log.info("sparseserve stopped")

    async def _stop_http(self) -> None:
        if self._http_server is not None:
            await self._http_server.stop()
            self._http_server = None


def _startup_failure(failures: dict[str, SparseServeError], available: list[str]) -> str:
    """One line for the models named to load at start that did not load."""
    reasons = []
    for name, error in failures.items():
        if isinstance(error, ModelNotFound):
            have = ", ".join(available[:8]) + (", ..." if len(available) > 8 else "")
            reasons.append(f"--load-model {name}: no such model (the repository has: {have})")
        else:
            reasons.append(f"--load-model {name}: {error}")
    return "; ".join(reasons) + " (--no-exit-on-error starts without them)"


def _check_port_free(host: str, port: int, what: str, flag: str) -> None:
    """Refuse a taken port with one clear line, before grpc logs its own complaint
    about it. (A port taken between this check and the bind still fails, less tidily.)"""
    if port == 0:
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc binds
            probe.bind(address)
    except OSError as exc:
        raise StartupError(
            f"cannot listen for {what} on {host}:{port}: {exc.strerror or exc} "
            f"({flag} picks another port, 0 any free one)"
        ) from exc


def _bind_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _repository_mistake(root: Path) -> str | None:
    """What to pass instead when the repository given is a model's folder or a version's
    (its versions would be taken for models: "model '1' has no version")."""

    def model_file(folder: Path) -> Path | None:
        return next((f for f in (folder / "model.onnx", folder / "model.xml") if f.is_file()), None)

    layout = "<repository>/<model>/<version>/model.onnx"
    if (found := model_file(root)) is not None:
        return (
            f"{root} holds {found.name}: it looks like a version folder, not a model "
            f"repository ({layout}); pass --repository {root.parent.parent}"
        )
    versions = [v for v in root.iterdir() if v.name.isdigit()] if root.is_dir() else []
    if (found := next(filter(None, map(model_file, sorted(versions))), None)) is not None:
        return (
            f"{root} holds {found.parent.name}/{found.name}: it looks like a model's folder, "
            f"not a model repository ({layout}); pass --repository {root.parent}"
        )
    return None


def _transport(tls: GrpcTlsSettings) -> str:
    if not tls.enabled:
        return "plaintext"
    return "mutual TLS" if tls.mutual else "TLS"


def _add_reflection(server: RestrictingServer) -> None:
    # Our stubs live in a private descriptor pool (see sparseserve.protocol._pool);
    # reflection answers from that pool, so the health and reflection files go there too.
    for descriptor in (health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        with contextlib.suppress(TypeError):  # already added by an earlier server
            # types-protobuf leaves AddSerializedFile unannotated.
            POOL.AddSerializedFile(descriptor.serialized_pb)  # type: ignore[no-untyped-call]
    names = (V2_SERVICE, V1_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
    # What enable_server_reflection does for a grpc.aio server, through the stand-in.
    # (types-grpcio-reflection leaves the generated function unannotated.)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(  # type: ignore[no-untyped-call]
        reflection.aio.ReflectionServicer(names, pool=POOL), server
    )


async def serve(settings: Settings, ready_file: Path | None = None) -> int:
    """Run until SIGTERM, SIGINT or SIGHUP; return the process exit code."""
    server = SparseServeServer(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:  # not under nohup, which ignores it
        loop.add_signal_handler(signal.SIGHUP, stop.set)
    try:
        await server.start()
        if ready_file is not None:
            _write_ready_file(ready_file, server)
        await stop.wait()
    except BaseException:
        await server.stop()
        raise
    await server.stop(close_transport=False)
    _exit_closing_the_transport()
    return 0  # not reached


def _exit_closing_the_transport() -> None:
    """End the process once the drain is over, the models unloaded and the logs flushed,
    without grpc.aio's `stop()`.

    `stop()` cancels the calls its transport has taken but not yet handed to a handler
    (CANCELLED, which clients do not retry); while clients keep sending on their open
    connections some always are, however long the drain waits (bench/soak.py, 100
    clients: 90 such calls). Ended with the process, the connections close under them
    and the same calls fail UNAVAILABLE, which clients retry. Nothing of sparseserve's
    runs any more at this point: every call since the drain began was refused."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _write_ready_file(path: Path, server: SparseServeServer) -> None:
    """Tell a supervisor (or a test) the bound ports once the server is ready."""
    tmp = path.with_name(path.name + ".tmp")
    info = {
        "pid": os.getpid(),
        "grpc_port": server.grpc_port,
        "http_port": server.http_port,
        "metrics_port": server.metrics_port,
    }
    tmp.write_text(json.dumps(info), encoding="utf-8")
    tmp.replace(path)
