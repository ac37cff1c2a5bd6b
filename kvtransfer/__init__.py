"""KV transfer: moves one request's prompt KV from a prefill worker's paged cache into the blocks
a decode worker reserved for it (`KVSender` -> `KVTransport` ("grpc" | "local") -> `KVReceiver`)."""
from __future__ import annotations

from kvtransfer.layout import KVLayout, KVLayoutMismatchError
from kvtransfer.receiver import KVCommitInfo, KVReceiver, UnknownTransferError
from kvtransfer.transport import TRANSPORTS, KVChunkData, KVTransferError, KVTransport, make_transport
from kvtransfer import grpc_transport, local_transport  # noqa: E402,F401  (fill TRANSPORTS)
from kvtransfer.sender import KVSender, TransferResult

__all__ = [
    "KVChunkData", "KVCommitInfo", "KVLayout", "KVLayoutMismatchError", "KVReceiver", "KVSender",
    "KVTransferError", "KVTransport", "TRANSPORTS", "TransferResult", "UnknownTransferError", "make_transport",
]
