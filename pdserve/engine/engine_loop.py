"""`EngineLoop`: the one bridge between asyncio servers and an engine's step loop on its own
thread. Work goes in with `call(fn)` (fn runs on the loop thread between two steps, so schedulers
and block pools are only ever touched by one thread and need no locks); events come out per
request through `stream()`, which the loop thread feeds with `publish()`."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Future
from typing import Generic, TypeVar

from pdserve.engine.sampling_params import InvalidRequestError

logger = logging.getLogger(__name__)
T = TypeVar("T")
E = TypeVar("E")


class EventStream(Generic[E]):
    """Events of one request, from the loop thread to one asyncio consumer."""

    def __init__(self) -> None:
        self._aloop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[E | BaseException, bool]] = asyncio.Queue()

    def put(self, event: E | BaseException, is_last: bool) -> None:
        """Thread-safe. An exception is raised to the consumer and ends the stream."""
        self._aloop.call_soon_threadsafe(self._queue.put_nowait, (event, is_last))

    async def get(self) -> tuple[E, bool]:
        event, is_last = await self._queue.get()
        if isinstance(event, BaseException):
            raise event
        return event, is_last


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
        self._streams: dict[str, EventStream] = {}  # owned by the loop thread

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

    # -- into the loop ----------------------------------------------------------------------------
    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Runs `fn` on the loop thread before the next step; its result or exception in the future."""
        future: Future[T] = Future()
        if self._stopping.is_set():
            future.set_exception(RuntimeError("the engine loop is stopped"))
            return future
        self._inbox.put((fn, future))
        self._wake.set()
        return future

    async def run(self, fn: Callable[[], T]) -> T:
        return await asyncio.wrap_future(self.call(fn))

    # -- out of the loop --------------------------------------------------------------------------
    async def stream(self, request_id: str, add: Callable[[], object], abort: Callable[[], object]) -> AsyncGenerator[E, None]:
        """Runs `add` on the loop thread (it queues the request; InvalidRequestError for bad input)
        with a stream open for `request_id`, then yields what `publish` sends it, up to the last
        event. Leaving early runs `abort` on the loop thread, unless the stream already ended."""
        events: EventStream[E] = EventStream()

        def open_stream() -> None:
            if request_id in self._streams:
                raise InvalidRequestError(f"request {request_id} is already running here", "request_id")
            add()
            self._streams[request_id] = events

        is_last = False
        try:
            # A cancel may land after `open_stream` ran but before we hear back: the `finally`
            # covers that too, since the loop takes calls in order.
            await self.run(open_stream)
            while not is_last:
                event, is_last = await events.get()
                yield event
        except BaseException:
            is_last = False  # an exception event or a cancel: the request may still be queued
            raise
        finally:
            if not is_last:
                self.call(lambda: self._abort_own(request_id, events, abort))

    def publish(self, request_id: str, event: object, is_last: bool = False) -> None:
        """Loop thread: send `event` to the request's stream (if it still has one). An exception
        event, or `is_last`, ends the stream."""
        stream = self._streams.get(request_id)
        if stream is None:
            return
        if is_last or isinstance(event, BaseException):
            del self._streams[request_id]
        stream.put(event, is_last)

    def has_stream(self, request_id: str) -> bool:
        return request_id in self._streams

    @property
    def stream_ids(self) -> list[str]:
        return list(self._streams)

    def _abort_own(self, request_id: str, events: EventStream, abort: Callable[[], object]) -> None:
        """The consumer of `events` left: abort its request, and only its (not a later one's)."""
        if self._streams.get(request_id) is events:
            del self._streams[request_id]
            abort()

    # -- the thread -------------------------------------------------------------------------------
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
