"""`KVSender`: the prefill worker's side of KV hand-offs. Handshakes once per decode worker (layout
check, transport agreed, data half connected), then per prompt: begin (take the reservation),
push (layer groups as they are computed), commit (the first token) or abandon."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import torch

from pdserve.kvtransfer.control import KVControlClient, layout_from_proto
from pdserve.kvtransfer.layer_progress import layer_bounds
from pdserve.kvtransfer.layout import KVLayout
from pdserve.kvtransfer.receiver import KVCommitInfo
from pdserve.kvtransfer.transport import TRANSPORTS, Endpoint, KVSendHalf, KVTransferError, OutgoingTransfer, PeerInfo
from pdserve.proto.cluster_secret import ClusterSecret

logger = logging.getLogger(__name__)
ABANDON_TIMEOUT_S = 5.0
PEER_CLOSE_DELAY_S = 30.0


@dataclass
class KVPeer:
    """A handshaken decode worker."""

    info: PeerInfo
    transport: str
    half: KVSendHalf


@dataclass(frozen=True)
class Reservation:
    """A decode worker's blocks this sender has begun to fill."""

    transfer_id: str
    block_ids: list[int]  # to write: the prompt's blocks after the first `num_present_blocks`
    deadline: float  # time.monotonic(): the end of its lease
    num_present_blocks: int = 0  # the prompt's first blocks, which the decode worker already holds


class KVSender:
    def __init__(
        self,
        kv_cache: torch.Tensor,
        layout: KVLayout,
        sender_id: str,
        endpoint: Endpoint,
        offered: list[str],
        layers_per_group: int = 4,
        *,
        secret: ClusterSecret,
    ) -> None:
        """Signs its calls with `secret` as `sender_id`; a peer must prove it holds the same."""
        if KVLayout.of(kv_cache, layout.model_id, (layout.k_scales, layout.v_scales)) != layout:
            raise ValueError(f"layout {layout} does not describe kv_cache {tuple(kv_cache.shape)} {kv_cache.dtype}")
        if layers_per_group <= 0:
            raise ValueError(f"layers_per_group must be > 0, got {layers_per_group}")
        self.kv_cache = kv_cache  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
        self.layout = layout
        self.sender_id = sender_id
        self.endpoint = endpoint
        self.offered = offered
        self.secret = secret
        self.bounds = layer_bounds(layout.num_layers, layers_per_group)
        self.bytes_sent = 0
        self._peers: dict[str, KVPeer] = {}
        self._connecting: dict[str, asyncio.Lock] = {}

    async def connect(self, address: str, timeout: float) -> KVPeer:
        """The peer at `address`, handshaken once (KVLayoutMismatchError / NoCommonTransportError
        when it cannot take our KV, UnprovenPeerError when it does not hold the cluster secret)."""
        lock = self._connecting.setdefault(address, asyncio.Lock())
        async with lock:
            peer = self._peers.get(address)
            if peer is not None and peer.half.is_broken:
                del self._peers[address]
                await _close_peer(peer)
            if address not in self._peers:
                self._peers[address] = await self._handshake(address, timeout)
        return self._peers[address]

    async def begin(self, peer: KVPeer, transfer_id: str, num_blocks: int, timeout: float) -> Reservation:
        control: KVControlClient = peer.info.control
        try:
            response = await control.begin(self.sender_id, transfer_id, num_blocks, timeout)
        except KVTransferError as error:
            self._forget_if_gone(peer, error)
            raise
        if response.num_present_blocks < 0 or response.num_present_blocks + len(response.block_ids) != num_blocks:
            raise KVTransferError(
                f"{peer.info.address}: the reservation of transfer {transfer_id!r} has {response.num_present_blocks} "
                f"blocks present and {len(response.block_ids)} to write; the prompt has {num_blocks}"
            )
        deadline = time.monotonic() + response.lease_remaining_s
        return Reservation(transfer_id, list(response.block_ids), deadline, response.num_present_blocks)

    async def push(self, peer: KVPeer, transfer: OutgoingTransfer) -> int:
        try:
            num_bytes = await peer.half.push(transfer)
        except KVTransferError as error:
            self._forget_if_gone(peer, error)
            raise
        self.bytes_sent += num_bytes
        return num_bytes

    async def commit(self, peer: KVPeer, transfer_id: str, info: KVCommitInfo, timeout: float) -> int:
        control: KVControlClient = peer.info.control
        return await control.commit(self.sender_id, transfer_id, info, timeout)

    async def abandon(self, peer: KVPeer, transfer_id: str, reason: str) -> None:
        """Best effort: the peer's lease is the backstop."""
        control: KVControlClient = peer.info.control
        try:
            await control.abandon(self.sender_id, transfer_id, reason, ABANDON_TIMEOUT_S)
        except Exception as error:  # noqa: BLE001 - the peer may be gone, its channel closed
            logger.info("abandoning transfer %s at %s failed: %s", transfer_id, peer.info.address, error)

    def transfer_bytes(self, num_blocks: int) -> int:
        return self.layout.chunk_num_bytes(self.layout.num_layers, num_blocks)

    async def close(self) -> None:
        for peer in self._peers.values():
            await _close_peer(peer)
        self._peers.clear()

    async def _handshake(self, address: str, timeout: float) -> KVPeer:
        """Agree on the first transport both ends can use; if connecting over it fails here (say,
        the peer's GPU is not visible to us), agree on the next one we offer."""
        offered = list(self.offered)
        while True:
            control = KVControlClient(address, self.secret, self.sender_id)
            response = None
            try:
                response = await control.handshake(self.sender_id, self.layout, offered, self.endpoint, timeout)
                info = PeerInfo(address, response.receiver_id, layout_from_proto(response.layout), dict(response.params), control)
                connect = TRANSPORTS[response.transport].connect
                half = await asyncio.to_thread(connect, self.kv_cache, self.sender_id, self.endpoint, info)
            except (RuntimeError, OSError, ValueError) as error:
                await control.close()
                is_connect_failure = response is not None and not isinstance(error, KVTransferError)
                if is_connect_failure and len(offered) > 1 and response.transport in offered:
                    logger.warning("KV transport %s to %s failed (%s); trying the next", response.transport, address, error)
                    offered.remove(response.transport)
                    continue
                raise
            except BaseException:
                await control.close()
                raise
            logger.info("KV hand-offs to %s go over %s", address, response.transport)
            return KVPeer(info, response.transport, half)

    def _forget_if_gone(self, peer: KVPeer, error: KVTransferError) -> None:
        """A peer that stopped answering may come back restarted, configured otherwise: handshake anew."""
        if error.code in ("UNAVAILABLE", "FAILED_PRECONDITION") and self._peers.get(peer.info.address) is peer:
            del self._peers[peer.info.address]
            # Closed later: calls still in flight on it (an abandon, another prompt's commit) end first.
            loop = asyncio.get_running_loop()
            loop.call_later(PEER_CLOSE_DELAY_S, lambda: loop.create_task(_close_peer(peer)))


async def _close_peer(peer: KVPeer) -> None:
    try:
        await peer.half.close()
    finally:
        await peer.info.control.close()
