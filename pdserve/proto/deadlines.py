"""`Deadlines`: every time limit of one request, defined once. Built from flags at the entry point,
enforced by the gateway, and carried to the workers as gRPC deadlines (each worker sees the time
its call has left) and as the KV lease of the decode worker's reservation."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Deadlines:
    """Seconds. A worker that stops answering is caught sooner than these: the gateway fails over
    or fails its requests as soon as its health poll marks the worker unhealthy (~2-3 s)."""

    first_token_s: float = 60.0  # arrival -> first token: decode blocks, prefill queue and compute, KV hand-off, one retry
    prefill_s: float = 30.0  # one hand-off attempt (decode reservation + Prefill RPC); past it the attempt is retried once
    kv_lease_s: float = 90.0  # a reservation waits this long for its KV: the backstop when the gateway cannot cancel it
    stall_s: float = 15.0  # between two tokens of a generation (a frozen decode worker)
    request_s: float = 600.0  # arrival -> last token

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"deadline {f.name} must be a positive number of seconds, got {value}")
        if self.first_token_s > self.request_s:
            raise ValueError(
                f"the first-token deadline ({self.first_token_s:g} s) exceeds the request deadline ({self.request_s:g} s)"
            )
