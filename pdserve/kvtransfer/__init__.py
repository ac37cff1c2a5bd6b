"""KV hand-off: moves a prompt's KV from a prefill worker's paged cache into the blocks a decode
worker reserved for it. Control over gRPC (`control.py`); the bytes over one of the data-plane
transports in `TRANSPORTS` (`cuda_ipc`, `nccl`, `grpc`, `local`), agreed in each pair's handshake."""

from __future__ import annotations

from pdserve.kvtransfer import cuda_ipc, grpc_transport, local_transport, nccl_transport  # noqa: F401  (fill TRANSPORTS)
from pdserve.kvtransfer.layer_progress import LayerProgress
from pdserve.kvtransfer.layout import KVLayout, KVLayoutMismatchError
from pdserve.kvtransfer.receiver import KVCommitInfo, KVReceiver, UnknownTransferError
from pdserve.kvtransfer.sender import KVPeer, KVSender
from pdserve.kvtransfer.transport import (
    AUTO,
    TRANSPORTS,
    Endpoint,
    KVTransferError,
    NoCommonTransportError,
    OutgoingTransfer,
    UnprovenPeerError,
    accepts,
    choose,
    offers,
)

__all__ = [
    "AUTO",
    "Endpoint",
    "KVCommitInfo",
    "KVLayout",
    "KVLayoutMismatchError",
    "KVPeer",
    "KVReceiver",
    "KVSender",
    "KVTransferError",
    "LayerProgress",
    "NoCommonTransportError",
    "OutgoingTransfer",
    "TRANSPORTS",
    "UnknownTransferError",
    "UnprovenPeerError",
    "accepts",
    "choose",
    "offers",
]
