"""A model served by a remote Triton Inference Server (the GPU path), over the Open
Inference Protocol with `tritonclient.grpc.aio`.

tritonclient is imported only by this module, which `BACKENDS` resolves only when a model
is dispatched to Triton, so a CPU-only server never imports it. Upstream errors become
our domain errors: unreachable (or too slow) -> `BackendUnavailable`, which the
dispatcher answers by falling back to onnxruntime; INVALID_ARGUMENT -> `InvalidInput`;
NOT_FOUND -> `ModelNotReady`; anything else -> `InferenceFailed`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

import numpy as np
import tritonclient.grpc.aio as triton
from tritonclient.utils import InferenceServerException

from sparseserve.backends.base import (
    Backend,
    ExecutionRecord,
    ModelFiles,
    ModelSignature,
    TensorSpec,
)
from sparseserve.codec import BY_NAME, datatype_of
from sparseserve.errors import (
    BackendUnavailable,
    InferenceFailed,
    InvalidInput,
    ModelLoadError,
    ModelNotReady,
    SparseServeError,
)
from sparseserve.settings import TritonSettings

log = logging.getLogger(__name__)

T = TypeVar("T")
# Status codes meaning "Triton cannot be reached (now)", as tritonclient reports them.
_UNREACHABLE = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.CANCELLED"}
_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    # gRPC backs off up to 120 s between reconnects by default; a restarted Triton
    # should be found within a probe interval or two.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def connect(settings: TritonSettings) -> triton.InferenceServerClient:
    """An asyncio client for `settings.url` (TLS and certificates as configured)."""
    if settings.url is None:
        raise BackendUnavailable("no Triton server is configured (triton.url)")

    def path(value: object) -> str | None:
        return None if value is None else str(value)

    return triton.InferenceServerClient(
        settings.url,
        ssl=settings.ssl,
        root_certificates=path(settings.root_certificates),
        private_key=path(settings.private_key),
        certificate_chain=path(settings.certificate_chain),
        channel_args=_CHANNEL_ARGS,
    )


async def server_ready(settings: TritonSettings) -> bool:
    """Whether the configured Triton answers ServerReady with true (False if none)."""
    if settings.url is None:
        return False
    client = connect(settings)
    try:
        return bool(await client.is_server_ready(client_timeout=settings.control_timeout_seconds))
    except InferenceServerException:
        return False
    finally:
        await client.close()


class TritonBackend(Backend):
    """One model version on Triton: same name and version as in our repository, which
    Triton mounts too (see docs/gpu-deployment.md)."""

    name = "triton"
    platform = "onnxruntime_onnx"

    def __init__(self, files: ModelFiles, settings: TritonSettings):
        self._files = files
        self._settings = settings
        self._version = str(files.version)
        self._client: triton.InferenceServerClient | None = None

    @property
    def model(self) -> str:
        return self._files.name

    async def load(self) -> ModelSignature:
        """Check Triton serves the model, asking it to load it if not (explicit
        model-control mode), and return its signature from ModelMetadata."""
        first = self._client is None
        if first:
            self._client = connect(self._settings)
        try:
            if not await self.ready():
                await self._load_upstream()
            metadata = await self._call(
                lambda c: c.get_model_metadata(
                    self.model, self._version, client_timeout=self._settings.control_timeout_seconds
                )
            )
        except SparseServeError:
            # A breaker's probe (not the first load) keeps the connection: calls sent
            # before the breaker opened may still be answered on it (a draining Triton
            # finishes them), and gRPC reconnects to a restarted one by itself.
            if first:
                await self.unload()
            raise
        return ModelSignature(_specs(metadata.inputs), _specs(metadata.outputs))

    async def _load_upstream(self) -> None:
        """Best effort: Triton refuses loads unless it runs with
        --model-control-mode=explicit; the error then says so."""
        try:
            await self._call(
                lambda c: c.load_model(
                    self.model, client_timeout=self._settings.load_timeout_seconds
                )
            )
        except BackendUnavailable:
            raise
        except SparseServeError as exc:
            raise ModelLoadError(
                f"Triton at {self._settings.url} does not serve model {self.model!r} version "
                f"{self._version} and could not load it ({exc}); run Triton with "
                "--model-control-mode=explicit on the same repository, or load it there"
            ) from exc
        if not await self.ready():
            raise ModelLoadError(
                f"Triton at {self._settings.url} loaded model {self.model!r} but version "
                f"{self._version} is not ready there (its version policy may exclude it)"
            )

    async def ready(self) -> bool:
        """Whether Triton is reachable and serves this model version (never raises
        for an unreachable server: that is a plain no)."""
        try:
            return bool(
                await self._call(
                    lambda c: c.is_model_ready(
                        self.model,
                        self._version,
                        client_timeout=self._settings.control_timeout_seconds,
                    )
                )
            )
        except SparseServeError:
            return False

    async def infer(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> ExecutionRecord:
        started = time.perf_counter_ns()
        tensors = []
        for name, array in inputs.items():
            datatype = "BYTES" if array.dtype == np.object_ else datatype_of(array).name
            tensor = triton.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        requested = [triton.InferRequestedOutput(name) for name in outputs]
        attempts = 1 + self._settings.retries
        for attempt in range(attempts):
            try:
                result = await self._call(
                    lambda c: c.infer(
                        self.model,
                        tensors,
                        model_version=self._version,
                        outputs=requested,
                        client_timeout=self._settings.timeout_seconds,
                    )
                )
                break
            except BackendUnavailable:
                if attempt + 1 == attempts:
                    raise
        outputs_by_name = {name: result.as_numpy(name) for name in outputs}
        return ExecutionRecord(outputs_by_name, self.name, time.perf_counter_ns() - started)

    async def unload(self) -> None:
        """Close the connection. The model stays loaded on Triton: other sparseserve
        replicas may be using it, and Triton owns its own lifecycle."""
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def _call(self, call: Callable[[triton.InferenceServerClient], Awaitable[T]]) -> T:
        """Run one client call and translate its errors into domain errors."""
        client = self._client
        if client is None:
            raise BackendUnavailable(f"model {self.model!r} is not connected to Triton")
        try:
            return await call(client)
        except InferenceServerException as exc:
            raise _domain_error(exc, self._settings.url) from exc
        except TimeoutError as exc:
            raise BackendUnavailable(f"Triton at {self._settings.url} timed out") from exc
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise  # our own caller is cancelled
            # The connection was closed under the call (an unload past its grace period):
            # unreachable, so a fallback may still answer it.
            raise BackendUnavailable(
                f"Triton at {self._settings.url}: the call was cancelled (connection closed)"
            ) from exc


def _domain_error(exc: InferenceServerException, url: str | None) -> SparseServeError:
    status = exc.status() or ""
    message = f"Triton at {url}: {exc.message()}"
    if status in _UNREACHABLE:
        return BackendUnavailable(message)
    if status == "StatusCode.INVALID_ARGUMENT":
        return InvalidInput(message)
    if status == "StatusCode.NOT_FOUND":
        return ModelNotReady(message)
    return InferenceFailed(message)


def _specs(tensors: Sequence[object]) -> tuple[TensorSpec, ...]:
    """ModelMetadata tensors (tritonclient's protobuf) as our TensorSpecs."""
    specs = []
    for tensor in tensors:
        datatype = BY_NAME.get(tensor.datatype)  # type: ignore[attr-defined]
        if datatype is None:
            raise ModelLoadError(f"Triton reports an unknown datatype {tensor.datatype!r}")  # type: ignore[attr-defined]
        specs.append(TensorSpec(tensor.name, datatype, tuple(tensor.shape)))  # type: ignore[attr-defined]
    return tuple(specs)
