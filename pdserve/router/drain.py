"""`Drain`: the gateway's graceful stop (SIGTERM). From `run` on, `/health` answers 503 and new
requests get 503 + Retry-After (a load balancer moves them elsewhere); requests in flight run on
until the shutdown timeout, then every generation still running is ended: a stream with an error
event and `[DONE]`, a whole response with a 503."""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from starlette.types import ASGIApp, Receive, Scope, Send

from pdserve.proto.failures import Failure
from pdserve.router.auth import route_path
from pdserve.router.errors import APIError

logger = logging.getLogger(__name__)
OPEN_PATHS = ("/health", "/ping", "/metrics")  # they keep answering while draining (/health and /ping with 503)
WIND_DOWN_S = 5.0  # after ending the generations, how long their error events may take to go out
CUT_WIND_DOWN_S = 1.0  # the same after a second signal (`cut_short`)


class Expirable(Protocol):
    def expire(self) -> None:
        """End now: the request fails with 503 (an error event when it is streaming)."""


class Drain:
    def __init__(self) -> None:
        self.is_draining = False
        self.is_expired = False
        self.is_cut_short = False
        self.num_in_flight = 0  # HTTP requests being answered (not probes)
        self._generations: set[Expirable] = set()

    def track(self, generation: Expirable) -> None:
        self._generations.add(generation)
        if self.is_expired:
            generation.expire()

    def untrack(self, generation: Expirable) -> None:
        self._generations.discard(generation)

    async def run(self, timeout_s: float) -> None:
        """Refuse new work, let the requests in flight finish within `timeout_s`, end the rest."""
        self.is_draining = True
        logger.info("draining: %d requests in flight, up to %g s", self.num_in_flight, timeout_s)
        await self._wait_idle(timeout_s, until_cut_short=True)
        if self.num_in_flight:
            logger.warning(
                "shutdown %s: ending %d generations", "cut short" if self.is_cut_short else "timeout", len(self._generations)
            )
        self.is_expired = True
        for generation in list(self._generations):
            generation.expire()
        await self._wait_idle(CUT_WIND_DOWN_S if self.is_cut_short else WIND_DOWN_S)

    def cut_short(self) -> None:
        """A second signal: end the requests in flight now (their error events and `[DONE]` still go
        out), rather than at the shutdown timeout."""
        self.is_cut_short = True

    async def _wait_idle(self, timeout_s: float, until_cut_short: bool = False) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.num_in_flight and loop.time() < deadline and not (until_cut_short and self.is_cut_short):
            await asyncio.sleep(0.05)


class DrainGate:
    """ASGI middleware: counts the requests in flight and refuses new ones while draining."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or route_path(scope) in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if self.drain.is_draining:
            await APIError.of(Failure.UNAVAILABLE, "the server is shutting down").response()(scope, receive, send)
            return
        self.drain.num_in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.num_in_flight -= 1
