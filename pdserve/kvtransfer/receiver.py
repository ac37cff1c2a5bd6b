"""`KVReceiver`: the decode worker's side of KV hand-offs. Holds the reservations (blocks waiting for
a prompt's KV, each under a lease), which sender took each, the writes into them (on a CUDA stream
of its own, so the decode engine never waits for them), and the commit. It never frees blocks: the
decode worker's BlockManager does, from what `cancel` and `poll` tell it."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from pdserve import kernels
from pdserve.engine.outputs import TokenLogprobs
from pdserve.kernels.kv_quant import as_bytes
from pdserve.kvtransfer.layout import KVLayout, KVScales

_MAX_CLOSED_IDS = 4096  # ended transfers remembered only to say why a late message is refused
HOLD_GRACE_S = 10.0  # a device writer's blocks stay held this long past the lease, at most


@dataclass(frozen=True)
class KVCommitInfo:
    """What the prefill worker learned besides the KV: the first generated token."""

    first_token_id: int
    first_logprobs: TokenLogprobs | None
    num_prompt_tokens: int
    # With n > 1: the first tokens of sequences 1..n-1 (they share this KV; the decode worker forks it).
    sibling_token_ids: tuple[int, ...] = ()
    sibling_logprobs: tuple[TokenLogprobs | None, ...] = ()


class UnknownTransferError(KeyError):
    """A message for a transfer that is not pending: never expected, or already ended."""

    def __init__(self, transfer_id: str, reason: str) -> None:
        super().__init__(transfer_id)
        self.transfer_id = transfer_id
        self.reason = reason

    def __str__(self) -> str:  # KeyError would print only the quoted id
        return f"transfer {self.transfer_id!r} is not pending: {self.reason}"


# on_commit(info, ready): `ready` is the CUDA event after the KV writes (None on the CPU or when
# the sender wrote it itself); the first step that reads the KV must wait on it.
OnCommit = Callable[[KVCommitInfo, torch.cuda.Event | None], object]
# check_commit(info): raises ValueError when the commit does not fit its request (a token outside
# the vocabulary, another prompt length): that commit is refused and the reservation stays pending.
CheckCommit = Callable[[KVCommitInfo], None]


@dataclass
class _Reservation:
    block_ids: list[int]
    block_index: torch.Tensor  # int64 [num_blocks] on the cache's device
    deadline: float  # time.monotonic()
    on_commit: OnCommit
    check_commit: CheckCommit | None
    is_written: torch.Tensor  # bool [num_layers, num_blocks]: written at least once
    sender_id: str | None = None  # who began it
    # The prompt's first blocks, which this worker already holds (`keep_present`): nothing is
    # written into them; `block_ids` are the rest. Held with them when a device writer ends.
    present_block_ids: list[int] = field(default_factory=list)
    is_handed_out: bool = False  # its sender was told the blocks to write (`to_write`): they stay
    is_device_writer: bool = False  # that sender writes into the blocks itself (CUDA IPC)
    num_bytes: int = 0


class _Held(NamedTuple):
    """The blocks of a reservation that ended while a device writer (CUDA IPC) may still write them."""

    block_ids: list[int]
    deadline: float  # time.monotonic(): free by then whatever the writer does
    sender_id: str | None  # the writer: its commit or abandon frees them sooner


@dataclass(frozen=True)
class Ended:
    """A reservation that ended without a commit (lease expired, sender abandoned it)."""

    transfer_id: str
    reason: str
    is_free: bool  # its blocks may be reused now; else `poll` hands them back later


class KVReceiver:
    """Thread-safe: messages arrive on gRPC threads while the owner (the decode engine's loop)
    reserves, cancels and polls. Writes are issued under the lock, so once a reservation ended no
    write of ours lands in its blocks; a device writer's blocks are held until it says it is done."""

    def __init__(self, kv_cache: torch.Tensor, model_id: str, receiver_id: str = "", kv_scales: KVScales = ((), ())) -> None:
        self.kv_cache = kv_cache  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
        self.layout = KVLayout.of(kv_cache, model_id, kv_scales)
        self.receiver_id = receiver_id
        self.bytes_received = 0
        self._lock = threading.Lock()
        self._pending: dict[str, _Reservation] = {}
        self._closed: OrderedDict[str, str] = OrderedDict()  # transfer_id -> why it ended
        self._ended: list[Ended] = []  # for the owner's next poll
        self._held: dict[str, _Held] = {}
        self._released: list[list[int]] = []
        self._stream = torch.cuda.Stream(kv_cache.device) if kv_cache.is_cuda else None
        self._positions = torch.arange(kv_cache.shape[2], device=kv_cache.device)  # identity block ids

    # -- the owner ------------------------------------------------------------------------------
    def expect(
        self,
        transfer_id: str,
        block_ids: list[int],
        deadline: float,
        on_commit: OnCommit,
        check_commit: CheckCommit | None = None,
    ) -> None:
        """Accept a sender for `transfer_id` into `block_ids` until commit, cancel or `deadline`;
        `check_commit` vets the commit's own fields (called under our lock: it must not call us)."""
        num_cache_blocks = self.kv_cache.shape[2]
        if not block_ids or len(set(block_ids)) != len(block_ids):
            raise ValueError(f"transfer {transfer_id!r}: block ids {block_ids} must be distinct and non-empty")
        if not all(0 <= block_id < num_cache_blocks for block_id in block_ids):
            raise ValueError(f"transfer {transfer_id!r}: block ids {block_ids} outside [0, {num_cache_blocks})")
        with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
            block_index = torch.tensor(block_ids, dtype=torch.long).to(self.kv_cache.device)  # used on our stream
        reservation = _Reservation(
            block_ids=list(block_ids),
            block_index=block_index,
            deadline=deadline,
            on_commit=on_commit,
            check_commit=check_commit,
            is_written=torch.zeros(self.layout.num_layers, len(block_ids), dtype=torch.bool),
        )
        with self._lock:
            if transfer_id in self._pending or transfer_id in self._held:
                raise ValueError(f"transfer {transfer_id!r} is already pending")
            self._closed.pop(transfer_id, None)
            self._pending[transfer_id] = reservation

    def cancel(self, transfer_id: str) -> bool:
        """Drop a reservation (pending or not). True: its blocks may be reused now; False: a device
        writer may still be writing them (`poll` hands them back once it is done)."""
        with self._lock:
            if transfer_id in self._pending:
                return self._close(transfer_id, "cancelled")
            if transfer_id in self._held:
                return False
            self._fence()  # committed meanwhile: its writes may still be on our stream
            return True

    def is_held(self, transfer_id: str) -> bool:
        """Whether `transfer_id`'s blocks are held for a device writer (the id may not be reused yet)."""
        with self._lock:
            return transfer_id in self._held

    def poll(self, now: float | None = None) -> tuple[list[Ended], list[list[int]]]:
        """Reservations that ended by themselves since the last poll, and held blocks now free."""
        now = time.monotonic() if now is None else now
        with self._lock:
            for transfer_id in [t for t, r in self._pending.items() if r.deadline <= now]:
                self._ended.append(Ended(transfer_id, "expired", self._close(transfer_id, "expired")))
            for transfer_id in [t for t, held in self._held.items() if held.deadline <= now]:
                self._release(transfer_id)
            ended, released = self._ended, self._released
            self._ended, self._released = [], []
        return ended, released

    def is_pending(self, transfer_id: str) -> bool:
        with self._lock:
            return transfer_id in self._pending

    @property
    def num_held_blocks(self) -> int:
        with self._lock:
            return sum(len(held.block_ids) for held in self._held.values())

    # -- the sender's messages --------------------------------------------------------------------
    def begin(self, transfer_id: str, sender_id: str, num_blocks: int, is_device_writer: bool) -> None:
        """`sender_id` takes the reservation (what it writes: `to_write`)."""
        with self._lock:
            reservation = self._get(transfer_id)
            if reservation.sender_id not in (None, sender_id):
                raise ValueError(f"transfer {transfer_id!r} was already begun by {reservation.sender_id}")
            num_reserved = len(reservation.present_block_ids) + len(reservation.block_ids)
            if num_blocks != num_reserved:
                raise ValueError(f"transfer {transfer_id!r}: the sender has {num_blocks} blocks, the reservation {num_reserved}")
            reservation.sender_id = sender_id
            reservation.is_device_writer = is_device_writer

    def to_write(self, transfer_id: str, sender_id: str) -> tuple[float, list[int], int]:
        """What a begun transfer's sender writes: the seconds left on its lease, the blocks, and how
        many of the prompt's first blocks come before them, already here (`keep_present`)."""
        with self._lock:
            reservation = self._get_begun(transfer_id, sender_id)
            reservation.is_handed_out = True
            return reservation.deadline - time.monotonic(), list(reservation.block_ids), len(reservation.present_block_ids)

    def keep_present(self, transfer_id: str, sender_id: str, present_block_ids: list[int]) -> None:
        """The prompt's first `len(present_block_ids)` blocks are already here, in those blocks
        (cached from an earlier transfer of `sender_id`): they replace the reservation's first
        blocks, which the owner frees, and the sender writes only the rest. Before the sender
        learns its blocks (`to_write`): nothing may have been written into the replaced ones."""
        with self._lock:
            reservation = self._get_begun(transfer_id, sender_id)
            num_present = len(present_block_ids)
            if reservation.present_block_ids or not 0 < num_present < len(reservation.block_ids):
                raise ValueError(f"transfer {transfer_id!r}: cannot keep {num_present} present blocks")
            if reservation.is_handed_out:  # a second Begin of its sender was answered meanwhile
                raise ValueError(f"transfer {transfer_id!r}: its sender knows its blocks already")
            if bool(reservation.is_written[:, :num_present].any()):
                raise ValueError(f"transfer {transfer_id!r}: its first blocks are written already")
            reservation.present_block_ids = list(present_block_ids)
            reservation.block_ids = reservation.block_ids[num_present:]
            reservation.block_index = reservation.block_index[num_present:]
            reservation.is_written = reservation.is_written[:, num_present:]

    def num_reserved_blocks(self, transfer_id: str, sender_id: str) -> int:
        """The blocks its sender writes (after any the owner kept: `keep_present`)."""
        with self._lock:
            return len(self._get_begun(transfer_id, sender_id).block_ids)

    def write(
        self,
        transfer_id: str,
        sender_id: str,
        layer_start: int,
        layer_end: int,
        block_start: int,
        block_end: int,
        data: torch.Tensor,
        ready: torch.cuda.Event | None = None,
    ) -> int:
        """Write `data` `[layer_end - layer_start, 2, block_end - block_start, block_size, kv_heads,
        head_dim]` (on the CPU or this device; `ready`: the event after which it is valid) into
        those layers of the reservation's blocks [block_start, block_end). Returns the bytes; on
        any error nothing is written."""
        if data.dtype != self.kv_cache.dtype:
            raise ValueError(f"transfer {transfer_id!r}: chunk dtype {data.dtype} != cache dtype {self.kv_cache.dtype}")
        data = self._upload(data, ready)  # before taking the lock: may be a large host copy
        with self._lock:
            reservation = self._get_begun(transfer_id, sender_id)
            self._check_chunk(transfer_id, reservation, layer_start, layer_end, block_start, block_end, data)
            self._scatter(layer_start, layer_end, reservation.block_index[block_start:block_end], data)
            reservation.is_written[layer_start:layer_end, block_start:block_end] = True
            num_bytes = data.numel() * data.element_size()
            reservation.num_bytes += num_bytes
            self.bytes_received += num_bytes
        return num_bytes

    def commit(self, transfer_id: str, sender_id: str, info: KVCommitInfo) -> int:
        """End the transfer: every (layer, block) must have been written (a device writer vouches
        for its own writes). The bytes received."""
        ready = None
        with self._lock:
            self._release(transfer_id, sender_id)  # a late commit: the sender is done with blocks we gave up
            reservation = self._get_begun(transfer_id, sender_id)
            if not reservation.is_device_writer and not bool(reservation.is_written.all()):
                raise ValueError(
                    f"transfer {transfer_id!r}: commit before all KV arrived; missing "
                    + _describe_missing(reservation.is_written)
                )
            if reservation.check_commit is not None:
                reservation.check_commit(info)  # a refused commit changes nothing
            if reservation.is_device_writer:
                reservation.num_bytes = self.layout.chunk_num_bytes(self.layout.num_layers, len(reservation.block_ids))
                self.bytes_received += reservation.num_bytes
            if self._stream is not None and not reservation.is_device_writer:
                ready = self._stream.record_event()
            self._remember_closed(transfer_id, "already committed")
            del self._pending[transfer_id]
        reservation.on_commit(info, ready)  # outside the lock: the callback may call back into us
        return reservation.num_bytes

    def abandon(self, transfer_id: str, sender_id: str, reason: str) -> None:
        """The sender writes nothing more for `transfer_id`: a pending reservation ends, and blocks
        held for it are free."""
        with self._lock:
            self._release(transfer_id, sender_id)
            reservation = self._pending.get(transfer_id)
            if reservation is not None and reservation.sender_id == sender_id:
                reservation.is_device_writer = False  # it said it is done writing
                self._close(transfer_id, f"abandoned by the sender: {reason}")
                self._ended.append(Ended(transfer_id, f"the prefill worker gave it up: {reason}", True))

    # -- inside ---------------------------------------------------------------------------------
    def _get(self, transfer_id: str) -> _Reservation:
        reservation = self._pending.get(transfer_id)
        if reservation is None:
            raise UnknownTransferError(transfer_id, self._closed.get(transfer_id, "never expected"))
        return reservation

    def _get_begun(self, transfer_id: str, sender_id: str) -> _Reservation:
        reservation = self._get(transfer_id)
        if reservation.sender_id != sender_id:
            raise ValueError(f"transfer {transfer_id!r} was not begun by {sender_id!r}")
        return reservation

    def _close(self, transfer_id: str, reason: str) -> bool:
        """Ends a pending reservation; whether its blocks are free now (else they are held)."""
        reservation = self._pending.pop(transfer_id)
        self._remember_closed(transfer_id, reason)
        if reservation.is_device_writer:
            blocks = reservation.present_block_ids + reservation.block_ids
            self._held[transfer_id] = _Held(
                blocks, max(reservation.deadline, time.monotonic()) + HOLD_GRACE_S, reservation.sender_id
            )
            return False
        self._fence()
        return True

    def _remember_closed(self, transfer_id: str, reason: str) -> None:
        """Why `transfer_id` ended, for late messages; only the latest `_MAX_CLOSED_IDS` are kept."""
        self._closed[transfer_id] = reason
        if len(self._closed) > _MAX_CLOSED_IDS:
            self._closed.popitem(last=False)

    def _release(self, transfer_id: str, sender_id: str | None = None) -> None:
        """Held blocks free: at their deadline (no `sender_id`), or when the sender that writes them is done."""
        held = self._held.get(transfer_id)
        if held is not None and sender_id in (None, held.sender_id):
            del self._held[transfer_id]
            self._released.append(held.block_ids)

    def _fence(self) -> None:
        """Work issued after this (a decode step reusing freed blocks) runs after our writes."""
        if self._stream is not None:
            torch.cuda.default_stream(self.kv_cache.device).wait_stream(self._stream)

    def _upload(self, data: torch.Tensor, ready: torch.cuda.Event | None) -> torch.Tensor:
        """`data` on the cache's device, ordered on our stream (host data through pinned memory)."""
        if self._stream is None:
            return data
        with torch.cuda.stream(self._stream):
            if ready is not None:
                self._stream.wait_event(ready)
            if data.is_cuda:
                data.record_stream(self._stream)  # made on another stream: not reused before we read it
                return data
            pinned = torch.empty(data.shape, dtype=data.dtype, pin_memory=True)
            pinned.copy_(data)
            return pinned.to(self.kv_cache.device, non_blocking=True)

    def _scatter(self, layer_start: int, layer_end: int, block_index: torch.Tensor, data: torch.Tensor) -> None:
        cache = self.kv_cache[layer_start:layer_end]
        if self._stream is None:
            as_bytes(cache).index_copy_(2, block_index, as_bytes(data))  # CPU index_copy_ has no fp8
            return
        with torch.cuda.stream(self._stream):
            kernels.copy_kv_blocks(data, self._positions[: block_index.shape[0]], cache, block_index)

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
                f"transfer {transfer_id!r}: blocks [{block_start}, {block_end}) outside the reservation's [0, {num_blocks})"
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
