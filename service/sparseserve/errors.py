"""The domain errors of sparseserve: one hierarchy, and the one table that maps each to
a status code. Messages are for the client: they name what was expected and what
arrived.

`STATUS` holds gRPC status code *names* so that this module (and the metrics, which
label failures by code) need not import grpc; `sparseserve.server.errors` turns them
into `grpc.StatusCode` in the one interceptor that every RPC goes through.
"""

from __future__ import annotations


class SparseServeError(Exception):
    """Base of every error that reaches a client with a deliberate status."""


class ModelNotFound(SparseServeError):
    """No model (or no such version of a model) in the repository."""


class InvalidModelName(SparseServeError):
    """A model name that is not a plain directory name (e.g. tries `../x`)."""


class ModelNotReady(SparseServeError):
    """The model exists but is loading, unloading or failed to load."""


class InvalidInput(SparseServeError):
    """The request does not match the model's inputs/outputs or the wire format."""


class Overloaded(SparseServeError):
    """Too many requests in flight for this model; retry later."""


class RequestTooLarge(SparseServeError):
    """The request exceeds a size limit of this server (BYTES elements, bytes in flight);
    the message names the limit and the setting that raises it."""


class ModelLoadError(SparseServeError):
    """A model could not be loaded (corrupt file, bad manifest, backend refused it)."""


class OperationNotAllowed(SparseServeError):
    """The request is valid but not in this server's mode (e.g. load while polling)."""


class BackendUnavailable(SparseServeError):
    """The backend that serves the model cannot be reached right now."""


class InferenceFailed(SparseServeError):
    """The backend accepted the inputs but failed while running the model."""


class ShuttingDown(SparseServeError):
    """The server is draining and accepts no new work."""


class ProtocolRestricted(SparseServeError):
    """The RPC's group is restricted and the call lacks its header (Triton's status)."""


class ApiRestricted(SparseServeError):
    """The REST route's group is restricted and the request lacks its header (Triton's
    HTTP endpoint answers 403)."""


class StartupError(Exception):
    """The server cannot start as configured: the repository is missing, a port is taken,
    a model named to load at start is not there or does not load. Never reaches a
    client (there is none yet), so it has no status: `sparseserve serve` prints it as
    one line and exits non-zero."""


# Every error class -> gRPC status code name. The most specific class wins (MRO order).
STATUS: dict[type[SparseServeError], str] = {
    SparseServeError: "INTERNAL",
    ModelNotFound: "NOT_FOUND",
    InvalidModelName: "INVALID_ARGUMENT",
    ModelNotReady: "UNAVAILABLE",
    InvalidInput: "INVALID_ARGUMENT",
    Overloaded: "RESOURCE_EXHAUSTED",
    RequestTooLarge: "RESOURCE_EXHAUSTED",
    ModelLoadError: "FAILED_PRECONDITION",
    OperationNotAllowed: "FAILED_PRECONDITION",
    BackendUnavailable: "UNAVAILABLE",
    InferenceFailed: "INTERNAL",
    ShuttingDown: "UNAVAILABLE",
    # UNAVAILABLE, not PERMISSION_DENIED: what Triton answers, so clients behave the same.
    ProtocolRestricted: "UNAVAILABLE",
    ApiRestricted: "PERMISSION_DENIED",
}


def status_of(error: BaseException) -> str:
    """The status code name for any exception (INTERNAL for ones we did not raise)."""
    for cls in type(error).__mro__:
        code = STATUS.get(cls)
        if code is not None:
            return code
    return "INTERNAL"
