"""The KV hand-off's control plane over gRPC (`pdserve.KVTransfer`): the decode worker's servicer
(handshake with layout check and transport choice, begin, commit, abandon, plus the entry points
of the gRPC and NCCL data halves) and the prefill worker's client. Every call has a deadline."""
from __future__ import annotations

import asyncio
import logging

import grpc

from kvtransfer.layout import KVLayout, KVLayoutMismatchError
from kvtransfer.receiver import KVCommitInfo, KVReceiver
from kvtransfer.transport import (
    TRANSPORTS, Endpoint, KVReceiveHalf, KVTransferError, NoCommonTransportError, choose, status_code_name,
)
from proto import GRPC_OPTIONS
from proto import pdserve_pb2 as pb
from proto import pdserve_pb2_grpc as pb_grpc
from proto.convert import logprobs_from_proto, logprobs_to_proto

logger = logging.getLogger(__name__)


class KVTransferServicer(pb_grpc.KVTransferServicer):
    """Serves one decode worker's `KVReceiver` to the prefill workers that hand it KV."""

    def __init__(self, receiver: KVReceiver, endpoint: Endpoint, accepted: list[str]) -> None:
        self.receiver = receiver
        self.endpoint = endpoint
        self.accepted = accepted
        self.halves: dict[str, KVReceiveHalf] = {name: TRANSPORTS[name].receiver(receiver, endpoint) for name in accepted}
        self._sender_transports: dict[str, str] = {}  # sender_id -> the transport agreed in its handshake

    def close(self) -> None:
        for half in self.halves.values():
            half.close()

    async def Handshake(self, request: pb.HandshakeRequest, context: grpc.aio.ServicerContext) -> pb.HandshakeResponse:
        try:
            mismatches = layout_from_proto(request.layout).mismatches(self.receiver.layout)  # the sender's view
            if mismatches:
                raise KVLayoutMismatchError(mismatches)
            sender = endpoint_from_proto(request.endpoint)
            name = choose(list(request.transports), self.accepted, sender, self.endpoint)
            params = await asyncio.to_thread(self.halves[name].accept, request.sender_id, sender)
        except (ValueError, RuntimeError) as error:
            await _abort(context, error)
        self._sender_transports[request.sender_id] = name
        logger.info("KV handshake with %s: transport %s", request.sender_id, name)
        return pb.HandshakeResponse(
            receiver_id=self.receiver.receiver_id, layout=layout_to_proto(self.receiver.layout), transport=name, params=params
        )

    async def Begin(self, request: pb.BeginRequest, context: grpc.aio.ServicerContext) -> pb.BeginResponse:
        name = await self._transport_of(request.sender_id, context)
        try:
            remaining, block_ids = self.receiver.begin(
                request.transfer_id, request.sender_id, request.num_blocks, TRANSPORTS[name].is_device_writer
            )
        except (KeyError, ValueError) as error:
            await _abort(context, error)
        return pb.BeginResponse(lease_remaining_s=remaining, block_ids=block_ids)

    async def PushKV(self, request_iterator: object, context: grpc.aio.ServicerContext) -> pb.KVAck:
        half = await self._data_half("grpc", context)
        return await half.receive_stream(request_iterator, context)

    async def Receive(self, request: pb.ReceiveRequest, context: grpc.aio.ServicerContext) -> pb.KVAck:
        if await self._transport_of(request.sender_id, context) != "nccl":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{request.sender_id} did not agree on nccl")
        half = await self._data_half("nccl", context)
        return await half.receive(request, context)

    async def Commit(self, request: pb.KVCommit, context: grpc.aio.ServicerContext) -> pb.KVAck:
        try:
            num_bytes = self.receiver.commit(request.transfer_id, request.sender_id, commit_from_proto(request))
        except (KeyError, ValueError) as error:
            await _abort(context, error)
        return pb.KVAck(bytes_received=num_bytes)

    async def Abandon(self, request: pb.AbandonRequest, context: grpc.aio.ServicerContext) -> pb.AbandonResponse:
        self.receiver.abandon(request.transfer_id, request.sender_id, request.reason)
        return pb.AbandonResponse()

    async def _transport_of(self, sender_id: str, context: grpc.aio.ServicerContext) -> str:
        name = self._sender_transports.get(sender_id)
        if name is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{sender_id!r} has not handshaken with this worker")
        return name

    async def _data_half(self, name: str, context: grpc.aio.ServicerContext) -> object:
        half = self.halves.get(name)
        if half is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"this worker does not accept the {name} transport")
        return half


def add_kv_transfer_service(server: grpc.aio.Server, servicer: KVTransferServicer) -> None:
    """Serve `servicer` on `server`, which must be built with `options=GRPC_OPTIONS`."""
    pb_grpc.add_KVTransferServicer_to_server(servicer, server)


class KVControlClient:
    """The prefill worker's channel to one decode worker's KVTransfer service."""

    def __init__(self, address: str) -> None:
        self.address = address
        # A subchannel of its own: a peer restarted at the same address is dialled afresh, not
        # refused from the shared pool's backoff after the old one's failure.
        self.channel = grpc.aio.insecure_channel(address, options=[*GRPC_OPTIONS, ("grpc.use_local_subchannel_pool", 1)])
        self.stub = pb_grpc.KVTransferStub(self.channel)

    async def handshake(
        self, sender_id: str, layout: KVLayout, offered: list[str], endpoint: Endpoint, timeout: float
    ) -> pb.HandshakeResponse:
        request = pb.HandshakeRequest(
            sender_id=sender_id, layout=layout_to_proto(layout), transports=offered, endpoint=endpoint_to_proto(endpoint)
        )
        try:
            return await self.stub.Handshake(request, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            details = error.details() or ""
            if error.code() == grpc.StatusCode.FAILED_PRECONDITION:
                if details.startswith(KVLayoutMismatchError.PREFIX):
                    raise KVLayoutMismatchError(details.removeprefix(KVLayoutMismatchError.PREFIX).split("; ")) from error
                if details.startswith(NoCommonTransportError.PREFIX):
                    raise NoCommonTransportError(details.removeprefix(NoCommonTransportError.PREFIX)) from error
            raise self.error(error) from error

    async def begin(self, sender_id: str, transfer_id: str, num_blocks: int, timeout: float) -> pb.BeginResponse:
        request = pb.BeginRequest(transfer_id=transfer_id, sender_id=sender_id, num_blocks=num_blocks)
        return await self._call(self.stub.Begin, request, timeout)

    async def commit(self, sender_id: str, transfer_id: str, info: KVCommitInfo, timeout: float) -> int:
        request = commit_to_proto(info)
        request.transfer_id, request.sender_id = transfer_id, sender_id
        return (await self._call(self.stub.Commit, request, timeout)).bytes_received

    async def abandon(self, sender_id: str, transfer_id: str, reason: str, timeout: float) -> None:
        request = pb.AbandonRequest(transfer_id=transfer_id, sender_id=sender_id, reason=reason[:512])
        await self._call(self.stub.Abandon, request, timeout)

    async def close(self) -> None:
        await self.channel.close()

    async def _call(self, method: object, request: object, timeout: float) -> object:
        try:
            return await method(request, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            raise self.error(error) from error

    def error(self, error: grpc.aio.AioRpcError) -> KVTransferError:
        return KVTransferError(f"{self.address}: {error.details()}", error.code().name)


async def _abort(context: grpc.aio.ServicerContext, error: Exception) -> None:
    code = status_code_name(error) or "INTERNAL"
    await context.abort(grpc.StatusCode[code], str(error))


def layout_to_proto(layout: KVLayout) -> pb.KVLayout:
    return pb.KVLayout(
        model_id=layout.model_id, dtype=layout.dtype, num_layers=layout.num_layers, num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim, block_size=layout.block_size, layout=layout.layout,
    )


def layout_from_proto(message: pb.KVLayout) -> KVLayout:
    return KVLayout(
        message.model_id, message.dtype, message.num_layers, message.num_kv_heads,
        message.head_dim, message.block_size, message.layout,
    )


def endpoint_to_proto(endpoint: Endpoint) -> pb.Endpoint:
    return pb.Endpoint(
        host_id=endpoint.host_id, pid=endpoint.pid, device=endpoint.device,
        device_uuid=endpoint.device_uuid, address=endpoint.address,
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
    return KVCommitInfo(message.first_token_id, first_logprobs, message.num_prompt_tokens, tuple(message.sibling_token_ids), sibling_logprobs)
