"""Decode GEMV: the few rows of a decode step (M <= GEMV_MAX_ROWS) times a weight that is read once,
at memory speed. The weight is bf16/fp16/fp32, or fp8 (e4m3) / int8 with one fp32 scale per output
channel, stored [N, K] as nn.Linear stores it.

No tensor cores: every program owns BLOCK_N outputs of one row, streams its [BLOCK_N, K] slab of
the weight in [BLOCK_N, BLOCK_K] tiles with elementwise FMAs into a 2-D fp32 accumulator, and
reduces it once at the end. Row m is the fastest program id, so the M programs that read one slab
run together and L2 serves the repeats."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.w8_matmul import _X_DTYPES as _FLOAT_DTYPES

GEMV_MAX_ROWS = 4
_W_KINDS = {torch.float8_e4m3fn: 1, torch.int8: 2}  # others (float): 0


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    out_ptr,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    W_KIND: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    m = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    x_row = x_ptr + m * stride_xm
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_row + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        w_mask = mask_n[:, None] & mask_k[None, :]
        w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :]
        if W_KIND == 1:  # fp8 e4m3, read as bytes (0 is 0.0)
            w = tl.load(w_ptrs, mask=w_mask, other=0).to(tl.float8e4nv, bitcast=True).to(tl.float32)
        elif W_KIND == 2:
            # int8 without an int->float conversion: the byte, biased to 0..255 (xor 0x80), put in
            # the mantissa of 2^23, minus 2^23 + 128, is its value exactly
            b = tl.load(w_ptrs, mask=w_mask, other=0).to(tl.int32) & 0xFF
            w = ((b ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
        else:
            w = tl.load(w_ptrs, mask=w_mask, other=0.0).to(tl.float32)
        acc += w * x[None, :]
    out = tl.sum(acc, axis=1)
    if HAS_SCALE:
        out = out * tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)
    tl.store(out_ptr + m * stride_om + offs_n, out.to(out_ptr.dtype.element_ty), mask=mask_n)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
    *,
    tiles: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """x [M, K] @ (weight * scale[:, None])^T -> [M, N] in x.dtype, for M <= GEMV_MAX_ROWS.

    weight: [N, K], contiguous in K; fp8/int8 weights need `scale` (fp32 [N]).
    tiles: (BLOCK_N, BLOCK_K, num_warps, num_stages) instead of `gemv_tile_sizes` (`bench/gemv.py --sweep`)."""
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"need x [M, K] and a 2-D weight; got {tuple(x.shape)}, {tuple(weight.shape)}")
    n, k = weight.shape
    if x.shape[1] != k:
        raise ValueError(f"x {tuple(x.shape)} does not match weight {tuple(weight.shape)}")
    if x.shape[0] > GEMV_MAX_ROWS:
        raise ValueError(f"gemv takes at most {GEMV_MAX_ROWS} rows; got {x.shape[0]}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be one of {_FLOAT_DTYPES}; got {x.dtype}")
    w_kind = _W_KINDS.get(weight.dtype, 0)
    if w_kind == 0 and weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"weight must be float, fp8 e4m3 or int8; got {weight.dtype}")
    if w_kind and (scale is None or scale.shape != (n,) or scale.dtype != torch.float32 or not scale.is_contiguous()):
        raise ValueError(f"a {weight.dtype} weight needs a contiguous fp32 scale of shape ({n},)")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"x and weight must be contiguous in K; got strides {x.stride()}, {weight.stride()}")
    m = x.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    block_n, block_k, num_warps, num_stages = tiles or gemv_tile_sizes(n, k, weight.element_size())
    grid = (m, triton.cdiv(n, block_n))
    _gemv_kernel[grid](
        x,
        weight.view(torch.uint8) if w_kind else weight,
        scale if scale is not None else x,
        out,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        W_KIND=w_kind,
        HAS_SCALE=scale is not None,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def gemv_tile_sizes(n: int, k: int, element_size: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages), from a sweep on an H200 (`bench/gemv.py --sweep`;
    bench/runs/2026-12-01-h200-decode-kernels/exploration.md):
    4 output rows a program (8 for wide outputs), a tile row of 512-2048 contiguous bytes, longer
    for long inputs; within 0-6 points of the best of 36 configurations on Llama-3-8B's shapes."""
    row_bytes = 2048 if k >= 8192 else 1024 if n <= 4096 else 512
    block_n = min(4 if n <= 8192 else 8, 8192 // row_bytes)  # tiles of at most 8 KiB: no register spills
    return block_n, row_bytes // element_size, 4, 3


def gemv_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    out = x.float() @ weight.float().t()
    return (out if scale is None else out * scale).to(x.dtype)
