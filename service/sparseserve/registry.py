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
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from sparseserve.backends.base import (
    Backend,
    ExecutionRecord,
    ModelFiles,
    ModelSignature,
    config_mismatches,
)
from sparseserve.backends.dispatch import Dispatcher
from sparseserve.backends.hardware import probe_hardware
from sparseserve.errors import (
    ModelLoadError,
    ModelNotFound,
    ModelNotReady,
    OperationNotAllowed,
    Overloaded,
    SparseServeError,
    status_of,
)
from sparseserve.observability.memory import ResidentGrowth, directory_bytes
from sparseserve.observability.stats import ModelFootprint, ModelStats, WeightCounts
from sparseserve.repository.manifest import VariantManifest
from sparseserve.repository.store import (
    CONFIG_FILENAME,
    Fingerprint,
    ModelRepository,
    ModelSource,
    version_number,
)
from sparseserve.scheduling.batcher import BatchingPolicy, DynamicBatcher
from sparseserve.settings import ModelControl, Settings

log = logging.getLogger(__name__)

# Runs a decoding function elsewhere (the data plane's codec thread) and returns its result.
Offload = Callable[[Callable[[], Mapping[str, np.ndarray]]], Awaitable[Mapping[str, np.ndarray]]]


class ModelState(StrEnum):
    """States as Triton's RepositoryIndex reports them."""

    READY = "READY"
    LOADING = "LOADING"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(eq=False, slots=True)
class LoadedModel:
    """One version of one model, loaded and warmed up. `run` serves a request on it;
    `stats` (one object, with a part per backend that served requests) says what it
    served."""

    name: str
    version: int
    backend: Backend
    signature: ModelSignature
    source: ModelSource
    fingerprint: Fingerprint
    stats: ModelStats = field(init=False)
    batcher: DynamicBatcher | None = None  # None: requests run one by one
    footprint: ModelFootprint = field(default_factory=ModelFootprint)  # measured at load
    inflight: int = 0
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.stats = ModelStats(self.backend.name)

    async def run(
        self,
        decode: Callable[[], Mapping[str, np.ndarray]],
        requested_outputs: Sequence[str],
        max_inflight: int,
        offload: Offload | None = None,
    ) -> tuple[Mapping[str, np.ndarray], ExecutionRecord]:
        """Serve one request: decode its inputs with `decode` (through `offload`, e.g.
        on the codec thread, if given; here so that a malformed request counts against
        this model), validate them, run them through the batcher if there is one (else
        on the backend) and record the request once, for the backend that ran it. Return
        the inputs and the execution record (the outputs in the order requested, or the
        model's when none were)."""
        started = time.perf_counter_ns()
        stats = self.stats
        # In flight from the first line, before any await: a reload that publishes a new
        # version while this request decodes must wait for it before unloading this one.
        self.begin()
        try:
            inputs = decode() if offload is None else await offload(decode)
            signature = self.signature
            signature.validate(self.name, inputs)
            outputs = signature.select_outputs(self.name, requested_outputs)
            if self.inflight > max_inflight:  # this request is one of them
                raise Overloaded(
                    f"model {self.name!r} already has {self.inflight - 1} requests in flight "
                    f"(limit {max_inflight}); retry later"
                )
            if self.batcher is None:
                record = await self.backend.infer(inputs, outputs)
                rows = _batch_rows(inputs)
                queue_ns = None
                stats.record_execution(record.backend, record.compute_ns, rows)
            else:
                share = await self.batcher.infer(inputs, outputs)
                record = share.record
                rows = _batch_rows(inputs)
                queue_ns = share.queue_ns
                if share.counts_execution:
                    stats.record_execution(record.backend, record.compute_ns, share.execution_rows)
        except SparseServeError as exc:
            # Counted against the route: who would have run it is not the question.
            stats.record_failure(status_of(exc), time.perf_counter_ns() - started)
            raise
        finally:
            self.end()
        stats.record_success(record.backend, time.perf_counter_ns() - started, rows, queue_ns)
        return inputs, record

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
    holding: set[int] = field(default_factory=set)  # versions kept serving in another's slot

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
        self._executor = executor  # also counts weights at load (`_count_weights`)
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
        self._changes: set[asyncio.Task[None]] = set()  # loads and unloads under way
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

    def load_failures(self) -> list[tuple[str, str]]:
        """(model, version) of each load that failed and whose files have not loaded
        since: a version's (its files), or the model's ("": its manifest, config or
        folders). Also called by the metrics thread: each dict is copied in one step."""
        failures = []
        for entry in list(self._entries.values()):
            if entry.error:
                failures.append((entry.name, ""))
            failures.extend((entry.name, str(version)) for version in list(entry.failed))
        return failures

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
                if not isinstance(exc, ModelLoadError):  # those are logged where they arise
                    log.error("model %s not loaded: %s", name, exc)
                if named:
                    failures[name] = exc
        return failures

    async def load(self, name: str, retry_failed: bool = True) -> None:
        """Load `name`, or reconcile it with the repository if it is loaded already.
        Raise `ModelLoadError` if a version it should serve could not be loaded.

        With `retry_failed` False (polling), a version that failed to load is tried again
        only once its files change.

        A caller that is cancelled (a client's deadline on RepositoryModelLoad) stops
        waiting, not the load: as in Triton, it runs to its end, and a half-loaded
        engine is never left behind."""
        if not self.repository.exists(name):  # also refuses names like "../x"
            entry = self._entries.get(name)
            still = (
                f"; version {', '.join(map(str, sorted(entry.ready)))} still serves from "
                "memory until it is unloaded"
                if entry is not None and entry.ready
                else ""
            )
            raise ModelNotFound(f"model {name!r} is not in the repository{still}")
        await self._to_the_end(self._load(name, retry_failed))

    async def _to_the_end(self, change: Coroutine[Any, Any, None]) -> None:
        """Run a load or unload to its end even if the caller stops waiting for it."""
        task = asyncio.ensure_future(change)
        self._changes.add(task)
        task.add_done_callback(self._changes.discard)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_retrieved)  # nobody awaits its outcome now
            raise

    async def _load(self, name: str, retry_failed: bool) -> None:
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
                why = entry.why_not_ready()
                # The store's own messages name the model already.
                said = why if why.startswith(f"model {name!r}") else f"model {name!r}: {why}"
                raise ModelLoadError(f"{said}{still}")

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
            _model_error(entry, str(exc))
            return
        except Exception as exc:  # a file the store did not foresee: one model's problem
            _model_error(
                entry, f"model {entry.name!r}: cannot read its files: {_described(exc)}", exc
            )
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
            except Exception as exc:  # unforeseen: this version's failure, not the pass's
                entry.failed[version] = FailedLoad(fingerprints[version], _described(exc))
                log.error("model %s version %d failed to load", entry.name, version,
                          exc_info=True)  # fmt: skip
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
        holding = set()
        if unfilled > 0:
            holders = sorted((v for v in entry.ready if v not in serving), reverse=True)
            for version in holders[:unfilled]:
                serving[version] = entry.ready[version]
                holding.add(version)
                if version not in entry.holding:  # once, not at every poll
                    log.warning(
                        "model %s: version %d keeps serving until a version the policy %s "
                        "wants loads", entry.name, version, source.policy.describe(),
                    )  # fmt: skip
        entry.holding = holding
        # By identity: a version whose files changed keeps its number, and its old copy
        # must be drained and unloaded like any other.
        retired = [m for v, m in entry.ready.items() if serving.get(v) is not m]
        self._publish(entry, serving)
        await self._retire(entry, retired)

    async def _load_version(self, source: ModelSource, version: int) -> LoadedModel:
        started = time.perf_counter()
        files = ModelFiles(
            source.name, version, source.versions[version], source.config, source.precision
        )
        fingerprint = source.fingerprint(version)
        async with self._load_lock:
            if not self._primed:
                await self._prime(files)
            with ResidentGrowth() as growth:
                try:
                    backend, signature = await self.dispatcher.load(files)
                except ModelLoadError:
                    raise
                except SparseServeError as exc:  # e.g. warm-up rejected by the model itself
                    raise ModelLoadError(f"{files.path}: warm-up failed: {exc}") from exc
                except Exception as exc:  # an engine's unforeseen error: this model's only
                    log.error("loading %s failed", files.path, exc_info=True)
                    raise ModelLoadError(f"{files.path}: {_described(exc)}") from exc
            # Under the load lock but after the measurement: reading the weights copies
            # them, which must count against neither this model nor one loading beside it.
            weights = await self._count_weights(files, source.manifest)
        footprint = ModelFootprint(directory_bytes(files.path.parent), growth.bytes, weights)
        try:
            if source.config is not None and (
                problems := config_mismatches(signature, source.config)
            ):
                raise ModelLoadError(
                    f"{source.directory / CONFIG_FILENAME} does not match the model "
                    f"{files.path.name}: {'; '.join(problems)}"
                )
            policy = BatchingPolicy.for_model(
                source.name, source.config, signature, self.settings.batching
            )
        except Exception as exc:  # the engine loaded: it never outlives a failed load
            await backend.unload()
            if isinstance(exc, ModelLoadError):
                raise
            raise ModelLoadError(f"{files.path}: {_described(exc)}") from exc
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
            model.batcher = DynamicBatcher(source.name, backend, policy)
        return model

    async def _count_weights(
        self, files: ModelFiles, manifest: VariantManifest | None
    ) -> WeightCounts | None:
        """The version's parameters, zeros and weight sparsity counted from its ONNX file,
        for a model whose manifest does not record all three (a model pruned elsewhere gets
        the same metrics as one built by `sparsify`); None where the manifest has them or
        the weights cannot be read (the model serves all the same)."""
        if manifest is not None and None not in (
            manifest.parameters,
            manifest.nonzero_parameters,
            manifest.sparsity,
        ):
            return None
        if files.path.suffix != ".onnx":
            return None  # another engine's format (OpenVINO IR): no ONNX weights to read
        # Imported here: `onnx` stays out of the server's imports (test_lean_import.py).
        from sparseserve.repository.weights import count_weights

        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            counts = await loop.run_in_executor(self._executor, count_weights, files.path)
        except Exception as exc:  # counting is for the metrics: it never fails a load
            log.warning("model %s version %d: weights not counted: %s", files.name,
                        files.version, exc)  # fmt: skip
            return None
        log.info(
            "model %s version %d: %d parameters, %d non-zero, weight sparsity %.3f "
            "(counted from its weights in %.2fs)",
            files.name, files.version, counts.parameters, counts.nonzero_parameters,
            counts.weight_sparsity, time.perf_counter() - started,
        )  # fmt: skip
        return counts

    async def _prime(self, files: ModelFiles) -> None:
        """Load the first model once, unmeasured, and drop it. A CPU engine's one-time
        set-up (onnxruntime's environment, kernel registry and allocator arenas: 7 to 16
        MiB on the digits models; OpenVINO's plugin) would otherwise count as the first
        model's memory, and make every other variant look many times lighter than it."""
        self._primed = True
        try:
            await self.dispatcher.prime(files)
        except Exception:  # the measured load that follows reports it
            return

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
        serving = self._entries.get(model.name)
        replaced = serving is not None and serving.ready.get(model.version) not in (None, model)
        log.info(
            "unloaded model %s version %d%s", model.name, model.version,
            f" (its old copy, on {model.backend.name}; the new one serves)" if replaced else "",
        )  # fmt: skip

    async def unload(self, name: str) -> None:
        """Stop serving `name`: new requests are refused at once, in-flight ones finish.
        Like a load, it happens even if the caller stops waiting for it."""
        self.repository.path(name)
        if name not in self._entries and name not in self._name_locks:
            raise ModelNotFound(f"model {name!r} is not loaded")
        await self._to_the_end(self._unload(name))

    async def _unload(self, name: str) -> None:
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
            except Exception:  # never let one model stop the pass for the others
                log.exception("poll: model %s", name)

    def check_explicit_control(self) -> None:
        if self.settings.model_control is not ModelControl.explicit:
            raise OperationNotAllowed(
                f"explicit model load/unload is not allowed in model-control mode "
                f"{self.settings.model_control.value!r}; start the server with "
                "--model-control explicit"
            )

    async def close(self) -> None:
        """Unload everything (in-flight requests finish first, up to the grace period)."""
        # Loads and unloads whose callers stopped waiting: stopped, as the process is
        # (waiting for them, one after another under the load lock, held up shutdown).
        changes = list(self._changes)
        for task in changes:
            task.cancel()
        if changes:
            await asyncio.gather(*changes, return_exceptions=True)
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
                    if entry.error:  # the model's folder can no longer be read: the latest
                        reason = "serving the files loaded before; " + entry.error
                    elif version in entry.failed:
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
    versions served). Spelled as version folders are (`version_number`), so that each
    version has one spelling, the one ModelMetadata lists."""
    number = version_number(version)
    return -1 if number is None else number


def _model_error(entry: ModelEntry, error: str, unforeseen: Exception | None = None) -> None:
    """Record why the model's files cannot be read; log it once, when it first appears or
    changes, not at every poll (an unforeseen one with its traceback)."""
    if error != entry.error:
        log.error("%s", error, exc_info=unforeseen)
    entry.error = error


def _described(error: BaseException) -> str:
    """An unforeseen exception in one line: its type and message."""
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _retrieved(task: asyncio.Task[None]) -> None:
    """The outcome of a load or unload nobody awaits any more (its caller was cancelled),
    read so that asyncio does not log "Task exception was never retrieved". The
    server's own errors were logged already; anything else is said here."""
    if task.cancelled():
        return
    error = task.exception()
    if error is not None and not isinstance(error, SparseServeError):
        log.error("a model load or unload failed unexpectedly: %r", error, exc_info=error)


def _batch_rows(inputs: Mapping[str, np.ndarray]) -> int:
    """Samples in a request: the leading dimension of its first input (1 if scalar)."""
    for array in inputs.values():
        return int(array.shape[0]) if array.ndim else 1
    return 1
