"""Where workers run: each prefill worker asks Ray for one unit of the `prefill_pool` custom
resource, each decode worker for one of `decode_pool` (plus its CPU and GPU share), so each lands on
a node of its own pool. A single machine's local Ray gives its node both resources."""

from __future__ import annotations

import math
import os
from pathlib import Path

from pdserve.deploy.config import ACTOR_OPTIONS

REPO_ROOT = str(Path(__file__).resolve().parent.parent.parent)  # the directory holding the `pdserve` package
# A local node's units of each pool resource: as many workers as its CPUs and GPUs hold.
LOCAL_POOL_UNITS = 1000


def pool_resource(role: str) -> str:
    return f"{role}_pool"


def local_node_resources() -> dict[str, float]:
    """The custom resources `pdserve serve` gives the local Ray node it starts: both pools."""
    return {pool_resource("prefill"): LOCAL_POOL_UNITS, pool_resource("decode"): LOCAL_POOL_UNITS}


def missing_pools(cluster_resources: dict[str, float]) -> list[str]:
    """Pool resources no node of the cluster carries yet (an autoscaling cluster may add them)."""
    return [pool_resource(r) for r in ("prefill", "decode") if cluster_resources.get(pool_resource(r), 0) <= 0]


def gpus_per_worker(num_cluster_gpus: float, num_workers: int, device: str) -> float:
    """One GPU per worker when the cluster has enough; else the GPUs are shared evenly (a single
    GPU machine runs a prefill and a decode worker on one GPU). 0: the workers run on the CPU."""
    if device == "cpu" or num_cluster_gpus == 0:
        return 0
    if num_cluster_gpus >= num_workers:
        return 1
    return 1 / math.ceil(num_workers / num_cluster_gpus)  # equal shares that pack whole GPUs


def pool_gpu_share(resources: dict[str, float], computed_share: float) -> float:
    """The GPU share of one worker of a pool, both what Ray gives it and the part of a GPU's memory
    it sizes its KV cache in: the pool's own `num_gpus` if it sets one (Ray's request is then that,
    see `actor_options`), else the even share `gpus_per_worker` computed."""
    return float(resources["num_gpus"]) if "num_gpus" in resources else computed_share


def actor_options(units: dict[str, int], resources: dict[str, float], gpu_share: float) -> dict:
    """Ray actor options of a process hosting `units[role]` workers of each role (several only for
    the `local` KV transport): their pool resources, a CPU, GPU shares, and the pool's `resources`."""
    num_workers = sum(units.values())
    options: dict = {"num_cpus": 1, "resources": {pool_resource(role): n for role, n in units.items()}}
    if gpu_share:
        options["num_gpus"] = min(1.0, gpu_share * num_workers)
    for name, amount in resources.items():
        if name in ACTOR_OPTIONS:
            options[name] = amount
        else:
            options["resources"][name] = amount
    env = {"PYTHONPATH": pythonpath()}
    if options.get("num_gpus"):  # the worker orders the GPUs it sees itself (deploy/worker_host.py)
        env["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] = "1"
    options["runtime_env"] = {"env_vars": env}
    return options


def pythonpath() -> str:
    existing = os.environ.get("PYTHONPATH")
    return f"{REPO_ROOT}:{existing}" if existing else REPO_ROOT
