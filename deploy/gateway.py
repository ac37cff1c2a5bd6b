"""Runs the HTTP gateway in this process until SIGINT/SIGTERM (which drain it first): over the
workers (disaggregated) or over one in-process engine (`--colocated`)."""
from __future__ import annotations

import logging
import sys

from deploy.controller import ServeConfig
from deploy.http_server import GatewayServer, gateway_config
from deploy.worker_host import GIL_SWITCH_INTERVAL_S
from engine.tokenizer import Tokenizer
from router.app import create_app
from router.backend import Backend
from router.config import GatewayConfig
from router.metrics import Metrics
from router.registry import InMemoryRegistry, RedisRegistry, WorkerRecord

logger = logging.getLogger(__name__)
READY_TIMEOUT_S = 60.0


async def run_gateway(config: ServeConfig, records: list[WorkerRecord] | None, gateway: GatewayConfig) -> int:
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # the event loop, gRPC's threads and (colocated) the engine thread
    metrics = Metrics(config.served_model_name)
    backend = await _colocated(config) if records is None else await _disaggregated(config, records, metrics, gateway)
    app = create_app(backend, metrics, gateway)
    if records is not None:
        from router.admin import admin_routes

        app.include_router(admin_routes(backend.pool))
    uvicorn_config = gateway_config(app, config.host, config.port, gateway.request_read_timeout_s)
    server = GatewayServer(uvicorn_config, app.state.drain, gateway.shutdown_timeout_s)
    mode = "colocated" if records is None else f"{config.num_prefill_workers} prefill + {config.num_decode_workers} decode workers"
    logger.info("serving %s at http://%s:%d/v1 (%s)", config.served_model_name, config.host, config.port, mode)
    try:
        await server.serve()
    finally:
        await backend.close()
    return 0


async def _colocated(config: ServeConfig) -> Backend:
    from engine.async_engine import AsyncEngine
    from engine.llm_engine import LLMEngine
    from router.backend import ColocatedBackend

    return ColocatedBackend(AsyncEngine(LLMEngine.from_config(config.engine)), config.served_model_name)


async def _disaggregated(config: ServeConfig, records: list[WorkerRecord], metrics: Metrics, gateway: GatewayConfig) -> Backend:
    from router.disaggregated import DisaggregatedBackend
    from router.workers import WorkerPool

    registry = RedisRegistry(config.redis_url, config.cluster_secret) if config.redis_url else InMemoryRegistry(records)
    pool = WorkerPool(registry, config.cluster_secret)
    await pool.start()
    if not await pool.wait_ready(READY_TIMEOUT_S):
        await pool.close()
        raise RuntimeError(f"no healthy prefill and decode workers within {READY_TIMEOUT_S:g} s")
    max_model_len = min(w.status.max_model_len for w in pool.workers.values() if w.status is not None)
    tokenizer = Tokenizer.from_pretrained(config.engine.model)
    return DisaggregatedBackend(
        pool, tokenizer, config.served_model_name, max_model_len, on_kv_transfer=metrics.observe_kv_transfer,
        deadlines=gateway.deadlines,
    )
