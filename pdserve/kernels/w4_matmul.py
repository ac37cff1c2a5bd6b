"""4-bit weight matmul with group-wise scales and zero points (the AWQ/GPTQ family, repacked at
load into one layout): qweight int32 [K / 8, N], input k in bits 4 * (k % 8) of row k // 8;
scales [K / group, N] and zeros uint8 [K / group, N]; W[k, n] = (q - zero) * scale."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.w8_matmul import _num_sms

_X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _w4_matmul_kernel(
    x_ptr,
    qweight_ptr,
    scales_ptr,
    zeros_ptr,
    out_ptr,
    M,
    N,
    K,
    group_size,
    stride_xm,
    stride_qk,
    stride_sg,
    stride_zg,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_mask = mask_k[:, None] & mask_n[None, :]
        # each int32 is read by the 8 rows it packs (the loads coalesce; L1 serves the repeats)
        packed = tl.load(qweight_ptr + (offs_k[:, None] // 8) * stride_qk + offs_n[None, :], mask=w_mask, other=0)
        q = (packed >> ((offs_k[:, None] % 8) * 4)) & 0xF  # [BLOCK_K, BLOCK_N]
        group = k0 // group_size  # BLOCK_K divides group_size: one group a tile
        scale = tl.load(scales_ptr + group * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + group * stride_zg + offs_n, mask=mask_n, other=0).to(tl.float32)
        w = (q.to(tl.float32) - zero[None, :]) * scale[None, :]
        acc += tl.dot(x, w.to(x.dtype), input_precision=DOT_PRECISION)
    tl.store(
        out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


def w4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [M, K] @ dequantized W [K, N] -> [M, N] in x.dtype."""
    _check(x, qweight, scales, zeros, group_size)
    m, k = x.shape
    n = qweight.shape[1]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    block_m, block_n, block_k, num_warps = tile_sizes(m, n, x.device)
    block_k = min(block_k, group_size & -group_size)  # the largest power of two dividing the group
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _w4_matmul_kernel[grid](
        x,
        qweight,
        scales,
        zeros,
        out,
        m,
        n,
        k,
        group_size,
        x.stride(0),
        qweight.stride(0),
        scales.stride(0),
        zeros.stride(0),
        out.stride(0),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
    )
    return out


def tile_sizes(m: int, n: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps). Few rows (decode) read the weight once: column tiles
    narrow enough that every SM streams its share; many rows (prefill): square tiles."""
    if m > 64:
        return 128, 128, 64, 8
    block_m = max(16, triton.next_power_of_2(m))
    num_sms = _num_sms(device.index or 0) if device.type == "cuda" else 1
    block_n = next((b for b in (64, 32) if triton.cdiv(n, b) >= num_sms), 16)
    return block_m, block_n, 128, 4


def _check(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> None:
    k8, n = qweight.shape
    k = x.shape[-1]
    if group_size % 16:
        raise ValueError(f"group_size must be a multiple of 16; got {group_size}")
    if x.dim() != 2 or k != 8 * k8 or k % group_size or scales.shape != (k // group_size, n) or zeros.shape != scales.shape:
        raise ValueError(
            f"need x [M, K], qweight [K/8, N], scales and zeros [K/{group_size}, N]; got {tuple(x.shape)}, "
            f"{tuple(qweight.shape)}, {tuple(scales.shape)}, {tuple(zeros.shape)}"
        )
    if x.dtype not in _X_DTYPES or qweight.dtype != torch.int32 or zeros.dtype != torch.uint8 or scales.dtype not in _X_DTYPES:
        raise ValueError(
            f"need float x and scales, int32 qweight, uint8 zeros; got {x.dtype}, {scales.dtype}, {qweight.dtype}, {zeros.dtype}"
        )
    if x.stride(1) != 1 or qweight.stride(1) != 1 or scales.stride(1) != 1 or zeros.stride(1) != 1:
        raise ValueError("x, qweight, scales and zeros must be contiguous in their last dim")


def w4_dequantize_ref(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The fp32 weight [K, N]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)
    q = ((qweight[:, None, :] >> shifts[None, :, None]) & 0xF).reshape(-1, qweight.shape[1])  # [K, N]
    zero = zeros.float().repeat_interleave(group_size, dim=0)
    return (q.float() - zero) * scales.float().repeat_interleave(group_size, dim=0)


def w4_matmul_ref(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    return x @ w4_dequantize_ref(qweight, scales, zeros, group_size).to(x.dtype)
