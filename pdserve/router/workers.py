"""`WorkerPool`: the gateway's view of the workers: who exists (from the registry, and every worker it
already knows while that worker passes its own health checks), a gRPC channel to each (every call
signed with the cluster secret), their status polled with a deadline (healthy only if the worker
proves it holds the secret too), and the choice of the least-loaded healthy worker that is not
draining."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field

import grpc

from pdserve.proto import GRPC_OPTIONS, auth
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.proto.cluster_secret import ClusterSecret
from pdserve.router.backend import BackendUnavailableError
from pdserve.router.closing import end_within
from pdserve.router.registry import Registry, WorkerRecord

logger = logging.getLogger(__name__)
RETIRE_POLL_S = 0.1  # how often a retired handle checks whether its last call has ended
CLOSE_TIMEOUT_S = 5.0  # close(): each step (the pool's tasks, the registry) may take this long


@dataclass(eq=False)
class WorkerHandle:
    record: WorkerRecord
    channel: grpc.aio.Channel
    stub: pb_grpc.PrefillWorkerStub | pb_grpc.DecodeWorkerStub
    status: pb.WorkerStatus | None = None
    is_healthy: bool = False
    is_listed: bool = True  # the registry listed it at its last successful read
    num_in_flight: int = 0  # requests this gateway has sent and not finished
    num_prefill_tokens: int = 0  # prefill workers: prompt tokens of this gateway's it has still to compute
    num_prefill_tokens_at_status: int = 0  # ... as they were when its last status came
    is_unproven: bool = False  # it answered without proving it holds the cluster secret
    last_seen: float = field(default_factory=time.monotonic)

    @property
    def is_draining(self) -> bool:
        return self.status is not None and self.status.is_draining

    @property
    def is_routable(self) -> bool:
        return self.is_healthy and not self.is_draining

    @property
    def load(self) -> tuple[int, float]:
        used = self.status.num_used_blocks / max(1, self.status.num_total_blocks) if self.status else 1.0
        return self.num_in_flight, used


class WorkerPool:
    def __init__(
        self,
        registry: Registry,
        secret: ClusterSecret,
        poll_interval_s: float = 0.5,
        rpc_timeout_s: float = 2.0,
        close_timeout_s: float = CLOSE_TIMEOUT_S,
    ) -> None:
        self.registry = registry
        self.secret = secret
        self.caller = auth.default_caller("gateway")
        self.poll_interval_s = poll_interval_s
        self.rpc_timeout_s = rpc_timeout_s
        self.close_timeout_s = close_timeout_s
        self.is_closed = False
        self.workers: dict[str, WorkerHandle] = {}
        self.retired: set[WorkerHandle] = set()  # out of the pool; channel open until their calls end
        self.is_registry_reachable = True
        self._task: asyncio.Task | None = None
        self._listing: asyncio.Task | None = None  # the registry read in flight
        self._closers: set[asyncio.Task] = set()
        self._refreshing = asyncio.Lock()  # the poller and /admin/workers may refresh at once

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._poll_forever())

    async def close(self) -> None:
        """Stops polling, closes every channel, then the registry; ends within about twice
        `close_timeout_s` even when a client hangs in its close or swallows the poller's cancel."""
        self.is_closed = True
        tasks = [t for t in (self._task, self._listing, *self._closers) if t is not None]
        for task in tasks:
            task.cancel()
        await end_within(tasks, self.close_timeout_s, "the worker pool's poller")
        for handle in [*self.workers.values(), *self.retired]:
            await handle.channel.close()  # no grace: cancels its calls, then returns
        self.workers.clear()
        self.retired.clear()
        await end_within([self.registry.close()], self.close_timeout_s, "closing the worker registry")

    async def wait_ready(self, timeout_s: float) -> bool:
        """True once at least one healthy prefill and one healthy decode worker are known."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.healthy("prefill") and self.healthy("decode"):
                return True
            await asyncio.sleep(0.1)
        return False

    def healthy(self, role: str) -> list[WorkerHandle]:
        """Workers of `role` that answer their health checks and are not draining: those that can
        take a new request."""
        return [w for w in self.workers.values() if w.record.role == role and w.is_routable]

    def known(self) -> list[WorkerHandle]:
        """The pool's workers, then those that left it (draining, unlisted or dead) while this
        gateway's requests on them still run."""
        return [*self.workers.values(), *(h for h in self.retired if h.num_in_flight > 0)]

    def pick(self, role: str) -> WorkerHandle:
        """The healthy worker of `role` with the fewest requests in flight, then the emptiest cache."""
        candidates = self.healthy(role)
        if not candidates:
            raise BackendUnavailableError(f"no healthy {role} worker is available")
        return min(candidates, key=lambda w: w.load)

    async def _poll_forever(self) -> None:
        while not self.is_closed:  # also ends a poller whose cancel a client swallowed
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - a bad poll must not stop the next one
                logger.exception("refreshing the worker pool failed")

    async def refresh(self) -> None:
        async with self._refreshing:
            await self._refresh()

    async def _refresh(self) -> None:
        """The registry adds workers; each worker's own health check keeps or drops it, so a registry
        that is down or restarted empty neither hides live workers nor keeps dead ones healthy. A
        registry slow to answer (a busy controller, a frozen Redis) holds up no health check: the
        read is awaited for as long as one check may take, and taken in a later round otherwise."""
        listing = self._listing = self._listing or asyncio.ensure_future(self._listed())
        known = [self._poll(h) for h in list(self.workers.values())]
        await asyncio.gather(asyncio.wait({listing}, timeout=self.rpc_timeout_s), *known)
        if listing.done():
            self._listing = None
            records = listing.result()
            if records is not None:
                await asyncio.gather(*(self._poll(h) for h in self._sync(records)))
        for handle in list(self.workers.values()):
            if not handle.is_listed and (not handle.is_healthy or handle.is_draining):
                self._retire(handle)

    async def _listed(self) -> dict[str, WorkerRecord] | None:
        """The registry's records, or None while it cannot be read (logged once per outage)."""
        try:
            records = {r.worker_id: r for r in await self.registry.list_workers()}
        except Exception as exc:  # noqa: BLE001 - Redis down: keep the workers we know, check them ourselves
            if self.is_registry_reachable:
                logger.warning(
                    "the worker registry cannot be read (%s); routing over the %d known workers", exc, len(self.workers)
                )
            self.is_registry_reachable = False
            return None
        if not self.is_registry_reachable:
            logger.info("the worker registry is readable again")
        self.is_registry_reachable = True
        return records

    def _sync(self, records: dict[str, WorkerRecord]) -> list[WorkerHandle]:
        """The pool as the registry lists it; returns the workers new to it."""
        for worker_id, handle in list(self.workers.items()):
            record = records.get(worker_id)
            handle.is_listed = record is not None
            if record is not None and record != handle.record:  # same id, another address: a new process
                self._retire(handle)
        new = [self._connect(record) for worker_id, record in records.items() if worker_id not in self.workers]
        self.workers.update((handle.record.worker_id, handle) for handle in new)
        return new

    def _retire(self, handle: WorkerHandle) -> None:
        """Out of the pool at once; its channel stays open until this gateway's calls on it end
        (closing a grpc.aio channel cancels the calls still active on it)."""
        del self.workers[handle.record.worker_id]
        self.retired.add(handle)
        logger.info(
            "worker %s at %s left the pool (%d requests in flight)",
            handle.record.worker_id,
            handle.record.address,
            handle.num_in_flight,
        )
        closer = asyncio.create_task(self._close_when_idle(handle))
        self._closers.add(closer)
        closer.add_done_callback(self._closers.discard)

    async def _close_when_idle(self, handle: WorkerHandle) -> None:
        while handle.num_in_flight > 0:
            await asyncio.sleep(RETIRE_POLL_S)
        self.retired.discard(handle)
        await handle.channel.close()

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
                logger.warning(
                    "%s at %s did not prove it holds the cluster secret: no traffic",
                    handle.record.worker_id,
                    handle.record.address,
                )
            handle.is_healthy, handle.is_unproven = False, True
            return
        handle.status, handle.is_healthy, handle.last_seen = status, True, time.monotonic()
        handle.num_prefill_tokens_at_status = handle.num_prefill_tokens
