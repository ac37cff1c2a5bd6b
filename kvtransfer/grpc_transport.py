"""KV transfer over gRPC (`pdserve.KVTransfer`): the client `GrpcTransport` and the decode worker's
`KVTransferServicer`. The only place where KV chunks meet protobuf: tensors travel as raw bytes in
the layout's order, the commit in a last message of its own."""
from __future__ import annotations

import asyncio
import warnings
from collections.abc import AsyncIterator, Iterable, Iterator

import grpc
import torch

from engine.outputs import TokenLogprobs
from kvtransfer.layout import KVLayout, KVLayoutMismatchError
from kvtransfer.receiver import KVCommitInfo, KVReceiver, UnknownTransferError
from kvtransfer.transport import HANDSHAKE_TIMEOUT_S, TRANSPORTS, KVChunkData, KVTransferError, status_code_name
from proto import pdserve_pb2 as pb
from proto import GRPC_OPTIONS, pdserve_pb2_grpc



class GrpcTransport:
    """One cached channel per address; every call carries a deadline."""

    def __init__(self, sender_id: str = "") -> None:
        self.sender_id = sender_id
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, pdserve_pb2_grpc.KVTransferStub] = {}

    async def handshake(self, address: str, layout: KVLayout, timeout: float = HANDSHAKE_TIMEOUT_S) -> KVLayout:
        request = pb.HandshakeRequest(sender_id=self.sender_id, layout=layout_to_proto(layout))
        try:
            response = await self._stub(address).Handshake(request, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            details = error.details() or ""
            if error.code() == grpc.StatusCode.FAILED_PRECONDITION and details.startswith(KVLayoutMismatchError.PREFIX):
                raise KVLayoutMismatchError(details.removeprefix(KVLayoutMismatchError.PREFIX).split("; ")) from error
            raise _transfer_error(address, error) from error
        return layout_from_proto(response.layout)

    async def push(
        self,
        address: str,
        transfer_id: str,
        chunks: Iterable[KVChunkData],
        commit: KVCommitInfo,
        timeout: float,
    ) -> int:
        call = self._stub(address).PushKV(timeout=timeout)
        try:
            await _write_all(call, _messages(transfer_id, chunks, commit))
            ack = await call
        except grpc.aio.AioRpcError as error:
            raise _transfer_error(address, error) from error
        finally:
            call.cancel()  # a no-op once the call has finished; stops the stream if we failed
        return ack.bytes_received

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._stubs.clear()

    def _stub(self, address: str) -> pdserve_pb2_grpc.KVTransferStub:
        if address not in self._stubs:
            self._channels[address] = grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
            self._stubs[address] = pdserve_pb2_grpc.KVTransferStub(self._channels[address])
        return self._stubs[address]


class KVTransferServicer(pdserve_pb2_grpc.KVTransferServicer):
    """Serves a decode worker's `KVReceiver`. Chunks are written on the event loop thread: a copy
    into the cache is short, and the receiver's lock orders it with the owner's cancel/expire."""

    def __init__(self, receiver: KVReceiver) -> None:
        self.receiver = receiver

    async def Handshake(self, request: pb.HandshakeRequest, context: grpc.aio.ServicerContext) -> pb.HandshakeResponse:
        mismatches = layout_from_proto(request.layout).mismatches(self.receiver.layout)  # sender's view
        if mismatches:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(KVLayoutMismatchError(mismatches)))
        return pb.HandshakeResponse(receiver_id=self.receiver.receiver_id, layout=layout_to_proto(self.receiver.layout))

    async def PushKV(self, request_iterator: AsyncIterator[pb.KVChunk], context: grpc.aio.ServicerContext) -> pb.KVAck:
        try:
            num_bytes = await self._receive_stream(request_iterator)
        except (UnknownTransferError, ValueError) as error:
            # Read the stream to its end before failing: a grpc.aio client whose write races with
            # our status would see INTERNAL instead of it (grpc/grpc#36066).
            async for _ in request_iterator:
                pass
            await context.abort(grpc.StatusCode[status_code_name(error)], str(error))
        return pb.KVAck(bytes_received=num_bytes)

    async def _receive_stream(self, request_iterator: AsyncIterator[pb.KVChunk]) -> int:
        """Writes every chunk, commits on the last message; the bytes written."""
        transfer_id, num_bytes, is_committed = None, 0, False
        async for message in request_iterator:
            if is_committed:
                raise ValueError(f"transfer {transfer_id!r}: message after the commit")
            if transfer_id is not None and message.transfer_id != transfer_id:
                raise ValueError(f"one stream carries one transfer: {message.transfer_id!r} after {transfer_id!r}")
            transfer_id = message.transfer_id
            num_bytes += self._receive(message)
            is_committed = message.HasField("commit")
        if not is_committed:
            raise ValueError(f"transfer {transfer_id!r}: stream ended before the commit")
        return num_bytes

    def _receive(self, message: pb.KVChunk) -> int:
        num_bytes = 0
        if message.data:
            data = decode_chunk(message, self.receiver.layout)
            num_bytes = self.receiver.write(
                message.transfer_id, message.layer_start, message.layer_end,
                message.block_start, message.block_end, data,
            )
        if message.HasField("commit"):
            self.receiver.commit(message.transfer_id, commit_from_proto(message.commit))
        elif not message.data:
            raise ValueError(f"transfer {message.transfer_id!r}: a message with neither data nor commit")
        return num_bytes


def add_kv_transfer_service(server: grpc.aio.Server, receiver: KVReceiver) -> None:
    """Serve `receiver` on `server`, which must be built with `options=GRPC_OPTIONS`."""
    pdserve_pb2_grpc.add_KVTransferServicer_to_server(KVTransferServicer(receiver), server)


def encode_chunk(transfer_id: str, chunk: KVChunkData) -> pb.KVChunk:
    # numpy has no bfloat16: reinterpret the tensor as bytes in torch
    flat = chunk.data.contiguous().cpu().view(-1).view(torch.uint8)
    return pb.KVChunk(
        transfer_id=transfer_id,
        layer_start=chunk.layer_start,
        layer_end=chunk.layer_end,
        block_start=chunk.block_start,
        block_end=chunk.block_end,
        data=flat.numpy().tobytes(),
    )


def decode_chunk(message: pb.KVChunk, layout: KVLayout) -> torch.Tensor:
    """The chunk's tensor `[layers, 2, blocks, block_size, kv_heads, head_dim]`, on the CPU, sharing `message.data`."""
    num_layers = message.layer_end - message.layer_start
    num_blocks = message.block_end - message.block_start
    if num_layers <= 0 or num_blocks <= 0:
        raise ValueError(
            f"transfer {message.transfer_id!r}: empty range layers [{message.layer_start}, {message.layer_end}) "
            f"x blocks [{message.block_start}, {message.block_end})"
        )
    num_expected = layout.chunk_num_bytes(num_layers, num_blocks)
    if len(message.data) != num_expected:
        raise ValueError(
            f"transfer {message.transfer_id!r}: chunk has {len(message.data)} bytes, expected {num_expected} "
            f"for {num_layers} layers x {num_blocks} blocks"
        )
    with warnings.catch_warnings():  # bytes are read-only; torch warns the tensor could write them. We only read.
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(message.data, dtype=torch.uint8)
    return flat.view(layout.torch_dtype).view(layout.chunk_shape(num_layers, num_blocks))


def layout_to_proto(layout: KVLayout) -> pb.KVLayout:
    return pb.KVLayout(
        model_id=layout.model_id,
        dtype=layout.dtype,
        num_layers=layout.num_layers,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        block_size=layout.block_size,
        layout=layout.layout,
    )


def layout_from_proto(message: pb.KVLayout) -> KVLayout:
    return KVLayout(
        message.model_id, message.dtype, message.num_layers, message.num_kv_heads,
        message.head_dim, message.block_size, message.layout,
    )


def commit_to_proto(commit: KVCommitInfo) -> pb.KVCommit:
    message = pb.KVCommit(first_token_id=commit.first_token_id, num_prompt_tokens=commit.num_prompt_tokens)
    if commit.first_logprobs is not None:
        logprobs = commit.first_logprobs
        message.first_logprobs.CopyFrom(pb.TokenLogprobs(
            token_id=logprobs.token_id,
            logprob=logprobs.logprob,
            rank=logprobs.rank,
            top_token_ids=[token_id for token_id, _ in logprobs.top],
            top_logprobs=[logprob for _, logprob in logprobs.top],
        ))
    return message


def commit_from_proto(message: pb.KVCommit) -> KVCommitInfo:
    first_logprobs = None
    if message.HasField("first_logprobs"):
        logprobs = message.first_logprobs
        top = tuple(zip(logprobs.top_token_ids, logprobs.top_logprobs))
        first_logprobs = TokenLogprobs(logprobs.token_id, logprobs.logprob, logprobs.rank, top)
    return KVCommitInfo(message.first_token_id, first_logprobs, message.num_prompt_tokens)


def _messages(transfer_id: str, chunks: Iterable[KVChunkData], commit: KVCommitInfo) -> Iterator[pb.KVChunk]:
    for chunk in chunks:
        yield encode_chunk(transfer_id, chunk)
    yield pb.KVChunk(transfer_id=transfer_id, commit=commit_to_proto(commit))


async def _write_all(call: grpc.aio.StreamUnaryCall, messages: Iterator[pb.KVChunk]) -> None:
    """Stops at the first failed write: the call has ended. The write's own error may be grpc.aio's
    INTERNAL in place of the peer's status (grpc/grpc#36066); awaiting the call raises the real one."""
    try:
        for message in messages:
            await call.write(message)  # waits for the transport: flow control bounds memory
        await call.done_writing()
    except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
        pass


def _transfer_error(address: str, error: grpc.aio.AioRpcError) -> KVTransferError:
    return KVTransferError(f"{address}: {error.details()}", error.code().name)


TRANSPORTS["grpc"] = GrpcTransport
