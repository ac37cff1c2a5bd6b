"""The one table of failure kinds: how a worker reports each on the wire (gRPC status) and how the
gateway answers a client with it (HTTP status, OpenAI error type). Workers, the gateway's gRPC
client and its HTTP error handler all read it; nothing else maps statuses."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import grpc

RETRY_AFTER_S = 1  # the Retry-After of every 503: overload and lost workers pass within seconds
# An INVALID_ARGUMENT's offending request field (OpenAI's error `param`) rides in this trailing
# metadata key; its details are the message for the client, as the worker's engine wrote it.
PARAM_METADATA_KEY = "pdserve-param"


class Failure(enum.Enum):
    INVALID_REQUEST = "invalid_request"  # the client's input (a field out of range, a prompt too long)
    UNAUTHORIZED = "unauthorized"  # no or a wrong API key
    NOT_FOUND = "not_found"  # an unknown model or route
    TOO_LARGE = "too_large"  # a request body over --max-request-body-bytes
    READ_TIMEOUT = "read_timeout"  # the client did not send its request in time
    OVERLOADED = "overloaded"  # admission refused it: queues full
    UNAVAILABLE = "unavailable"  # no healthy worker, a worker lost or stopped answering, a draining gateway
    KV_LOST = "kv_lost"  # the KV hand-off failed (lease over, peer gone): trying again is safe
    TIMEOUT = "timeout"  # a deadline passed (first token, stall, whole request)
    INCOMPATIBLE = "incompatible"  # two workers cannot exchange KV (layout, transport): a deployment error
    INTERNAL = "internal"  # a bug or a failed device


@dataclass(frozen=True)
class Status:
    grpc_code: grpc.StatusCode | None  # how a worker reports it; None: only the gateway meets it
    http_status: int
    error_type: str  # OpenAI's `error.type` (vLLM's names)

    @property
    def is_retry_later(self) -> bool:
        """A 503: the client may try again after `RETRY_AFTER_S` (Retry-After header)."""
        return self.http_status == 503


TABLE: dict[Failure, Status] = {
    Failure.INVALID_REQUEST: Status(grpc.StatusCode.INVALID_ARGUMENT, 400, "BadRequestError"),
    Failure.UNAUTHORIZED: Status(None, 401, "AuthenticationError"),
    Failure.NOT_FOUND: Status(None, 404, "NotFoundError"),
    Failure.TOO_LARGE: Status(None, 413, "RequestTooLargeError"),
    Failure.READ_TIMEOUT: Status(None, 408, "RequestTimeoutError"),
    Failure.OVERLOADED: Status(grpc.StatusCode.RESOURCE_EXHAUSTED, 503, "ServiceUnavailableError"),
    Failure.UNAVAILABLE: Status(grpc.StatusCode.UNAVAILABLE, 503, "ServiceUnavailableError"),
    Failure.KV_LOST: Status(grpc.StatusCode.ABORTED, 503, "ServiceUnavailableError"),
    Failure.TIMEOUT: Status(grpc.StatusCode.DEADLINE_EXCEEDED, 504, "TimeoutError"),
    Failure.INCOMPATIBLE: Status(grpc.StatusCode.FAILED_PRECONDITION, 500, "InternalServerError"),
    Failure.INTERNAL: Status(grpc.StatusCode.INTERNAL, 500, "InternalServerError"),
}
# Codes a worker call can end with that no worker sends on purpose. CANCELLED: the worker's server
# or the channel to it went away (the gateway's own cancels never surface as errors); a refused
# cluster credential is the deployment's fault, not the client's.
_ALSO_RECEIVED = {
    grpc.StatusCode.CANCELLED: Failure.UNAVAILABLE,
    grpc.StatusCode.UNAUTHENTICATED: Failure.INTERNAL,
    grpc.StatusCode.PERMISSION_DENIED: Failure.INTERNAL,
}
_BY_GRPC_CODE = {s.grpc_code: f for f, s in TABLE.items() if s.grpc_code is not None} | _ALSO_RECEIVED


def grpc_code(failure: Failure) -> grpc.StatusCode:
    """The status a worker aborts an RPC with for `failure`."""
    code = TABLE[failure].grpc_code
    assert code is not None, f"{failure} is the gateway's own and never crosses gRPC"
    return code


def param_metadata(param: str | None) -> tuple[tuple[str, str], ...]:
    """The trailing metadata of an invalid-request abort that names `param`."""
    return ((PARAM_METADATA_KEY, param),) if param else ()


def param_of(error: grpc.aio.AioRpcError) -> str | None:
    """The request field an invalid-request status names (`param_metadata`), if any."""
    for key, value in error.trailing_metadata() or ():
        if key == PARAM_METADATA_KEY and isinstance(value, str):
            return value
    return None


def failure_of(code: grpc.StatusCode) -> Failure:
    """The failure a worker's gRPC status stands for (anything unexpected is INTERNAL)."""
    return _BY_GRPC_CODE.get(code, Failure.INTERNAL)


def failure_of_http(http_status: int) -> Failure:
    """The first kind answered with `http_status` (errors raised with a bare status code)."""
    return next((f for f, s in TABLE.items() if s.http_status == http_status), Failure.INTERNAL)
