"""The `local` transport: sender and receiver in one process (tests, single-process set-ups). Layer
groups go straight into the receiver's `write`; nothing is serialised or copied through the host."""

from __future__ import annotations

import asyncio

import torch

from pdserve.kernels.kv_quant import as_bytes
from pdserve.kvtransfer.receiver import KVReceiver
from pdserve.kvtransfer.transport import TRANSPORTS, Endpoint, KVTransferError, OutgoingTransfer, PeerInfo, Transport

_RECEIVERS: dict[str, KVReceiver] = {}  # receiver_id -> receiver, in this process


class LocalSendHalf:
    is_broken = False

    def __init__(self, kv_cache: torch.Tensor, sender_id: str, endpoint: Endpoint, peer: PeerInfo) -> None:
        self.kv_cache = kv_cache
        self.sender_id = sender_id
        self.receiver_id = peer.receiver_id
        self._stream = torch.cuda.Stream(kv_cache.device) if kv_cache.is_cuda else None

    async def push(self, transfer: OutgoingTransfer) -> int:
        receiver = _RECEIVERS.get(self.receiver_id)
        if receiver is None:
            raise KVTransferError(f"no KV receiver {self.receiver_id!r} in this process", "UNAVAILABLE")
        index = torch.tensor(transfer.src_block_ids, dtype=torch.long, device=self.kv_cache.device)
        num_bytes = 0
        for group, (layer_start, layer_end) in enumerate(transfer.progress.groups):
            event = await transfer.progress.ready(group, transfer.deadline)
            num_bytes += await asyncio.to_thread(self._write, receiver, transfer, layer_start, layer_end, index, event)
        return num_bytes

    def _write(
        self,
        receiver: KVReceiver,
        transfer: OutgoingTransfer,
        layer_start: int,
        layer_end: int,
        index: torch.Tensor,
        event: torch.cuda.Event | None,
    ) -> int:
        cache = as_bytes(self.kv_cache)  # fp8 blocks are gathered as bytes, handed over in the cache's dtype
        if self._stream is None:
            data, ready = cache[layer_start:layer_end, :, index].view(self.kv_cache.dtype), None
        else:
            with torch.cuda.stream(self._stream):
                if event is not None:
                    self._stream.wait_event(event)
                data = cache[layer_start:layer_end, :, index].view(self.kv_cache.dtype)
                ready = self._stream.record_event()
        try:
            return receiver.write(
                transfer.transfer_id, self.sender_id, layer_start, layer_end, 0, len(transfer.src_block_ids), data, ready
            )
        except (KeyError, ValueError) as error:
            raise KVTransferError(str(error), "NOT_FOUND" if isinstance(error, KeyError) else "INVALID_ARGUMENT") from error

    async def close(self) -> None:
        pass


class LocalReceiveHalf:
    def __init__(self, receiver: KVReceiver, endpoint: Endpoint) -> None:
        if receiver.receiver_id in _RECEIVERS:
            raise ValueError(f"a KV receiver {receiver.receiver_id!r} is already registered in this process")
        self.receiver = receiver
        _RECEIVERS[receiver.receiver_id] = receiver

    def accept(self, sender_id: str, sender: Endpoint) -> dict[str, bytes]:
        return {}

    def close(self) -> None:
        _RECEIVERS.pop(self.receiver.receiver_id, None)


TRANSPORTS["local"] = Transport(
    name="local",
    can_connect=lambda sender, receiver: (sender.host_id, sender.pid) == (receiver.host_id, receiver.pid),
    connect=LocalSendHalf,
    receiver=LocalReceiveHalf,
)
