"""What `pdserve serve` / `pdserve router` were told, built once at the entry point (flags over a
`--config` file) and never mutated: `ServeConfig`, each pool's `PoolConfig`, the `AutoscaleConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.engine.config import EngineConfig
from pdserve.proto.cluster_secret import ClusterSecret
from pdserve.router.registry import check_redis_url

ROLES = ("prefill", "decode")
# Ray actor options a pool's `resources` may set besides custom resources.
ACTOR_OPTIONS = ("num_cpus", "num_gpus", "memory")


@dataclass(frozen=True)
class PoolConfig:
    """One pool's bounds and what each of its workers asks Ray for, besides its pool resource
    (`num_cpus`, `num_gpus`, `memory`, custom resources; unset: 1 CPU and an even GPU share)."""

    min_replicas: int = 1
    max_replicas: int = 8
    resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"a pool needs 0 <= min <= max replicas; got min {self.min_replicas}, max {self.max_replicas}")
        bad = [k for k, v in self.resources.items() if not isinstance(v, (int, float)) or v < 0]
        if bad:
            raise ValueError(f"pool resources must be non-negative numbers: {', '.join(bad)}")


@dataclass(frozen=True)
class AutoscaleConfig:
    """When the autoscaler grows or shrinks a pool (by one worker per decision). A signal must stay
    past its threshold for `sustain_ticks` ticks in a row (hysteresis: the "low" thresholds sit well
    below the "high" ones); after a change, the pool is left alone for `cooldown_s` and until its
    starting and draining workers are done. Latencies are the p90 over the last tick."""

    enabled: bool = False
    interval_s: float = 5.0
    cooldown_s: float = 60.0
    sustain_ticks: int = 2
    # prefill pool: prompts a worker holds (queued, computing, handing off), time to first token
    prefill_queue_high: float = 4.0
    prefill_queue_low: float = 0.5
    ttft_high_s: float = 2.0
    ttft_low_s: float = 0.5
    # decode pool: KV usage (0..1), running requests per worker over max_num_seqs, inter-token latency
    decode_kv_high: float = 0.8
    decode_kv_low: float = 0.3
    decode_batch_high: float = 0.9
    decode_batch_low: float = 0.4
    itl_high_s: float = 0.2
    itl_low_s: float = 0.05

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or self.cooldown_s < 0 or self.sustain_ticks < 1:
            raise ValueError("autoscaler: interval_s > 0, cooldown_s >= 0 and sustain_ticks >= 1 are required")
        pairs = {
            "prefill_queue": (self.prefill_queue_low, self.prefill_queue_high),
            "ttft": (self.ttft_low_s, self.ttft_high_s),
            "decode_kv": (self.decode_kv_low, self.decode_kv_high),
            "decode_batch": (self.decode_batch_low, self.decode_batch_high),
            "itl": (self.itl_low_s, self.itl_high_s),
        }
        for name, (low, high) in pairs.items():
            if not 0 <= low < high:
                raise ValueError(f"autoscaler: {name} needs 0 <= low < high; got low {low}, high {high}")


@dataclass(frozen=True)
class DrainConfig:
    """A draining worker leaves once no gateway can still pick it (`quiet_s`, a few of their status
    polls) and it holds nothing: no request running or waiting, no used KV block; or at `timeout_s`."""

    quiet_s: float = 3.0
    timeout_s: float = 660.0  # past the gateway's whole-request deadline (600 s)

    def __post_init__(self) -> None:
        if not 0 <= self.quiet_s <= self.timeout_s:
            raise ValueError(
                f"drain: 0 <= quiet_s <= timeout_s is required; got quiet_s {self.quiet_s}, timeout_s {self.timeout_s}"
            )


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
    admin_token: str | None = None
    prefill_pool: PoolConfig = PoolConfig()
    decode_pool: PoolConfig = PoolConfig()
    autoscale: AutoscaleConfig = AutoscaleConfig()
    drain: DrainConfig = DrainConfig()
    # Authenticates every gRPC call and registry record of this cluster (proto/auth.py).
    cluster_secret: ClusterSecret = field(default_factory=ClusterSecret.generate)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535; got {self.port}")
        if self.redis_url is not None:
            check_redis_url(self.redis_url)
        for role in ROLES:
            replicas, pool = self.replicas(role), self.pool(role)
            if replicas < 1:
                raise ValueError(f"--{role}-workers must be at least 1")
            if not pool.min_replicas <= replicas <= pool.max_replicas:
                raise ValueError(
                    f"{role} replicas ({replicas}) must lie within the pool's min {pool.min_replicas} and max {pool.max_replicas}"
                )

    def replicas(self, role: str) -> int:
        return self.num_prefill_workers if role == "prefill" else self.num_decode_workers

    def pool(self, role: str) -> PoolConfig:
        return self.prefill_pool if role == "prefill" else self.decode_pool
