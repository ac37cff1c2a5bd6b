"""Quantized weights widened to a 16-bit weight, for prefill-sized matmuls: there the weight-only
kernels (w8_matmul, w4_matmul) spend their main loop unpacking, while one pass that writes the
whole weight at memory speed, then the bf16/fp16 tensor-core GEMM, reads each weight once more
and runs at the GEMM's rate (bench/RESULTS.md). The weight written is what a 16-bit checkpoint of
the dequantized model holds: each value rounded once to the output dtype.
- `w8_dequantize`: fp8 e4m3 / int8 [N, K] with one fp32 scale per output -> [N, K].
- `w4_dequantize`: 4-bit qweight [K / 8, N] with a scale and zero point per group of inputs
  (kernels/w4_matmul.py's layout, either stride order) -> [K, N]."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.w4_matmul import _check as _check_w4
from pdserve.kernels.w8_matmul import WEIGHT_DTYPES as W8_DTYPES

_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _w8_dequantize_kernel(
    w_ptr, scale_ptr, out_ptr, N, K, stride_wn, stride_on, IS_FP8: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    bits = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=mask, other=0)
    w = bits.to(tl.float8e4nv, bitcast=True) if IS_FP8 else bits.to(tl.int8, bitcast=True)
    scale = tl.load(scale_ptr + offs_n, mask=offs_n < N, other=0.0)
    out = w.to(tl.float32) * scale[:, None]
    tl.store(out_ptr + offs_n[:, None] * stride_on + offs_k[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def w8_dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight [N, K] (fp8 e4m3 / int8, contiguous in K) times scale (fp32 [N]) per row -> [N, K] in dtype."""
    if weight.dim() != 2 or weight.dtype not in W8_DTYPES or scale.shape != (weight.shape[0],) or scale.dtype != torch.float32:
        raise ValueError(
            f"need weight [N, K] in {W8_DTYPES} and an fp32 scale [N]; got {weight.dtype} {tuple(weight.shape)}, "
            f"{scale.dtype} {tuple(scale.shape)}"
        )
    if dtype not in _OUT_DTYPES or weight.stride(1) != 1 or not scale.is_contiguous():
        raise ValueError(
            f"need an output dtype in {_OUT_DTYPES} and weight contiguous in K; got {dtype}, strides {weight.stride()}"
        )
    n, k = weight.shape
    out = torch.empty((n, k), dtype=dtype, device=weight.device)
    if out.numel():
        block_n, block_k = 16, 256
        _w8_dequantize_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
            weight.view(torch.uint8), scale, out, n, k, weight.stride(0), out.stride(0),
            IS_FP8=weight.dtype == torch.float8_e4m3fn, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
        )  # fmt: skip
    return out


def w8_dequantize_ref(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (weight.float() * scale[:, None]).to(dtype)


@triton.jit
def _w4_dequantize_kernel(
    q_ptr, scales_ptr, zeros_ptr, out_ptr, K8, N, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
    stride_ok, GROUP_K8: tl.constexpr, BLOCK_K8: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    offs_k8 = tl.program_id(0) * BLOCK_K8 + tl.arange(0, BLOCK_K8)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_k8 < K8)[:, None] & (offs_n < N)[None, :]
    packed = tl.load(q_ptr + offs_k8[:, None] * stride_qk + offs_n[None, :] * stride_qn, mask=mask, other=0)
    group = offs_k8 // GROUP_K8  # a packed row's 8 inputs share a group (group_size: a multiple of 16)
    zero = tl.load(zeros_ptr + group[:, None] * stride_zg + offs_n[None, :] * stride_zn, mask=mask, other=0)
    scale = tl.load(scales_ptr + group[:, None] * stride_sg + offs_n[None, :] * stride_sn, mask=mask, other=0.0)
    shifts = 4 * tl.arange(0, 8)
    nibbles = (packed[:, None, :] >> shifts[None, :, None]) & 0xF  # [BLOCK_K8, 8, BLOCK_N]: input 8 * k8 + j
    w = (nibbles.to(tl.float32) - zero.to(tl.float32)[:, None, :]) * scale.to(tl.float32)[:, None, :]
    rows = offs_k8[:, None] * 8 + tl.arange(0, 8)[None, :]
    ptrs = out_ptr + rows[:, :, None] * stride_ok + offs_n[None, None, :]
    tl.store(ptrs, w.to(out_ptr.dtype.element_ty), mask=mask[:, None, :])


def w4_dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """The weight [K, N] in dtype, (q - zero) * scale (kernels/w4_matmul.py's layout)."""
    k8, n = qweight.shape
    _check_w4(torch.empty((0, 8 * k8), dtype=scales.dtype, device=qweight.device), qweight, scales, zeros, group_size)
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"need an output dtype in {_OUT_DTYPES}; got {dtype}")
    out = torch.empty((8 * k8, n), dtype=dtype, device=qweight.device)
    if out.numel():
        block_k8, block_n = 4, 128
        _w4_dequantize_kernel[(triton.cdiv(k8, block_k8), triton.cdiv(n, block_n))](
            qweight, scales, zeros, out, k8, n, *qweight.stride(), *scales.stride(), *zeros.stride(), out.stride(0),
            GROUP_K8=group_size // 8, BLOCK_K8=block_k8, BLOCK_N=block_n, num_warps=4,
        )  # fmt: skip
    return out
