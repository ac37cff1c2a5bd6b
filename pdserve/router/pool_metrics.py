"""Per-pool series on /metrics: each pool's load as this gateway polls its workers
(`pdserve:pool_*`), and, on a gateway that reaches the controller, each pool's replicas by state,
its desired size and the autoscaler's decisions. Read at scrape time from state kept elsewhere."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from pdserve.router.workers import WorkerPool

POOLS = ("prefill", "decode")
STATES = ("starting", "ready", "draining")


class PoolCollector:
    def __init__(self, pool: WorkerPool, model_name: str, pools_view: Callable[[], dict | None] = lambda: None) -> None:
        """`pools_view()`: the controller's last answer (`/admin/pools`' body), or None."""
        self.pool = pool
        self.model_name = model_name
        self.pools_view = pools_view

    def collect(self) -> Iterator[Metric]:
        yield from self._load()
        view = self.pools_view()
        if view is not None:
            yield from self._replicas(view)

    def _load(self) -> Iterator[Metric]:
        labels = ["model_name", "pool"]
        families = {
            "healthy": GaugeMetricFamily(
                "pdserve:pool_healthy_workers", "Workers of the pool this gateway can route to.", labels=labels
            ),
            "running": GaugeMetricFamily(
                "pdserve:pool_num_requests_running", "Requests running on the pool's workers.", labels=labels
            ),
            "waiting": GaugeMetricFamily(
                "pdserve:pool_num_requests_waiting", "Requests queued on the pool's workers.", labels=labels
            ),
            "kv": GaugeMetricFamily(
                "pdserve:pool_kv_cache_usage_perc", "KV blocks in use over all blocks of the pool (1 = full).", labels=labels
            ),
        }
        for role in POOLS:
            handles = [h for h in self.pool.workers.values() if h.record.role == role and h.is_healthy and h.status is not None]
            statuses = [h.status for h in handles if h.status is not None]  # every handle's: filtered above
            total = sum(s.num_total_blocks for s in statuses)
            values: dict[str, float] = {
                "healthy": sum(h.is_routable for h in handles),
                "running": sum(s.num_running for s in statuses),
                "waiting": sum(s.num_waiting for s in statuses),
                "kv": sum(s.num_used_blocks for s in statuses) / total if total else 0.0,
            }
            for name, family in families.items():
                family.add_metric([self.model_name, role], values[name])
        yield from families.values()

    def _replicas(self, view: dict) -> Iterator[Metric]:
        replicas = GaugeMetricFamily(
            "pdserve:pool_replicas", "Workers of the pool by state (controller).", labels=["model_name", "pool", "state"]
        )
        desired = GaugeMetricFamily(
            "pdserve:pool_desired_replicas", "The pool's desired size (operator or autoscaler).", labels=["model_name", "pool"]
        )
        decisions = CounterMetricFamily(
            "pdserve:autoscaler_decisions", "Pool resizes decided by the autoscaler.", labels=["model_name", "pool", "direction"]
        )
        counts = view.get("autoscaler", {}).get("num_decisions", {})
        for role, pool in view["pools"].items():
            desired.add_metric([self.model_name, role], pool["desired"])
            for state in STATES:
                replicas.add_metric([self.model_name, role, state], pool["num_workers"][state])
            for direction in ("up", "down"):
                decisions.add_metric([self.model_name, role, direction], counts.get(role, {}).get(direction, 0))
        yield from (replicas, desired, decisions)
