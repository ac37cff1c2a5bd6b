"""The `cuda_ipc` transport: within one host, the decode worker shares its whole KV cache once (a
CUDA IPC handle in the handshake) and the prefill worker copies a prompt's blocks straight into the
reserved blocks, one block-copy kernel per layer group on a stream of its own, each launched once
its layers are computed. Same GPU, or two GPUs of one host (peer access)."""

from __future__ import annotations

import json
import time

import torch

from pdserve import kernels
from pdserve.kernels.kv_quant import as_bytes
from pdserve.kvtransfer.receiver import KVReceiver
from pdserve.kvtransfer.transport import (
    TRANSPORTS,
    Endpoint,
    KVTransferError,
    OutgoingTransfer,
    PeerInfo,
    Transport,
    wait_for_event,
)

DRAIN_TIMEOUT_S = 30.0  # issued copies always finish; this only bounds a wedged device


class CudaIpcSendHalf:
    is_broken = False

    def __init__(self, kv_cache: torch.Tensor, sender_id: str, endpoint: Endpoint, peer: PeerInfo) -> None:
        self.kv_cache = kv_cache
        self.layout = peer.layout
        self.peer_cache = open_shared_cache(peer.params)  # the decode worker's whole cache
        if self.peer_cache.shape[:2] != kv_cache.shape[:2] or self.peer_cache.shape[3:] != kv_cache.shape[3:]:
            raise KVTransferError(f"the peer's cache {tuple(self.peer_cache.shape)} does not fit ours {tuple(kv_cache.shape)}")
        self._stream = torch.cuda.Stream(kv_cache.device)
        # Another GPU of the host: Triton will not write another device's IPC memory, so its blocks
        # are gathered here, moved over the link, and scattered there by a stream on that device.
        is_across = self.peer_cache.device != kv_cache.device
        self._peer_stream = torch.cuda.Stream(self.peer_cache.device) if is_across else None

    async def push(self, transfer: OutgoingTransfer) -> int:
        num_blocks = len(transfer.src_block_ids)
        src_index = _to_device(transfer.src_block_ids, self._stream)
        dst_index = _to_device(transfer.dst_block_ids, self._peer_stream or self._stream)
        try:
            for group, (layer_start, layer_end) in enumerate(transfer.progress.groups):
                event = await transfer.progress.ready(group, transfer.deadline)
                if time.monotonic() > transfer.deadline:  # the peer may have reused the blocks: write nothing
                    raise KVTransferError(
                        f"transfer {transfer.transfer_id!r}: the reservation's lease ended", "DEADLINE_EXCEEDED"
                    )
                self._copy(layer_start, layer_end, src_index, dst_index, event)
        finally:
            # Done, failed or cancelled: return only once every copy issued has finished, so that
            # what the caller says next (commit, abandon) is true on the device too.
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            for stream in (self._stream, self._peer_stream):
                if stream is not None:
                    await wait_for_event(stream.record_event(), deadline, "cuda_ipc copy")
        return self.layout.chunk_num_bytes(self.layout.num_layers, num_blocks)

    def _copy(
        self, layer_start: int, layer_end: int, src_index: torch.Tensor, dst_index: torch.Tensor, event: torch.cuda.Event | None
    ) -> None:
        src, dst = self.kv_cache[layer_start:layer_end], self.peer_cache[layer_start:layer_end]
        with torch.cuda.stream(self._stream):
            if event is not None:
                self._stream.wait_event(event)
            if self._peer_stream is None:
                kernels.copy_kv_blocks(src, src_index, dst, dst_index)
                return
            gathered = as_bytes(src)[:, :, src_index]  # contiguous, on our device; fp8 as bytes
        with torch.cuda.stream(self._peer_stream):
            self._peer_stream.wait_stream(self._stream)
            staged = gathered.to(dst.device, non_blocking=True)
            gathered.record_stream(self._peer_stream)
            as_bytes(dst).index_copy_(2, dst_index, staged)

    async def close(self) -> None:
        self.peer_cache = None


def _to_device(block_ids: list[int], stream: torch.cuda.Stream) -> torch.Tensor:
    """Block ids on `stream`'s device, copied on that stream (no host wait)."""
    with torch.cuda.stream(stream):
        return torch.tensor(block_ids, dtype=torch.long).pin_memory().to(stream.device, non_blocking=True)


class CudaIpcReceiveHalf:
    def __init__(self, receiver: KVReceiver, endpoint: Endpoint) -> None:
        if not receiver.kv_cache.is_cuda:
            raise ValueError("the cuda_ipc transport needs a KV cache on a GPU")
        self.kv_cache = receiver.kv_cache
        self._params: dict[str, bytes] | None = None

    def accept(self, sender_id: str, sender: Endpoint) -> dict[str, bytes]:
        if self._params is None:  # one handle for every sender
            self._params = share_cache(self.kv_cache)
        return self._params

    def close(self) -> None:
        pass


def share_cache(kv_cache: torch.Tensor) -> dict[str, bytes]:
    """What another process needs to open `kv_cache`: its storage's IPC handle and the view on it."""
    device, handle, size, offset, ref_handle, ref_offset, event_handle, event_sync = kv_cache.untyped_storage()._share_cuda_()
    meta = {
        "storage_size": size,
        "storage_offset": offset,
        "ref_counter_offset": ref_offset,
        "event_sync": bool(event_sync),
        "tensor_offset": kv_cache.storage_offset(),
        "shape": list(kv_cache.shape),
        "stride": list(kv_cache.stride()),
        "dtype": str(kv_cache.dtype).removeprefix("torch."),
        "device_uuid": str(torch.cuda.get_device_properties(device).uuid),
    }
    return {"meta": json.dumps(meta).encode(), "handle": handle, "ref_counter_handle": ref_handle, "event_handle": event_handle}


def open_shared_cache(params: dict[str, bytes]) -> torch.Tensor:
    """The peer's cache, mapped into this process on the device whose UUID it names."""
    meta = json.loads(params["meta"])
    device = _device_with_uuid(meta["device_uuid"])
    storage = torch.UntypedStorage._new_shared_cuda(
        device,
        params["handle"],
        meta["storage_size"],
        meta["storage_offset"],
        params["ref_counter_handle"],
        meta["ref_counter_offset"],
        params["event_handle"],
        meta["event_sync"],
    )
    dtype = getattr(torch, meta["dtype"])
    tensor = torch.empty(0, dtype=dtype, device=f"cuda:{device}")
    return tensor.set_(storage, meta["tensor_offset"], meta["shape"], meta["stride"])


def _device_with_uuid(uuid: str) -> int:
    for index in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(index).uuid) == uuid:
            return index
    raise KVTransferError(f"the peer's GPU {uuid} is not visible to this process", "FAILED_PRECONDITION")


TRANSPORTS["cuda_ipc"] = Transport(
    name="cuda_ipc",
    can_connect=lambda sender, receiver: sender.device == receiver.device == "cuda" and sender.host_id == receiver.host_id,
    connect=CudaIpcSendHalf,
    receiver=CudaIpcReceiveHalf,
    devices=("cuda",),
    is_device_writer=True,
)
