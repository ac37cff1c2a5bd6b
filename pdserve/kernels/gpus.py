"""What the kernels' launch rules read of a GPU, cached per device index: its SM count, its shared
memory per SM, and the entry of a by-name table of tiles measured on that GPU (`by_gpu_name`)."""

from __future__ import annotations

import functools
from typing import Any, TypeVar

import torch

T = TypeVar("T")


@functools.lru_cache(maxsize=16)
def _properties(device_index: int) -> Any:
    return torch.cuda.get_device_properties(device_index)


@functools.lru_cache(maxsize=16)
def gpu_name(device_index: int) -> str:
    return torch.cuda.get_device_name(device_index)


def num_sms(device: torch.device, on_cpu: int = 1) -> int:
    """A CUDA device's SM count; `on_cpu` (the rule's number of "SMs") for other devices."""
    return _properties(device.index or 0).multi_processor_count if device.type == "cuda" else on_cpu


def shared_memory_per_sm(device: torch.device) -> int:
    """Bytes of shared memory an SM of a CUDA device has; 0 for other devices (and where torch does
    not say)."""
    if device.type != "cuda":
        return 0
    return getattr(_properties(device.index or 0), "shared_memory_per_multiprocessor", 0)


def by_gpu_name(table: dict[str, T], device: torch.device | None) -> T | None:
    """table's entry whose key is part of a CUDA device's name (e.g. "H100"); None for other GPUs and
    for other devices."""
    if device is None or device.type != "cuda":
        return None
    name = gpu_name(device.index or 0)
    return next((entry for part, entry in table.items() if part in name), None)
