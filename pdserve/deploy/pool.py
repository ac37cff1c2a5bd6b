"""`Pool`: one role's membership as the controller keeps it: desired replicas within the pool's
bounds, and each worker's state, `starting -> ready -> draining -> gone`. Plain data and rules, no
Ray: the controller acts on what a pool says is missing or surplus."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from pdserve.deploy.config import PoolConfig

NUM_GONE_KEPT = 16  # recently gone workers shown by /admin/pools (how each ended, its last load)
MAX_START_BACKOFF_S = 60.0


class WorkerState(str, Enum):
    STARTING = "starting"  # placed (or waiting for a node), loading its model; no traffic
    READY = "ready"  # serving; listed for the gateways
    DRAINING = "draining"  # no new requests; finishing what it holds
    GONE = "gone"  # exited: drained, died, failed to start, or stopped


@dataclass(frozen=True)
class WorkerLoad:
    num_running: int = 0
    num_waiting: int = 0
    num_used_blocks: int = 0
    num_total_blocks: int = 0

    @classmethod
    def of(cls, status: dict) -> WorkerLoad:
        return cls(*(int(status.get(name, 0)) for name in ("num_running", "num_waiting", "num_used_blocks", "num_total_blocks")))

    @property
    def kv_cache_usage(self) -> float:
        return self.num_used_blocks / self.num_total_blocks if self.num_total_blocks else 0.0

    @property
    def is_idle(self) -> bool:
        return self.num_running == 0 and self.num_waiting == 0 and self.num_used_blocks == 0

    def view(self) -> dict:
        return {
            "num_running": self.num_running,
            "num_waiting": self.num_waiting,
            "num_used_blocks": self.num_used_blocks,
            "num_total_blocks": self.num_total_blocks,
            "kv_cache_usage": round(self.kv_cache_usage, 4),
        }


@dataclass(eq=False)
class PoolWorker:
    worker_id: str
    role: str
    actor: Any  # the Ray actor (a `WorkerProcess`) hosting it
    state: WorkerState = WorkerState.STARTING
    address: str | None = None
    node_id: str | None = None
    pid: int | None = None
    load: WorkerLoad | None = None
    load_at_drain: WorkerLoad | None = None  # what it held when asked to drain
    end_reason: str | None = None
    since: float = field(default_factory=time.monotonic)  # entered its state at
    last_answer: float = field(default_factory=time.monotonic)
    is_leaving: bool = False  # its process is being stopped

    def enter(self, state: WorkerState) -> None:
        self.state, self.since = state, time.monotonic()

    def view(self) -> dict:
        return {
            "worker_id": self.worker_id,
            "address": self.address,
            "state": self.state.value,
            "node_id": self.node_id,
            "pid": self.pid,
            "load": self.load.view() if self.load else None,
            "seconds_in_state": round(time.monotonic() - self.since, 1),
            "load_at_drain": self.load_at_drain.view() if self.load_at_drain else None,
            "end_reason": self.end_reason,
        }


class Pool:
    def __init__(self, role: str, config: PoolConfig, replicas: int, is_fixed: bool = False) -> None:
        """`is_fixed`: the workers share one process (`local` KV transport): no rescaling, no replacement."""
        self.role = role
        self.config = config
        self.desired = replicas
        self.is_fixed = is_fixed
        self.workers: dict[str, PoolWorker] = {}  # every worker not gone
        self.gone: deque[PoolWorker] = deque(maxlen=NUM_GONE_KEPT)
        self.last_change = time.monotonic()  # of `desired`
        self.next_start_at = 0.0
        self._num_start_failures = 0

    def members(self, *states: WorkerState) -> list[PoolWorker]:
        return [w for w in self.workers.values() if w.state in states]

    @property
    def num_active(self) -> int:
        """Workers that count toward `desired`: starting or ready."""
        return len(self.members(WorkerState.STARTING, WorkerState.READY))

    @property
    def is_settled(self) -> bool:
        """Every desired worker ready, none starting or draining."""
        return len(self.members(WorkerState.READY)) == self.desired == len(self.workers)

    def refusal(self, replicas: int) -> str | None:
        """Why `replicas` cannot be the pool's size, or None."""
        if self.is_fixed:
            return "with --kv-transport local every worker shares one process: the pools cannot be rescaled"
        if not self.config.min_replicas <= replicas <= self.config.max_replicas:
            return f"the {self.role} pool takes {self.config.min_replicas} to {self.config.max_replicas} replicas; got {replicas}"
        return None

    def set_desired(self, replicas: int) -> None:
        assert self.refusal(replicas) is None, self.refusal(replicas)
        self.desired = replicas
        self.last_change = time.monotonic()

    def shortfall(self) -> int:
        return max(0, self.desired - self.num_active)

    def surplus(self) -> list[PoolWorker]:
        """Workers to take out, starting ones first (they hold nothing), then the least loaded."""
        extra = self.num_active - self.desired
        if extra <= 0:
            return []
        starting = sorted(self.members(WorkerState.STARTING), key=lambda w: -w.since)
        ready = sorted(self.members(WorkerState.READY), key=lambda w: _busyness(w.load))
        return (starting + ready)[:extra]

    def add(self, worker: PoolWorker) -> None:
        self.workers[worker.worker_id] = worker

    def remove(self, worker: PoolWorker, reason: str) -> None:
        if self.workers.pop(worker.worker_id, None) is None:
            return
        worker.end_reason = reason
        worker.enter(WorkerState.GONE)
        self.gone.append(worker)

    def started(self, is_ok: bool) -> None:
        """A worker came up or failed to: failures back further starts off (1 s, 2 s, ... 60 s)."""
        self._num_start_failures = 0 if is_ok else self._num_start_failures + 1
        if self._num_start_failures:
            self.next_start_at = time.monotonic() + min(MAX_START_BACKOFF_S, 2.0 ** (self._num_start_failures - 1))

    def view(self) -> dict:
        counts = {
            state.value: len(self.members(state)) for state in (WorkerState.STARTING, WorkerState.READY, WorkerState.DRAINING)
        }
        return {
            "desired": self.desired,
            "min": self.config.min_replicas,
            "max": self.config.max_replicas,
            "is_fixed": self.is_fixed,
            "num_workers": counts,
            "workers": [w.view() for w in self.workers.values()],
            "gone": [w.view() for w in self.gone],
        }


def _busyness(load: WorkerLoad | None) -> tuple[int, int]:
    return (0, 0) if load is None else (load.num_running + load.num_waiting, load.num_used_blocks)
