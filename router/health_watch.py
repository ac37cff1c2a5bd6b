"""`HealthWatch`: a call waiting on a worker ends as soon as the pool marks that worker unhealthy
(a frozen or dead worker fails its status poll within seconds), not at the call's deadline. Each
wait is an `asyncio.Timeout`; the watch brings it forward to now when one of its workers is lost."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from router.workers import WorkerHandle, WorkerPool

CHECK_INTERVAL_S = 0.25  # the pool polls every 0.5 s: checking more often adds nothing


class WorkerLostError(Exception):
    """A worker a call was waiting on turned unhealthy."""

    def __init__(self, handle: WorkerHandle) -> None:
        super().__init__(f"{handle.record.role} worker {handle.record.worker_id} at {handle.record.address} stopped answering")
        self.handle = handle


class HealthWatch:
    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self._waits: dict[WorkerHandle, set[asyncio.Timeout]] = {}
        self._task: asyncio.Task | None = None

    @contextlib.asynccontextmanager
    async def bounded(self, handles: list[WorkerHandle], deadline: float | None) -> AsyncIterator[None]:
        """Runs the block until `deadline` (loop time; None: no deadline): TimeoutError past it,
        WorkerLostError as soon as one of `handles` is unhealthy. Never spans a `yield` of the caller."""
        self._ensure_running()
        lost = _first_lost(handles)
        if lost is not None:
            raise WorkerLostError(lost)
        try:
            async with asyncio.timeout_at(deadline) as timeout:
                for handle in handles:
                    self._waits.setdefault(handle, set()).add(timeout)
                try:
                    yield
                finally:
                    for handle in handles:
                        self._forget(handle, timeout)
        except TimeoutError:
            lost = _first_lost(handles)
            if lost is not None:
                raise WorkerLostError(lost) from None
            raise

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._watch_forever())

    def _forget(self, handle: WorkerHandle, timeout: asyncio.Timeout) -> None:
        waits = self._waits.get(handle)
        if waits is not None:
            waits.discard(timeout)
            if not waits:
                del self._waits[handle]

    async def _watch_forever(self) -> None:
        while True:
            await asyncio.sleep(CHECK_INTERVAL_S)
            now = asyncio.get_running_loop().time()
            for handle, waits in list(self._waits.items()):
                if handle.is_healthy:
                    continue
                for timeout in list(waits):
                    if not timeout.expired():
                        timeout.reschedule(now)


def _first_lost(handles: list[WorkerHandle]) -> WorkerHandle | None:
    return next((h for h in handles if not h.is_healthy), None)
