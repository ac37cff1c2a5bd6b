"""`KVReceiver`: the decode worker's side of KV transfer. Owns every write into `kv_cache` for the
blocks reserved for incoming transfers, and tells the owner (by id) which reservations ended.
It never frees blocks: the decode worker's BlockManager does, from the ids it gets back."""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.outputs import TokenLogprobs
from kvtransfer.layout import KVLayout

_MAX_CLOSED_IDS = 4096  # ended transfers remembered only to say why a late chunk is refused


@dataclass(frozen=True)
class KVCommitInfo:
    """What the prefill worker learned besides the KV: the first generated token."""

    first_token_id: int
    first_logprobs: TokenLogprobs | None
    num_prompt_tokens: int


class UnknownTransferError(KeyError):
    """A write or commit for a transfer that is not pending: never expected, or already ended."""

    def __init__(self, transfer_id: str, reason: str) -> None:
        super().__init__(transfer_id)
        self.transfer_id = transfer_id
        self.reason = reason

    def __str__(self) -> str:  # KeyError would print only the quoted id
        return f"transfer {self.transfer_id!r} is not pending: {self.reason}"


@dataclass
class _Reservation:
    block_ids: list[int]
    block_index: torch.Tensor  # int64 [num_blocks] on the cache's device
    deadline: float  # time.monotonic()
    on_commit: Callable[[KVCommitInfo], None]
    is_written: torch.Tensor  # bool [num_layers, num_blocks]: written at least once


class KVReceiver:
    """Thread-safe: chunks arrive on gRPC threads while the owner calls expire/cancel. Every cache
    write happens under the lock, so once cancel/expire returned no write lands in those blocks
    and the owner may hand them to another request."""

    def __init__(self, kv_cache: torch.Tensor, model_id: str, receiver_id: str = "") -> None:
        self.kv_cache = kv_cache  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
        self.layout = KVLayout.of(kv_cache, model_id)
        self.receiver_id = receiver_id
        self.bytes_received = 0
        self._lock = threading.Lock()
        self._pending: dict[str, _Reservation] = {}
        self._closed: OrderedDict[str, str] = OrderedDict()  # transfer_id -> why it ended

    def expect(
        self,
        transfer_id: str,
        block_ids: list[int],
        deadline: float,
        on_commit: Callable[[KVCommitInfo], None],
    ) -> None:
        """Accept writes for `transfer_id` into `block_ids` until commit, cancel or `deadline`."""
        num_cache_blocks = self.kv_cache.shape[2]
        if not block_ids:
            raise ValueError(f"transfer {transfer_id!r}: no blocks reserved")
        if len(set(block_ids)) != len(block_ids):
            raise ValueError(f"transfer {transfer_id!r}: repeated block ids {block_ids}")
        if not all(0 <= block_id < num_cache_blocks for block_id in block_ids):
            raise ValueError(f"transfer {transfer_id!r}: block ids {block_ids} outside [0, {num_cache_blocks})")
        reservation = _Reservation(
            block_ids=list(block_ids),
            block_index=torch.tensor(block_ids, dtype=torch.long, device=self.kv_cache.device),
            deadline=deadline,
            on_commit=on_commit,
            is_written=torch.zeros(self.layout.num_layers, len(block_ids), dtype=torch.bool),
        )
        with self._lock:
            if transfer_id in self._pending:
                raise ValueError(f"transfer {transfer_id!r} is already pending")
            self._closed.pop(transfer_id, None)
            self._pending[transfer_id] = reservation

    def write(
        self,
        transfer_id: str,
        layer_start: int,
        layer_end: int,
        block_start: int,
        block_end: int,
        data: torch.Tensor,
    ) -> int:
        """Write `data` `[layer_end - layer_start, 2, block_end - block_start, block_size, kv_heads,
        head_dim]` into layers [layer_start, layer_end) of the reservation's blocks at positions
        [block_start, block_end). Returns the bytes written; on any error nothing is written."""
        if data.dtype != self.kv_cache.dtype:
            raise ValueError(f"transfer {transfer_id!r}: chunk dtype {data.dtype} != cache dtype {self.kv_cache.dtype}")
        data = data.to(self.kv_cache.device)  # before taking the lock: may be a host-to-device copy
        with self._lock:
            reservation = self._get(transfer_id)
            self._check_chunk(transfer_id, reservation, layer_start, layer_end, block_start, block_end, data)
            block_index = reservation.block_index[block_start:block_end]
            self.kv_cache[layer_start:layer_end].index_copy_(2, block_index, data)
            reservation.is_written[layer_start:layer_end, block_start:block_end] = True
            num_bytes = data.numel() * data.element_size()
            self.bytes_received += num_bytes
        return num_bytes

    def commit(self, transfer_id: str, info: KVCommitInfo) -> None:
        """End the transfer: every (layer, block) of the reservation must have been written."""
        with self._lock:
            reservation = self._get(transfer_id)
            if not bool(reservation.is_written.all()):
                raise ValueError(
                    f"transfer {transfer_id!r}: commit before all KV arrived; missing "
                    + _describe_missing(reservation.is_written)
                )
            self._close(transfer_id, "already committed")
        reservation.on_commit(info)  # outside the lock: the callback may call back into us

    def cancel(self, transfer_id: str) -> bool:
        """Drop a pending reservation; False when it was not pending."""
        with self._lock:
            if transfer_id not in self._pending:
                return False
            self._close(transfer_id, "cancelled")
            return True

    def expire(self, now: float) -> list[str]:
        """Drop the reservations whose deadline is <= `now`; their ids, so the owner frees the blocks."""
        with self._lock:
            expired = [tid for tid, reservation in self._pending.items() if reservation.deadline <= now]
            for transfer_id in expired:
                self._close(transfer_id, "expired")
        return expired

    def is_pending(self, transfer_id: str) -> bool:
        with self._lock:
            return transfer_id in self._pending

    def _get(self, transfer_id: str) -> _Reservation:
        reservation = self._pending.get(transfer_id)
        if reservation is None:
            raise UnknownTransferError(transfer_id, self._closed.get(transfer_id, "never expected"))
        return reservation

    def _close(self, transfer_id: str, reason: str) -> None:
        del self._pending[transfer_id]
        self._closed[transfer_id] = reason
        if len(self._closed) > _MAX_CLOSED_IDS:
            self._closed.popitem(last=False)

    def _check_chunk(
        self,
        transfer_id: str,
        reservation: _Reservation,
        layer_start: int,
        layer_end: int,
        block_start: int,
        block_end: int,
        data: torch.Tensor,
    ) -> None:
        num_layers, num_blocks = self.layout.num_layers, len(reservation.block_ids)
        if not 0 <= layer_start < layer_end <= num_layers:
            raise ValueError(f"transfer {transfer_id!r}: layers [{layer_start}, {layer_end}) outside [0, {num_layers})")
        if not 0 <= block_start < block_end <= num_blocks:
            raise ValueError(
                f"transfer {transfer_id!r}: blocks [{block_start}, {block_end}) outside the "
                f"reservation's [0, {num_blocks})"
            )
        shape = self.layout.chunk_shape(layer_end - layer_start, block_end - block_start)
        if tuple(data.shape) != shape:
            raise ValueError(f"transfer {transfer_id!r}: chunk shape {tuple(data.shape)} != expected {shape}")


def _describe_missing(is_written: torch.Tensor) -> str:
    """'layer 0 blocks [2, 4); layer 3 blocks [0, 1) [5, 6)' for the pairs not yet written."""
    parts = []
    for layer, row in enumerate(is_written.tolist()):
        ranges, start = [], None
        for block, written in enumerate([*row, True]):  # a True sentinel closes a trailing range
            if not written and start is None:
                start = block
            elif written and start is not None:
                ranges.append(f"[{start}, {block})")
                start = None
        if ranges:
            parts.append(f"layer {layer} blocks " + " ".join(ranges))
    shown = "; ".join(parts[:4])
    return shown if len(parts) <= 4 else f"{shown}; ... ({len(parts)} layers incomplete)"
