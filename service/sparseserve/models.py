"""The ModelRegistry: which model versions are loaded, and their lifecycle.

Loading a model (again) reconciles it with the repository: versions the policy wants
and that are new or changed on disk are loaded and warmed up *before* the table is
switched; only then are replaced or retired versions drained (in-flight requests finish)
and unloaded. A version that fails to load never replaces one that serves: each slot of
the version policy (each of the latest N, each specific version, each version of "all")
keeps the version that served it until a replacement has loaded.

The request path reads the table with plain dict lookups on the event loop; every change
to it happens on the event loop too, one model name at a time under that name's lock,
which also covers finding (or creating) the model's entry: load, unload and load again
in quick succession end in the state the last call asked for.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from enum import StrEnum

from sparseserve.backends.base import SERVED_BY, Backend, ModelFiles, ModelSignature
from sparseserve.backends.dispatch import Dispatcher
from sparseserve.backends.hardware import probe_hardware
from sparseserve.errors import (
    ModelLoadError,
    ModelNotFound,
    ModelNotReady,
    OperationNotAllowed,
    SparseServeError,
)
from sparseserve.observability.memory import ResidentGrowth, directory_bytes
from sparseserve.observability.metrics import (
    LatencyHistogram,
    ModelFootprint,
    ValueHistogram,
    batch_size_histogram,
)
from sparseserve.repository.manifest import VariantManifest
from sparseserve.repository.store import Fingerprint, ModelRepository, ModelSource
from sparseserve.scheduling.batcher import BatchingPolicy, DynamicBatcher
from sparseserve.settings import ModelControl, Settings

log = logging.getLogger(__name__)


class ModelState(StrEnum):
    """States as Triton's RepositoryIndex reports them."""

    READY = "READY"
    LOADING = "LOADING"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(slots=True)
class InferenceStats:
    """What one loaded model version has served: the numbers behind ModelStatistics
    (Triton's names; durations in nanoseconds) and behind its Prometheus series.

    Plain ints, written on the event loop only, so recording a request takes no lock;
    the metrics thread reads them when scraped (see `ModelCollector`)."""

    codes: dict[str, int] = field(default_factory=dict)  # requests, by status code name
    request_duration: LatencyHistogram = field(default_factory=LatencyHistogram)  # successes
    queue_duration: LatencyHistogram = field(default_factory=LatencyHistogram)  # batched ones
    compute_duration: LatencyHistogram = field(default_factory=LatencyHistogram)  # executions
    batch_size: ValueHistogram = field(default_factory=batch_size_histogram)  # executions
    fail_ns: int = 0
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    created: float = field(default_factory=time.time)  # when counting began (Unix time)

    def record_success(self, request_ns: int, rows: int, queue_ns: int | None = None) -> None:
        """One request answered with `rows` samples; `queue_ns`: how long it waited for
        its batch (None: the model is not batched)."""
        self.codes["OK"] = self.codes.get("OK", 0) + 1
        self.request_duration.observe(request_ns)
        if queue_ns is not None:
            self.queue_duration.observe(queue_ns)
        self.inference_count += rows
        self.last_inference_ms = time.time_ns() // 1_000_000

    def record_execution(self, compute_ns: int, rows: int) -> None:
        """One successful backend execution of `rows` samples, of one request or of a
        batch of them."""
        self.compute_duration.observe(compute_ns)
        self.batch_size.observe(rows)
        self.execution_count += 1

    def record_failure(self, code: str, request_ns: int) -> None:
        """One request refused or failed with status `code` after reaching the model."""
        self.codes[code] = self.codes.get(code, 0) + 1
        self.fail_ns += request_ns

    @property
    def success_count(self) -> int:
        return self.request_duration.count

    @property
    def success_ns(self) -> int:
        return self.request_duration.sum_ns

    @property
    def fail_count(self) -> int:
        return sum(count for code, count in self.codes.items() if code != "OK")

    @property
    def compute_count(self) -> int:
        return self.compute_duration.count

    @property
    def compute_ns(self) -> int:
        return self.compute_duration.sum_ns

    @property
    def queue_count(self) -> int:
        return self.queue_duration.count

    @property
    def queue_ns(self) -> int:
        return self.queue_duration.sum_ns

    @classmethod
    def total(cls, parts: list[InferenceStats]) -> InferenceStats:
        """The sum of `parts` (e.g. one model's stats per serving backend)."""
        if len(parts) == 1:
            return parts[0]
        total = cls(created=min(p.created for p in parts))
        for part in parts:
            for code, count in part.codes.copy().items():
                total.codes[code] = total.codes.get(code, 0) + count
            total.request_duration.add(part.request_duration)
            total.queue_duration.add(part.queue_duration)
            total.compute_duration.add(part.compute_duration)
            total.batch_size.add(part.batch_size)
            total.fail_ns += part.fail_ns
            total.inference_count += part.inference_count
            total.execution_count += part.execution_count
            total.last_inference_ms = max(total.last_inference_ms, part.last_inference_ms)
        return total


@dataclass(eq=False, slots=True)
class LoadedModel:
    """One version of one model, loaded and warmed up.

    Its stats are kept per backend that served its requests (the `backend` label of its
    Prometheus series): `stats` is the route's (`backend.name`): every request of a
    plain model, and of a dispatched one (`backend.relays`) the failures and what
    Triton served; `stats_of` adds the fallback's on its first request."""

    name: str
    version: int
    backend: Backend
    signature: ModelSignature
    source: ModelSource
    fingerprint: Fingerprint
    stats: InferenceStats = field(default_factory=InferenceStats)
    batcher: DynamicBatcher | None = None  # None: requests run one by one
    footprint: ModelFootprint = field(default_factory=ModelFootprint)  # measured at load
    inflight: int = 0
    _idle: asyncio.Event = field(default_factory=asyncio.Event)
    # By serving backend; replaced, never changed, so the metrics thread reads it safely.
    served: dict[str, InferenceStats] = field(init=False)
    relays: bool = field(init=False)  # backend.relays, read on every request

    def __post_init__(self) -> None:
        self.served = {self.backend.name: self.stats}
        self.relays = self.backend.relays

    def stats_of(self, backend: str) -> InferenceStats:
        """The stats of the requests `backend` served (created on its first)."""
        stats = self.served.get(backend)
        if stats is None:
            stats = InferenceStats()
            self.served = {**self.served, backend: stats}
        return stats

    def served_stats(self) -> InferenceStats:
        """The stats of the execution this task just awaited: who served it (SERVED_BY)
        for a dispatched model, else the model's only ones."""
        if self.relays:
            return self.stats_of(SERVED_BY.get(self.backend.name))
        return self.stats

    def record_execution(self, compute_ns: int, rows: int) -> None:
        """A batch execution, in the task that ran it (the batcher's `on_execution`)."""
        self.served_stats().record_execution(compute_ns, rows)

    def total_stats(self) -> InferenceStats:
        """All its requests, whoever served them (Triton's per-model ModelStatistics)."""
        return InferenceStats.total(list(self.served.values()))

    @property
    def version_label(self) -> str:
        return str(self.version)

    @property
    def manifest(self) -> VariantManifest | None:
        return self.source.manifest

    @property
    def family(self) -> str:
        return self.manifest.family if self.manifest else self.name

    @property
    def variant(self) -> str:
        return self.manifest.variant if self.manifest else "default"

    def begin(self) -> None:
        self.inflight += 1
        self._idle.clear()

    def end(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    async def drain(self, timeout: float) -> bool:
        """Wait until no request runs on this model; False if `timeout` ran out first."""
        if self.inflight == 0:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


@dataclass(frozen=True, slots=True)
class FailedLoad:
    """A version that could not be loaded from the files with this fingerprint."""

    fingerprint: Fingerprint
    reason: str


@dataclass(slots=True)
class ModelEntry:
    """A model name the registry knows: its serving versions and what went wrong."""

    name: str
    ready: dict[int, LoadedModel] = field(default_factory=dict)
    default: LoadedModel | None = None  # highest ready version: what version "" gets
    loading: set[int] = field(default_factory=set)
    failed: dict[int, FailedLoad] = field(default_factory=dict)
    error: str | None = None  # model-level problem (manifest, config, no versions)

    def publish(self, ready: dict[int, LoadedModel]) -> None:
        self.ready = ready
        self.default = ready[max(ready)] if ready else None

    def why_not_ready(self) -> str:
        if self.loading:
            return "it is loading"
        if self.error:
            return self.error
        if self.failed:
            return "; ".join(f"version {v}: {f.reason}" for v, f in sorted(self.failed.items()))
        return "it has no loaded version"


@dataclass(frozen=True, slots=True)
class IndexEntry:
    name: str
    version: str
    state: ModelState
    reason: str


class ModelRegistry:
    """Owns the loaded models: load, warm up, swap versions, drain, unload."""

    def __init__(
        self,
        repository: ModelRepository,
        settings: Settings,
        executor: Executor,
        dispatcher: Dispatcher | None = None,
    ):
        self.repository = repository
        self.settings = settings
        # The executor runs onnxruntime sessions, which the dispatcher creates.
        self.dispatcher = dispatcher or Dispatcher(
            settings, probe_hardware(settings.assume_gpus), executor
        )
        self._entries: dict[str, ModelEntry] = {}
        # One lock per model name, kept when the model is unloaded: a call that waited on
        # it must find the entry the call before it left, not a detached one. (Names are
        # of directories that were in the repository, so this stays small.)
        self._name_locks: dict[str, asyncio.Lock] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._draining: set[LoadedModel] = set()
        # One load at a time, so that each version's measured memory growth is its own.
        self._load_lock = asyncio.Lock()
        self._primed = False  # see _prime
        # Bumped whenever the set of serving versions changes (the router's family index).
        self.generation = 0

    # -- the request path ---------------------------------------------------------------

    def get(self, name: str, version: str = "") -> LoadedModel:
        """The loaded model that serves `name` at `version` ("" = the highest ready)."""
        entry = self._entries.get(name)
        if entry is not None:
            model = entry.default if version == "" else entry.ready.get(_parse_version(version))
            if model is not None:
                return model
        raise self._not_served(name, version, entry)

    def _not_served(self, name: str, version: str, entry: ModelEntry | None) -> Exception:
        if entry is None:
            if self.repository.exists(name):  # also refuses names like "../x"
                return ModelNotReady(
                    f"model {name!r} is in the repository but not loaded; "
                    "load it with RepositoryModelLoad"
                )
            return ModelNotFound(f"unknown model {name!r}")
        if version == "":
            return ModelNotReady(f"model {name!r} is not ready: {entry.why_not_ready()}")
        number = _parse_version(version)
        if number in entry.loading:
            return ModelNotReady(f"model {name!r} version {number} is loading")
        if number in entry.failed:
            return ModelNotReady(
                f"model {name!r} version {number} is unavailable: {entry.failed[number].reason}"
            )
        served = ", ".join(str(v) for v in sorted(entry.ready)) or "none"
        return ModelNotFound(f"model {name!r} has no version {version!r} (serving: {served})")

    def is_ready(self, name: str, version: str = "") -> bool:
        try:
            self.get(name, version)
        except SparseServeError:
            return False
        return True

    def has_model(self, name: str) -> bool:
        """Whether `name` is a model the registry knows (loaded or not), not a family."""
        return name in self._entries

    def loaded(self) -> Iterator[LoadedModel]:
        """The versions that serve requests. Also called by the metrics thread: the copy
        of `_entries` is one step, and `publish` replaces `ready` dicts, never changes one."""
        for entry in list(self._entries.values()):
            yield from entry.ready.values()

    def draining(self) -> list[LoadedModel]:
        """The versions taken out of service whose last requests are still finishing."""
        return list(self._draining)  # one step, so safe from the metrics thread too

    def versions(self, name: str) -> list[int]:
        entry = self._entries.get(name)
        return sorted(entry.ready) if entry else []

    # -- lifecycle --------------------------------------------------------------------

    async def load_startup_models(self) -> dict[str, SparseServeError]:
        """Load what the model-control mode says to load at start. Failures are logged
        and shown in RepositoryIndex; the ones of models named in `startup_models` (not
        matched by '*') are also returned, for the server to refuse to start on them."""
        wanted = self.settings.startup_models
        named = self.settings.model_control is ModelControl.explicit and "*" not in wanted
        names = list(dict.fromkeys(wanted)) if named else self.repository.names()
        failures: dict[str, SparseServeError] = {}
        for name in names:
            try:
                await self.load(name)
            except SparseServeError as exc:
                log.error("model %s not loaded: %s", name, exc)
                if named:
                    failures[name] = exc
        return failures

    async def load(self, name: str, retry_failed: bool = True) -> None:
        """Load `name`, or reconcile it with the repository if it is loaded already.
        Raise `ModelLoadError` if a version it should serve could not be loaded.

        With `retry_failed` False (polling), a version that failed to load is tried again
        only once its files change."""
        if not self.repository.exists(name):  # also refuses names like "../x"
            raise ModelNotFound(f"model {name!r} is not in the repository")
        async with self._name_lock(name):
            entry = self._entries.get(name)
            if entry is None:
                entry = self._entries[name] = ModelEntry(name)
            try:
                await self._reconcile(entry, retry_failed)
            except ModelNotFound:
                self._entries.pop(name, None)
                raise
            if entry.error or entry.failed:
                serving = ", ".join(str(v) for v in sorted(entry.ready))
                still = f"; still serving version {serving}" if serving else ""
                raise ModelLoadError(f"model {name!r}: {entry.why_not_ready()}{still}")

    def _name_lock(self, name: str) -> asyncio.Lock:
        lock = self._name_locks.get(name)
        if lock is None:
            lock = self._name_locks[name] = asyncio.Lock()
        return lock

    async def _reconcile(self, entry: ModelEntry, retry_failed: bool) -> None:
        try:
            source = self.repository.read(entry.name)
        except ModelNotFound:  # removed from disk: stop serving it
            retired = list(entry.ready.values())
            self._publish(entry, {})
            await self._retire(entry, retired)
            raise
        except ModelLoadError as exc:
            # Keep serving what serves; say why nothing new could be loaded.
            entry.error = str(exc)
            return
        entry.error = None
        wanted = source.served_versions()
        fingerprints = {v: source.fingerprint(v) for v in wanted}

        def needs_load(version: int) -> bool:
            current = entry.ready.get(version)
            if current is not None and current.fingerprint == fingerprints[version]:
                return False  # serving exactly these files already
            failure = entry.failed.get(version)
            return retry_failed or failure is None or failure.fingerprint != fingerprints[version]

        entry.failed = {v: f for v, f in entry.failed.items() if v in wanted}
        fresh: dict[int, LoadedModel] = {}
        for version in [v for v in wanted if needs_load(v)]:
            entry.loading.add(version)
            try:
                fresh[version] = await self._load_version(source, version)
                entry.failed.pop(version, None)
            except ModelLoadError as exc:
                entry.failed[version] = FailedLoad(fingerprints[version], str(exc))
                log.error("model %s version %d failed to load: %s", entry.name, version, exc)
            finally:
                entry.loading.discard(version)
        # Wanted versions that serve now: new files that loaded, and unchanged ones (or
        # ones whose new files failed to load: their old files keep serving).
        serving = {v: m for v, m in entry.ready.items() if v in wanted and v not in fresh}
        serving.update(fresh)
        # A slot whose new version failed (or was not retried) keeps the version that
        # served before, highest first, until a replacement loads: never nothing where
        # something served. Under "all" each version on disk is its own slot, so a new
        # one that fails takes no one's place, and a removed one is retired.
        unfilled = 0 if source.policy.serves_all else len(wanted) - len(serving)
        if unfilled > 0:
            holders = sorted((v for v in entry.ready if v not in serving), reverse=True)
            for version in holders[:unfilled]:
                serving[version] = entry.ready[version]
                log.warning(
                    "model %s: version %d keeps serving until a version the policy %s "
                    "wants loads", entry.name, version, source.policy.describe(),
                )  # fmt: skip
        retired = [m for v, m in entry.ready.items() if v not in serving]
        self._publish(entry, serving)
        await self._retire(entry, retired)

    async def _load_version(self, source: ModelSource, version: int) -> LoadedModel:
        started = time.perf_counter()
        files = ModelFiles(source.name, version, source.versions[version])
        fingerprint = source.fingerprint(version)
        async with self._load_lock:
            if not self._primed:
                await self._prime(files)
            with ResidentGrowth() as growth:
                backend = await self.dispatcher.backend(files)
                try:
                    signature = await backend.load()
                except ModelLoadError:
                    raise
                except SparseServeError as exc:  # e.g. warm-up rejected by the model itself
                    raise ModelLoadError(f"{files.path}: warm-up failed: {exc}") from exc
        footprint = ModelFootprint(directory_bytes(files.path.parent), growth.bytes)
        try:
            policy = BatchingPolicy.for_model(
                source.name, source.config, signature, self.settings.batching
            )
        except ModelLoadError:
            await backend.unload()
            raise
        log.info(
            "loaded model %s version %d with %s in %.2fs%s",
            source.name, version, backend.name, time.perf_counter() - started,
            f", batching {policy}" if policy else "",
        )  # fmt: skip
        model = LoadedModel(
            name=source.name,
            version=version,
            backend=backend,
            signature=signature,
            source=source,
            fingerprint=fingerprint,
            footprint=footprint,
        )
        if policy is not None:
            # A dispatched model's executions count for who ran them (model.relays).
            on_execution = model.record_execution if model.relays else model.stats.record_execution
            model.batcher = DynamicBatcher(source.name, backend, policy, on_execution)
        return model

    async def _prime(self, files: ModelFiles) -> None:
        """Load the first model once, unmeasured, and drop it. onnxruntime's one-time
        set-up (its environment, kernel registry and allocator arenas: 7 to 16 MiB on the
        digits models) would otherwise count as the first model's memory, and make every
        other variant look many times lighter than it."""
        self._primed = True
        backend = await self.dispatcher.backend(files)
        if backend.name != "onnxruntime":
            return  # a dispatched model's cost is Triton's; do not load it twice
        try:
            await backend.load()
        except SparseServeError:
            return  # the measured load that follows reports it
        await backend.unload()

    def _publish(self, entry: ModelEntry, ready: dict[int, LoadedModel]) -> None:
        entry.publish(ready)
        self.generation += 1

    async def _retire(self, entry: ModelEntry, models: list[LoadedModel]) -> None:
        """Unload models already taken out of the table, once their requests finished.
        Runs in the background so that a slow request does not hold up a reload; until
        then `draining()` lists them (the metrics show them with `model_ready` 0)."""
        for model in models:
            self._draining.add(model)
            task = asyncio.create_task(self._unload_when_idle(model))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def _unload_when_idle(self, model: LoadedModel) -> None:
        try:
            if not await model.drain(self.settings.shutdown_grace_seconds):
                log.warning(
                    "model %s version %d still had %d requests after %.1fs; unloading anyway",
                    model.name, model.version, model.inflight,
                    self.settings.shutdown_grace_seconds,
                )  # fmt: skip
            await model.backend.unload()
        finally:
            self._draining.discard(model)
        log.info("unloaded model %s version %d", model.name, model.version)

    async def unload(self, name: str) -> None:
        """Stop serving `name`: new requests are refused at once, in-flight ones finish."""
        self.repository.path(name)
        if name not in self._entries and name not in self._name_locks:
            raise ModelNotFound(f"model {name!r} is not loaded")
        async with self._name_lock(name):  # after the loads sent before this call
            entry = self._entries.pop(name, None)
            if entry is None:
                raise ModelNotFound(f"model {name!r} is not loaded")
            retired = list(entry.ready.values())
            self._publish(entry, {})
            await self._retire(entry, retired)

    async def poll(self) -> None:
        """One poll-mode pass: load new models, reload changed ones, unload removed ones."""
        on_disk = set(self.repository.names())
        for name in sorted(on_disk | set(self._entries)):
            if name not in on_disk:
                await self.unload(name)
                continue
            try:
                await self.load(name, retry_failed=False)
            except SparseServeError as exc:
                log.debug("poll: model %s: %s", name, exc)

    def check_explicit_control(self) -> None:
        if self.settings.model_control is not ModelControl.explicit:
            raise OperationNotAllowed(
                f"explicit model load/unload is not allowed in model-control mode "
                f"{self.settings.model_control.value!r}; start the server with "
                "--model-control explicit"
            )

    async def close(self) -> None:
        """Unload everything (in-flight requests finish first, up to the grace period)."""
        for name in list(self._entries):
            await self.unload(name)
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)

    # -- reporting --------------------------------------------------------------------

    def index(self) -> list[IndexEntry]:
        """Every model in the repository or in memory, per version, with its state."""
        rows: list[IndexEntry] = []
        for name in sorted(set(self.repository.names()) | set(self._entries)):
            entry = self._entries.get(name)
            if entry is None:
                rows.append(IndexEntry(name, "", ModelState.UNAVAILABLE, "not loaded"))
                continue
            versions = set(entry.ready) | entry.loading | set(entry.failed)
            if entry.error and not entry.ready:
                rows.append(IndexEntry(name, "", ModelState.UNAVAILABLE, entry.error))
            for version in sorted(versions):
                if version in entry.loading:
                    state, reason = ModelState.LOADING, ""
                elif version in entry.ready:
                    state, reason = ModelState.READY, ""
                    if version in entry.failed:
                        reason = (
                            "serving the files loaded before; the new ones failed to load: "
                            + entry.failed[version].reason
                        )
                else:
                    state, reason = ModelState.UNAVAILABLE, entry.failed[version].reason
                rows.append(IndexEntry(name, str(version), state, reason))
        return rows


def _parse_version(version: str) -> int:
    """A requested version as a number, or -1 (no such version: NOT_FOUND, with the
    versions served). Only plain ASCII decimal counts, each version spelled one way, as
    ModelMetadata lists it: Python's `int` would also take " 1", "+1", "1_0", "01" and
    other scripts' digits (Arabic-Indic one, U+0661)."""
    if not (version.isascii() and version.isdigit()) or (version[0] == "0" and version != "0"):
        return -1
    return int(version)
