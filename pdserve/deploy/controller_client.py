"""`ControllerClient`: a gateway's handle on the controller actor. It is the gateway's registry (the
ready workers; `pdserve serve`'s gateway needs no Redis), its `PoolAdmin` for `/admin/pools`, and it
reports the gateway's TTFT and ITL to the autoscaler, keeping the pools' last view for /metrics."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from pdserve.deploy.latency_window import LatencyWindow
from pdserve.router.admin import ScaleError
from pdserve.router.metrics import Metrics
from pdserve.router.registry import WorkerRecord

logger = logging.getLogger(__name__)
CALL_TIMEOUT_S = 10.0
REPORT_QUANTILE = 0.9


class ControllerClient:
    def __init__(self, actor: Any) -> None:
        self.actor = actor
        self.gateway_id = uuid.uuid4().hex[:8]
        self.last_view: dict | None = None  # the pools as of the last call

    @classmethod
    def find(cls, ray_address: str) -> ControllerClient:
        """Joins the Ray cluster and finds the controller that `pdserve serve` started there."""
        import ray

        from pdserve.deploy.controller import CONTROLLER_NAME, NAMESPACE

        if not ray.is_initialized():
            ray.init(address=ray_address, namespace=NAMESPACE, logging_level=logging.WARNING)
        return cls(ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE))

    async def _call(self, method: str, *args: object) -> Any:
        async def call() -> Any:
            return await getattr(self.actor, method).remote(*args)

        return await asyncio.wait_for(call(), CALL_TIMEOUT_S)

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
            except Exception as exc:  # noqa: BLE001 - the controller may be busy or restarting
                logger.warning("reporting to the controller failed: %s", exc)
