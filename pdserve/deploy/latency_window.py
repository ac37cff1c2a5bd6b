"""`LatencyWindow`: a quantile of what a Prometheus histogram observed since the previous reading
(the gateway's TTFT and ITL over the autoscaler's last interval), from the cumulative bucket counts."""

from __future__ import annotations

import math

from prometheus_client import Histogram


class LatencyWindow:
    def __init__(self, histogram: Histogram) -> None:
        self.histogram = histogram
        self._previous = self._buckets()

    def quantile(self, q: float) -> float | None:
        """The upper bound of the bucket holding the q-quantile of the observations since the last
        call (a +Inf bucket reads as its lower bound); None when nothing was observed."""
        now = self._buckets()
        window = [(bound, count - self._previous.get(bound, 0.0)) for bound, count in sorted(now.items())]
        self._previous = now
        total = window[-1][1] if window else 0.0
        if total <= 0:
            return None
        finite = [bound for bound, _ in window if math.isfinite(bound)]
        for bound, count in window:
            if count >= q * total:
                return bound if math.isfinite(bound) else finite[-1]
        return finite[-1]

    def _buckets(self) -> dict[float, float]:
        """Cumulative count per bucket upper bound, summed over the histogram's label sets."""
        counts: dict[float, float] = {}
        for family in self.histogram.collect():
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    bound = float(sample.labels["le"])
                    counts[bound] = counts.get(bound, 0.0) + sample.value
        return counts
