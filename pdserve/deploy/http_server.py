"""uvicorn as the gateway runs it: connections that do not deliver a request's headers in time are
closed (slow or half-open clients hold nothing for long), and SIGTERM/SIGINT first drain the app
(`router/drain.py`) before uvicorn stops; a second signal ends the requests in flight at once."""

from __future__ import annotations

import asyncio
import ssl
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from pdserve.router.config import GatewayConfig
from pdserve.router.drain import WIND_DOWN_S, Drain


class _HeaderTimeout:
    """Mixin over uvicorn's HTTP protocol classes: from a connection's start, and again after each
    response, the next request's headers must arrive within `header_timeout_s`."""

    header_timeout_s: float = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm()

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle  # type: ignore[attr-defined]
        super().data_received(data)  # type: ignore[misc]
        if self.cycle is not cycle:  # type: ignore[attr-defined]  # a request's headers are in
            self._disarm()

    def on_response_complete(self) -> None:
        cycle = self.cycle  # type: ignore[attr-defined]
        self._arm()
        super().on_response_complete()  # type: ignore[misc]
        if self.cycle is not cycle:  # type: ignore[attr-defined]  # a pipelined request was waiting
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def _arm(self) -> None:
        self._disarm()
        loop = asyncio.get_running_loop()
        self._header_timer = loop.call_later(self.header_timeout_s, self._on_header_timeout)

    def _disarm(self) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        transport = self.transport  # type: ignore[attr-defined]
        if not transport.is_closing():
            transport.close()


def protocol_class(header_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's own HTTP protocol (httptools when installed, else h11) with the header timeout."""
    return type("HeaderTimeoutHTTPProtocol", (_HeaderTimeout, AutoHTTPProtocol), {"header_timeout_s": header_timeout_s})


class GatewayServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain: Drain, shutdown_timeout_s: float) -> None:
        super().__init__(config)
        self._drain = drain
        self._shutdown_timeout_s = shutdown_timeout_s
        self._is_drain_requested = False
        self._drain_task: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """A signal handler (main thread): the first signal asks for the drain; a second one ends the
        requests in flight at once (each stream with its error event and `[DONE]`), then stops; a
        third leaves it to uvicorn (which stops without waiting for its connections)."""
        if self._drain.is_cut_short:
            super().handle_exit(sig, frame)
        elif self._is_drain_requested:
            self._drain.cut_short()
        self._is_drain_requested = True

    async def on_tick(self, counter: int) -> bool:
        if self._is_drain_requested and self._drain_task is None:
            self._drain_task = asyncio.create_task(self._drain_then_stop())
        return await super().on_tick(counter)

    async def _drain_then_stop(self) -> None:
        await self._drain.run(self._shutdown_timeout_s)
        self.should_exit = True


def gateway_config(app: Any, host: str, port: int, gateway: GatewayConfig) -> uvicorn.Config:
    tls = gateway.tls
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        http=protocol_class(gateway.request_read_timeout_s),
        timeout_graceful_shutdown=int(WIND_DOWN_S),  # the drain has ended every request by then
        root_path=gateway.root_path,
        ssl_keyfile=tls.keyfile if tls else None,
        ssl_certfile=tls.certfile if tls else None,
        ssl_ca_certs=tls.ca_certs if tls else None,
        ssl_cert_reqs=tls.cert_reqs if tls else ssl.CERT_NONE,
    )
