"""`HealthWatch`: a call waiting on a worker ends as soon as the pool marks that worker unhealthy
(a frozen or dead worker fails its status poll within seconds), not at the call's deadline. A
watcher is a callback run once when one of its workers is lost: `bounded` brings an
`asyncio.Timeout` forward to now; a stream's reader cancels its call (no cost per message)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from pdserve.router.closing import end_within
from pdserve.router.workers import CLOSE_TIMEOUT_S, WorkerHandle, WorkerPool

logger = logging.getLogger(__name__)
CHECK_INTERVAL_S = 0.25  # the pool polls every 0.5 s: checking more often adds nothing

Forget = Callable[[], None]


class WorkerLostError(Exception):
    """A worker a call was waiting on turned unhealthy."""

    def __init__(self, handle: WorkerHandle) -> None:
        super().__init__(f"{handle.record.role} worker {handle.record.worker_id} at {handle.record.address} stopped answering")
        self.handle = handle


class HealthWatch:
    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self._watchers: dict[WorkerHandle, set[Callable[[], None]]] = {}
        self._task: asyncio.Task | None = None

    def watch(self, handles: list[WorkerHandle], on_lost: Callable[[], None]) -> Forget:
        """Runs `on_lost()` once, at the first check that finds one of `handles` unhealthy, unless
        the returned function is called before."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._check_forever())
        for handle in handles:
            self._watchers.setdefault(handle, set()).add(on_lost)

        def forget() -> None:
            for handle in handles:
                watchers = self._watchers.get(handle)
                if watchers is not None:
                    watchers.discard(on_lost)
                    if not watchers:
                        del self._watchers[handle]

        return forget

    @contextlib.asynccontextmanager
    async def bounded(self, handles: list[WorkerHandle], deadline: float | None) -> AsyncIterator[None]:
        """Runs the block until `deadline` (loop time; None: no deadline): TimeoutError past it,
        WorkerLostError as soon as one of `handles` is unhealthy. Never spans a `yield` of the caller."""
        lost = _first_lost(handles)
        if lost is not None:
            raise WorkerLostError(lost)
        try:
            async with asyncio.timeout_at(deadline) as timeout:
                forget = self.watch(handles, lambda: _expire(timeout))
                try:
                    yield
                finally:
                    forget()
        except TimeoutError:
            lost = _first_lost(handles)
            if lost is not None:
                raise WorkerLostError(lost) from None
            raise

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await end_within([self._task], CLOSE_TIMEOUT_S, "the health watch")

    async def _check_forever(self) -> None:
        while True:
            await asyncio.sleep(CHECK_INTERVAL_S)
            for handle in [h for h in self._watchers if not h.is_healthy]:
                for on_lost in self._watchers.pop(handle, ()):
                    try:
                        on_lost()
                    except Exception:  # noqa: BLE001 - one watcher must not stop the others
                        logger.exception("a health watcher failed")


def _expire(timeout: asyncio.Timeout) -> None:
    if not timeout.expired():
        timeout.reschedule(asyncio.get_running_loop().time())


def _first_lost(handles: list[WorkerHandle]) -> WorkerHandle | None:
    return next((h for h in handles if not h.is_healthy), None)
