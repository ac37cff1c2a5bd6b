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
        """The q-quantile of the observations since the last call, interpolated linearly inside its
        bucket as Prometheus's histogram_quantile does (the first bucket starts at 0; a quantile in
        the +Inf bucket reads as the highest finite bound); None when nothing was observed."""
        assert 0.0 <= q <= 1.0, q
        now = self._buckets()
        window = [(bound, count - self._previous.get(bound, 0.0)) for bound, count in sorted(now.items())]
        self._previous = now
        total = window[-1][1] if window else 0.0
        if total <= 0:
            return None
        rank = q * total
        lower, below = 0.0, 0.0  # the previous bucket's bound and cumulative count
        for upper, count in window:
            if not math.isfinite(upper):
                return lower
            if count >= rank and count > below:  # `count > below`: q = 0 skips empty leading buckets
                return lower + (upper - lower) * (rank - below) / (count - below)
            lower, below = upper, count
        return lower

    def _buckets(self) -> dict[float, float]:
        """Cumulative count per bucket upper bound, summed over the histogram's label sets."""
        counts: dict[float, float] = {}
        for family in self.histogram.collect():
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    bound = float(sample.labels["le"])
                    counts[bound] = counts.get(bound, 0.0) + sample.value
        return counts
