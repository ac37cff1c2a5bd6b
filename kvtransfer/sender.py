"""`KVSender`: the prefill worker's side of KV transfer. Cuts a request's KV blocks into chunks
(layer groups, then blocks) and pushes them with a commit to the decode worker's reservation."""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from kvtransfer.layout import KVLayout
from kvtransfer.receiver import KVCommitInfo
from kvtransfer.transport import KVChunkData, KVTransferError, KVTransport, make_transport


@dataclass(frozen=True)
class TransferResult:
    num_bytes: int
    seconds: float


class KVSender:
    def __init__(
        self,
        kv_cache: torch.Tensor,
        layout: KVLayout,
        sender_id: str,
        max_chunk_bytes: int = 4 * 2**20,
        layers_per_chunk: int | None = None,
    ) -> None:
        """`layers_per_chunk`: layers per layer group (default all); a chunk never spans two groups."""
        if KVLayout.of(kv_cache, layout.model_id) != layout:
            raise ValueError(f"layout {layout} does not describe kv_cache {tuple(kv_cache.shape)} {kv_cache.dtype}")
        if max_chunk_bytes <= 0:
            raise ValueError(f"max_chunk_bytes must be > 0, got {max_chunk_bytes}")
        if layers_per_chunk is not None and layers_per_chunk <= 0:
            raise ValueError(f"layers_per_chunk must be > 0, got {layers_per_chunk}")
        self.kv_cache = kv_cache  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
        self.layout = layout
        self.sender_id = sender_id
        self.max_chunk_bytes = max_chunk_bytes
        self.layers_per_chunk = layers_per_chunk or layout.num_layers
        self.bytes_sent = 0
        self._transports: dict[str, KVTransport] = {}
        self._peer_layouts: dict[tuple[str, str], KVLayout] = {}  # (transport, address) -> handshaken

    async def send(
        self,
        transport_name: str,
        address: str,
        transfer_id: str,
        src_block_ids: list[int],
        dst_num_blocks: int,
        commit: KVCommitInfo,
        timeout: float,
    ) -> TransferResult:
        """Push the KV of `src_block_ids` into the peer's reservation `transfer_id`, then commit;
        everything within `timeout` seconds. Returns once the peer acknowledged."""
        self._check_sources(transfer_id, src_block_ids)
        start = time.monotonic()
        transport = self._transport(transport_name)
        await self._handshake(transport_name, transport, address, timeout)  # a layout mismatch is named here
        if len(src_block_ids) != dst_num_blocks:
            raise ValueError(
                f"transfer {transfer_id!r}: {len(src_block_ids)} source blocks but the peer reserved {dst_num_blocks}"
            )
        remaining = timeout - (time.monotonic() - start)
        if remaining <= 0:
            raise KVTransferError(f"transfer {transfer_id!r}: no time left after the handshake", "DEADLINE_EXCEEDED")
        try:
            num_bytes = await transport.push(address, transfer_id, self.chunks(src_block_ids), commit, remaining)
        except KVTransferError as exc:
            if exc.code == "UNAVAILABLE":  # the peer may come back restarted, maybe configured otherwise
                self._peer_layouts.pop((transport_name, address), None)
            raise
        num_expected = self.layout.chunk_num_bytes(self.layout.num_layers, len(src_block_ids))
        if num_bytes != num_expected:
            raise KVTransferError(f"transfer {transfer_id!r}: peer acknowledged {num_bytes} of {num_expected} bytes")
        self.bytes_sent += num_bytes
        return TransferResult(num_bytes, time.monotonic() - start)

    def chunks(self, src_block_ids: list[int]) -> Iterator[KVChunkData]:
        """Lazily, layer group by layer group: a group's chunks read only its layers of the cache."""
        block_index = torch.tensor(src_block_ids, dtype=torch.long, device=self.kv_cache.device)
        for layer_start in range(0, self.layout.num_layers, self.layers_per_chunk):
            layer_end = min(layer_start + self.layers_per_chunk, self.layout.num_layers)
            yield from self._layer_group_chunks(layer_start, layer_end, block_index)

    async def close(self) -> None:
        for transport in self._transports.values():
            await transport.close()
        self._transports.clear()

    def _layer_group_chunks(self, layer_start: int, layer_end: int, block_index: torch.Tensor) -> Iterator[KVChunkData]:
        num_block_bytes = self.layout.chunk_num_bytes(layer_end - layer_start, 1)
        blocks_per_chunk = max(1, self.max_chunk_bytes // num_block_bytes)
        for block_start in range(0, len(block_index), blocks_per_chunk):
            block_end = min(block_start + blocks_per_chunk, len(block_index))
            # a gather: a fresh contiguous copy, so later writes to the cache cannot change it
            data = self.kv_cache[layer_start:layer_end, :, block_index[block_start:block_end]]
            yield KVChunkData(layer_start, layer_end, block_start, block_end, data)

    async def _handshake(self, transport_name: str, transport: KVTransport, address: str, timeout: float) -> None:
        key = (transport_name, address)
        if key not in self._peer_layouts:  # a mismatch raises and caches nothing
            self._peer_layouts[key] = await transport.handshake(address, self.layout, timeout)

    def _transport(self, name: str) -> KVTransport:
        if name not in self._transports:
            self._transports[name] = make_transport(name, self.sender_id)
        return self._transports[name]

    def _check_sources(self, transfer_id: str, src_block_ids: list[int]) -> None:
        num_cache_blocks = self.kv_cache.shape[2]
        if not src_block_ids or not all(0 <= block_id < num_cache_blocks for block_id in src_block_ids):
            raise ValueError(
                f"transfer {transfer_id!r}: source blocks {src_block_ids} must be a non-empty subset "
                f"of [0, {num_cache_blocks})"
            )
