"""`KVTransport`: how KV chunks reach a peer's `KVReceiver` (gRPC stream or same process), the
registry of implementations, and the one mapping from receiver errors to status code names."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from kvtransfer.layout import KVLayout, KVLayoutMismatchError
from kvtransfer.receiver import KVCommitInfo, UnknownTransferError

HANDSHAKE_TIMEOUT_S = 10.0


@dataclass
class KVChunkData:
    """Layers [layer_start, layer_end) of the reservation's blocks at positions [block_start, block_end)."""

    layer_start: int
    layer_end: int
    block_start: int
    block_end: int
    data: torch.Tensor  # [layer_end - layer_start, 2, block_end - block_start, block_size, kv_heads, head_dim]

    @property
    def num_bytes(self) -> int:
        return self.data.numel() * self.data.element_size()


class KVTransferError(RuntimeError):
    """The peer refused or failed a transfer; `code` is the gRPC status code name when there is one."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(f"{code}: {message}" if code else message)
        self.code = code


class KVTransport(Protocol):
    async def handshake(self, address: str, layout: KVLayout, timeout: float = HANDSHAKE_TIMEOUT_S) -> KVLayout:
        """The peer's layout; KVLayoutMismatchError (phrased from our side) when it differs from ours."""
        ...

    async def push(
        self,
        address: str,
        transfer_id: str,
        chunks: Iterable[KVChunkData],
        commit: KVCommitInfo,
        timeout: float,
    ) -> int:
        """Send every chunk then the commit, all within `timeout` seconds; the bytes the peer acknowledged."""
        ...

    async def close(self) -> None:
        ...


TRANSPORTS: dict[str, type] = {}  # filled by grpc_transport and local_transport


def make_transport(name: str, sender_id: str = "") -> KVTransport:
    if name not in TRANSPORTS:
        raise ValueError(f"unknown KV transport {name!r}; known: {sorted(TRANSPORTS)}")
    return TRANSPORTS[name](sender_id)


def status_code_name(error: Exception) -> str | None:
    """The gRPC status code a receiver-side error maps to (both transports report the same)."""
    if isinstance(error, KVLayoutMismatchError):  # before ValueError: it is one
        return "FAILED_PRECONDITION"
    if isinstance(error, UnknownTransferError):
        return "NOT_FOUND"
    if isinstance(error, ValueError):
        return "INVALID_ARGUMENT"
    return None
