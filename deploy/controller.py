"""`Cluster`: starts a local Ray instance (or joins one), places the prefill and decode workers as
Ray actors on their own pools, and stops them all. `ServeConfig` is what `pdserve serve` was told."""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from deploy.worker_host import WorkerProcess, WorkerSpec
from engine.config import ConfigError, EngineConfig
from proto.cluster_secret import ClusterSecret
from router.registry import WorkerRecord

logger = logging.getLogger(__name__)
REPO_ROOT = str(Path(__file__).resolve().parent.parent)


@dataclass(frozen=True)
class ServeConfig:
    engine: EngineConfig
    served_model_name: str
    host: str = "127.0.0.1"
    port: int = 8000
    num_prefill_workers: int = 1
    num_decode_workers: int = 1
    redis_url: str | None = None
    ray_address: str | None = None
    worker_host: str = "127.0.0.1"
    startup_timeout_s: float = 600.0
    kv_transport: str = "auto"
    colocated: bool = False
    # Authenticates every gRPC call and registry record of this cluster (proto/auth.py).
    cluster_secret: ClusterSecret = field(default_factory=ClusterSecret.generate)

    def __post_init__(self) -> None:
        if self.num_prefill_workers < 1 or self.num_decode_workers < 1:
            raise ValueError("--prefill-workers and --decode-workers must be at least 1")



class Cluster:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.actors: list[object] = []
        self._started_ray = False

    def start(self) -> list[WorkerRecord]:
        """Starts every worker (models load in parallel); returns their registry records."""
        import ray

        config = self.config
        num_workers = config.num_prefill_workers + config.num_decode_workers
        if not ray.is_initialized():
            ray.init(
                address=config.ray_address or "local",  # never join a cluster by accident (`ray start` on this machine)
                num_cpus=None if config.ray_address else max(os.cpu_count() or 1, num_workers),
                include_dashboard=False,
                logging_level=logging.WARNING,
                runtime_env={"env_vars": {"PYTHONPATH": _pythonpath()}},
            )
            self._started_ray = True
        gpus_per_worker = self._gpus_per_worker(num_workers)
        engine = config.engine
        if 0 < gpus_per_worker < 1 and engine.kv_cache_memory_gib is None:
            # Workers share a GPU: each sizes its KV cache within its share of the memory.
            engine = replace(engine, gpu_memory_utilization=engine.gpu_memory_utilization * gpus_per_worker)
        specs = [self._spec("prefill", engine) for _ in range(config.num_prefill_workers)]
        specs += [self._spec("decode", engine) for _ in range(config.num_decode_workers)]
        # One process per worker; the `local` transport needs them all in one.
        groups = [specs] if config.kv_transport == "local" else [[spec] for spec in specs]
        actor_cls = ray.remote(WorkerProcess)
        for group in groups:
            num_gpus = min(1.0, gpus_per_worker * len(group))
            resources = {"num_gpus": num_gpus, "num_cpus": 1} if gpus_per_worker else {"num_cpus": 1}
            if gpus_per_worker:  # the worker orders the GPUs it sees itself (deploy/worker_host.py)
                env = {"PYTHONPATH": _pythonpath(), "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}
                resources["runtime_env"] = {"env_vars": env}
            actor = actor_cls.options(name=group[0].worker_id, **resources).remote(group)
            self.actors.append(actor)
        records = ray.get([actor.start.remote() for actor in self.actors], timeout=config.startup_timeout_s)
        return [record for group_records in records for record in group_records]

    def _spec(self, role: str, engine: EngineConfig) -> WorkerSpec:
        config = self.config
        return WorkerSpec(
            role, engine, config.served_model_name, config.worker_host, kv_transport=config.kv_transport, redis_url=config.redis_url,
            cluster_secret=config.cluster_secret,
        )

    def _gpus_per_worker(self, num_workers: int) -> float:
        """One GPU per worker when the cluster has enough; else the GPUs are shared evenly (a single
        GPU machine runs a prefill and a decode worker on one GPU). 0: the workers run on the CPU."""
        import ray

        num_gpus = ray.cluster_resources().get("GPU", 0)
        if self.config.engine.device == "cpu" or num_gpus == 0:
            if self.config.engine.device == "cuda":
                raise ConfigError("--device cuda was asked for but the Ray cluster has no GPU")
            return 0
        if num_gpus >= num_workers:
            return 1
        return 1 / math.ceil(num_workers / num_gpus)  # equal shares that pack whole GPUs

    def stop(self) -> None:
        import ray

        if not ray.is_initialized():
            return
        try:
            ray.get([actor.stop.remote() for actor in self.actors], timeout=15)
        except Exception as exc:  # noqa: BLE001 - shutting down regardless
            logger.warning("workers did not stop cleanly: %s", exc)
        for actor in self.actors:
            ray.kill(actor)
        self.actors.clear()
        if self._started_ray:
            ray.shutdown()


def _pythonpath() -> str:
    existing = os.environ.get("PYTHONPATH")
    return f"{REPO_ROOT}:{existing}" if existing else REPO_ROOT
