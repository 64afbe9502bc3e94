"""The drain, end to end on a real grpc.aio server with sparseserve's handler wrapping
(`add_mapping_errors` with a `Drain`): calls running when it starts finish, new ones are
refused UNAVAILABLE with the reason, exempt methods still answer, and `wait` returns
once the last call has ended."""

from __future__ import annotations

import asyncio

import grpc

from sparseserve.server.drain import Drain
from sparseserve.server.errors import add_mapping_errors

SERVICE = "sparseserve.test.Drain"


def add_to_server(servicer: dict[str, object], server: grpc.aio.Server) -> None:
    """What generated `add_*Servicer_to_server` code does."""
    handlers = {
        "Slow": grpc.unary_unary_rpc_method_handler(servicer["Slow"]),
        "Live": grpc.unary_unary_rpc_method_handler(servicer["Live"]),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


def test_a_call_in_flight_finishes_new_ones_are_refused_exempt_ones_answer() -> None:
    async def main() -> tuple[bytes, grpc.aio.AioRpcError, bytes, bool, bool]:
        release = asyncio.Event()
        started = asyncio.Event()

        async def slow(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            started.set()
            await release.wait()
            return b"done"

        async def live(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return b"live"

        drain = Drain()
        server = grpc.aio.server()
        add_mapping_errors(
            add_to_server,
            {"Slow": slow, "Live": live},
            server,
            drain,
            frozenset({f"/{SERVICE}/Live"}),
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                running = asyncio.ensure_future(
                    channel.unary_unary(f"/{SERVICE}/Slow")(b"x", timeout=10)
                )
                await asyncio.wait_for(started.wait(), 10)
                drain.start()
                idle_before = await drain.wait(0.05)  # the slow call still runs
                try:
                    await channel.unary_unary(f"/{SERVICE}/Slow")(b"x", timeout=10)
                    raise AssertionError("a call during the drain was served")
                except grpc.aio.AioRpcError as exc:
                    refused = exc
                exempt = await channel.unary_unary(f"/{SERVICE}/Live")(b"x", timeout=10)
                release.set()
                answer = await running
                idle_after = await drain.wait(10)
        finally:
            await server.stop(None)
        return answer, refused, exempt, idle_before, idle_after

    answer, refused, exempt, idle_before, idle_after = asyncio.run(main())
    assert answer == b"done"
    assert refused.code() is grpc.StatusCode.UNAVAILABLE
    assert "server is shutting down" in (refused.details() or "")
    assert exempt == b"live"
    assert not idle_before
    assert idle_after


def test_settle_waits_for_refused_arrivals_to_pause() -> None:
    """Once nothing runs, `settle` returns only after `quiet` seconds without a new
    arrival, and gives up (False) at its timeout while calls keep arriving."""
    from sparseserve.errors import ShuttingDown

    def refuse(drain: Drain) -> None:
        try:
            drain.admit()
        except ShuttingDown:
            return
        raise AssertionError("admitted during the drain")

    async def main() -> tuple[bool, float, bool]:
        loop = asyncio.get_running_loop()
        drain = Drain()
        drain.start()
        arrivals = [loop.call_later(delay, refuse, drain) for delay in (0.05, 0.1, 0.15)]
        began = loop.time()
        quiet = await drain.settle(quiet=0.1, timeout=2.0)
        waited = loop.time() - began

        busy = Drain()
        busy.start()
        stop = loop.time() + 0.6

        def keep_arriving() -> None:
            refuse(busy)
            if loop.time() < stop:
                loop.call_later(0.02, keep_arriving)

        keep_arriving()
        settled = await busy.settle(quiet=0.1, timeout=0.3)
        for arrival in arrivals:
            arrival.cancel()
        return quiet, waited, settled

    quiet, waited, settled = asyncio.run(main())
    assert quiet and 0.2 <= waited < 1.5  # past the last arrival (0.15 s) plus a pause
    assert not settled


def test_a_cancellation_nobody_asked_the_call_for_is_answered_internal() -> None:
    """A handler awaits something another task cancels (as a connection to an upstream
    closed under its call did): the CancelledError that comes up is not the call's own.
    Re-raised, grpc.aio would take the call for cancelled and never answer it; the
    client gets INTERNAL at once, and calls after it are served."""

    async def main() -> tuple[grpc.aio.AioRpcError, float, bytes]:
        async def stray(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            upstream: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_later(0.01, upstream.cancel)
            return await upstream

        async def live(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return b"live"

        server = grpc.aio.server()
        add_mapping_errors(
            add_to_server, {"Slow": stray, "Live": live}, server, Drain(), frozenset()
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                started = asyncio.get_running_loop().time()
                try:
                    await channel.unary_unary(f"/{SERVICE}/Slow")(b"x", timeout=10)
                    raise AssertionError("the call was answered OK")
                except grpc.aio.AioRpcError as exc:
                    error = exc
                took = asyncio.get_running_loop().time() - started
                after = await channel.unary_unary(f"/{SERVICE}/Live")(b"x", timeout=10)
        finally:
            await server.stop(None)
        return error, took, after

    error, took, after = asyncio.run(main())
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "was cancelled" in (error.details() or "")
    assert took < 5
    assert after == b"live"
