"""ModelStreamInfer through tritonclient's streaming API: answers arrive in request order,
equal the unary answers, a failed request is answered in-stream and the stream goes on,
and requests on one stream run concurrently."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import service_pb2, service_pb2_grpc

from sparseserve.client.server_process import ServerProcess
from sparseserve.server.v2_servicer import STREAM_WINDOW
from tests.scrape import inflight

pytestmark = pytest.mark.integration


def _input(x: np.ndarray, name: str = "input", module=triton):
    tensor = module.InferInput(name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def test_stream_answers_in_order_and_match_unary(server: ServerProcess) -> None:
    rng = np.random.default_rng(11)
    xs = [rng.standard_normal((1 + i % 3, 64)).astype(np.float32) for i in range(30)]
    answers: queue.Queue = queue.Queue()
    with triton.InferenceServerClient(server.grpc_url) as client:
        expected = [client.infer("mlp", [_input(x)]).as_numpy("output") for x in xs]
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        for i, x in enumerate(xs):
            client.async_stream_infer("mlp", [_input(x)], request_id=str(i))
        received = [answers.get(timeout=30) for _ in xs]
        client.stop_stream()
    for i, (result, error) in enumerate(received):
        assert error is None
        assert result.get_response().id == str(i)
        assert np.array_equal(result.as_numpy("output"), expected[i])


def test_a_failed_request_is_answered_in_stream_and_the_stream_goes_on(
    server: ServerProcess,
) -> None:
    good = np.ones((1, 64), np.float32)
    bad = np.ones((1, 63), np.float32)
    answers: queue.Queue = queue.Queue()
    with triton.InferenceServerClient(server.grpc_url) as client:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer("mlp", [_input(good)], request_id="first")
        client.async_stream_infer("mlp", [_input(bad)], request_id="wrong-shape")
        client.async_stream_infer("no-such-model", [_input(good)], request_id="unknown")
        client.async_stream_infer("mlp", [_input(good)], request_id="last")
        received = [answers.get(timeout=30) for _ in range(4)]
        client.stop_stream()
    (first, e1), (_, e2), (_, e3), (last, e4) = received
    assert e1 is None and first.get_response().id == "first"
    assert "expects shape [-1, 64]" in str(e2)
    assert "unknown model 'no-such-model'" in str(e3)
    assert e4 is None and last.get_response().id == "last"


def test_requests_on_one_stream_run_concurrently(server: ServerProcess) -> None:
    """Two slow requests on one stream are in the server at the same time: it does not
    wait for an answer before starting the next request. Seen in the server's own
    in-flight gauge, polled while the stream runs (a wall-clock comparison would depend
    on free cores, which a loaded machine does not have)."""
    x = np.ones((4096, 512), np.float32)  # about half a second of work here
    seen: list[float] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            seen.append(inflight(server, "slow"))
            time.sleep(0.01)

    async def run(count: int) -> None:
        async def requests() -> AsyncIterator[dict]:
            for i in range(count):
                yield {"model_name": "slow", "inputs": [_input(x, "x", triton_aio)],
                       "request_id": str(i)}  # fmt: skip

        async with triton_aio.InferenceServerClient(server.grpc_url) as client:
            ids = []
            async for result, error in client.stream_infer(requests()):
                assert error is None
                ids.append(result.get_response().id)
                if len(ids) == count:
                    break
            assert ids == [str(i) for i in range(count)]

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        asyncio.run(run(2))
    finally:
        done.set()
        poller.join()
    assert max(seen) == 2, f"at most {max(seen):.0f} of the 2 requests were in the server"


def test_an_undecodable_message_is_answered_in_its_place_and_the_stream_goes_on(
    server: ServerProcess,
) -> None:
    """Bytes that are no ModelInferRequest, between good requests on one stream: the
    stream answers it with an error_message in its place and answers the requests after
    it (grpc.aio alone would end the stream with OK and drop them)."""
    good = service_pb2.ModelInferRequest(model_name="mlp", id="good")
    good.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    good.raw_input_contents.append(np.ones((1, 64), np.float32).tobytes())
    messages = [
        good.SerializeToString(),
        b"\x0a\xff\xff\xff\xff\x0f",  # model_name whose length runs past the end
        good.SerializeToString(),
        b"\xff" * 8,
        good.SerializeToString(),
    ]
    with grpc.insecure_channel(server.grpc_url) as channel:
        call = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            response_deserializer=service_pb2.ModelStreamInferResponse.FromString,
        )
        answers = list(call(iter(messages), timeout=30))
    assert len(answers) == len(messages)
    for index in (0, 2, 4):
        assert answers[index].error_message == ""
        assert answers[index].infer_response.id == "good"
    for index in (1, 3):
        assert "not a valid ModelInferRequest" in answers[index].error_message


def test_a_stream_cancelled_with_its_window_full_frees_every_request_byte(
    start_server, repository
) -> None:
    """A client sends 400 requests on one stream (more than the server's window of 256
    reads ahead) to a slow model and cancels the stream. Every request the server read
    leaves the in-flight byte budget, including the one that waited for room in the
    full window (it once stayed counted for ever: from then on a request larger than
    what was left of the budget, admitted only on an idle server, was refused even
    there)."""
    budget = 32 * 1024 * 1024
    server = start_server(
        repository, "--max-inflight-request-bytes", str(budget), "--max-inflight-per-model", "1000"
    )
    over_budget = _input(np.zeros((budget // 16 + 1024, 4), np.float32), "x")

    def probe(client: triton.InferenceServerClient) -> str:
        try:
            client.infer("latest", [over_budget], client_timeout=30)
            return "OK"
        except triton.InferenceServerException as exc:
            return f"{exc.status()}: {exc.message()}"

    with triton.InferenceServerClient(server.grpc_url) as client:
        assert probe(client) == "OK"  # admitted: nothing else is in flight
        answers: list[object] = []
        client.start_stream(callback=lambda result, error: answers.append(error or result))
        rows = _input(np.ones((40, 512), np.float32), "x")  # 80 KiB: counted
        for _ in range(400):
            client.async_stream_infer("slow", [rows])
        # The server reads until its window is full: the window's requests, the one
        # whose answer it awaits, and the one waiting for room all run.
        full = STREAM_WINDOW + 2
        deadline = time.monotonic() + 30
        while (running := inflight(server, "slow")) < full and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running == full, "the window never filled"
        client.stop_stream(cancel_requests=True)
        deadline = time.monotonic() + 30  # the runs already started finish first
        while (outcome := probe(client)) != "OK" and time.monotonic() < deadline:
            time.sleep(0.5)
        assert outcome == "OK", outcome


def test_a_stream_whose_answers_are_never_read_holds_no_more_than_the_budget(
    start_server, repository
) -> None:
    """A client sends small requests (under the 64 KiB from which a unary message is
    counted) on a stream and never reads an answer. Its requests and their unread
    answers count against max_inflight_request_bytes: past the budget, other clients'
    counted requests are refused RESOURCE_EXHAUSTED (they were not counted at all: 30
    such streams took a server past 1.2 GB whatever its budget); once the stream is
    cancelled, everything it held is given back."""
    budget = 4 * 1024 * 1024
    server = start_server(repository, "--max-inflight-request-bytes", str(budget))
    rows = np.ones((3800, 4), np.float32)  # 60 KB, answered with as much
    request = service_pb2.ModelInferRequest(
        model_name="latest", raw_input_contents=[rows.tobytes()]
    )
    request.inputs.add(name="x", datatype="FP32", shape=rows.shape)
    probe = _input(np.ones((400, 64), np.float32))  # 100 KB: counted

    def probe_outcome() -> str:
        with triton.InferenceServerClient(server.grpc_url) as client:
            try:
                client.infer("mlp", [probe], client_timeout=10)
                return "OK"
            except triton.InferenceServerException as exc:
                return f"{exc.status()}: {exc.message()}"

    async def hog() -> tuple[str, str]:
        async with grpc.aio.insecure_channel(server.grpc_url) as channel:
            call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer()

            async def send() -> None:
                for _ in range(300):  # 18 MB of requests, as much of answers
                    await call.write(request)

            sender = asyncio.create_task(send())
            await asyncio.sleep(3)  # the server reads what its window and the budget take
            held = await asyncio.to_thread(probe_outcome)
            call.cancel()
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        deadline = time.monotonic() + 10
        while (after := await asyncio.to_thread(probe_outcome)) != "OK":
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        return held, after

    held, after = asyncio.run(hog())
    assert held.startswith("StatusCode.RESOURCE_EXHAUSTED"), held
    assert "max_inflight_request_bytes" in held
    assert after == "OK", after
    # A client cancelling its stream is no server error (grpc logged one with a traceback).
    assert "ExecuteBatchError" not in server.log()
