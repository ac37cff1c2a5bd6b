"""`WorkerPool`: the gateway's view of the workers: who exists (from the registry), a gRPC channel
to each (every call signed with the cluster secret), their status polled with a deadline (healthy
only if the worker proves it holds the secret too), and the choice of the least-loaded healthy worker."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field

import grpc

from proto import GRPC_OPTIONS, auth
from proto import pdserve_pb2 as pb
from proto import pdserve_pb2_grpc as pb_grpc
from proto.cluster_secret import ClusterSecret
from router.backend import BackendUnavailableError
from router.registry import Registry, WorkerRecord

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class WorkerHandle:
    record: WorkerRecord
    channel: grpc.aio.Channel
    stub: pb_grpc.PrefillWorkerStub | pb_grpc.DecodeWorkerStub
    status: pb.WorkerStatus | None = None
    is_healthy: bool = False
    num_in_flight: int = 0  # requests this gateway has sent and not finished
    is_unproven: bool = False  # it answered without proving it holds the cluster secret
    last_seen: float = field(default_factory=time.monotonic)

    @property
    def load(self) -> tuple[int, float]:
        used = self.status.num_used_blocks / max(1, self.status.num_total_blocks) if self.status else 1.0
        return self.num_in_flight, used


class WorkerPool:
    def __init__(self, registry: Registry, secret: ClusterSecret, poll_interval_s: float = 0.5, rpc_timeout_s: float = 2.0) -> None:
        self.registry = registry
        self.secret = secret
        self.caller = auth.default_caller("gateway")
        self.poll_interval_s = poll_interval_s
        self.rpc_timeout_s = rpc_timeout_s
        self.workers: dict[str, WorkerHandle] = {}
        self._task: asyncio.Task | None = None
        self._refreshing = asyncio.Lock()  # the poller and /admin/workers may refresh at once

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._poll_forever())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for handle in self.workers.values():
            await handle.channel.close()
        self.workers.clear()
        await self.registry.close()

    async def wait_ready(self, timeout_s: float) -> bool:
        """True once at least one healthy prefill and one healthy decode worker are known."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.healthy("prefill") and self.healthy("decode"):
                return True
            await asyncio.sleep(0.1)
        return False

    def healthy(self, role: str) -> list[WorkerHandle]:
        return [w for w in self.workers.values() if w.record.role == role and w.is_healthy]

    def pick(self, role: str) -> WorkerHandle:
        """The healthy worker of `role` with the fewest requests in flight, then the emptiest cache."""
        candidates = self.healthy(role)
        if not candidates:
            raise BackendUnavailableError(f"no healthy {role} worker is available")
        return min(candidates, key=lambda w: w.load)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - a bad poll must not stop the next one
                logger.exception("refreshing the worker pool failed")

    async def refresh(self) -> None:
        async with self._refreshing:
            await self._refresh()

    async def _refresh(self) -> None:
        records = {r.worker_id: r for r in await self.registry.list_workers()}
        for worker_id in list(self.workers):
            if worker_id not in records or records[worker_id] != self.workers[worker_id].record:
                handle = self.workers.pop(worker_id)
                await handle.channel.close()
        for worker_id, record in records.items():
            if worker_id not in self.workers:
                self.workers[worker_id] = self._connect(record)
        await asyncio.gather(*(self._poll(h) for h in list(self.workers.values())))

    def _connect(self, record: WorkerRecord) -> WorkerHandle:
        channel = auth.channel(record.address, self.secret, self.caller, GRPC_OPTIONS)
        stub_cls = pb_grpc.PrefillWorkerStub if record.role == "prefill" else pb_grpc.DecodeWorkerStub
        return WorkerHandle(record, channel, stub_cls(channel))

    async def _poll(self, handle: WorkerHandle) -> None:
        nonce = secrets.token_bytes(16)
        try:
            status = await handle.stub.GetStatus(pb.StatusRequest(nonce=nonce), timeout=self.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            if handle.is_healthy:
                logger.warning("worker %s at %s is unhealthy: %s", handle.record.worker_id, handle.record.address, exc.code())
            handle.is_healthy = False
            return
        if not auth.is_proven(self.secret, auth.STATUS_PROOF, nonce, handle.record.worker_id, status.proof):
            if not handle.is_unproven:
                logger.warning("%s at %s did not prove it holds the cluster secret: no traffic", handle.record.worker_id, handle.record.address)
            handle.is_healthy, handle.is_unproven = False, True
            return
        handle.status, handle.is_healthy, handle.last_seen = status, True, time.monotonic()
