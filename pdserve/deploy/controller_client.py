"""`ControllerClient`: a gateway's handle on the controller actor. It is the gateway's registry (the
ready workers; `pdserve serve`'s gateway needs no Redis), its `PoolAdmin` for `/admin/pools`, and it
reports the gateway's TTFT and ITL to the autoscaler, keeping the pools' last view for /metrics.
A `pdserve router` finds the controller by name and, once it is lost, joins Ray and looks it up anew."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from pdserve.deploy.latency_window import LatencyWindow
from pdserve.router.admin import ControllerUnavailableError, ScaleError
from pdserve.router.metrics import Metrics
from pdserve.router.registry import WorkerRecord

logger = logging.getLogger(__name__)
CALL_TIMEOUT_S = 10.0
LOOKUP_INTERVAL_S = 2.0  # each lookup joins Ray anew (about 1 s of a core)
REPORT_QUANTILE = 0.9
UNREACHABLE = "the cluster controller is not reachable (is `pdserve serve` running?)"


class ControllerClient:
    def __init__(self, actor: Any, ray_address: str | None = None) -> None:
        """`actor`: the controller this process started (`pdserve serve`), or None with the
        `ray_address` of the cluster to look it up in (`pdserve router`, see `find`)."""
        self.actor = actor
        self.ray_address = ray_address
        self.gateway_id = uuid.uuid4().hex[:8]
        self.last_view: dict | None = None  # the pools as of the last call; None while unreachable
        self.is_reachable = True
        self._lookup: asyncio.Future | None = None
        self._next_lookup_at = 0.0

    @classmethod
    def find(cls, ray_address: str) -> ControllerClient:
        """The controller that `pdserve serve` started in the Ray cluster at `ray_address`, looked up
        at the first call: a router may start before it, and outlives it."""
        return cls(None, ray_address)

    async def _call(self, method: str, *args: object) -> Any:
        from ray.exceptions import RayActorError, RaySystemError

        try:
            actor = await self._actor()
            result = await asyncio.wait_for(_remote(actor, method, *args), CALL_TIMEOUT_S)
        except (RayActorError, RaySystemError, TimeoutError, ConnectionError, ControllerUnavailableError) as exc:
            self._lost(exc)
            raise ControllerUnavailableError(UNREACHABLE) from None
        if not self.is_reachable:
            logger.info("the cluster controller is reachable again")
        self.is_reachable = True
        return result

    async def _actor(self) -> Any:
        """The controller's handle; without one, a lookup: one at a time (a slow one is shared), at
        most one per LOOKUP_INTERVAL_S however often /admin is polled."""
        if self.actor is None:
            if self._lookup is None or self._lookup.done():
                if time.monotonic() < self._next_lookup_at:
                    raise ControllerUnavailableError(UNREACHABLE)
                self._next_lookup_at = time.monotonic() + LOOKUP_INTERVAL_S
                self._lookup = asyncio.ensure_future(asyncio.to_thread(self._look_up))
            self.actor = await asyncio.wait_for(asyncio.shield(self._lookup), CALL_TIMEOUT_S)
        return self.actor

    def _look_up(self) -> Any:
        """(On a thread: it blocks.) A fresh connection each time: the Ray instance may be a new one,
        and a driver left connected to a stopped one is ended by Ray once it cannot reach the GCS for
        60 s (`gcs_rpc_server_reconnect_timeout_s`), and hangs until then in any call that needs it."""
        import ray

        from pdserve.deploy.controller import CONTROLLER_NAME, NAMESPACE

        assert self.ray_address is not None, "`pdserve serve`'s client holds the controller it started"
        if ray.is_initialized():
            ray.shutdown()
        try:  # off the main thread: Ray leaves SIGTERM to the gateway; ERROR: not its warning of that at every try
            ray.init(address=self.ray_address, namespace=NAMESPACE, logging_level=logging.ERROR)
        except Exception as exc:  # noqa: BLE001 - no Ray there (yet): the next call tries again
            raise ControllerUnavailableError(f"cannot join the Ray cluster at {self.ray_address}: {_first_line(exc)}") from None
        try:
            return ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
        except ValueError:  # no actor of that name: `pdserve serve` is not running there
            raise ControllerUnavailableError(f"no {CONTROLLER_NAME} actor in the Ray cluster at {self.ray_address}") from None

    def _lost(self, exc: BaseException) -> None:
        """Logged once per outage; the pools' series leave /metrics rather than show a stale view."""
        if self.is_reachable:
            logger.warning("%s: %s", UNREACHABLE, _first_line(exc))
        self.is_reachable = False
        self.last_view = None
        if self.ray_address is not None:
            self.actor = None

    # -- Registry --------------------------------------------------------------------------------
    async def list_workers(self) -> list[WorkerRecord]:
        return await self._call("ready_records")

    async def close(self) -> None:
        return None

    # -- PoolAdmin -------------------------------------------------------------------------------
    async def pools(self) -> dict:
        self.last_view = await self._call("pools_view")
        return self.last_view

    async def scale(self, pool: str, replicas: int) -> dict:
        result = await self._call("scale", pool, replicas)
        if "error" in result:
            raise ScaleError(result["error"])
        self.last_view = result
        return result

    # -- the autoscaler's inputs -----------------------------------------------------------------
    async def report_forever(self, metrics: Metrics, interval_s: float) -> None:
        """Every `interval_s`: this gateway's TTFT and ITL p90 since the last report."""
        ttft, itl = LatencyWindow(metrics.time_to_first_token), LatencyWindow(metrics.inter_token_latency)
        while True:
            await asyncio.sleep(interval_s)
            try:
                self.last_view = await self._call(
                    "report", self.gateway_id, ttft.quantile(REPORT_QUANTILE), itl.quantile(REPORT_QUANTILE)
                )
            except ControllerUnavailableError:  # logged once per outage; the next report looks it up again
                pass
            except Exception as exc:  # noqa: BLE001 - the controller's own failure: the next report may pass
                logger.warning("reporting to the controller failed: %s", exc)


async def _remote(actor: Any, method: str, *args: object) -> Any:
    return await getattr(actor, method).remote(*args)


def _first_line(exc: BaseException) -> str:
    """Ray's errors run to many lines (actor id, pid, address...): the log gets their first."""
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
