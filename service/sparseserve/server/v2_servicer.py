"""The Open Inference Protocol (KServe v2 / Triton) over gRPC: decode, call the
DataPlane, encode. No logic lives here; errors are raised and mapped by the interceptor.

A family name works wherever a model name does, so that v2 clients can call a family:
ModelInfer runs the variant the traffic policy picks and answers with that variant's
`model_name` and `model_version`; ModelMetadata, ModelConfig and ModelReady describe the
variant the family goes to without a random split draw (its default, the heaviest
variant of its split, or its baseline); ModelStatistics reports every loaded variant of
the family. Repository calls (index, load, unload) take model names only."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable
from functools import partial

import numpy as np

from sparseserve import __version__, codec
from sparseserve.backends.base import TensorSpec
from sparseserve.backends.triton_export import describe_tensors
from sparseserve.controlplane import ControlPlane
from sparseserve.dataplane import Answer, DataPlane
from sparseserve.errors import InvalidInput, SparseServeError
from sparseserve.protocol import grpc_service_pb2 as pb
from sparseserve.protocol import grpc_service_pb2_grpc as pb_grpc
from sparseserve.protocol import model_config_pb2 as mc
from sparseserve.registry import LoadedModel
from sparseserve.server.errors import ServicerContext
from sparseserve.server.wire import InferRequestMessage, RefusedMessage, release

log = logging.getLogger(__name__)

SERVER_NAME = "sparseserve"
# Requests of one ModelStreamInfer stream running or answered-but-unsent at once.
STREAM_WINDOW = 256
EXTENSIONS = ("model_repository", "model_configuration", "statistics")
# BYTES data from this size on is decoded, and BYTES outputs from this many elements on
# are encoded, on the codec thread: each element costs Python work (~0.3 µs), so a
# large tensor would stall every other request on the event loop, while handing over
# costs ~30 µs.
CODEC_THREAD_MIN_BYTES = 64 * 1024
CODEC_THREAD_MIN_ELEMENTS = 16 * 1024
# A stream's answer, and what to hand to the data plane once it is written.
StreamAnswer = tuple[pb.ModelStreamInferResponse, Answer | None]
# A request read from a stream (its bytes count until answered) and its answer to come.
StreamPending = tuple[object, "asyncio.Future[StreamAnswer]"]


# The generated base class is untyped (docs/typing.md); it answers UNIMPLEMENTED for the
# RPCs not defined here.
class V2Servicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """Inference goes to the DataPlane; everything else to the ControlPlane (`control`,
    which the REST adapter shares). The REST adapter also calls the metadata,
    statistics and repository RPCs, without a gRPC context (None), to reuse their
    answers."""

    def __init__(
        self,
        dataplane: DataPlane,
        control: ControlPlane,
        max_bytes_elements: int = codec.DEFAULT_MAX_BYTES_ELEMENTS,
    ):
        self._dataplane = dataplane
        self.control = control
        self._max_bytes_elements = max_bytes_elements

    # -- health and metadata ----------------------------------------------------------

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.control.server_ready())

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: ServicerContext
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.control.model_ready(request.name, request.version))

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: ServicerContext | None
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=__version__, extensions=EXTENSIONS
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: ServicerContext | None
    ) -> pb.ModelMetadataResponse:
        model = self.control.model(request.name, request.version)
        signature = model.signature
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[str(v) for v in self.control.versions(model.name)],
            platform=model.backend.platform,
            inputs=[_tensor_metadata(s) for s in signature.inputs],
            outputs=[_tensor_metadata(s) for s in signature.outputs],
        )

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: ServicerContext | None
    ) -> pb.ModelConfigResponse:
        model = self.control.model(request.name, request.version)
        return pb.ModelConfigResponse(config=_model_config(model))

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: ServicerContext | None
    ) -> pb.ModelStatisticsResponse:
        models = self.control.statistics(request.name, request.version)
        return pb.ModelStatisticsResponse(model_stats=[_statistics(m) for m in models])

    # -- inference --------------------------------------------------------------------

    async def ModelInfer(
        self, request: pb.ModelInferRequest | InferRequestMessage, context: ServicerContext
    ) -> pb.ModelInferResponse:
        response, answer = await self._infer(request)
        if answer.shadow is not None:
            # Shadow runs start once the answer has been sent, never before. (types-grpcio
            # declares the callback's type as a class, not a Protocol: no function fits.)
            context.add_done_callback(
                lambda _: self._dataplane.after_sent(answer)  # type: ignore[arg-type]
            )
        return response

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[
            pb.ModelInferRequest | InferRequestMessage | RefusedMessage
        ],
        context: ServicerContext,
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Many requests on one stream: each runs as soon as it arrives (concurrently with
        the others) and the answers go back in the order of the requests. A failed
        request, or a message that is not a valid request, is answered with its
        `error_message` in its place; the stream goes on."""
        pending: asyncio.Queue[StreamPending | None] = asyncio.Queue(STREAM_WINDOW)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    # A full window blocks reading, so gRPC flow control slows the client.
                    answer = asyncio.ensure_future(self._stream_answer(request))
                    try:
                        await pending.put((request, answer))
                    except asyncio.CancelledError:  # the stream ended while the window was
                        answer.cancel()  # full: this request is in no queue, so it is
                        release(request)  # dropped (and its bytes freed) here
                        raise
            finally:
                await pending.put(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await pending.get()) is not None:
                request, answer = item
                try:
                    response, sent = await answer
                    yield response
                finally:
                    release(request)  # its bytes leave the in-flight budget
                if sent is not None:  # written to the stream: its shadow runs may start
                    self._dataplane.after_sent(sent)
        finally:
            reader.cancel()
            while not pending.empty():
                if (item := pending.get_nowait()) is not None:
                    item[1].cancel()
                    release(item[0])

    async def _stream_answer(
        self, request: pb.ModelInferRequest | InferRequestMessage | RefusedMessage
    ) -> StreamAnswer:
        try:
            if isinstance(request, RefusedMessage):
                raise request.error
            response, answer = await self._infer(request)
            if isinstance(request, InferRequestMessage):  # held until the client reads it
                request.charge(response.ByteSize())
            return pb.ModelStreamInferResponse(infer_response=response), answer
        except SparseServeError as exc:
            return pb.ModelStreamInferResponse(error_message=str(exc)), None
        except Exception as exc:
            log.exception("unexpected error in ModelStreamInfer")
            return pb.ModelStreamInferResponse(error_message=f"internal error: {exc}"), None

    async def _infer(
        self, request: pb.ModelInferRequest | InferRequestMessage
    ) -> tuple[pb.ModelInferResponse, Answer]:
        requested = [output.name for output in request.outputs]
        answer = await self._dataplane.infer(
            request.model_name,
            request.model_version,
            partial(codec.decode_inputs, request, self._max_bytes_elements),
            requested,
            # A message smaller than the threshold cannot carry that much BYTES data.
            decode_in_thread=isinstance(request, InferRequestMessage)
            and request.size >= CODEC_THREAD_MIN_BYTES
            and codec.bytes_payload(request) >= CODEC_THREAD_MIN_BYTES,
        )
        model = answer.model
        # The variant that answered, also when the request named its family.
        response = pb.ModelInferResponse(
            model_name=model.name, model_version=model.version_label, id=request.id
        )
        if _many_strings(answer.outputs.values()):
            await self._dataplane.in_codec_thread(codec.encode_outputs, response, answer.outputs)
        else:
            codec.encode_outputs(response, answer.outputs)
        return response, answer

    # -- repository -------------------------------------------------------------------

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: ServicerContext | None
    ) -> pb.RepositoryIndexResponse:
        rows = self.control.index(ready_only=request.ready)
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(
                    name=r.name, version=r.version, state=r.state.value, reason=r.reason
                )
                for r in rows
            ]
        )

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: ServicerContext | None
    ) -> pb.RepositoryModelLoadResponse:
        _no_repository_parameters(request)
        await self.control.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: ServicerContext | None
    ) -> pb.RepositoryModelUnloadResponse:
        _no_repository_parameters(request)
        await self.control.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()


def _many_strings(arrays: Iterable[np.ndarray]) -> bool:
    """Whether encoding `arrays` costs enough Python work for the codec thread."""
    strings = 0
    for array in arrays:
        if array.dtype.kind in "OSU":
            strings += array.size
    return strings >= CODEC_THREAD_MIN_ELEMENTS


def _no_repository_parameters(request: pb.RepositoryModelLoadRequest) -> None:
    if request.repository_name:
        raise InvalidInput(
            f"repository {request.repository_name!r} is unknown: this server has one "
            "repository; leave repository_name empty"
        )
    # tritonclient's unload_model always sends unload_dependents; sparseserve has no
    # ensembles, so a model never has dependents and the flag changes nothing.
    unknown = [key for key in request.parameters if key != "unload_dependents"]
    if unknown:
        raise InvalidInput(
            f"load/unload parameters are not supported (got {', '.join(unknown)}); "
            "change the model's files in the repository instead"
        )


def _tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=spec.datatype.name, shape=spec.shape
    )


def _model_config(model: LoadedModel) -> mc.ModelConfig:
    """The model's config.pbtxt if it has one, completed from what the model reports."""
    config = mc.ModelConfig()
    if model.source.config is not None:
        config.CopyFrom(model.source.config)
    config.name = model.name
    # The engine that serves, whatever config.pbtxt asked for (an override may differ).
    backend = model.backend
    config.platform = backend.platform
    config.backend = backend.name
    config.parameters["precision"].string_value = backend.precision.value
    config.parameters["sparse_kernel_layers"].string_value = str(backend.sparse_kernel_layers)
    for engine, seconds in backend.candidate_seconds.items():
        config.parameters[f"engine_latency_seconds.{engine}"].string_value = f"{seconds:.6g}"
    describe_tensors(config, model.signature, batched=config.max_batch_size > 0)
    return config


def _statistics(model: LoadedModel) -> pb.ModelStatistics:
    s = model.stats.total()
    duration = pb.StatisticDuration
    return pb.ModelStatistics(
        name=model.name,
        version=model.version_label,
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(
            success=duration(count=s.success_count, ns=s.success_ns),
            fail=duration(count=s.fail_count, ns=s.fail_ns),
            queue=duration(count=s.queue_count, ns=s.queue_ns),
            compute_infer=duration(count=s.compute_count, ns=s.compute_ns),
        ),
    )
