"""The `grpc` transport: KV bytes streamed over gRPC (`KVTransfer.PushKV`), anywhere, CPU or GPU.
Device-to-host copies run on a CUDA stream of the sender's own and every host copy in a worker
thread, so neither side's event loop or engine waits for them."""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import AsyncIterator

import grpc
import torch

from pdserve.kernels.kv_quant import as_bytes
from pdserve.kvtransfer.layout import KVLayout
from pdserve.kvtransfer.receiver import KVReceiver, UnknownTransferError
from pdserve.kvtransfer.transport import (
    TRANSPORTS,
    Endpoint,
    KVTransferError,
    OutgoingTransfer,
    PeerInfo,
    Transport,
    status_code_name,
)
from pdserve.proto import pdserve_pb2 as pb

MAX_CHUNK_BYTES = 4 * 2**20
CHUNK_HEADER_BYTES = 4 * 2**10  # a KVChunk's fields besides its data


def max_chunk_message_bytes(layout: KVLayout) -> int:
    """The largest KVChunk a sender makes: MAX_CHUNK_BYTES of data, or one block of a whole layer
    group when that is larger (a group is at most every layer)."""
    return max(MAX_CHUNK_BYTES, layout.chunk_num_bytes(layout.num_layers, 1)) + CHUNK_HEADER_BYTES


class GrpcSendHalf:
    is_broken = False

    def __init__(self, kv_cache: torch.Tensor, sender_id: str, endpoint: Endpoint, peer: PeerInfo) -> None:
        self.kv_cache = kv_cache
        self.sender_id = sender_id
        self.stub = peer.control.stub
        self.address = peer.address
        self.layout = peer.layout
        self._stream = torch.cuda.Stream(kv_cache.device) if kv_cache.is_cuda else None

    async def push(self, transfer: OutgoingTransfer) -> int:
        call = self.stub.PushKV(timeout=max(0.0, transfer.deadline - time.monotonic()))
        try:
            await _write_all(call, self._messages(transfer))
            ack = await call
        except grpc.aio.AioRpcError as error:
            raise KVTransferError(f"{self.address}: {error.details()}", error.code().name) from error
        finally:
            call.cancel()  # a no-op once the call has finished; stops the stream if we failed
        return ack.bytes_received

    async def close(self) -> None:
        pass

    async def _messages(self, transfer: OutgoingTransfer) -> AsyncIterator[pb.KVChunk]:
        """One layer group after another, as each is computed; the next chunk's copy runs while
        the current one is written to the stream."""
        src_index = torch.tensor(transfer.src_block_ids, dtype=torch.long)
        pending: asyncio.Task | None = None
        for group, (layer_start, layer_end) in enumerate(transfer.progress.groups):
            event = await transfer.progress.ready(group, transfer.deadline)
            for block_start, block_end in _block_ranges(self.layout, layer_end - layer_start, len(src_index)):
                chunk = asyncio.create_task(
                    asyncio.to_thread(
                        self._chunk, transfer.transfer_id, layer_start, layer_end, block_start, block_end, src_index, event
                    )
                )
                if pending is not None:
                    yield await pending
                pending = chunk
        if pending is not None:
            yield await pending

    def _chunk(
        self,
        transfer_id: str,
        layer_start: int,
        layer_end: int,
        block_start: int,
        block_end: int,
        src_index: torch.Tensor,
        event: torch.cuda.Event | None,
    ) -> pb.KVChunk:
        """Worker thread: gather the blocks, bring them to the host, wrap them in a message."""
        index = src_index[block_start:block_end]
        cache = as_bytes(self.kv_cache)  # fp8 blocks are gathered as bytes (no fp8 indexing needed)
        if self._stream is None:
            host = cache[layer_start:layer_end, :, index]
        else:
            with torch.cuda.stream(self._stream):
                if event is not None:
                    self._stream.wait_event(event)
                gathered = cache[layer_start:layer_end, :, index.to(self.kv_cache.device, non_blocking=True)]
                host = torch.empty(gathered.shape, dtype=gathered.dtype, pin_memory=True)
                host.copy_(gathered, non_blocking=True)
            self._stream.synchronize()  # this thread only; nothing else waits for it
        data = host.contiguous().view(-1).view(torch.uint8).numpy().tobytes()  # numpy has no bfloat16
        return pb.KVChunk(
            transfer_id=transfer_id,
            sender_id=self.sender_id,
            layer_start=layer_start,
            layer_end=layer_end,
            block_start=block_start,
            block_end=block_end,
            data=data,
        )


class GrpcReceiveHalf:
    def __init__(self, receiver: KVReceiver, endpoint: Endpoint) -> None:
        self.receiver = receiver

    def accept(self, sender_id: str, sender: Endpoint) -> dict[str, bytes]:
        return {}

    def close(self) -> None:
        pass

    async def receive_stream(self, request_iterator: AsyncIterator[pb.KVChunk], context: grpc.aio.ServicerContext) -> pb.KVAck:
        num_bytes = 0
        try:
            async for message in request_iterator:
                num_bytes += await asyncio.to_thread(self._write, message)
        except (UnknownTransferError, ValueError) as error:
            # Read the stream to its end before failing: a grpc.aio client whose write races with
            # our status would see INTERNAL instead of it (grpc/grpc#36066).
            async for _ in request_iterator:
                pass
            await context.abort(grpc.StatusCode[status_code_name(error)], str(error))
        return pb.KVAck(bytes_received=num_bytes)

    def _write(self, message: pb.KVChunk) -> int:
        """Worker thread: the chunk into its blocks (one host copy into pinned memory on a GPU)."""
        data = decode_chunk(message, self.receiver.layout)
        return self.receiver.write(
            message.transfer_id,
            message.sender_id,
            message.layer_start,
            message.layer_end,
            message.block_start,
            message.block_end,
            data,
        )


def decode_chunk(message: pb.KVChunk, layout: KVLayout) -> torch.Tensor:
    """The chunk's tensor `[layers, 2, blocks, block_size, kv_heads, head_dim]`, on the CPU, sharing the message's bytes."""
    num_layers = message.layer_end - message.layer_start
    num_blocks = message.block_end - message.block_start
    if num_layers <= 0 or num_blocks <= 0:
        raise ValueError(
            f"transfer {message.transfer_id!r}: empty range layers [{message.layer_start}, {message.layer_end}) "
            f"x blocks [{message.block_start}, {message.block_end})"
        )
    data = message.data
    num_expected = layout.chunk_num_bytes(num_layers, num_blocks)
    if len(data) != num_expected:
        raise ValueError(
            f"transfer {message.transfer_id!r}: chunk has {len(data)} bytes, expected {num_expected} "
            f"for {num_layers} layers x {num_blocks} blocks"
        )
    with warnings.catch_warnings():  # bytes are read-only; torch warns the tensor could write them. We only read.
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(data, dtype=torch.uint8)
    return flat.view(layout.torch_dtype).view(layout.chunk_shape(num_layers, num_blocks))


def _block_ranges(layout: KVLayout, num_layers: int, num_blocks: int) -> list[tuple[int, int]]:
    """Block ranges of at most MAX_CHUNK_BYTES each (one block at least)."""
    blocks_per_chunk = max(1, MAX_CHUNK_BYTES // layout.chunk_num_bytes(num_layers, 1))
    return [(start, min(start + blocks_per_chunk, num_blocks)) for start in range(0, num_blocks, blocks_per_chunk)]


async def _write_all(call: grpc.aio.StreamUnaryCall, messages: AsyncIterator[pb.KVChunk]) -> None:
    """Stops at the first failed write: the call has ended. The write's own error may be grpc.aio's
    INTERNAL in place of the peer's status (grpc/grpc#36066); awaiting the call raises the real one."""
    try:
        async for message in messages:
            await call.write(message)  # waits for the transport: flow control bounds memory
        await call.done_writing()
    except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
        pass


TRANSPORTS["grpc"] = Transport(
    name="grpc",
    can_connect=lambda sender, receiver: True,
    connect=GrpcSendHalf,
    receiver=GrpcReceiveHalf,
)
