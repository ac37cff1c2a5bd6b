"""`IterationTokens`: how many tokens each engine step computed, as cumulative histogram buckets
(vLLM's `vllm:iteration_tokens_total` boundaries). Plain counts, no torch: workers report them in
their status and the gateway exports them."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass
class IterationTokens:
    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))  # per bucket, +Inf last
    total: int = 0  # tokens over all steps
    num_steps: int = 0

    def observe(self, num_tokens: int) -> None:
        self.counts[bisect.bisect_left(BUCKETS, num_tokens)] += 1
        self.total += num_tokens
        self.num_steps += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, steps with at most that many tokens), Prometheus' bucket form; bounds written as
        prometheus_client (vLLM's exporter) writes them, "1.0", so both fleets' series are one."""
        running, out = 0, []
        for bound, count in zip([*(str(float(b)) for b in BUCKETS), "+Inf"], self.counts):
            running += count
            out.append((bound, running))
        return out

    def add(self, other: IterationTokens) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        self.total += other.total
        self.num_steps += other.num_steps
