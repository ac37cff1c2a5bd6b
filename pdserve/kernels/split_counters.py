"""Zeroed int32 counters for kernels whose programs split one output's work and let the last of
them to finish merge the splits (`is_last_split`): each program increments its output's counter
(acq_rel), the one that reads splits - 1 merges and resets it to zero, for the next launch or graph
replay. A buffer per (kernel, device), shared by that kernel's launches, which run in stream order."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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


@triton.jit
def is_last_split(counter_ptr, num_splits):
    """After the program has stored its partial results: whether it is the last of the num_splits
    programs sharing counter_ptr to get here, the one to merge; that program resets the counter.
    Ordering: every thread's stores, then a CTA barrier, then one thread's gpu-scope acq_rel
    increment (release is cumulative: it publishes the whole program's stores); increments of one
    counter are totally ordered, so the program that reads num_splits - 1 comes after every other
    split's release, and its acquire reaches its other threads through the broadcast of the
    atomic's result. Its merge should load the partials past L1 (.cg)."""
    tl.debug_barrier()
    is_last = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu") == num_splits - 1
    if is_last:
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")
    return is_last


@triton.jit
def sum_of_splits(partial_ptrs, split_stride, num_splits, mask):
    """For the program that `is_last_split` chose: the fp32 partials of every split, at partial_ptrs
    + split * split_stride, added in split order (deterministic), read past L1."""
    total = tl.zeros(partial_ptrs.shape, dtype=tl.float32)
    for split in range(num_splits):
        total += tl.load(partial_ptrs + split * split_stride, mask=mask, other=0.0, cache_modifier=".cg")
    return total
