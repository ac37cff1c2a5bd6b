"""`EngineLoop`: a step loop on its own thread. Other threads (asyncio servers) hand it work with
`call(fn)`; fn runs on the loop thread between two steps, so schedulers and block pools are only
ever touched by one thread and need no locks."""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")


class EngineLoop:
    def __init__(
        self,
        step: Callable[[], bool],
        on_error: Callable[[BaseException], None] | None = None,
        name: str = "engine-loop",
        idle_wait_s: float = 0.05,
    ) -> None:
        """`step()` runs one unit of work and says whether it did any; an idle loop sleeps until
        `call` wakes it (or `idle_wait_s`, for timers such as lease expiry)."""
        self._step = step
        self._on_error = on_error
        self._idle_wait_s = idle_wait_s
        self._inbox: queue.SimpleQueue[tuple[Callable[[], object], Future]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def call(self, fn: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        if self._stopping.is_set():
            future.set_exception(RuntimeError("the engine loop is stopped"))
            return future
        self._inbox.put((fn, future))
        self._wake.set()
        return future

    def _drain_inbox(self) -> None:
        while True:
            try:
                fn, future = self._inbox.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._drain_inbox()
            try:
                did_work = self._step()
            except Exception as exc:  # noqa: BLE001 - a failed step must not kill the loop silently
                logger.exception("engine step failed")
                did_work = False
                if self._on_error is not None:
                    self._on_error(exc)
            if not did_work:
                self._wake.wait(self._idle_wait_s)
                self._wake.clear()
        self._drain_inbox()
