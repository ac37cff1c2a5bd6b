"""`Autoscaler`: sizes each pool from what it observes, one worker per decision: the prefill pool from
its queue and the time to first token, the decode pool from KV usage, batch size and inter-token
latency. Hysteresis (high and low thresholds, a signal held for several ticks), bounds and a
cool-down; it only sets a pool's desired size, so removals go through the controller's drain."""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass

from pdserve.deploy.config import AutoscaleConfig
from pdserve.deploy.pool import WorkerLoad

NUM_DECISIONS_KEPT = 32


@dataclass(frozen=True)
class PoolSignals:
    """What one tick observed of a pool: its ready workers' loads and the gateways' latencies (p90
    over the last tick, None without traffic)."""

    role: str
    loads: list[WorkerLoad]
    ttft_s: float | None = None
    itl_s: float | None = None


@dataclass(frozen=True)
class Decision:
    role: str
    direction: str  # "up" | "down"
    replicas: int  # the pool's new desired size
    reason: str
    at: float  # time.time()

    def view(self) -> dict:
        return {"pool": self.role, "direction": self.direction, "replicas": self.replicas, "reason": self.reason, "at": self.at}


class Autoscaler:
    def __init__(self, config: AutoscaleConfig, max_num_seqs: int) -> None:
        self.config = config
        self.max_num_seqs = max_num_seqs
        self.num_decisions: Counter[tuple[str, str]] = Counter()
        self.recent: deque[Decision] = deque(maxlen=NUM_DECISIONS_KEPT)
        self._streaks: dict[str, tuple[str | None, int]] = {}

    def decide(self, signals: PoolSignals, desired: int, bounds: tuple[int, int], can_change: bool) -> Decision | None:
        """`can_change`: the pool is settled and out of its cool-down. A direction must be seen
        `sustain_ticks` ticks in a row, and the new size stay within `bounds`."""
        direction, reason = self.pressure(signals)
        previous, count = self._streaks.get(signals.role, (None, 0))
        count = count + 1 if direction == previous else 1
        self._streaks[signals.role] = (direction, count)
        replicas = desired + (1 if direction == "up" else -1)
        if direction is None or count < self.config.sustain_ticks or not can_change:
            return None
        if not bounds[0] <= replicas <= bounds[1]:
            return None
        self._streaks[signals.role] = (None, 0)
        decision = Decision(signals.role, direction, replicas, reason, time.time())
        self.num_decisions[(signals.role, direction)] += 1
        self.recent.append(decision)
        return decision

    def pressure(self, signals: PoolSignals) -> tuple[str | None, str]:
        """("up" | "down" | None, why) for this tick alone."""
        if not signals.loads:
            return None, ""
        return self._prefill(signals) if signals.role == "prefill" else self._decode(signals)

    def _prefill(self, s: PoolSignals) -> tuple[str | None, str]:
        """The queue is every prompt a worker holds: waiting, being computed, or handing its KV off."""
        c, n = self.config, len(s.loads)
        queue = sum(load.num_waiting + load.num_running for load in s.loads)
        if queue / n >= c.prefill_queue_high:
            return "up", f"{queue / n:.1f} prompts queued per worker >= {c.prefill_queue_high:g}"
        if s.ttft_s is not None and s.ttft_s >= c.ttft_high_s:
            return "up", f"TTFT p90 {s.ttft_s:.3f} s >= {c.ttft_high_s:g} s"
        is_fast = s.ttft_s is None or s.ttft_s <= c.ttft_low_s
        if n > 1 and is_fast and queue / (n - 1) <= c.prefill_queue_low:
            return (
                "down",
                f"{queue} prompts queued: {queue / (n - 1):.1f} per worker with one fewer, TTFT p90 {_seconds(s.ttft_s)}",
            )
        return None, ""

    def _decode(self, s: PoolSignals) -> tuple[str | None, str]:
        c, n = self.config, len(s.loads)
        kv = sum(load.kv_cache_usage for load in s.loads) / n
        batch = sum(load.num_running for load in s.loads) / n / self.max_num_seqs
        if kv >= c.decode_kv_high:
            return "up", f"KV usage {kv:.0%} >= {c.decode_kv_high:.0%}"
        if batch >= c.decode_batch_high:
            return "up", f"batch {batch:.0%} of max_num_seqs >= {c.decode_batch_high:.0%}"
        if s.itl_s is not None and s.itl_s >= c.itl_high_s:
            return "up", f"ITL p90 {s.itl_s:.3f} s >= {c.itl_high_s:g} s"
        spread = n / (n - 1) if n > 1 else float("inf")  # the same load over one worker fewer
        is_fast = s.itl_s is None or s.itl_s <= c.itl_low_s
        if n > 1 and is_fast and kv * spread <= c.decode_kv_low and batch * spread <= c.decode_batch_low:
            return "down", f"KV usage {kv:.0%} and batch {batch:.0%} stay low with one worker fewer, ITL p90 {_seconds(s.itl_s)}"
        return None, ""

    def view(self) -> dict:
        counts = {role: {d: self.num_decisions[(role, d)] for d in ("up", "down")} for role in ("prefill", "decode")}
        return {"enabled": True, "num_decisions": counts, "recent": [d.view() for d in self.recent]}


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f} s"
