"""Per-row (per-token) fp8 e4m3 quantization of activations for the FP8 tensor-core GEMM, in one
kernel: a row's absolute maximum, its scale max(amax * (1/448), 1e-12), and every element divided by
it (correctly rounded, as torch divides), saturated and cast. One program per row, two passes over
it (the second mostly from L2). The scale is a multiplication, which rounds alike in the kernel and
in torch on every device (torch divides by a Python number on the CPU, multiplies by its reciprocal
on a GPU)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.kv_quant import FP8_MAX

_BLOCK = 2048


@triton.jit
def _quantize_rows_kernel(x_ptr, out_ptr, scale_ptr, K, stride_x, stride_out, INV_FP8_MAX: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        amax = tl.maximum(amax, tl.abs(tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)))
    scale = tl.maximum(tl.max(amax, 0) * INV_FP8_MAX, 1e-12)
    tl.store(scale_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(tl.div_rn(x, scale), -448.0), 448.0)
        tl.store(out_ptr + row * stride_out + offs, q.to(out_ptr.dtype.element_ty), mask=offs < K)


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (float) -> (x_fp8 [M, K] e4m3, scale fp32 [M, 1]) with x ~= x_fp8 * scale."""
    if x.dim() != 2 or x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or x.stride(1) != 1:
        raise ValueError(f"need a float x [M, K] contiguous in K; got {x.dtype} {tuple(x.shape)} strides {x.stride()}")
    m, k = x.shape
    out = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        block = min(_BLOCK, triton.next_power_of_2(max(k, 16)))
        _quantize_rows_kernel[(m,)](x, out, scale, k, x.stride(0), out.stride(0), INV_FP8_MAX=1.0 / FP8_MAX, BLOCK=block)
    return out, scale


def quantize_fp8_rows_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (x.abs().amax(dim=1, keepdim=True).float() * (1.0 / FP8_MAX)).clamp_min(1e-12)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale
