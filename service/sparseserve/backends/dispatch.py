"""Which backend serves a model, and the fallback from Triton (GPU) to the CPU.

`Dispatcher.load()` applies the policy (`dispatch`, per model `dispatch_overrides`):
`cpu` -> the CPU engine; `triton` -> `DispatchingBackend`; `auto` -> the latter when the
hardware report has a GPU and `triton.url` answers ServerReady at load time, else the
former. The decision is taken per load, so a reload re-decides.

The CPU engine (onnxruntime or OpenVINO) is, in this order: the model's entry in
`cpu_engine_overrides`, the engine its config.pbtxt names (`backend:` or `platform:`,
as in Triton), or `cpu_engine`. `auto` loads the variant on every installed engine that
can run it at its precision, times each on one sample with its dynamic dimensions at 128
(`timing_inputs`: a sequence of 128 tokens; median of several runs),
serves with the fastest and unloads the others, all before the registry reads the
memory the load cost. onnxruntime keeps the model unless another engine is faster by
more than `engine_margin` (timing noise on a shared machine is of that order). With
`measure_engines` off, `auto` takes onnxruntime unless only OpenVINO can run the
variant (a bf16 variant, an OpenVINO IR `model.xml`).

Triton is asked only for what it computes as the variant was measured: an fp32 ONNX file
whose config.pbtxt does not name the openvino backend (`triton_refusal`). A bf16 variant
would run in fp32 on Triton's onnxruntime backend (it has no bf16 mode), and an OpenVINO
model (IR, or `backend: "openvino"`) on Triton's OpenVINO backend, on its host's CPU in
whatever precision that CPU defaults to: another variant either way. `auto` keeps such a
model on the CPU (and logs why); `triton` refuses to load it, naming the model and the
setting that serves it on the CPU.

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
import importlib.util
import logging
import statistics
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor

import numpy as np

from sparseserve.backends.base import (
    Backend,
    ExecutionRecord,
    ModelFiles,
    ModelSignature,
    backend_class,
    timing_inputs,
    warmup_inputs,
)
from sparseserve.backends.hardware import HardwareReport
from sparseserve.errors import BackendUnavailable, InvalidInput, ModelLoadError, SparseServeError
from sparseserve.observability.stats import DispatchStats
from sparseserve.repository.manifest import Precision
from sparseserve.scheduling.batcher import BatchingPolicy
from sparseserve.settings import BatchingSettings, CpuEngine, DispatchPolicy, Settings

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
        # (model, version) whose staying on the CPU was logged: a load asks two or three
        # times (its backend, the untimed first load, the timed one).
        self._kept_on_cpu: set[tuple[str, int]] = set()

    def policy(self, model: str) -> DispatchPolicy:
        return self.settings.dispatch_overrides.get(model, self.settings.dispatch)

    async def load(self, files: ModelFiles) -> tuple[Backend, ModelSignature]:
        """Create the backend of one model version, load and warm it up; return it with
        its signature. Raise `ModelLoadError` (or the backend's error)."""
        engine, _ = self.cpu_engine(files)
        if (
            engine is CpuEngine.auto
            and self.settings.measure_engines
            and await self._policy(files) is DispatchPolicy.cpu
        ):
            return await self._load_fastest(files)
        backend = await self.backend(files)
        return backend, await backend.load()

    def cpu_engine(self, files: ModelFiles) -> tuple[CpuEngine, str]:
        """The CPU engine asked for, and who asked (see the module docstring)."""
        override = self.settings.cpu_engine_overrides.get(files.name)
        if override is not None:
            return override, "cpu_engine_overrides"
        configured = configured_engine(files)
        if configured is not None:
            return configured, "config.pbtxt"
        return self.settings.cpu_engine, "cpu_engine"

    async def backend(self, files: ModelFiles) -> Backend:
        """The backend (not loaded) of one model version; `auto` CPU engine unmeasured."""
        policy = await self._policy(files)
        if policy is DispatchPolicy.cpu:
            return self._cpu_backend(files, self._unmeasured_engine(files))
        if self.settings.triton.url is None:
            raise ModelLoadError(
                f"model {files.name!r} is dispatched to Triton but no triton.url is set"
            )
        triton = backend_class("triton")(files, self.settings.triton)  # type: ignore[call-arg]
        fallback = (
            self._cpu_backend(files, self._unmeasured_engine(files))
            if self.settings.dispatch_fallback
            else None
        )
        return DispatchingBackend(
            triton,
            fallback,
            self.settings.triton.failure_threshold,
            self.settings.triton.probe_interval_seconds,
        )

    async def _policy(self, files: ModelFiles) -> DispatchPolicy:
        policy = self.policy(files.name)
        if policy is DispatchPolicy.cpu:
            return policy
        if policy is DispatchPolicy.auto and (
            self.hardware.gpu_count == 0 or self.settings.triton.url is None
        ):
            return DispatchPolicy.cpu  # Triton is no option: nothing to say per model
        refusal = triton_refusal(files)
        if refusal is None:
            return await self._resolve_auto() if policy is DispatchPolicy.auto else policy
        if policy is DispatchPolicy.triton:
            raise ModelLoadError(
                f"model {files.name!r} is dispatched to Triton, but it is {refusal}; serve "
                f"it on the CPU (dispatch_overrides: {{{files.name}: cpu}})"
            )
        if (files.name, files.version) not in self._kept_on_cpu:
            self._kept_on_cpu.add((files.name, files.version))
            log.info("model %s stays on the CPU (dispatch auto): it is %s", files.name, refusal)
        return DispatchPolicy.cpu

    def _unmeasured_engine(self, files: ModelFiles) -> CpuEngine:
        """The engine asked for; for `auto` without measuring, and for the server-wide
        default onnxruntime, onnxruntime unless only OpenVINO can run the variant."""
        engine, source = self.cpu_engine(files)
        if engine is CpuEngine.openvino or (
            engine is CpuEngine.onnxruntime and source != "cpu_engine"
        ):
            return engine  # pinned for this model: no other engine, whatever it is
        # The server-wide onnxruntime, or auto: a variant only OpenVINO can run (bf16, an
        # IR model.xml) goes to OpenVINO rather than fail.
        if onnxruntime_can_serve(files) or not openvino_installed():
            return CpuEngine.onnxruntime
        return CpuEngine.openvino

    async def _load_fastest(self, files: ModelFiles) -> tuple[Backend, ModelSignature]:
        """Load every engine that can run the variant, time them run after run in turn at
        one row (and, for a model the server batches, at the rows its batcher aims for,
        as many as about 3 s of timing allows), keep the fastest at one row unless it
        fails to beat onnxruntime by `engine_margin` at every size (`choose_engine`),
        unload the others."""
        loaded = await self._load_candidates(files)
        loop = asyncio.get_running_loop()
        backends = {engine.value: backend for engine, (backend, _) in loaded.items()}
        signature = next(iter(loaded.values()))[1]
        timings: dict[int, dict[str, float]] = {}
        single = await loop.run_in_executor(
            self._executor, time_engines, backends, signature, files.name
        )
        assert single is not None  # one row is always timed
        timings[1] = single
        if len(backends) > 1:
            for wanted in timing_batches(files, signature, self.settings.batching)[1:]:
                rows = affordable_rows(single, wanted)
                if rows < 2:
                    log.info("model %s: not timed at %d rows (one row takes %.0f ms); "
                             "choosing on one row", files.name, wanted,
                             max(single.values()) * 1e3)  # fmt: skip
                    continue
                seconds = await loop.run_in_executor(
                    self._executor, time_engines, backends, signature, files.name, rows
                )
                if seconds is None:
                    log.info("model %s: not timed at %d rows; choosing on one row",
                             files.name, rows)  # fmt: skip
                else:
                    timings[rows] = seconds
        winner = CpuEngine(choose_engine(timings, self.settings.engine_margin))
        for engine, (backend, _) in loaded.items():
            if engine is not winner:
                await backend.unload()
        chosen, signature = loaded[winner]
        chosen.candidate_seconds = timings[1]
        log.info(
            "model %s version %d: median run %s; serving with %s",
            files.name, files.version,
            "; ".join(
                f"{batch} row(s) "
                + ", ".join(f"{name} {value * 1e6:.0f} us" for name, value in seconds.items())
                for batch, seconds in timings.items()
            ),
            winner.value,
        )  # fmt: skip
        return chosen, signature

    async def prime(self, files: ModelFiles) -> None:
        """Load and drop `files` on each CPU engine it would be loaded with, untimed, so
        that the engines' one-time set-up is spent before any load is measured."""
        if isinstance(await self.backend(files), DispatchingBackend):
            return  # a dispatched model's cost is Triton's; do not load it twice
        engine, _ = self.cpu_engine(files)
        if engine is CpuEngine.auto and self.settings.measure_engines:
            loaded = await self._load_candidates(files)
            backends = [backend for backend, _ in loaded.values()]
        else:
            backend = await self.backend(files)
            await backend.load()
            backends = [backend]
        for backend in backends:
            await backend.unload()

    async def _load_candidates(
        self, files: ModelFiles
    ) -> dict[CpuEngine, tuple[Backend, ModelSignature]]:
        """Every installed engine that can run the variant, loaded and warmed up."""
        engines = [CpuEngine.onnxruntime] if onnxruntime_can_serve(files) else []
        if openvino_installed():
            engines.append(CpuEngine.openvino)
        if not engines:
            engines = [CpuEngine.onnxruntime]  # its load error says why it cannot
        loaded: dict[CpuEngine, tuple[Backend, ModelSignature]] = {}
        failures: list[str] = []
        for engine in engines:
            backend = self._cpu_backend(files, engine)
            try:
                loaded[engine] = (backend, await backend.load())
            except SparseServeError as exc:  # refused the variant, or failed its warm-up
                log.info("model %s: %s cannot serve it: %s", files.name, engine.value, exc)
                failures.append(str(exc))
        if not loaded:
            raise ModelLoadError("; ".join(failures))  # each names its engine
        return loaded

    def _cpu_backend(self, files: ModelFiles, engine: CpuEngine) -> Backend:
        if engine is CpuEngine.openvino:
            if not openvino_installed():
                raise ModelLoadError(
                    f"model {files.name!r} is to run on openvino, which is not installed "
                    "here (pip install openvino, as pyproject.toml pins it)"
                )
            cls = backend_class("openvino")
            ort = self.settings.onnxruntime
            return cls(  # type: ignore[call-arg]
                files, self.settings.openvino, ort.intra_op_threads, ort.inline_max_us,
                self._executor,
            )  # fmt: skip
        return self._onnxruntime(files)

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


# config.pbtxt `backend:` and `platform:` values that name a CPU engine, as in Triton.
_CONFIG_BACKENDS = {"onnxruntime": CpuEngine.onnxruntime, "openvino": CpuEngine.openvino}
_CONFIG_PLATFORMS = {"onnxruntime_onnx": CpuEngine.onnxruntime, "openvino": CpuEngine.openvino}


def configured_engine(files: ModelFiles) -> CpuEngine | None:
    """The engine the model's config.pbtxt names (None: it names none). A backend or
    platform sparseserve does not run is a load error, never silently another engine."""
    config = files.config
    if config is None:
        return None
    named: list[CpuEngine] = []
    for field, value, known in (
        ("backend", config.backend, _CONFIG_BACKENDS),
        ("platform", config.platform, _CONFIG_PLATFORMS),
    ):
        if not value:
            continue
        if value not in known:
            raise ModelLoadError(
                f"model {files.name!r}: config.pbtxt {field} {value!r} is not one sparseserve "
                f"runs; known {field}s: {', '.join(known)}"
            )
        named.append(known[value])
    if len(set(named)) > 1:
        raise ModelLoadError(
            f"model {files.name!r}: config.pbtxt backend {config.backend!r} and platform "
            f"{config.platform!r} name different engines"
        )
    return named[0] if named else None


def triton_refusal(files: ModelFiles) -> str | None:
    """Why Triton would not compute this variant as it was measured (None: it would);
    the text completes "model X is ..." (see the module docstring)."""
    if files.precision is not Precision.fp32:
        return (
            f"a {files.precision.value} variant, and Triton's onnxruntime backend would "
            f"compute it in fp32 (it has no {files.precision.value} mode)"
        )
    if files.path.suffix != ".onnx":
        return (
            f"an OpenVINO model ({files.path.name}), which Triton runs only with its "
            "OpenVINO backend, on its host's CPU rather than the GPU"
        )
    if configured_engine(files) is CpuEngine.openvino:
        return (
            "configured for the openvino backend (config.pbtxt), which Triton runs on its "
            "host's CPU rather than the GPU, in that CPU's default precision"
        )
    return None


def onnxruntime_can_serve(files: ModelFiles) -> bool:
    """onnxruntime runs ONNX files in fp32 only (see `refuse_unservable`)."""
    return files.precision is Precision.fp32 and files.path.suffix == ".onnx"


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


# Rounds of `interleaved_medians`: each runs every candidate once, in turn.
TIMING_ROUNDS = 9


def interleaved_medians(
    backends: Mapping[str, Backend], feeds: Mapping[str, np.ndarray]
) -> dict[str, float]:
    """The median time of one run of each backend on `feeds`, run one after the other in
    rounds, so that what else the machine does at that moment weighs on every engine
    alike (timing them one after the other flipped a 20 ms model's choice on a shared
    2-core machine). A first run of each at this shape is not timed."""
    for backend in backends.values():
        backend.run_once(feeds)
    times: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(TIMING_ROUNDS):
        for name, backend in backends.items():
            times[name].append(backend.run_once(feeds))
    return {name: statistics.median(values) for name, values in times.items()}


# Past this many elements in one input (a model with three or more dynamic dimensions
# after the batch), the engines are timed on the warm-up inputs instead.
MAX_TIMING_ELEMENTS = 1 << 20


def time_engines(
    backends: Mapping[str, Backend], signature: ModelSignature, model: str, batch: int = 1
) -> dict[str, float] | None:
    """`interleaved_medians` on `timing_inputs` at `batch` rows (dynamic dimensions at
    128: the size requests have, not the warm-up's 1). At one row, where an engine cannot
    run those or they are too large, on the warm-up inputs; at more rows, then None (not
    timed at that size)."""
    try:
        feeds = timing_inputs(signature, batch=batch)
        too_large = max((array.size for array in feeds.values()), default=0) > MAX_TIMING_ELEMENTS
    except ModelLoadError:  # more than any request can carry
        too_large = True
    if too_large:
        # 128 x 128 x ..., or a large batch of large rows
        return interleaved_medians(backends, warmup_inputs(signature)) if batch == 1 else None
    try:
        return interleaved_medians(backends, feeds)
    except Exception as exc:  # each engine raises its own types
        if batch > 1:
            log.info("model %s: timing %d rows failed (%s)", model, batch, exc)
            return None
        log.info("model %s: timing at 128 per dynamic dimension failed (%s); timing on "
                 "the warm-up inputs", model, exc)  # fmt: skip
        return interleaved_medians(backends, warmup_inputs(signature))


def timing_batches(
    files: ModelFiles, signature: ModelSignature, batching: BatchingSettings
) -> tuple[int, ...]:
    """The batch sizes `auto` times the engines at: one row, and where the server batches
    the model (config.pbtxt `dynamic_batching`, or `batching.enabled` for every model that
    can batch), the rows its batcher aims for. An engine can win at one row and lose at
    32: on an AMX Xeon, OpenVINO fp32 ran the 1024-4096-4096-1000 MLP at 1.1-1.3x
    onnxruntime's speed at one row and 0.97-0.99x at 32, and `auto`, timing one row,
    served it batched at 0.91x (bench/served_speedups.py)."""
    explicit = files.config is not None and files.config.HasField("dynamic_batching")
    if not (explicit or batching.enabled) or signature.batch_dimension_problem():
        return (1,)
    try:
        policy = BatchingPolicy.for_model(files.name, files.config, signature, batching)
    except ModelLoadError:
        return (1,)  # the batcher refuses it too, and its load says why
    rows = policy.target_rows if policy is not None else 1
    return (1, rows) if rows > 1 else (1,)


# What timing a batched size may cost at load, at most, judged from the one-row runs.
BATCH_TIMING_SECONDS = 3.0


def affordable_rows(single: Mapping[str, float], wanted: int) -> int:
    """The most rows, up to `wanted`, that every engine's timing runs can take within
    BATCH_TIMING_SECONDS, taking a run to grow with its rows (larger batches usually cost
    less per row): MiniLM at 25 ms a row times 6 rows, a 7 ms MLP 21."""
    per_row = max(single.values()) * (TIMING_ROUNDS + 1) * len(single)
    return min(wanted, int(BATCH_TIMING_SECONDS / per_row)) if per_row > 0 else wanted


def choose_engine(timings: Mapping[int, Mapping[str, float]], margin: float) -> str:
    """The engine to serve with, from each batch size's median run per engine: the
    fastest at one row, unless onnxruntime is a candidate and that engine is not faster
    than it by more than `margin` at every size timed (then onnxruntime)."""
    single = timings[1]
    winner = min(single, key=single.__getitem__)
    baseline = CpuEngine.onnxruntime.value
    if baseline in single and winner != baseline:
        for seconds in timings.values():
            if seconds[winner] >= seconds[baseline] * (1 - margin):
                return baseline
    return winner
