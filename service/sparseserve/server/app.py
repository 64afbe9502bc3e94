"""The server process: build the parts, serve gRPC and metrics, and shut down cleanly.

Shutdown (SIGTERM on every Kubernetes rollout, or SIGINT): health turns NOT_SERVING
first, the gRPC server stops taking new calls and lets in-flight ones finish within the
grace period, models are unloaded, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from sparseserve.backends.dispatch import Dispatcher
from sparseserve.backends.hardware import probe_hardware
from sparseserve.dataplane import DataPlane
from sparseserve.errors import ModelNotFound, SparseServeError, StartupError
from sparseserve.models import ModelRegistry
from sparseserve.observability.metrics import Metrics
from sparseserve.protocol import grpc_service_pb2, grpc_service_pb2_grpc
from sparseserve.protocol._pool import POOL
from sparseserve.repository.store import ModelRepository
from sparseserve.routing.router import Router
from sparseserve.routing.shadow import ShadowRunner
from sparseserve.routing.traffic import PolicyFile
from sparseserve.server.errors import add_mapping_errors
from sparseserve.server.metrics_http import start_metrics_server
from sparseserve.server.predict_servicer import PredictServicer
from sparseserve.server.v2_servicer import V2Servicer
from sparseserve.settings import ModelControl, Settings
from sparseserve.v1 import service_pb2, service_pb2_grpc

log = logging.getLogger(__name__)

V2_SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
V1_SERVICE = service_pb2.DESCRIPTOR.services_by_name["SparseServe"].full_name
SERVICES = ("", V2_SERVICE, V1_SERVICE)  # what the health service reports on


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
        self.dataplane = DataPlane(
            self.registry,
            self.metrics,
            settings.max_inflight_per_model,
            router=self.router,
            shadows=self.shadows,
        )
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._metrics_server: WSGIServer | None = None
        self._poller: asyncio.Task[None] | None = None
        self._policy_watcher: asyncio.Task[None] | None = None
        self._ready = False
        self.grpc_port = 0
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
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
            ],
        )
        add_mapping_errors(
            grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server,
            V2Servicer(self.dataplane, self.registry, lambda: self._ready),
            server,
        )
        add_mapping_errors(
            service_pb2_grpc.add_SparseServeServicer_to_server,
            PredictServicer(self.dataplane, self.registry, self.router),
            server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        _add_reflection(server)
        address = f"{_bind_host(settings.host)}:{settings.grpc_port}"
        _check_port_free(settings.host, settings.grpc_port, "gRPC", "--grpc-port")
        try:
            self.grpc_port = server.add_insecure_port(address)
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
        log.info(
            "sparseserve listening: gRPC %s:%d, metrics %s; repository %s, model control %s",
            settings.host, self.grpc_port, self.metrics_port or "off",
            self.registry.repository.root, settings.model_control.value,
        )  # fmt: skip
        if not repository.names():
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
        failures = await self.registry.load_startup_models()
        if failures and settings.exit_on_error:
            raise StartupError(_startup_failure(failures, repository.names()))
        if settings.model_control is ModelControl.poll:
            self._poller = asyncio.create_task(self._poll_forever())
        self.shadows.start()
        if settings.traffic.policy_file is not None:
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

    async def _watch_policy(self) -> None:
        """Hot reload: apply the policy file whenever it changes (a bad file is logged
        and leaves the policy in force as it was)."""
        while True:
            await asyncio.sleep(self.settings.traffic.reload_interval_seconds)
            try:
                self.router.policy.refresh()
            except Exception:  # a bad pass must not end watching
                log.exception("traffic policy check failed")

    async def stop(self) -> None:
        """Drain and stop; safe to call more than once."""
        if self._server is None:
            return
        self._ready = False
        # NOT_SERVING first, so load balancers stop sending before the port closes.
        await self._health.enter_graceful_shutdown()
        for task in (self._poller, self._policy_watcher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        grace = self.settings.shutdown_grace_seconds
        log.info("sparseserve stopping: up to %.1fs for in-flight requests", grace)
        await self._server.stop(grace)
        self._server = None
        await self.shadows.stop()
        await self.registry.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None
        self._executor.shutdown(wait=True)
        log.info("sparseserve stopped")


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


def _add_reflection(server: grpc.aio.Server) -> None:
    # Our stubs live in a private descriptor pool (see sparseserve.protocol._pool);
    # reflection answers from that pool, so the health and reflection files go there too.
    for descriptor in (health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        with contextlib.suppress(TypeError):  # already added by an earlier server
            POOL.AddSerializedFile(descriptor.serialized_pb)
    names = (V2_SERVICE, V1_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server, pool=POOL)


async def serve(settings: Settings, ready_file: Path | None = None) -> int:
    """Run until SIGTERM or SIGINT; return the process exit code."""
    server = SparseServeServer(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await server.start()
        if ready_file is not None:
            _write_ready_file(ready_file, server)
        await stop.wait()
    finally:
        await server.stop()
    return 0


def _write_ready_file(path: Path, server: SparseServeServer) -> None:
    """Tell a supervisor (or a test) the bound ports once the server is ready."""
    tmp = path.with_name(path.name + ".tmp")
    info = {"pid": os.getpid(), "grpc_port": server.grpc_port, "metrics_port": server.metrics_port}
    tmp.write_text(json.dumps(info), encoding="utf-8")
    tmp.replace(path)
