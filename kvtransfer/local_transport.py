"""`LocalTransport`: KV transfer between a sender and a receiver in the same process (tests,
single-process deployments). Tensors go straight into `KVReceiver.write`; nothing is serialised."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from kvtransfer.layout import KVLayout, KVLayoutMismatchError
from kvtransfer.receiver import KVCommitInfo, KVReceiver, UnknownTransferError
from kvtransfer.transport import HANDSHAKE_TIMEOUT_S, TRANSPORTS, KVChunkData, KVTransferError, status_code_name

_RECEIVERS: dict[str, KVReceiver] = {}  # address -> receiver


def register_receiver(address: str, receiver: KVReceiver) -> None:
    if address in _RECEIVERS:
        raise ValueError(f"a KV receiver is already registered at {address!r}")
    _RECEIVERS[address] = receiver


def unregister_receiver(address: str) -> None:
    _RECEIVERS.pop(address, None)


class LocalTransport:
    def __init__(self, sender_id: str = "") -> None:
        self.sender_id = sender_id

    async def handshake(self, address: str, layout: KVLayout, timeout: float = HANDSHAKE_TIMEOUT_S) -> KVLayout:
        receiver = _receiver_at(address)
        mismatches = layout.mismatches(receiver.layout)
        if mismatches:
            raise KVLayoutMismatchError(mismatches)
        return receiver.layout

    async def push(
        self,
        address: str,
        transfer_id: str,
        chunks: Iterable[KVChunkData],
        commit: KVCommitInfo,
        timeout: float,
    ) -> int:
        receiver = _receiver_at(address)
        deadline = time.monotonic() + timeout
        num_bytes = 0
        try:
            for chunk in chunks:
                if time.monotonic() > deadline:
                    raise KVTransferError(f"transfer {transfer_id!r} ran past {timeout}s", "DEADLINE_EXCEEDED")
                num_bytes += receiver.write(
                    transfer_id, chunk.layer_start, chunk.layer_end, chunk.block_start, chunk.block_end, chunk.data
                )
                await asyncio.sleep(0)  # like a network stream, let other tasks run between chunks
            receiver.commit(transfer_id, commit)
        except (UnknownTransferError, ValueError) as error:
            raise KVTransferError(str(error), status_code_name(error)) from error
        return num_bytes

    async def close(self) -> None:
        pass


def _receiver_at(address: str) -> KVReceiver:
    receiver = _RECEIVERS.get(address)
    if receiver is None:
        raise KVTransferError(f"no KV receiver registered at {address!r}", "UNAVAILABLE")
    return receiver


TRANSPORTS["local"] = LocalTransport
