"""The KV hand-off's control plane over gRPC (`pdserve.KVTransfer`): the decode worker's servicer
(handshake with layout check, transport choice and proof of the cluster secret, begin, commit,
abandon, plus the entry points of the gRPC and NCCL data halves) and the prefill worker's client,
which signs every call and hands KV only to a receiver that proved it holds the secret. Every
call has a deadline."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from pdserve.kvtransfer.layout import KVLayout, KVLayoutMismatchError
from pdserve.kvtransfer.receiver import KVCommitInfo, KVReceiver
from pdserve.kvtransfer.transport import (
    TRANSPORTS,
    Endpoint,
    KVReceiveHalf,
    KVTransferError,
    NoCommonTransportError,
    UnprovenPeerError,
    choose,
    status_code_name,
)
from pdserve.proto import GRPC_OPTIONS, auth
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.proto.cluster_secret import ClusterSecret
from pdserve.proto.convert import logprobs_from_proto, logprobs_to_proto

logger = logging.getLogger(__name__)
HANDSHAKE_PROOF = "kv-handshake"
REFUSAL_PROOF = "kv-handshake-refusal"  # a refused handshake's message: proven, or not repeated
PROOF_KEY = "pdserve-proof"  # trailing metadata of a refused handshake
NONCE_BYTES = 16
MAX_SENDER_ID_CHARS = 128
MAX_SENDERS = 1024  # handshaken senders remembered; one forgotten handshakes again
MAX_REASON_CHARS = 512


# on_begin(transfer_id, sender_id, may_keep): the receiver's owner learns who took a reservation
# and, before that sender learns the blocks, may keep the prompt's first blocks it already holds
# from it (`KVReceiver.keep_present`; only if `may_keep`: the sender said it sends the rest only).
OnBegin = Callable[[str, str, bool], Awaitable[None]]


class KVTransferServicer(pb_grpc.KVTransferServicer):
    """Serves one decode worker's `KVReceiver` to the prefill workers that hand it KV."""

    def __init__(
        self,
        receiver: KVReceiver,
        endpoint: Endpoint,
        accepted: list[str],
        secret: ClusterSecret,
        on_begin: OnBegin | None = None,
    ) -> None:
        self.receiver = receiver
        self.on_begin = on_begin
        self.endpoint = endpoint
        self.accepted = accepted
        self.secret = secret
        self.halves: dict[str, KVReceiveHalf] = {name: TRANSPORTS[name].receiver(receiver, endpoint) for name in accepted}
        self._sender_transports: OrderedDict[str, str] = OrderedDict()  # sender_id -> the transport agreed in its handshake

    def close(self) -> None:
        for half in self.halves.values():
            half.close()

    async def Handshake(self, request: pb.HandshakeRequest, context: grpc.aio.ServicerContext) -> pb.HandshakeResponse:
        try:
            if not 0 < len(request.sender_id) <= MAX_SENDER_ID_CHARS:
                raise ValueError(f"sender_id must have 1 to {MAX_SENDER_ID_CHARS} characters")
            mismatches = layout_from_proto(request.layout).mismatches(self.receiver.layout)  # the sender's view
            if mismatches:
                raise KVLayoutMismatchError(mismatches)
            sender = endpoint_from_proto(request.endpoint)
            name = choose(list(request.transports), self.accepted, sender, self.endpoint)
            params = await asyncio.to_thread(self.halves[name].accept, request.sender_id, sender)
        except (ValueError, RuntimeError) as error:
            await self._refuse_handshake(context, request.nonce, error)
        self._remember(request.sender_id, name)
        logger.info("KV handshake with %s: transport %s", request.sender_id, name)
        return pb.HandshakeResponse(
            receiver_id=self.receiver.receiver_id,
            layout=layout_to_proto(self.receiver.layout),
            transport=name,
            params=params,
            proof=auth.prove(self.secret, HANDSHAKE_PROOF, request.nonce, self.receiver.receiver_id),
        )

    async def Begin(self, request: pb.BeginRequest, context: grpc.aio.ServicerContext) -> pb.BeginResponse:
        name = await self._transport_of(request.sender_id, context)
        await _check_caller(request.sender_id, context)
        try:
            self.receiver.begin(request.transfer_id, request.sender_id, request.num_blocks, TRANSPORTS[name].is_device_writer)
            if self.on_begin is not None:
                await self.on_begin(request.transfer_id, request.sender_id, request.accepts_present_blocks)
            remaining, block_ids, num_present = self.receiver.to_write(request.transfer_id, request.sender_id)
        except (KeyError, ValueError) as error:
            await _abort(context, error)
        return pb.BeginResponse(lease_remaining_s=remaining, block_ids=block_ids, num_present_blocks=num_present)

    async def PushKV(self, request_iterator: AsyncIterator[pb.KVChunk], context: grpc.aio.ServicerContext) -> pb.KVAck:
        half = await self._data_half("grpc", context)
        return await half.receive_stream(_callers_chunks(request_iterator, auth.caller_of(context)), context)

    async def Receive(self, request: pb.ReceiveRequest, context: grpc.aio.ServicerContext) -> pb.KVAck:
        if await self._transport_of(request.sender_id, context) != "nccl":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{request.sender_id} did not agree on nccl")
        await _check_caller(request.sender_id, context)
        half = await self._data_half("nccl", context)
        return await half.receive(request, context)

    async def Commit(self, request: pb.KVCommit, context: grpc.aio.ServicerContext) -> pb.KVAck:
        await _check_caller(request.sender_id, context)
        try:
            num_bytes = self.receiver.commit(request.transfer_id, request.sender_id, commit_from_proto(request))
        except (KeyError, ValueError) as error:
            await _abort(context, error)
        return pb.KVAck(bytes_received=num_bytes)

    async def Abandon(self, request: pb.AbandonRequest, context: grpc.aio.ServicerContext) -> pb.AbandonResponse:
        await _check_caller(request.sender_id, context)
        self.receiver.abandon(request.transfer_id, request.sender_id, request.reason[:MAX_REASON_CHARS])
        return pb.AbandonResponse()

    def _remember(self, sender_id: str, transport: str) -> None:
        self._sender_transports[sender_id] = transport
        self._sender_transports.move_to_end(sender_id)
        if len(self._sender_transports) > MAX_SENDERS:
            self._sender_transports.popitem(last=False)

    async def _refuse_handshake(self, context: grpc.aio.ServicerContext, nonce: bytes, error: Exception) -> None:
        """The refusal's message comes with its proof: the sender repeats only what we said."""
        message = str(error)
        proof = auth.prove(self.secret, REFUSAL_PROOF, nonce, message)
        await context.abort(
            grpc.StatusCode[status_code_name(error) or "INTERNAL"], message, trailing_metadata=((PROOF_KEY, proof),)
        )

    async def _transport_of(self, sender_id: str, context: grpc.aio.ServicerContext) -> str:
        name = self._sender_transports.get(sender_id)
        if name is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{sender_id!r} has not handshaken with this worker")
        return name

    async def _data_half(self, name: str, context: grpc.aio.ServicerContext) -> Any:
        half = self.halves.get(name)
        if half is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"this worker does not accept the {name} transport")
        return half


def add_kv_transfer_service(server: grpc.aio.Server, servicer: KVTransferServicer) -> None:
    """Serve `servicer` on `server`, which must be built with `options=GRPC_OPTIONS`."""
    pb_grpc.add_KVTransferServicer_to_server(servicer, server)


class KVControlClient:
    """The prefill worker's channel to one decode worker's KVTransfer service; every call signed."""

    def __init__(self, address: str, secret: ClusterSecret, caller: str) -> None:
        self.address = address
        self.secret = secret
        # A subchannel of its own: a peer restarted at the same address is dialled afresh, not
        # refused from the shared pool's backoff after the old one's failure.
        options = [*GRPC_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
        self.channel = auth.channel(address, secret, caller, options)
        self.stub = pb_grpc.KVTransferStub(self.channel)

    async def handshake(
        self, sender_id: str, layout: KVLayout, offered: list[str], endpoint: Endpoint, timeout: float
    ) -> pb.HandshakeResponse:
        """The receiver's answer once it proved it holds the cluster secret (UnprovenPeerError if
        not); its refusals (layout, transport) are repeated only when proven too."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        request = pb.HandshakeRequest(
            sender_id=sender_id,
            layout=layout_to_proto(layout),
            transports=offered,
            endpoint=endpoint_to_proto(endpoint),
            nonce=nonce,
        )
        try:
            response = await self.stub.Handshake(request, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            raise self._refusal(error, nonce) from error
        if not auth.is_proven(self.secret, HANDSHAKE_PROOF, nonce, response.receiver_id, response.proof):
            raise UnprovenPeerError(self.address, "its handshake answer carries no valid proof")
        return response

    def _refusal(self, error: grpc.aio.AioRpcError, nonce: bytes) -> Exception:
        details, code = error.details() or "", error.code()
        proof = dict(error.trailing_metadata() or ()).get(PROOF_KEY, "")
        if not auth.is_proven(self.secret, REFUSAL_PROOF, nonce, details, proof):
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return KVTransferError(f"{self.address}: no answer to the KV handshake", code.name)
            return UnprovenPeerError(self.address, f"it answered {code.name}")
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            if details.startswith(KVLayoutMismatchError.PREFIX):
                return KVLayoutMismatchError(details.removeprefix(KVLayoutMismatchError.PREFIX).split("; "))
            if details.startswith(NoCommonTransportError.PREFIX):
                return NoCommonTransportError(details.removeprefix(NoCommonTransportError.PREFIX))
        return self.error(error)

    async def begin(self, sender_id: str, transfer_id: str, num_blocks: int, timeout: float) -> pb.BeginResponse:
        request = pb.BeginRequest(
            transfer_id=transfer_id, sender_id=sender_id, num_blocks=num_blocks, accepts_present_blocks=True
        )
        return await self._call(self.stub.Begin, request, timeout)

    async def commit(self, sender_id: str, transfer_id: str, info: KVCommitInfo, timeout: float) -> int:
        request = commit_to_proto(info)
        request.transfer_id, request.sender_id = transfer_id, sender_id
        return (await self._call(self.stub.Commit, request, timeout)).bytes_received

    async def abandon(self, sender_id: str, transfer_id: str, reason: str, timeout: float) -> None:
        request = pb.AbandonRequest(transfer_id=transfer_id, sender_id=sender_id, reason=reason[:MAX_REASON_CHARS])
        await self._call(self.stub.Abandon, request, timeout)

    async def close(self) -> None:
        await self.channel.close()

    async def _call(self, method: Any, request: object, timeout: float) -> Any:
        try:
            return await method(request, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            raise self.error(error) from error

    def error(self, error: grpc.aio.AioRpcError) -> KVTransferError:
        return KVTransferError(f"{self.address}: {error.details()}", error.code().name)


async def _check_caller(sender_id: str, context: grpc.aio.ServicerContext) -> None:
    """A sender acts only as itself: the id its reservations and cached KV go by is the one it signs with."""
    if sender_id != auth.caller_of(context):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _not_the_caller(sender_id))


async def _callers_chunks(chunks: AsyncIterator[pb.KVChunk], caller: str) -> AsyncIterator[pb.KVChunk]:
    """`chunks` up to the first that names another sender than `caller`, which ends them with a ValueError (unwritten)."""
    async for chunk in chunks:
        if chunk.sender_id != caller:
            async for _ in chunks:  # read to the end before failing the call (grpc/grpc#36066)
                pass
            raise ValueError(_not_the_caller(chunk.sender_id))
        yield chunk


def _not_the_caller(sender_id: str) -> str:
    return f"sender_id {sender_id!r} is not the caller that signed the call"


async def _abort(context: grpc.aio.ServicerContext, error: Exception) -> None:
    code = status_code_name(error) or "INTERNAL"
    await context.abort(grpc.StatusCode[code], str(error))


def layout_to_proto(layout: KVLayout) -> pb.KVLayout:
    return pb.KVLayout(
        model_id=layout.model_id,
        dtype=layout.dtype,
        num_layers=layout.num_layers,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        block_size=layout.block_size,
        layout=layout.layout,
        k_scales=layout.k_scales,
        v_scales=layout.v_scales,
    )


def layout_from_proto(message: pb.KVLayout) -> KVLayout:
    return KVLayout(
        message.model_id,
        message.dtype,
        message.num_layers,
        message.num_kv_heads,
        message.head_dim,
        message.block_size,
        message.layout,
        tuple(message.k_scales),
        tuple(message.v_scales),
    )


def endpoint_to_proto(endpoint: Endpoint) -> pb.Endpoint:
    return pb.Endpoint(
        host_id=endpoint.host_id,
        pid=endpoint.pid,
        device=endpoint.device,
        device_uuid=endpoint.device_uuid,
        address=endpoint.address,
    )


def endpoint_from_proto(message: pb.Endpoint) -> Endpoint:
    return Endpoint(message.host_id, message.pid, message.device, message.device_uuid, message.address)


def commit_to_proto(info: KVCommitInfo) -> pb.KVCommit:
    message = pb.KVCommit(first_token_id=info.first_token_id, num_prompt_tokens=info.num_prompt_tokens)
    if info.first_logprobs is not None:
        message.first_logprobs.CopyFrom(logprobs_to_proto(info.first_logprobs))
    message.sibling_token_ids.extend(info.sibling_token_ids)
    message.sibling_logprobs.extend(logprobs_to_proto(lp) for lp in info.sibling_logprobs if lp is not None)
    return message


def commit_from_proto(message: pb.KVCommit) -> KVCommitInfo:
    first_logprobs = logprobs_from_proto(message.first_logprobs) if message.HasField("first_logprobs") else None
    sibling_logprobs = tuple(logprobs_from_proto(lp) for lp in message.sibling_logprobs)
    return KVCommitInfo(
        message.first_token_id, first_logprobs, message.num_prompt_tokens, tuple(message.sibling_token_ids), sibling_logprobs
    )
