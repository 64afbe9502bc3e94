"""Which backend serves a model, and the fallback from Triton (GPU) to onnxruntime (CPU).

`Dispatcher.backend()` applies the policy (`dispatch`, per model `dispatch_overrides`):
`cpu` -> `OnnxRuntimeBackend`; `triton` -> `DispatchingBackend`; `auto` -> the latter
when the hardware report has a GPU and `triton.url` answers ServerReady at load time,
else the former. The decision is taken per load, so a reload re-decides.

`DispatchingBackend` is itself a Backend, so the registry, batcher and data plane treat
it like any other. It sends each execution to Triton while its circuit breaker is
closed. An execution that Triton fails (unreachable, timed out, or an upstream error
other than a rejected input) is retried at once on onnxruntime, so the client does not
see the fault; `failure_threshold` consecutive failures open the breaker, and while it
is open executions go straight to onnxruntime and a background probe asks Triton every
`probe_interval_seconds` whether the model is ready again (loading it if Triton is up
but lost it, e.g. after a restart); the first yes closes the breaker.

With `dispatch_fallback` off there is no onnxruntime session and Triton's failures
reach the client as UNAVAILABLE (the breaker then only spares a dead Triton the calls).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor

import numpy as np

from sparseserve.backends.base import (
    Backend,
    ExecutionRecord,
    ModelFiles,
    ModelSignature,
    backend_class,
)
from sparseserve.backends.hardware import HardwareReport
from sparseserve.errors import BackendUnavailable, InvalidInput, ModelLoadError, SparseServeError
from sparseserve.observability.stats import DispatchStats
from sparseserve.settings import DispatchPolicy, Settings

log = logging.getLogger(__name__)


class DispatchingBackend(Backend):
    """Triton first, onnxruntime behind a circuit breaker (see the module docstring)."""

    name = "triton"  # the route; each execution's record says who actually ran it
    platform = "onnxruntime_onnx"

    def __init__(
        self,
        primary: Backend,
        fallback: Backend | None,
        failure_threshold: int,
        probe_interval_seconds: float,
    ):
        self.primary = primary
        self.fallback = fallback
        self.stats = DispatchStats()
        self._threshold = failure_threshold
        self._probe_interval = probe_interval_seconds
        self._failures = 0
        self._probe: asyncio.Task[None] | None = None

    @property
    def breaker_open(self) -> bool:
        return self.stats.breaker_open

    def dispatch_stats(self) -> DispatchStats:
        return self.stats

    async def load(self) -> ModelSignature:
        """Load the fallback (the local file is the reference signature), then the
        primary. An unreachable Triton is no load failure while there is a fallback: the
        model starts with the breaker open and moves to Triton once it answers."""
        signature = await self.fallback.load() if self.fallback is not None else None
        try:
            upstream = await self.primary.load()
        except BackendUnavailable as exc:
            if self.fallback is None:
                raise ModelLoadError(str(exc)) from exc
            log.warning("%s; serving from %s until it is back", exc, self.fallback.name)
            self._open()
            assert signature is not None
            return signature
        except SparseServeError:
            if self.fallback is not None:
                await self.fallback.unload()
            raise
        if signature is not None and upstream != signature:
            await self.unload()
            raise ModelLoadError(
                f"the model Triton serves does not match the local file: Triton {upstream}, "
                f"local {signature}; mount the same repository into Triton"
            )
        return upstream

    async def infer(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> ExecutionRecord:
        """The primary's record, or the fallback's: the record names who ran it."""
        if not self.stats.breaker_open:
            try:
                record = await self.primary.infer(inputs, outputs)
            except InvalidInput:
                raise  # the request's fault: onnxruntime would refuse it too
            except SparseServeError as exc:
                self._failed(exc)
                if self.fallback is None:
                    raise _unavailable(exc) from exc
            else:
                self._failures = 0
                self.stats.count(record.backend)
                return record
        if self.fallback is None:
            raise BackendUnavailable(
                f"{self.primary.name} is unavailable (circuit open) and fallback is off"
            )
        record = await self.fallback.infer(inputs, outputs)
        self.stats.count(record.backend)
        self.stats.fallbacks += 1
        return record

    def _failed(self, error: SparseServeError) -> None:
        self._failures += 1
        if self._failures >= self._threshold and not self.stats.breaker_open:
            log.warning(
                "%s failed %d times in a row (%s); circuit open, serving from %s",
                self.primary.name, self._failures, error,
                self.fallback.name if self.fallback else "nowhere (fallback off)",
            )  # fmt: skip
            self._open()

    def _open(self) -> None:
        self.stats.breaker_open = True
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._probe_until_ready())

    async def _probe_until_ready(self) -> None:
        while True:
            await asyncio.sleep(self._probe_interval)
            if await self._primary_back():
                self._failures = 0
                self.stats.breaker_open = False
                log.info("%s is ready again; circuit closed", self.primary.name)
                return

    async def _primary_back(self) -> bool:
        """Whether the primary serves the model again. `load` checks ModelReady and, as a
        Triton that restarted in explicit mode has forgotten its models, loads it there."""
        try:
            await self.primary.load()
        except SparseServeError as exc:
            log.debug("%s not back yet: %s", self.primary.name, exc)
            return False
        return True

    async def unload(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        await self.primary.unload()
        if self.fallback is not None:
            await self.fallback.unload()


def _unavailable(error: SparseServeError) -> SparseServeError:
    """What a client sees when Triton failed and there is no fallback."""
    return error if isinstance(error, BackendUnavailable) else BackendUnavailable(str(error))


class Dispatcher:
    """Picks the backend of each model version (the policy in the module docstring)."""

    def __init__(self, settings: Settings, hardware: HardwareReport, executor: Executor):
        self.settings = settings
        self.hardware = hardware
        self._executor = executor

    def policy(self, model: str) -> DispatchPolicy:
        return self.settings.dispatch_overrides.get(model, self.settings.dispatch)

    async def backend(self, files: ModelFiles) -> Backend:
        policy = self.policy(files.name)
        if policy is DispatchPolicy.auto:
            policy = await self._resolve_auto()
        if policy is DispatchPolicy.cpu:
            return self._onnxruntime(files)
        if self.settings.triton.url is None:
            raise ModelLoadError(
                f"model {files.name!r} is dispatched to Triton but no triton.url is set"
            )
        triton = backend_class("triton")(files, self.settings.triton)  # type: ignore[call-arg]
        fallback = self._onnxruntime(files) if self.settings.dispatch_fallback else None
        return DispatchingBackend(
            triton,
            fallback,
            self.settings.triton.failure_threshold,
            self.settings.triton.probe_interval_seconds,
        )

    async def _resolve_auto(self) -> DispatchPolicy:
        """auto: Triton when there is a GPU and a configured Triton that is ready."""
        if self.hardware.gpu_count == 0 or self.settings.triton.url is None:
            return DispatchPolicy.cpu
        from sparseserve.backends.triton import server_ready  # imports tritonclient

        if await server_ready(self.settings.triton):
            return DispatchPolicy.triton
        log.warning(
            "dispatch auto: Triton at %s is not ready; serving on the CPU",
            self.settings.triton.url,
        )
        return DispatchPolicy.cpu

    def _onnxruntime(self, files: ModelFiles) -> Backend:
        cls = backend_class("onnxruntime")
        return cls(files, self.settings.onnxruntime, self._executor)  # type: ignore[call-arg]
