"""Zeroed int32 counters for kernels whose programs split one output's work and let the last of
them to finish merge the splits: each program increments its output's counter (acq_rel), the one
that reads splits - 1 merges and resets it to zero, for the next launch or graph replay. A buffer
per (kernel, device), shared by that kernel's launches, which run in stream order."""

from __future__ import annotations

import torch
import triton

_counters: dict[tuple[str, torch.device], torch.Tensor] = {}
_outgrown: list[torch.Tensor] = []  # graphs captured with a smaller buffer still write into it


def split_counters(kernel: str, device: torch.device, count: int) -> torch.Tensor:
    """At least `count` counters for `kernel` on `device`, zero between launches. Grown only outside
    CUDA-graph capture: the engine runs each batch shape once before capturing it."""
    counters = _counters.get((kernel, device))
    if counters is None or counters.numel() < count:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"run this shape once before capturing: {count} split counters needed for {kernel}")
        if counters is not None:
            _outgrown.append(counters)
        counters = torch.zeros(triton.next_power_of_2(count), dtype=torch.int32, device=device)
        _counters[(kernel, device)] = counters
    return counters
