"""Model building blocks that dispatch to Triton kernels on CUDA and to torch references on the
CPU: RMSNorm (optionally fused with the residual add), SiLU-and-mul, and fused linear layers, and
the BLAS library their matmuls take by row count."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Protocol

import torch
from torch import nn

from pdserve import kernels
from pdserve.kernels.pdl import use_pdl

# Up to this many inputs, a decode step's one row folds the residual add and RMSNorm before a float
# projection into its GEMV (`add_norm_project`): every GEMV program then reads and norms the whole
# row itself, which costs L2 reads that grow with it. H100, batch-1 decode steps with the folds of
# q/k/v and gate/up against none: Qwen2.5-0.5B (896 inputs) -5.3%, Qwen3-0.6B (1024) -0.7%,
# Qwen2.5-1.5B (1536) +5.7% (bench/RESULTS.md)
FOLDED_NORM_MAX_INPUTS = 1024
# From this many rows the matmuls prefer cuBLASLt's kernels to cuBLAS's, on sm_90+ (H200, Llama-3-8B
# decode steps: 1-3.5% faster at 32-128 rows, 1.4-2% slower at 8-16; prefill unchanged; bench/RESULTS.md)
CUBLASLT_MIN_ROWS = 32


@contextlib.contextmanager
def blas_for_rows(rows: int, device: torch.device) -> Iterator[None]:
    """Within it, cuBLAS matmuls (torch's) use cuBLASLt where `rows` warrants it; torch's default
    choice elsewhere. The preference is process-wide: a matmul of another thread meanwhile takes it
    too, which changes its speed, not its result."""
    if rows < CUBLASLT_MIN_ROWS or not _has_cublaslt_preference(device):
        yield
        return
    before = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library("cublaslt")
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(before)


@functools.cache
def _has_cublaslt_preference(device: torch.device) -> bool:
    return device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device) >= (9, 0)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            norm = kernels.rms_norm if x.is_cuda else kernels.rms_norm_ref
            return norm(x, self.weight, self.eps)
        fused = kernels.fused_add_rms_norm if x.is_cuda else kernels.fused_add_rms_norm_ref
        return fused(x, residual, self.weight, self.eps)


class Projection(Protocol):
    """A linear layer, float or quantized (engine/quant_layers.py)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def swiglu(self, x: torch.Tensor) -> torch.Tensor: ...


def add_norm_project(
    norm: RMSNorm, projection: Projection, x: torch.Tensor, residual: torch.Tensor | None, swiglu: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """`norm(x, residual)` (`norm(x)` with no residual yet: x becomes it), then the projection of the
    normed rows (`swiglu`: its `swiglu`); returns (the projection, the new residual). Where a decode
    step's one row takes a float projection's GEMV over at most FOLDED_NORM_MAX_INPUTS inputs, both in
    one launch (`kernels.gemv_add_rms_norm`), whose new residual is a new tensor."""
    if residual is not None and isinstance(projection, Linear) and projection.folds_norm(x):
        out, residual = kernels.gemv_add_rms_norm(
            x.reshape(1, -1), residual.reshape(1, -1), norm.weight, norm.eps, projection.weight, projection.bias, swiglu=swiglu
        )
        return out.view(*x.shape[:-1], out.shape[-1]), residual.view(x.shape)
    if residual is None:
        normed, residual = norm(x), x
    else:
        normed, residual = norm(x, residual)
    return (projection.swiglu(normed) if swiglu else projection(normed)), residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return kernels.silu_and_mul(x) if x.is_cuda else kernels.silu_and_mul_ref(x)


class Linear(nn.Module):
    """y = x W^T + b. With `decode_gemv` (engine/model.py), on a GPU that launches kernels as
    dependents (kernels/pdl.py), the few rows of a decode step (up to the model's `pdl_max_rows`) take our GEMV
    (kernels/gemv.py), a link in a chain of such launches with the norms, attention and SwiGLU around
    it; more rows take cuBLAS.
    With `transposed`, W is stored [in, out] and used as `x @ W` by cuBLAS at every row count: its
    faster layout for o_proj, gate_up and down (bench/gemv.py; 1-2% at 16-64 rows, bench/RESULTS.md),
    taken where the GEMV is not, and for an untied LM head, which cuBLAS reads at memory speed so."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, transposed: bool = False, decode_gemv: bool = False
    ) -> None:
        super().__init__()
        if transposed and decode_gemv:
            raise ValueError("the decode GEMV reads weights stored [out, in], not transposed")
        self.in_features, self.out_features = in_features, out_features
        self.transposed, self.decode_gemv = transposed, decode_gemv
        shape = (in_features, out_features) if transposed else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            out = x @ self.weight
            return out if self.bias is None else out + self.bias
        if self._takes_gemv(x):
            rows = x.reshape(-1, self.in_features).contiguous()
            return kernels.gemv(rows, self.weight, bias=self.bias).view(*x.shape[:-1], self.out_features)
        return torch.nn.functional.linear(x, self.weight, self.bias)

    def _takes_gemv(self, x: torch.Tensor) -> bool:
        return not self.transposed and self.decode_gemv and use_pdl(x, x.numel() // self.in_features)

    def folds_norm(self, x: torch.Tensor) -> bool:
        """Whether `add_norm_project` folds the norm before this projection of x into its GEMV."""
        return x.numel() == self.in_features <= FOLDED_NORM_MAX_INPUTS and self._takes_gemv(x)

    def checkpoint_kinds(self) -> set[str]:
        """Tensor kinds (name suffixes) each HF projection must provide."""
        return {"weight", "bias"} if self.bias is not None else {"weight"}

    def optional_kinds(self) -> set[str]:
        return set()

    def load(self, kind: str, tensor: torch.Tensor, rows: slice = slice(None)) -> None:
        """Copy an HF tensor (weight [out, in] or bias [out]) into our output rows `rows`."""
        if kind not in self.checkpoint_kinds():
            raise ValueError(
                f"unexpected tensor kind {kind!r} for an unquantized layer (expected: {', '.join(sorted(self.checkpoint_kinds()))})"
            )
        if not tensor.is_floating_point() or tensor.element_size() == 1:
            raise ValueError(
                f"{tensor.dtype} is a quantized type, but this layer is not quantized (no quantization_config for it)"
            )
        param = self.weight if kind == "weight" else self.bias
        target = param.data[:, rows] if kind == "weight" and self.transposed else param.data[rows]
        source = tensor.t() if kind == "weight" and self.transposed else tensor
        if target.shape != source.shape:
            raise ValueError(f"{kind} has shape {tuple(tensor.shape)}; this layer expects {tuple(target.shape)} (HF layout)")
        target.copy_(source)


class MergedLinear(Linear):
    """One matmul for several HF projections of the same input (q/k/v, gate/up); each HF weight
    loads into its range of output rows (`shard`)."""

    def __init__(
        self, in_features: int, shard_sizes: dict[str, int], bias: bool, transposed: bool = False, decode_gemv: bool = False
    ) -> None:
        super().__init__(in_features, sum(shard_sizes.values()), bias=bias, transposed=transposed, decode_gemv=decode_gemv)
        self.shard_ranges: dict[str, tuple[int, int]] = {}
        start = 0
        for name, size in shard_sizes.items():
            self.shard_ranges[name] = (start, size)
            start += size

    def load_shard(self, shard: str, kind: str, tensor: torch.Tensor) -> None:
        start, size = self.shard_ranges[shard]
        self.load(kind, tensor, slice(start, start + size))

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of a [gate | up] projection: where a decode step's rows take our GEMV, in
        its epilogue (one launch fewer a layer), else the projection then `silu_and_mul`."""
        if self._takes_gemv(x):
            rows = x.reshape(-1, self.in_features).contiguous()
            return kernels.gemv(rows, self.weight, bias=self.bias, swiglu=True).view(*x.shape[:-1], self.out_features // 2)
        return silu_and_mul(self(x))
