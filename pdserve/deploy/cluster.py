"""`Cluster`: the `pdserve serve` process's side of Ray. It starts a local Ray instance whose node
carries both pool resources (or joins a running cluster with `--ray-address`), starts the controller
on this node, waits for the initial workers, and stops it all."""

from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent.futures import Future, wait
from dataclasses import replace
from typing import Any

from pdserve.deploy.config import ROLES, ServeConfig
from pdserve.deploy.controller import CONTROLLER_NAME, NAMESPACE, Controller, ControllerConfig
from pdserve.deploy.placement import gpus_per_worker, local_node_resources, missing_pools, pool_gpu_share, pythonpath
from pdserve.engine.config import ConfigError, EngineConfig
from pdserve.kvtransfer import TRANSPORTS

logger = logging.getLogger(__name__)
STOP_TIMEOUT_S = 30.0  # the controller's stop of the workers, after their drain
# The workers' drain at shutdown is cut to this, so that cli's exit guard (STOP_TIMEOUT_S + 30 s)
# still covers the drain, the stop and ray.shutdown.
MAX_DRAIN_S = 20.0
RAY_INIT_WAIT_S = 60.0  # a stop signal while Ray starts: how long it may still take to be up


class StartupError(RuntimeError):
    """The initial workers did not come up."""


class Cluster:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.controller: Any = None
        self._started_ray = False
        self._ray_released = threading.Event()  # ends the thread that started Ray (`_init_ray`)

    def start(self) -> Any:
        """Starts the controller and the initial workers (models load in parallel); returns the
        controller's actor handle once every initial worker is ready."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if not ray.is_initialized():
            self._init_ray()
        missing = missing_pools(ray.cluster_resources())
        if missing:
            logger.warning(
                "no node of the Ray cluster carries %s yet: those workers wait for one (an autoscaling "
                "cluster adds it; else start nodes with `ray start --resources`)",
                " or ".join(missing),
            )
        controller_cls = ray.remote(Controller).options(
            name=CONTROLLER_NAME,
            namespace=NAMESPACE,
            num_cpus=0,
            max_concurrency=100,
            scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
            runtime_env={"env_vars": {"PYTHONPATH": pythonpath()}},
        )
        controller_config = self._controller_config(ray.cluster_resources().get("GPU", 0))  # its own ConfigError
        try:
            self.controller = controller_cls.remote(controller_config)
        except ValueError as exc:  # ActorAlreadyExistsError
            raise ConfigError(f"another `pdserve serve` already controls this Ray cluster ({exc})") from exc
        timeout_s = self.config.startup_timeout_s
        error = ray.get(self.controller.start.remote(timeout_s), timeout=timeout_s + 60)
        if error is not None:
            raise StartupError(f"the workers did not start: {error}")
        return self.controller

    def _init_ray(self) -> None:
        """ray.init on a thread of its own, which lives as long as this Ray instance: Ray's
        processes get SIGKILL when the thread that started them ends (PR_SET_PDEATHSIG). On the
        main thread, ray.init would replace the process's SIGTERM handler with its own
        (`sys.exit`), whose exception is lost when the signal lands while Ray forks ("Exception
        ignored in" logging's at-fork hook): a SIGTERM in those seconds did nothing. An exception
        here (the caller's handler) waits for Ray to be up, so that `stop()` shuts it down whole."""
        self._started_ray = True
        started: Future[None] = Future()
        self._ray_released.clear()

        def own_ray() -> None:
            try:
                self._ray_init()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                started.set_exception(exc)
                return
            started.set_result(None)
            self._ray_released.wait()

        ray_logger = logging.getLogger("ray._private.worker")
        ray_logger.addFilter(_not_the_off_main_thread_warning)
        threading.Thread(target=own_ray, name="ray-owner", daemon=True).start()
        try:
            started.result()
        except BaseException:
            wait([started], timeout=RAY_INIT_WAIT_S)
            raise
        finally:
            ray_logger.removeFilter(_not_the_off_main_thread_warning)
            _take_back_sigterm()

    def _ray_init(self) -> None:
        import ray

        config = self.config
        env: dict[str, Any] = {
            "runtime_env": {"env_vars": {"PYTHONPATH": pythonpath()}},
            "namespace": NAMESPACE,
            "logging_level": logging.WARNING,
        }
        if config.ray_address:
            logger.info("connecting to the Ray cluster at %s", config.ray_address)
            ray.init(address=config.ray_address, **env)
        else:  # "local": a new instance even if `ray start` left one running on this machine
            max_workers = sum(config.pool(role).max_replicas for role in ROLES)
            logger.info("starting a local Ray instance")
            ray.init(
                address="local",
                num_cpus=max(os.cpu_count() or 1, max_workers),
                resources=local_node_resources(),
                include_dashboard=False,
                **env,
            )

    def _controller_config(self, num_cluster_gpus: float) -> ControllerConfig:
        config = self.config
        if config.engine.device == "cuda" and num_cluster_gpus == 0:
            raise ConfigError("--device cuda was asked for but the Ray cluster has no GPU")
        on_gpus = config.engine.device == "cuda" or (config.engine.device == "auto" and num_cluster_gpus > 0)
        transport = TRANSPORTS.get(config.kv_transport)
        if transport is not None and not on_gpus and "cpu" not in transport.devices:
            raise ConfigError(
                f"--kv-transport {config.kv_transport} needs GPU workers, and these run on the CPU "
                f"(--device {config.engine.device}, {num_cluster_gpus:g} GPUs in the Ray cluster)"
            )
        share = gpus_per_worker(num_cluster_gpus, config.num_prefill_workers + config.num_decode_workers, config.engine.device)
        if config.kv_transport == "local":  # one process holds every worker: they share its GPU whatever the pools ask
            shares = dict.fromkeys(ROLES, share)
        else:
            shares = {role: pool_gpu_share(config.pool(role).resources, share) for role in ROLES}
        return ControllerConfig(
            engines={role: _engine_for_share(config.engine, shares[role]) for role in ROLES},
            model_name=config.served_model_name,
            worker_host=config.worker_host,
            kv_transport=config.kv_transport,
            redis_url=config.redis_url,
            replicas={role: config.replicas(role) for role in ROLES},
            pools={role: config.pool(role) for role in ROLES},
            gpu_share=share,
            autoscale=config.autoscale,
            drain=config.drain,
            cluster_secret=config.cluster_secret,
        )

    def stop(self, drain_timeout_s: float = 0.0) -> None:
        """Stops the workers and the controller (and Ray, if this process started it). First, for up
        to `drain_timeout_s` (cut to `MAX_DRAIN_S`), the workers finish the requests they hold, those
        of every gateway (`pdserve router`s too), and take no new ones."""
        import ray

        if not ray.is_initialized():
            return
        if self.controller is not None:
            drain_s = min(max(drain_timeout_s, 0.0), MAX_DRAIN_S)
            try:
                ray.get(self.controller.shutdown.remote(drain_s), timeout=drain_s + STOP_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - shutting down regardless
                logger.warning("workers did not stop cleanly: %s", exc)
            ray.kill(self.controller)
            self.controller = None
        if self._started_ray:
            ray.shutdown()
            self._ray_released.set()


def _engine_for_share(engine: EngineConfig, gpu_share: float) -> EngineConfig:
    """The engine a worker given `gpu_share` of a GPU runs: below a whole GPU, it sizes its KV cache
    within that part of the GPU's memory (unless the KV cache's size is set outright)."""
    if 0 < gpu_share < 1 and engine.kv_cache_memory_gib is None:
        return replace(engine, gpu_memory_utilization=engine.gpu_memory_utilization * gpu_share)
    return engine


def _take_back_sigterm() -> None:
    """Ray's core worker puts a C handler of its own on SIGTERM while it starts (it logs the
    signal, then aborts the process); installing the process's Python handler again replaces it."""
    handler = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread() and handler is not None:  # None: not set from Python
        signal.signal(signal.SIGTERM, handler)


def _not_the_off_main_thread_warning(record: logging.LogRecord) -> bool:
    """ray.init off the main thread warns that it set no SIGTERM handler: that is the point."""
    return "not the main thread" not in record.getMessage()
