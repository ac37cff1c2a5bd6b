"""Weight-only 8-bit matmul: x [M, K] @ W^T with W [N, K] in fp8 (e4m3) or int8 and one fp32 scale
per output channel; W is widened to x's dtype tile by tile and the scale applied once per output."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.gpus import num_sms
from pdserve.kernels.pdl import use_pdl, wait_for_previous_kernel

WEIGHT_DTYPES = (torch.float8_e4m3fn, torch.int8)
_X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _w8_matmul_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    k_per_split,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    IS_FP8: tl.constexpr,
    SPLIT_K: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    pid_n, pid_m, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = split * k_per_split  # a multiple of BLOCK_K
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        # W^T tile [BLOCK_K, BLOCK_N] read as bytes (a zero byte is 0 in both formats), then
        # reinterpreted; fp8 and int8 values are exact in bf16/fp16/fp32
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0)
        w = w.to(tl.float8e4nv, bitcast=True) if IS_FP8 else w.to(tl.int8, bitcast=True)
        acc += tl.dot(x, w.to(tl.float32).to(x.dtype), input_precision=DOT_PRECISION)
    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        scale = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)
        out = acc * scale[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:  # fp32 partial sums [SPLIT_K, M, N] (out_ptr), summed by _reduce_splits_kernel
        tl.store(out_ptr + (split * M + offs_m[:, None]) * N + offs_n[None, :], acc, mask=out_mask)


@triton.jit
def _reduce_splits_kernel(
    partial_ptr, scale_ptr, out_ptr, M, N, stride_om, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr
):
    """out[m, n] = scale[n] * sum over splits of partial[split, m, n]: one program a block of one row."""
    wait_for_previous_kernel(PDL)
    m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs_n < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in tl.static_range(SPLIT_K):
        acc += tl.load(partial_ptr + (split * M + m) * N + offs_n, mask=mask, other=0.0)
    scale = tl.load(scale_ptr + offs_n, mask=mask, other=0.0)
    tl.store(out_ptr + m * stride_om + offs_n, (acc * scale).to(out_ptr.dtype.element_ty), mask=mask)


def w8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] (float) @ (weight [N, K] * scale [N, 1])^T -> [M, N] in x.dtype."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1] or scale.shape != (weight.shape[0],):
        raise ValueError(
            f"need x [M, K], weight [N, K], scale [N]; got {tuple(x.shape)}, {tuple(weight.shape)}, {tuple(scale.shape)}"
        )
    if x.dtype not in _X_DTYPES or weight.dtype not in WEIGHT_DTYPES or scale.dtype != torch.float32:
        raise ValueError(
            f"need x in {_X_DTYPES}, weight in {WEIGHT_DTYPES}, fp32 scale; got {x.dtype}, {weight.dtype}, {scale.dtype}"
        )
    if x.stride(1) != 1 or weight.stride(1) != 1 or not scale.is_contiguous():
        raise ValueError(f"x and weight must be contiguous in K; got strides {x.stride()}, {weight.stride()}")
    (m, k), n = x.shape, weight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    block_m, block_n, block_k, num_warps, split_k = tile_sizes(m, n, k, x.device)
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)  # no empty split
    partial = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device) if split_k > 1 else out
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), split_k)
    pdl = use_pdl(x, m)
    _w8_matmul_kernel[grid](
        x,
        weight.view(torch.uint8),
        scale,
        partial,
        m,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        k_per_split,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        IS_FP8=weight.dtype == torch.float8_e4m3fn,
        SPLIT_K=split_k,
        PDL=pdl,
        num_warps=num_warps,
        launch_pdl=pdl,
    )
    if split_k > 1:
        block = min(1024, triton.next_power_of_2(n))
        _reduce_splits_kernel[(m, triton.cdiv(n, block))](
            partial, scale, out, m, n, out.stride(0), SPLIT_K=split_k, BLOCK=block, PDL=pdl, launch_pdl=pdl
        )
    return out


def tile_sizes(m: int, n: int, k: int, device: torch.device) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, SPLIT_K). Many rows (prefill): square tiles. Few rows
    (decode) read the weight once: 64-column tiles, and where those are too few to give every SM
    two programs (Llama-3-8B's q/k/v, o and down), the inputs split in up to 8 ranges whose fp32
    partial sums a second kernel adds (split-K): 16-column tiles instead left the tensor cores and
    the loads too little to do a tile. Sized so three pipeline stages of x and weight tiles fit in
    shared memory (<= ~150 KB)."""
    if m > 64:
        return 128, 128, 64, 8, 1
    block_m = max(16, triton.next_power_of_2(m))
    sms = num_sms(device)
    block_n, block_k = 64, 128
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    split_k = max(1, min(8, triton.cdiv(2 * sms, tiles), k // (4 * block_k)))
    return block_m, block_n, block_k, 4, split_k


def w8_matmul_ref(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return ((x.float() @ weight.float().t()) * scale).to(x.dtype)
