"""Model building blocks that dispatch to Triton kernels on CUDA and to torch references on the
CPU: RMSNorm (optionally fused with the residual add), SiLU-and-mul, and fused linear layers."""
from __future__ import annotations

import torch
from torch import nn

import kernels


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            norm = kernels.rms_norm if x.is_cuda else kernels.rms_norm_ref
            return norm(x, self.weight, self.eps)
        fused = kernels.fused_add_rms_norm if x.is_cuda else kernels.fused_add_rms_norm_ref
        return fused(x, residual, self.weight, self.eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return kernels.silu_and_mul(x) if x.is_cuda else kernels.silu_and_mul_ref(x)


class MergedLinear(nn.Linear):
    """One matmul for several HF projections of the same input (q/k/v, gate/up); each HF weight
    loads into its row range (`shard`)."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool) -> None:
        super().__init__(in_features, sum(shard_sizes.values()), bias=bias)
        self.shard_ranges: dict[str, tuple[int, int]] = {}
        start = 0
        for name, size in shard_sizes.items():
            self.shard_ranges[name] = (start, size)
            start += size

    def load_shard(self, shard: str, param: nn.Parameter, tensor: torch.Tensor) -> None:
        start, size = self.shard_ranges[shard]
        if tensor.shape[0] != size:
            raise ValueError(f"shard {shard} has {tensor.shape[0]} rows, expected {size}")
        param.data[start : start + size].copy_(tensor)
