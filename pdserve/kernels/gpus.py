"""What the kernels' launch rules read of a GPU, cached per device index: its SM count, and the
entry of a by-name table of tiles measured on that GPU (`by_gpu_name`)."""

from __future__ import annotations

import functools
from typing import TypeVar

import torch

T = TypeVar("T")


@functools.lru_cache(maxsize=16)
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=16)
def gpu_name(device_index: int) -> str:
    return torch.cuda.get_device_name(device_index)


def by_gpu_name(table: dict[str, T], device: torch.device | None) -> T | None:
    """table's entry whose key is part of a CUDA device's name (e.g. "H100"); None for other GPUs and
    for other devices."""
    if device is None or device.type != "cuda":
        return None
    name = gpu_name(device.index or 0)
    return next((entry for part, entry in table.items() if part in name), None)
