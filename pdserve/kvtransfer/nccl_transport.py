"""The `nccl` transport: torch.distributed point-to-point between one prefill and one decode worker,
a two-rank process group per pair made on demand (the decode worker hosts its rendezvous store and
names it in the handshake), dropped and made anew when it fails. NCCL between GPUs; on CPU workers
the same code runs over gloo (which is how the CPU tests exercise it). Per pair, transfers go one
at a time, each layer group one send/recv, so both ends' operations match in order."""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grpc
import torch
import torch.distributed as dist

from pdserve.kernels.kv_quant import as_bytes
from pdserve.kvtransfer.layer_progress import LayerProgress
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
from pdserve.proto import pdserve_pb2 as pb

logger = logging.getLogger(__name__)
SENDER_RANK, RECEIVER_RANK = 0, 1
GROUP_TIMEOUT_S = 60.0  # rendezvous, and any one send or receive


class _Pair:
    """One end of a two-rank process group, with the one thread that runs its operations in order."""

    def __init__(self, name: str) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.group: Future = Future()
        self.stream: torch.cuda.Stream | None = None
        self.is_broken = False

    async def run(self, fn: Callable[..., Any], *args: object) -> Any:
        """`fn(*args)` on the pair's thread. On a pair closed before or meanwhile (by another
        transfer's failure, a new handshake, `close`): KVTransferError UNAVAILABLE, so its sender
        handshakes afresh."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        except Exception as error:  # the executor shut down, or the group was shut down under `fn`
            if self.is_broken:
                raise _closed_error() from error
            raise
        except asyncio.CancelledError:
            if self.is_broken and not asyncio.current_task().cancelling():  # close() dropped it from the queue
                raise _closed_error() from None
            raise

    def close(self) -> None:
        self.is_broken = True
        if self.group.done() and self.group.exception() is None:
            _shut_down(self.group.result())
        self.executor.shutdown(wait=False, cancel_futures=True)


class NcclSendHalf:
    def __init__(self, kv_cache: torch.Tensor, sender_id: str, endpoint: Endpoint, peer: PeerInfo) -> None:
        """Joins the peer's rendezvous: blocks until its end of the group is made too."""
        self.kv_cache = kv_cache
        self.sender_id = sender_id
        self.stub = peer.control.stub
        self.layout = peer.layout
        self._pair = _Pair(f"kv-send-{peer.receiver_id}")
        self._pair.stream = torch.cuda.Stream(kv_cache.device) if kv_cache.is_cuda else None
        self._lock: asyncio.Lock | None = None
        store = dist.TCPStore(
            peer.params["host"].decode(),
            int(peer.params["port"]),
            world_size=2,
            is_master=False,
            timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S),
        )
        self._pair.group.set_result(_make_group(peer.params["backend"].decode(), store, SENDER_RANK, endpoint.address))

    @property
    def is_broken(self) -> bool:
        return self._pair.is_broken

    async def push(self, transfer: OutgoingTransfer) -> int:
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:  # the peer receives our transfers in the order we send them
            if self._pair.is_broken:  # checked once ours: the push before us may have failed and closed it
                raise _closed_error()
            request = pb.ReceiveRequest(
                transfer_id=transfer.transfer_id, sender_id=self.sender_id, layer_bounds=transfer.progress.bounds
            )
            ack = asyncio.ensure_future(self.stub.Receive(request, timeout=max(0.0, transfer.deadline - time.monotonic())))
            sends = asyncio.ensure_future(self._send_groups(transfer))
            try:
                # A receiver that fails (or dies) ends the push at once, not when a send times out.
                await asyncio.wait({ack, sends}, return_when=asyncio.FIRST_EXCEPTION)
                if ack.done() and ack.exception() is not None:
                    await ack
                await sends
                return (await ack).bytes_received
            except BaseException as error:
                self._pair.close()  # the two ends may be out of step now: never use this group again
                for task in (ack, sends):
                    task.cancel()
                await asyncio.gather(ack, sends, return_exceptions=True)  # retrieved: nothing left to log
                if isinstance(error, grpc.aio.AioRpcError):
                    raise KVTransferError(f"the peer's receive failed: {error.details()}", error.code().name) from error
                if isinstance(error, Exception) and not isinstance(error, KVTransferError):  # gloo/NCCL: a lost peer, a timeout
                    raise KVTransferError(f"sending to the peer failed: {error}; handshake again", "UNAVAILABLE") from error
                raise

    async def _send_groups(self, transfer: OutgoingTransfer) -> None:
        index = torch.tensor(transfer.src_block_ids, dtype=torch.long)
        progress: LayerProgress = transfer.progress
        for group, (layer_start, layer_end) in enumerate(progress.groups):
            event = await progress.ready(group, transfer.deadline)
            await self._pair.run(self._send, layer_start, layer_end, index, event)
        if self._pair.stream is not None:  # NCCL runs on the device: wait for the sends there
            await wait_for_event(self._pair.stream.record_event(), transfer.deadline, "nccl send")

    def _send(self, layer_start: int, layer_end: int, index: torch.Tensor, event: torch.cuda.Event | None) -> None:
        group = self._pair.group.result()
        if self._pair.stream is None:
            data = as_bytes(self.kv_cache)[layer_start:layer_end, :, index]  # gloo has no fp8: bytes
            group.send([data], RECEIVER_RANK, 0).wait(datetime.timedelta(seconds=GROUP_TIMEOUT_S))
            return
        with torch.cuda.stream(self._pair.stream):
            if event is not None:
                self._pair.stream.wait_event(event)
            data = as_bytes(self.kv_cache)[layer_start:layer_end, :, index.to(self.kv_cache.device, non_blocking=True)]
            group.send([data], RECEIVER_RANK, 0).wait()  # our stream waits for NCCL's

    async def close(self) -> None:
        self._pair.close()


class NcclReceiveHalf:
    def __init__(self, receiver: KVReceiver, endpoint: Endpoint) -> None:
        self.receiver = receiver
        self.endpoint = endpoint
        self.backend = "nccl" if receiver.kv_cache.is_cuda else "gloo"
        self._pairs: dict[str, _Pair] = {}
        self._lock = threading.Lock()

    def accept(self, sender_id: str, sender: Endpoint) -> dict[str, bytes]:
        """A fresh group for `sender_id` (replacing any earlier one): its store is ours."""
        store = dist.TCPStore(
            self.endpoint.address,
            0,
            world_size=2,
            is_master=True,
            timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S),
            wait_for_workers=False,
        )
        pair = _Pair(f"kv-recv-{sender_id}")
        pair.stream = torch.cuda.Stream(self.receiver.kv_cache.device) if self.backend == "nccl" else None
        with self._lock:
            old, self._pairs[sender_id] = self._pairs.get(sender_id), pair
        if old is not None:
            old.close()
        pair.executor.submit(_join, pair, self.backend, store, self.endpoint.address)
        return {"backend": self.backend.encode(), "host": self.endpoint.address.encode(), "port": str(store.port).encode()}

    async def receive(self, request: pb.ReceiveRequest, context: grpc.aio.ServicerContext) -> pb.KVAck:
        pair = self._pairs.get(request.sender_id)
        if pair is None or pair.is_broken:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"no process group with {request.sender_id}: handshake again")
        try:
            num_blocks = self.receiver.num_reserved_blocks(request.transfer_id, request.sender_id)
            bounds = _check_bounds(list(request.layer_bounds), self.receiver.layout.num_layers)
        except (KeyError, ValueError) as error:
            pair.close()  # the sender is about to send what nobody will receive
            code = grpc.StatusCode.NOT_FOUND if isinstance(error, KeyError) else grpc.StatusCode.INVALID_ARGUMENT
            await context.abort(code, str(error))
        try:
            num_bytes = await pair.run(self._receive, pair, request.transfer_id, request.sender_id, bounds, num_blocks)
        except Exception as error:  # noqa: BLE001 - a timeout or a lost peer: this group is done
            pair.close()
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"receiving from {request.sender_id} failed: {error}")
        except asyncio.CancelledError:
            # The sender left mid-transfer (its end is closed). On NCCL our receives of the layers it
            # will never send would hold our stream, and the decode steps fenced behind it, until the
            # group timed out; aborting the group ends them now.
            pair.close()
            raise
        return pb.KVAck(bytes_received=num_bytes)

    def _receive(self, pair: _Pair, transfer_id: str, sender_id: str, bounds: list[int], num_blocks: int) -> int:
        """The pair's thread: one receive per layer group, each written into the blocks."""
        group, num_bytes = pair.group.result(timeout=GROUP_TIMEOUT_S), 0
        layout, device = self.receiver.layout, self.receiver.kv_cache.device
        for layer_start, layer_end in zip(bounds, bounds[1:]):
            data = torch.empty(layout.chunk_shape(layer_end - layer_start, num_blocks), dtype=layout.torch_dtype, device=device)
            ready = None
            if pair.stream is None:
                group.recv([as_bytes(data)], SENDER_RANK, 0).wait(datetime.timedelta(seconds=GROUP_TIMEOUT_S))
            else:
                with torch.cuda.stream(pair.stream):
                    group.recv([as_bytes(data)], SENDER_RANK, 0).wait()  # our stream waits for NCCL's
                    ready = pair.stream.record_event()
            num_bytes += self.receiver.write(transfer_id, sender_id, layer_start, layer_end, 0, num_blocks, data, ready)
        return num_bytes

    def close(self) -> None:
        with self._lock:
            pairs, self._pairs = list(self._pairs.values()), {}
        for pair in pairs:
            pair.close()


def _closed_error() -> KVTransferError:
    return KVTransferError("the process group to this peer was closed: handshake again", "UNAVAILABLE")


def _join(pair: _Pair, backend: str, store: dist.TCPStore, address: str) -> None:
    try:
        pair.group.set_result(_make_group(backend, store, RECEIVER_RANK, address))
    except Exception as error:  # noqa: BLE001 - the sender never came: receive() reports it
        logger.warning("the KV process group was not made: %s", error)
        pair.group.set_exception(error)


def _make_group(backend: str, store: dist.TCPStore, rank: int, address: str) -> object:
    """Our end of a two-rank group over the rendezvous store; blocks until the other end joins."""
    timeout = datetime.timedelta(seconds=GROUP_TIMEOUT_S)
    store = dist.PrefixStore("pdserve-kv", store)
    if backend == "gloo":
        options = dist.ProcessGroupGloo._Options()
        options._timeout = timeout
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=address)]
        return dist.ProcessGroupGloo(store, rank, 2, options)
    # A lost peer must fail the operation (and let its stream go), not kill this worker.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    return dist.ProcessGroupNCCL(store, rank, 2, options)


def _shut_down(group: object) -> None:
    for name in ("abort", "shutdown"):
        method = getattr(group, name, None)
        if method is not None:
            try:
                method()
                return
            except Exception:  # noqa: BLE001 - best effort: the group is abandoned either way
                pass


def _check_bounds(bounds: list[int], num_layers: int) -> list[int]:
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != num_layers or any(a >= b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"layer bounds {bounds} must rise from 0 to {num_layers}")
    return bounds


TRANSPORTS["nccl"] = Transport(
    name="nccl",
    # NCCL between two GPUs (it refuses two ranks on one GPU); gloo between two CPU workers.
    can_connect=lambda sender, receiver: (
        sender.device == receiver.device and (sender.device == "cpu" or sender.device_uuid != receiver.device_uuid)
    ),
    connect=NcclSendHalf,
    receiver=NcclReceiveHalf,
)
