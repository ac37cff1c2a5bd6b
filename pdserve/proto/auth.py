"""Every gRPC call between pdserve's processes is authenticated here, in one place. The caller
signs (method, time, caller name) with the cluster secret into one metadata entry; each worker's
server interceptor checks it before anything else runs (the request is not even read) and refuses
the call with UNAUTHENTICATED otherwise.

Why a shared cluster secret and not mTLS: mTLS needs a CA, a certificate per worker issued and
delivered to Ray actors on every host, and rotation; pdserve has no PKI and Ray already carries
the worker specs, so one secret made at `pdserve serve` (or PDSERVE_CLUSTER_SECRET, for several
gateways) is the whole set-up. TLS would also tax the gRPC KV transport with encryption and still
not cover the NCCL or CUDA IPC data planes. What mTLS gives that this does not: confidentiality
and integrity against someone who can read or alter the network (docs/security.md).

Why a signature and not the secret itself as a bearer token: the secret never crosses the wire.
A prefill worker dials the decode worker it is sent to; a bearer token would hand the secret to
whatever answered there, and the same secret signs registry entries. A signature is good only for
one method, within MAX_CLOCK_SKEW_S of its time."""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections import namedtuple
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from pdserve.proto.cluster_secret import ClusterSecret

logger = logging.getLogger(__name__)
METADATA_KEY = "pdserve-auth"
PURPOSE = "grpc-call"
VERSION = "v1"
MAX_CLOCK_SKEW_S = 300.0  # a signature's age (or lead) this side's clock accepts; NTP keeps hosts far closer
LOG_INTERVAL_S = 60.0
_CALLER = re.compile(r"[A-Za-z0-9_.-]{1,64}")


# ---- the credential ---------------------------------------------------------------------------


def sign_call(secret: ClusterSecret, method: str, caller: str, now: float | None = None) -> str:
    """`v1:<unix time>:<caller>:<hmac>`, good for calls of `method` only."""
    timestamp = int(time.time() if now is None else now)
    return f"{VERSION}:{timestamp}:{caller}:{secret.sign(PURPOSE, _message(method, timestamp, caller))}"


def check_call(secret: ClusterSecret, method: str, credential: str | None, now: float | None = None) -> str | None:
    """None when `credential` is valid for `method`; else why not (said to the caller: no secrets in it)."""
    if credential is None:
        return f"no {METADATA_KEY} credential: every call to a pdserve worker must be signed with the cluster secret"
    parts = credential.split(":")
    if len(parts) != 4 or parts[0] != VERSION or not parts[1].isdigit() or not _CALLER.fullmatch(parts[2]):
        return f"malformed {METADATA_KEY} credential"
    timestamp, caller, signature = int(parts[1]), parts[2], parts[3]
    if not secret.verify(PURPOSE, _message(method, timestamp, caller), signature):
        return "bad signature: not signed with this cluster's secret, or for another method"
    skew = (time.time() if now is None else now) - timestamp
    if abs(skew) > MAX_CLOCK_SKEW_S:
        return f"credential signed {skew:+.0f} s from this worker's clock (limit {MAX_CLOCK_SKEW_S:g} s): replayed, or clocks out of sync"
    return None


def caller_of(context: grpc.aio.ServicerContext) -> str:
    """Who signed this (already checked) call: the name the caller signed, e.g. a gateway's."""
    credential = _credential(context.invocation_metadata())
    return credential.split(":")[2] if credential else ""


def default_caller(role: str) -> str:
    """`role-host-pid`, in the characters a caller name may use."""
    name = f"{role}-{socket.gethostname()}-{os.getpid()}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[-64:]


def _message(method: str, timestamp: int, caller: str) -> bytes:
    return f"{method}|{timestamp}|{caller}".encode()


def _credential(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == METADATA_KEY:
            return value if isinstance(value, str) else None
    return None


# ---- the server side ----------------------------------------------------------------------------


class ServerAuth(grpc.aio.ServerInterceptor):
    """First interceptor of every worker's server: an unauthenticated call runs nothing of ours."""

    def __init__(self, secret: ClusterSecret) -> None:
        self.secret = secret
        self._num_refused = 0
        self._logged_at = -LOG_INTERVAL_S

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        reason = check_call(self.secret, details.method, _credential(details.invocation_metadata))
        if reason is None:
            return await continuation(details)
        self._log(details.method, reason)
        return _refusal(reason)

    def _log(self, method: str, reason: str) -> None:
        """The first refusal, then one line a minute at most: a flood must not flood the log."""
        self._num_refused += 1
        now = time.monotonic()
        if now - self._logged_at >= LOG_INTERVAL_S:
            logger.warning("refused %d unauthenticated gRPC call(s); latest: %s: %s", self._num_refused, method, reason)
            self._num_refused, self._logged_at = 0, now


def _refusal(reason: str) -> grpc.RpcMethodHandler:
    """One handler for every kind of call: as a request stream it never reads the request."""

    async def refuse(request_iterator: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    return grpc.stream_unary_rpc_method_handler(refuse)


# ---- the client side ----------------------------------------------------------------------------


class _Signer:
    def __init__(self, secret: ClusterSecret, caller: str) -> None:
        if not _CALLER.fullmatch(caller):
            raise ValueError(f"caller name {caller!r} must match {_CALLER.pattern}")
        self.secret = secret
        self.caller = caller

    def metadata(self, method: str | bytes, metadata: Sequence[tuple[str, str | bytes]] | None) -> list[tuple[str, str | bytes]]:
        method = method.decode() if isinstance(method, bytes) else method
        return [*(metadata or ()), (METADATA_KEY, sign_call(self.secret, method, self.caller))]

    def details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*self.metadata(details.method, details.metadata))
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready)


# grpc.aio files an interceptor under the first call kind it implements: one class per kind.
class _UnaryUnary(_Signer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Callable, details: grpc.aio.ClientCallDetails, request: object) -> object:
        return await continuation(self.details(details), request)


class _UnaryStream(_Signer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Callable, details: grpc.aio.ClientCallDetails, request: object
    ) -> object:
        return await continuation(self.details(details), request)


class _StreamUnary(_Signer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self, continuation: Callable, details: grpc.aio.ClientCallDetails, requests: object
    ) -> object:
        return await continuation(self.details(details), requests)


class _StreamStream(_Signer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self, continuation: Callable, details: grpc.aio.ClientCallDetails, requests: object
    ) -> object:
        return await continuation(self.details(details), requests)


def channel(address: str, secret: ClusterSecret, caller: str, options: Sequence[tuple[str, object]] = ()) -> grpc.aio.Channel:
    """A grpc.aio channel whose every call is signed as `caller`."""
    interceptors = [kind(secret, caller) for kind in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]
    return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)


_BlockingDetails = namedtuple("_BlockingDetails", "method timeout metadata credentials wait_for_ready compression")


class _BlockingSigner(
    _Signer,
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def _signed(self, details: grpc.ClientCallDetails) -> _BlockingDetails:
        return _BlockingDetails(
            details.method,
            details.timeout,
            self.metadata(details.method, details.metadata),
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation: Callable, details: grpc.ClientCallDetails, request: object) -> object:
        return continuation(self._signed(details), request)

    def intercept_unary_stream(self, continuation: Callable, details: grpc.ClientCallDetails, request: object) -> object:
        return continuation(self._signed(details), request)

    def intercept_stream_unary(self, continuation: Callable, details: grpc.ClientCallDetails, requests: object) -> object:
        return continuation(self._signed(details), requests)

    def intercept_stream_stream(self, continuation: Callable, details: grpc.ClientCallDetails, requests: object) -> object:
        return continuation(self._signed(details), requests)


def blocking_channel(
    address: str, secret: ClusterSecret, caller: str, options: Sequence[tuple[str, object]] = ()
) -> grpc.Channel:
    """A synchronous channel whose every call is signed as `caller` (scripts, tests)."""
    return grpc.intercept_channel(grpc.insecure_channel(address, options=list(options)), _BlockingSigner(secret, caller))


# ---- proofs: a server shows that it holds the secret too --------------------------------------

STATUS_PROOF = "worker-status"  # a worker's GetStatus answer: the gateway routes only to proven workers


def prove(secret: ClusterSecret, purpose: str, nonce: bytes, identity: str) -> str:
    """The answer to a verifier's fresh `nonce`: binds it to who answers (`identity`)."""
    return secret.sign(purpose, nonce + b"|" + identity.encode())


def is_proven(secret: ClusterSecret, purpose: str, nonce: bytes, identity: str, proof: str) -> bool:
    return secret.verify(purpose, nonce + b"|" + identity.encode(), proof)
