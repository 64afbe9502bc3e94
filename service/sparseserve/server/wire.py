"""Request messages as they come off the wire, before a handler sees them.

- **Safe deserialisation.** grpc.aio answers a message its deserializer cannot parse
  with UNKNOWN (unary) or ends a stream with OK, dropping what follows. Every handler's
  deserializer is wrapped so that a bad message becomes a `RefusedMessage` carrying the
  domain error; the unary wrapper raises it (INVALID_ARGUMENT) and ModelStreamInfer
  answers it in the stream, in its place, and reads on.
- **No copies of tensor data.** protobuf copies every `raw_input_contents` entry out of
  the message, and again into a new `bytes` at each access. A large ModelInferRequest is
  therefore split on its top-level fields: the small part (names, shapes, parameters)
  is parsed by protobuf, and each raw tensor stays a `memoryview` of the message gRPC
  handed over, which numpy then views without copying.
- **A budget of request bytes in flight.** Each inference message is counted from when
  gRPC hands it over until its answer is written; one that would take the total past
  the budget is refused at once with RESOURCE_EXHAUSTED, before it is parsed.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sparseserve import protowire
from sparseserve.api import service_pb2
from sparseserve.errors import InvalidInput, Overloaded, SparseServeError
from sparseserve.protocol import grpc_service_pb2 as pb

log = logging.getLogger(__name__)

# Below this size a message is parsed by protobuf whole: copying a few KiB costs less
# than splitting the message in Python (about 1 µs against 5).
ZERO_COPY_MIN_BYTES = 64 * 1024
# How long after the last large request ends its memory is handed back (see
# RequestBytesBudget).
TRIM_DELAY_SECONDS = 0.2
_RAW_INPUT_CONTENTS = 7  # ModelInferRequest.raw_input_contents
M = TypeVar("M")  # a counted message


@dataclass(frozen=True, slots=True)
class RefusedMessage:
    """A message that did not become a request: the error its handler answers with."""

    error: SparseServeError


class InferRequestMessage:
    """A ModelInferRequest whose raw tensors may be views of the received message.

    Offers the fields the servicer and the codec read, with `raw_input_contents` as
    `bytes` or `memoryview`s. `release()` gives its bytes back to the budget (once)."""

    __slots__ = ("_budget", "_charged", "_release", "message", "raw_input_contents", "size")

    def __init__(
        self,
        message: pb.ModelInferRequest,
        raw_input_contents: Sequence[bytes | memoryview],
        size: int = 0,
        release: Callable[[int], None] | None = None,
        budget: RequestBytesBudget | None = None,
    ):
        self.message = message
        self.raw_input_contents = raw_input_contents
        self.size = size
        self._release = release
        self._budget = budget
        self._charged = 0

    model_name = property(lambda self: self.message.model_name)
    model_version = property(lambda self: self.message.model_version)
    id = property(lambda self: self.message.id)
    parameters = property(lambda self: self.message.parameters)
    inputs = property(lambda self: self.message.inputs)
    outputs = property(lambda self: self.message.outputs)

    def charge(self, size: int) -> None:
        """Count `size` more bytes with this request until it is released: its answer,
        held until it is written (a stream's answers wait for the client to read them)."""
        if self._release is not None and self._budget is not None:
            self._budget.hold(size)
            self._charged += size

    def release(self) -> None:
        """The answer is written: this message's bytes leave the budget."""
        release, self._release = self._release, None
        if release is not None:
            release(self.size)
            if self._charged and self._budget is not None:
                self._budget.hold(-self._charged)


class PredictRequestMessage:
    """A `sparseserve.v1` PredictRequest counted in the budget, as a large ModelInferRequest
    is. Offers the message's fields; `release()` gives its bytes back (once)."""

    __slots__ = ("_release", "message", "size")

    def __init__(self, message: Any, size: int, release: Callable[[int], None]):
        self.message = message
        self.size = size
        self._release: Callable[[int], None] | None = release

    name = property(lambda self: self.message.name)
    version = property(lambda self: self.message.version)
    id = property(lambda self: self.message.id)
    inputs = property(lambda self: self.message.inputs)
    outputs = property(lambda self: self.message.outputs)

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release(self.size)


def release(request: object) -> None:
    """Give `request`'s bytes back to the budget, if it holds any (any other object: no-op)."""
    if isinstance(request, (InferRequestMessage, PredictRequestMessage)):
        request.release()


def parse_infer_request(data: bytes) -> InferRequestMessage:
    """A serialized ModelInferRequest -> InferRequestMessage, its raw tensors views of
    `data` when `data` is large. Raises on malformed input (the caller refuses it)."""
    if len(data) < ZERO_COPY_MIN_BYTES:
        message = pb.ModelInferRequest.FromString(data)
        return InferRequestMessage(message, message.raw_input_contents, len(data))
    view = memoryview(data)
    rest: list[memoryview] = []
    raws: list[memoryview] = []
    for field in protowire.fields(view):
        if field.number == _RAW_INPUT_CONTENTS and field.wire_type == protowire.LEN:
            raws.append(view[field.value : field.end])
        else:
            rest.append(view[field.start : field.end])
    message = pb.ModelInferRequest.FromString(b"".join(rest))
    return InferRequestMessage(message, raws, len(data))


def safe_deserializer(
    deserialize: Callable[[bytes], Any] | None, message_type: str
) -> Callable[[bytes], Any]:
    """`deserialize`, turning a parse failure into a `RefusedMessage(InvalidInput)`."""

    def parse(data: bytes) -> Any:
        if deserialize is None:
            return data
        try:
            return deserialize(data)
        except Exception as exc:
            return RefusedMessage(
                InvalidInput(
                    f"the message is not a valid {message_type} ({len(data)} bytes): "
                    f"{exc or type(exc).__name__}"
                )
            )

    return parse


class RequestBytesBudget:
    """The bytes of inference messages the server holds at once, and a bound on them.

    gRPC has already received a message when its deserializer runs, but refusing it
    then still saves its parse and every copy and array made from it, and the memory it
    held goes back at once. A message is admitted whenever nothing else is in flight, so
    one request larger than the budget (but within the message limit) is still served.

    After a large request (at least `trim_after_bytes`), once the large requests have all
    finished, glibc is asked to return its free memory to the system (`malloc_trim`):
    gRPC receives a message in many small buffers spread over per-thread malloc arenas,
    and without a trim the freed pages stay in the process (measured by
    bench/request_memory.py)."""

    def __init__(self, limit_bytes: int, trim_after_bytes: int = 8 * 1024 * 1024):
        self.limit_bytes = limit_bytes
        self.trim_after_bytes = trim_after_bytes
        # admit() runs in gRPC's deserialization, release on the event loop: the lock keeps
        # the count right whichever threads those are.
        self._lock = threading.Lock()
        self.inflight_bytes = 0
        self._large_inflight = 0
        # Built once: admit_stream runs for every stream message.
        self._unary_message = _infer_message(None)
        self._stream_message = _infer_message(self)

    def reserve(self, size: int) -> None:
        """Count `size` bytes of a request (a gRPC message in `admit`; a REST body, weighted
        by what decoding it costs), or raise `Overloaded` if they would pass the budget
        while other requests are held. Give them back with `give_back(size)` once the
        request is answered."""
        with self._lock:
            held = self.inflight_bytes
            if held and held + size > self.limit_bytes:
                raise Overloaded(
                    f"request of {size} bytes refused: the server already holds {held} "
                    f"bytes of requests, and its budget (max_inflight_request_bytes) is "
                    f"{self.limit_bytes}; retry later"
                )
            self.inflight_bytes += size
            if size >= self.trim_after_bytes:
                self._large_inflight += 1

    def give_back(self, size: int) -> None:
        """The bytes of a request counted by `reserve`, answered."""
        self._give_back(size)

    def admit(self, data: bytes) -> pb.ModelInferRequest | InferRequestMessage | RefusedMessage:
        """Parse `data` as a ModelInferRequest and count it, or refuse it. A message under
        `ZERO_COPY_MIN_BYTES` is parsed by protobuf and not counted: a unary call holds
        one at a time, `max_inflight_per_model` bounds how many there are, and the hot
        path of small requests stays as cheap as plain protobuf."""
        if len(data) < ZERO_COPY_MIN_BYTES:
            return _parsed(data, pb.ModelInferRequest.FromString)
        return self._counted(data, self._unary_message, "ModelInferRequest")

    def admit_stream(self, data: bytes) -> InferRequestMessage | RefusedMessage:
        """`admit` for ModelStreamInfer: every message is counted, however small, and its
        answer with it (`InferRequestMessage.charge`) until written. A stream holds a
        window of requests and their answers, for as long as its client does not read,
        and a client may open many streams."""
        return self._counted(data, self._stream_message, "ModelInferRequest")

    def admit_predict(self, data: bytes) -> Any:
        """`admit` for the v1 API's Predict: a message of `ZERO_COPY_MIN_BYTES` or more
        is counted, the same way, or refused."""
        if len(data) < ZERO_COPY_MIN_BYTES:
            return _parsed(data, service_pb2.PredictRequest.FromString, "PredictRequest")

        def message(data: bytes, release: Callable[[int], None]) -> PredictRequestMessage:
            return PredictRequestMessage(
                service_pb2.PredictRequest.FromString(data), len(data), release
            )

        return self._counted(data, message, "PredictRequest")

    def _counted(
        self, data: bytes, message: Callable[[bytes, Callable[[int], None]], M], kind: str
    ) -> M | RefusedMessage:
        """`message(data, give_back)`, its bytes counted; refused if they would pass the
        budget or if `data` does not parse (then given back at once)."""
        size = len(data)
        try:
            self.reserve(size)
        except Overloaded as exc:
            return RefusedMessage(exc)
        try:
            return message(data, self._give_back)
        except Exception as exc:
            self._give_back(size)
            return _not_a_request(size, exc, kind)

    def hold(self, size: int) -> None:
        """Count (or, negative, give back) bytes the server holds for a request already
        admitted: never refused, but later requests see them."""
        with self._lock:
            self.inflight_bytes += size

    def _give_back(self, size: int) -> None:
        with self._lock:
            self.inflight_bytes -= size
            if size < self.trim_after_bytes:
                return
            self._large_inflight -= 1
            if self._large_inflight:
                return
        # The answer is still being written, and gRPC frees the message's buffers only
        # after that: trim a moment later, if no large request has come meanwhile.
        try:
            asyncio.get_running_loop().call_later(TRIM_DELAY_SECONDS, self._trim_if_idle)
        except RuntimeError:  # no event loop (a test): now
            self._trim_if_idle()

    def _trim_if_idle(self) -> None:
        if not self._large_inflight:
            return_free_memory()


def _not_a_request(size: int, error: Exception, kind: str = "ModelInferRequest") -> RefusedMessage:
    return RefusedMessage(
        InvalidInput(f"the message is not a valid {kind} ({size} bytes): {error}")
    )


def _parsed(data: bytes, parse: Callable[[bytes], Any], kind: str = "ModelInferRequest") -> Any:
    """A small message parsed by protobuf, uncounted, or refused."""
    try:
        return parse(data)
    except Exception as exc:
        return _not_a_request(len(data), exc, kind)


def _infer_message(
    budget: RequestBytesBudget | None,
) -> Callable[[bytes, Callable[[int], None]], InferRequestMessage]:
    """Builds a counted InferRequestMessage; with `budget`, one its answer is charged to."""

    def message(data: bytes, release: Callable[[int], None]) -> InferRequestMessage:
        request = parse_infer_request(data)
        return InferRequestMessage(
            request.message, request.raw_input_contents, len(data), release, budget
        )

    return message


_libc: Any = None


def return_free_memory() -> None:
    """Ask glibc to hand the free memory of all its arenas back to the system. Does
    nothing where the C library has no `malloc_trim` (musl, macOS)."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)
