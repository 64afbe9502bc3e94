"""The drain on shutdown: count the calls in progress, refuse new ones once the drain has
begun, and end open streams after the requests they already carry are answered.

Why the server does not leave this to grpc.aio's `server.stop(grace)`: that stops the
transport at once (new connections are refused, new calls on open ones fail before any
handler sees them, health probes included), and once the grace ends it cancels whatever
still runs, so a client sees CANCELLED, which neither clients nor proxies retry. An open
stream (a client's idle ModelStreamInfer) also keeps it waiting for the whole grace.

So the server drains first, with the transport still open: from `Drain.start()` every
new call of sparseserve's services is answered UNAVAILABLE "server is shutting down"
(`ShuttingDown`, retryable; the health service answers NOT_SERVING), calls already
running finish, and each stream stops reading requests, answers those it read, and ends
with that UNAVAILABLE status. Only when no call runs (or the grace is over) does the
transport close: through the process's exit when nothing runs (`server.app.serve`: the
calls the transport holds then fail UNAVAILABLE with their connection, where `stop()`
would cancel them), through `stop()` when calls outlived the grace.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any

from sparseserve.errors import ShuttingDown

SHUTTING_DOWN = "server is shutting down; send the request to another replica"
GRACE_ENDED = (
    "server is shutting down, and its grace period ended before this call finished; "
    "send the request to another replica"
)


class Drain:
    """The calls of sparseserve's services in progress, and the switch that starts the
    drain. Used on the event loop only, so the counts take no lock."""

    def __init__(self) -> None:
        self._active = 0
        self._refused = 0  # calls answered "shutting down" since the drain began
        self._idle: asyncio.Event | None = None  # made by `wait`, so calls cost no Event
        self._started = False
        self._on_start: set[Callable[[], None]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()  # the calls' tasks, for `cut`
        self._cut = False

    @property
    def started(self) -> bool:
        return self._started

    @property
    def active(self) -> int:
        """Calls running now."""
        return self._active

    def admit(self) -> None:
        """Count a new call in; raise `ShuttingDown` once the drain has begun."""
        if self._started:
            self._refused += 1
            raise ShuttingDown(SHUTTING_DOWN)
        self._active += 1
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)

    def release(self) -> None:
        """A call counted in by `admit` has ended (in the task that was admitted)."""
        self._active -= 1
        task = asyncio.current_task()
        if task is not None:
            self._tasks.discard(task)
        if self._active == 0 and self._idle is not None:
            self._idle.set()

    def start(self) -> None:
        """Begin the drain: refuse new calls, tell open streams to stop reading."""
        if self._started:
            return
        self._started = True
        for callback in list(self._on_start):
            callback()

    @property
    def was_cut(self) -> bool:
        """Whether `cut` ended the calls still running: a call cancelled now ends with
        UNAVAILABLE (GRACE_ENDED), which clients retry elsewhere, rather than the
        CANCELLED or INTERNAL that grpc.aio's stop would give it."""
        return self._cut

    def cut(self) -> int:
        """Cancel the calls still running (the grace period is over); return how many."""
        self._cut = True
        tasks = [task for task in self._tasks if not task.done()]
        for task in tasks:
            task.cancel()
        return len(tasks)

    async def wait(self, timeout: float) -> bool:
        """Wait until no call runs; False if `timeout` seconds ran out first. Meant for
        after `start`, when the count can only fall."""
        if self._active == 0:
            return True
        if self._idle is None:
            self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def settle(self, quiet: float, timeout: float) -> bool:
        """After `wait`: keep answering until no call has run or arrived for `quiet`
        seconds; False if `timeout` ran out first (calls still arriving).

        grpc.aio's `stop()` cancels the calls its transport has received but not yet
        handed to a handler. At SIGTERM, calls sent a moment before are in that state
        while no handler counts them, so stopping as soon as the count reaches zero
        cancelled a few (CANCELLED, seen with 8 busy clients). Waiting for the arrivals
        to pause lets those reach a handler and be answered or refused."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            seen = self._refused
            await asyncio.sleep(max(0.0, min(quiet, deadline - loop.time())))
            if self._active == 0 and self._refused == seen:
                return True
            if loop.time() >= deadline:
                return False

    def requests_until_drain(self, requests: AsyncIterable[Any]) -> StreamRequests:
        """A stream's requests, ending (as if the client had closed its side) once the
        drain starts; `cut` then says so."""
        return StreamRequests(requests, self)

    def _listen(self, callback: Callable[[], None]) -> None:
        self._on_start.add(callback)

    def _forget(self, callback: Callable[[], None]) -> None:
        self._on_start.discard(callback)


class StreamRequests:
    """The requests of one stream; see `Drain.requests_until_drain`.

    A read waiting for the client when the drain starts is cancelled (the only way to
    stop waiting on gRPC's reader); a request that had arrived in that same instant is
    then not answered: the stream's UNAVAILABLE status tells the client that the requests
    without an answer were not run and may be sent elsewhere."""

    def __init__(self, requests: AsyncIterable[Any], drain: Drain):
        self._requests: AsyncIterator[Any] = aiter(requests)
        self._drain = drain
        self._reading: asyncio.Task[Any] | None = None
        self._stopping = False
        self.cut = False  # the drain ended the stream, not the client

    def __aiter__(self) -> StreamRequests:
        return self

    async def __anext__(self) -> Any:
        if self._drain.started:
            self.cut = True
            raise StopAsyncIteration
        task = asyncio.current_task()
        assert task is not None
        self._reading = task
        self._drain._listen(self._stop_reading)
        try:
            return await anext(self._requests)
        except asyncio.CancelledError:
            if not self._stopping:
                raise
            task.uncancel()
            self.cut = True
            raise StopAsyncIteration from None
        finally:
            self._drain._forget(self._stop_reading)
            self._reading = None

    def _stop_reading(self) -> None:
        if self._reading is not None and not self._stopping:
            self._stopping = True
            self._reading.cancel()
