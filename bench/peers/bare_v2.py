"""The least a Python v2 gRPC server can do, for bench/grpc_floor.py.

Serves ModelInfer (and ModelReady, for the benchmark's readiness check) with nothing
around it: no routing, validation, metrics or statistics. `--model PATH` runs the ONNX
model inline in the handler (raw bytes -> np.frombuffer -> session.run -> raw bytes;
`--runs 2` runs it twice, to see what a run costs right after another);
without it, every request is answered with the same all-zero output, so what is left is
gRPC and protobuf alone. `--sweep-bytes N` writes N bytes of memory before each such
answer: a model's memory traffic without the model. `--transport grpclib` serves with
grpclib (HTTP/2 in pure Python) instead of grpcio, to see whether another gRPC stack
has a lower floor. `--sparseserve REPOSITORY` (thread-pool transport only) is a
prototype instead: sparseserve's own request path (`V2Servicer`, the DataPlane, the
registry; no metrics port) driven synchronously from grpc's handler threads, which works
only for models that run inline and unbatched, and is not thread-safe (statistics may
lose counts). Run with the project's venv (it uses sparseserve's stubs):

    python bare_v2.py --transport aio|sync|grpclib [--model PATH | --sparseserve REPO] \
        [--runs N] [--sweep-bytes N] [--interceptor] [--threads N] --port P
"""

from __future__ import annotations

import argparse
import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import onnxruntime as ort

from sparseserve.protocol import grpc_service_pb2 as pb
from sparseserve.protocol import grpc_service_pb2_grpc as pb_grpc


class Answerer:
    """Builds the ModelInferResponse for a request: the model's output, or zeros (after
    writing `sweep_bytes` of memory, to see what a model's memory traffic alone costs)."""

    def __init__(
        self, model: str | None, output_shape: tuple[int, ...], sweep_bytes: int = 0, runs: int = 1
    ):
        self.runs = runs
        self.sweep = np.zeros(sweep_bytes, dtype=np.uint8) if sweep_bytes else None
        self.session: ort.InferenceSession | None = None
        if model is not None:
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
            self.input = self.session.get_inputs()[0].name
            self.output = self.session.get_outputs()[0].name
        self.zeros = np.zeros(output_shape, dtype=np.float32)

    def answer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        if self.session is None:
            if self.sweep is not None:
                self.sweep += 1
            result = self.zeros
        else:
            tensor = request.inputs[0]
            array = np.frombuffer(request.raw_input_contents[0], dtype=np.float32)
            feeds = {self.input: array.reshape(tuple(tensor.shape))}
            for _ in range(self.runs):
                result = self.session.run([self.output], feeds)[0]
        response = pb.ModelInferResponse(
            model_name=request.model_name, model_version="1", id=request.id
        )
        response.outputs.add(name="output", datatype="FP32", shape=result.shape)
        response.raw_output_contents.append(result.tobytes())
        return response


class SparseServePath:
    """sparseserve's request path without its gRPC server: for the thread-pool server,
    and for bench/grpc_floor.py to time in-process."""

    def __init__(self, repository: str):
        from sparseserve.server.app import SparseServeServer
        from sparseserve.server.v2_servicer import V2Servicer
        from sparseserve.settings import Settings

        settings = Settings(
            repository=repository, metrics_port=None, onnxruntime={"intra_op_threads": 1}
        )
        self.server = SparseServeServer(settings)
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.server.registry.load_startup_models())
        self.servicer = V2Servicer(self.server.dataplane, self.server.control)

    def close(self) -> None:
        self.loop.run_until_complete(self.server.registry.close())
        self.loop.close()

    def answer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        # An inline, unbatched model never suspends the coroutine: run it to its end here.
        coroutine = self.servicer._infer(request)
        try:
            coroutine.send(None)
        except StopIteration as done:
            return done.value[0]
        coroutine.close()
        raise RuntimeError("the request had to wait for the event loop: not an inline model")


class AioServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, answerer: Answerer | SparseServePath):
        self.answerer = answerer

    async def ModelInfer(self, request, context):
        return self.answerer.answer(request)

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=True)


class SyncServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, answerer: Answerer | SparseServePath):
        self.answerer = answerer

    def ModelInfer(self, request, context):
        return self.answerer.answer(request)

    def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=True)


class PassThrough(grpc.aio.ServerInterceptor):
    """Wraps each unary handler in a try/except, as an error-mapping interceptor does
    (handlers cached per method); what it costs is grpc.aio running the chain per call."""

    def __init__(self) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method not in self._wrapped:
            handler = await continuation(handler_call_details)
            inner = handler.unary_unary

            async def call(request, context):
                try:
                    return await inner(request, context)
                except LookupError:
                    await context.abort(grpc.StatusCode.NOT_FOUND, "not found")

            self._wrapped[method] = grpc.unary_unary_rpc_method_handler(
                call,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return self._wrapped[method]


async def serve_aio(answerer: Answerer | SparseServePath, port: int, interceptor: bool) -> None:
    server = grpc.aio.server(interceptors=[PassThrough()] if interceptor else None)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(AioServicer(answerer), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def serve_sync(answerer: Answerer | SparseServePath, port: int, threads: int) -> None:
    server = grpc.server(ThreadPoolExecutor(threads))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(SyncServicer(answerer), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


async def serve_grpclib(answerer: Answerer, port: int) -> None:
    """grpclib: gRPC over HTTP/2 in pure Python (h2) on one asyncio loop, no grpc core."""
    from grpclib.const import Cardinality, Handler
    from grpclib.server import Server

    service = "/inference.GRPCInferenceService/"

    class GrpclibServicer:
        async def model_infer(self, stream) -> None:
            await stream.send_message(answerer.answer(await stream.recv_message()))

        async def model_ready(self, stream) -> None:
            await stream.recv_message()
            await stream.send_message(pb.ModelReadyResponse(ready=True))

        def __mapping__(self) -> dict[str, Handler]:
            unary = Cardinality.UNARY_UNARY
            return {
                service + "ModelInfer": Handler(
                    self.model_infer, unary, pb.ModelInferRequest, pb.ModelInferResponse
                ),
                service + "ModelReady": Handler(
                    self.model_ready, unary, pb.ModelReadyRequest, pb.ModelReadyResponse
                ),
            }

    server = Server([GrpclibServicer()])
    await server.start("127.0.0.1", port)
    await server.wait_closed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transport", choices=("aio", "sync", "grpclib"), required=True)
    parser.add_argument("--model", help="ONNX model to run inline (default: answer zeros)")
    parser.add_argument("--sparseserve", help="repository: sparseserve's request path (sync)")
    parser.add_argument("--output-shape", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--interceptor", action="store_true", help="aio: a pass-through one")
    parser.add_argument("--sweep-bytes", type=int, default=0, help="no model: bytes written")
    parser.add_argument("--runs", type=int, default=1, help="--model: runs per request")
    parser.add_argument("--threads", type=int, default=4, help="sync: handler threads")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    if args.sparseserve and args.transport != "sync":
        parser.error("--sparseserve needs --transport sync")
    answerer = (
        SparseServePath(args.sparseserve)
        if args.sparseserve
        else Answerer(args.model, tuple(args.output_shape), args.sweep_bytes, args.runs)
    )
    if args.transport == "aio":
        asyncio.run(serve_aio(answerer, args.port, args.interceptor))
    elif args.transport == "grpclib":
        asyncio.run(serve_grpclib(answerer, args.port))
    else:
        serve_sync(answerer, args.port, args.threads)


if __name__ == "__main__":
    main()
