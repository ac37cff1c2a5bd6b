"""Runs the HTTP gateway in this process until SIGINT/SIGTERM (which drain it first): over the workers a registry lists (the
controller's, or Redis's for `pdserve router`), or over one in-process engine (`--colocated`)."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import TYPE_CHECKING

from pdserve.deploy import exit_guard
from pdserve.deploy.config import ServeConfig
from pdserve.deploy.controller_client import ControllerClient
from pdserve.deploy.http_server import GatewayServer, gateway_config
from pdserve.deploy.worker_host import GIL_SWITCH_INTERVAL_S
from pdserve.engine.tokenizer import Tokenizer
from pdserve.router.app import create_app
from pdserve.router.backend import Backend
from pdserve.router.config import GatewayConfig
from pdserve.router.metrics import Metrics
from pdserve.router.registry import Registry
from pdserve.router.response_store import open_response_store

if TYPE_CHECKING:
    from fastapi import FastAPI

    from pdserve.router.disaggregated import DisaggregatedBackend
    from pdserve.router.workers import WorkerPool

logger = logging.getLogger(__name__)
READY_TIMEOUT_S = 60.0
REPORT_INTERVAL_S = 2.0  # the controller's view on /metrics is this fresh (the autoscaler's interval when it runs)


async def run_gateway(
    config: ServeConfig,
    registry: Registry | None,
    gateway: GatewayConfig,
    controller: ControllerClient | None = None,
    can_serve_before_workers: bool = False,
) -> int:
    """`registry` None: colocated. `controller`: the pools' admin routes and the autoscaler's reports.
    `can_serve_before_workers` (`pdserve router`): listen at once, /health 503 until workers register;
    else (`pdserve serve`, which starts them) fail unless they are ready within `READY_TIMEOUT_S`.
    It owns the process: once it stops serving, the process has `exit_guard.EXIT_TIMEOUT_S` to end."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # the event loop, gRPC's threads and (colocated) the engine thread
    metrics = Metrics(config.served_model_name)
    tasks: list[asyncio.Task] = []
    if registry is None:
        backend: Backend = await _colocated(config)
    else:
        backend = await _disaggregated(config, registry, metrics, gateway, can_serve_before_workers)
    response_store = open_response_store(gateway, config.cluster_secret)
    app = create_app(backend, metrics, gateway, response_store)
    if registry is not None:
        tasks += _add_operations(app, backend, config, metrics, controller)
    else:
        from pdserve.router.admin import colocated_admin_routes

        app.include_router(colocated_admin_routes(config.admin_token))
    uvicorn_config = gateway_config(app, config.host, config.port, gateway)
    server = GatewayServer(uvicorn_config, app.state.drain, gateway.shutdown_timeout_s)
    mode = "colocated" if registry is None else f"disaggregated, workers from {type(registry).__name__}"
    url = f"{'https' if gateway.tls else 'http'}://{config.host}:{config.port}{gateway.root_path}/v1"
    logger.info("serving %s at %s (%s)", config.served_model_name, url, mode)
    try:
        await server.serve()
    finally:
        exit_guard.arm()  # no longer serving: whatever hangs from here, the process ends
        for task in tasks:
            task.cancel()
        await backend.close()
        if response_store is not None:
            await response_store.close()
    return 0


def _add_operations(
    app: FastAPI, backend: Backend, config: ServeConfig, metrics: Metrics, controller: ControllerClient | None
) -> list[asyncio.Task]:
    """Admin routes, per-pool metrics and, with a controller, the autoscaler's latency reports."""
    from pdserve.router.admin import admin_routes
    from pdserve.router.pool_metrics import PoolCollector

    app.include_router(admin_routes(backend.pool, config.admin_token, controller))
    metrics.registry.register(
        PoolCollector(backend.pool, config.served_model_name, lambda: controller.last_view if controller else None)
    )
    if controller is None:
        return []
    interval_s = config.autoscale.interval_s if config.autoscale.enabled else REPORT_INTERVAL_S
    return [asyncio.create_task(controller.report_forever(metrics, interval_s))]


async def _colocated(config: ServeConfig) -> Backend:
    from pdserve.engine.async_engine import AsyncEngine
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.router.backend import ColocatedBackend

    return ColocatedBackend(AsyncEngine(LLMEngine.from_config(config.engine)), config.served_model_name)


async def _disaggregated(
    config: ServeConfig, registry: Registry, metrics: Metrics, gateway: GatewayConfig, can_serve_before_workers: bool
) -> DisaggregatedBackend:
    """The backend over the registry's workers. Before they are ready (`can_serve_before_workers`)
    its context length is the model's, an upper bound of theirs, until they report their own
    (`DisaggregatedBackend.max_model_len` follows the pool's workers)."""
    from pdserve.engine.config import ModelConfig
    from pdserve.engine.loader import tokenizer_dir
    from pdserve.router.disaggregated import DisaggregatedBackend
    from pdserve.router.workers import WorkerPool

    pool = WorkerPool(registry, config.cluster_secret)
    await pool.start()
    if not can_serve_before_workers and not await pool.wait_ready(READY_TIMEOUT_S):
        await pool.close()
        raise RuntimeError(f"no healthy prefill and decode workers within {READY_TIMEOUT_S:g} s")
    if not _is_ready(pool):
        logger.info("no healthy prefill and decode workers yet: /health answers 503 until they register")
    model = ModelConfig.from_pretrained(config.engine.model)
    return DisaggregatedBackend(
        pool,
        Tokenizer.from_pretrained(
            tokenizer_dir(config.engine, config.engine.model), config.engine.model
        ),  # the workers' tokenizer
        config.served_model_name,
        model.longest_context,  # until the workers report theirs
        on_kv_transfer=metrics.observe_kv_transfer,
        deadlines=gateway.deadlines,
        prefix_share_url=config.redis_url,  # several gateways share Redis: they share their prefix routing too
        vocab_size=model.vocab_size,  # what a logprobs count of -1 asks for
    )


def _is_ready(pool: WorkerPool) -> bool:
    return bool(pool.healthy("prefill") and pool.healthy("decode"))
