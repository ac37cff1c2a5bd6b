"""Decode GEMV: the few rows of a decode step (M <= GEMV_MAX_ROWS) times a weight that is read once,
at memory speed. The weight is bf16/fp16/fp32, or fp8 (e4m3) / int8 with one fp32 scale per output
channel, stored [N, K] as nn.Linear stores it; an optional bias is added in the epilogue.

Two kernels. One row (and fp8/int8 weights up to ELEMENTWISE_MAX_ROWS): no tensor cores; every
program owns BLOCK_N outputs of one row, streams its [BLOCK_N, K] slab of the weight in
[BLOCK_N, BLOCK_K] tiles with elementwise FMAs into a 2-D fp32 accumulator, and reduces it once at
the end (the tiles after the first loaded into registers as used, or, with num_stages > 1, through
a cp.async pipeline in shared memory: 8-bit weights' wide projections); row m is the fastest
program id, so the M programs that read one slab run together and L2 serves the repeats. Float
weights of x's dtype from DOT_MIN_ROWS rows: `tl.dot` (tensor cores for 16-bit weights; fp32 ones in
full precision, no TF32), all rows of x (padded to 16) against each program's slab, read once.
Within a model's PDL row limit (kernels/pdl.py) the kernels launch as dependents of the kernel
before them; the one-row kernel reads its first weight tile before it waits for the kernel that
wrote x."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.pdl import use_pdl, wait_for_previous_kernel
from pdserve.kernels.w8_matmul import _X_DTYPES as _FLOAT_DTYPES

GEMV_MAX_ROWS = 16
ELEMENTWISE_MAX_ROWS = 4  # fp8/int8 weights: the elementwise kernel only, which repeats its unpacking per row
DOT_MIN_ROWS = 2  # float weights from here: the tensor-core kernel
_W_KINDS = {torch.float8_e4m3fn: 1, torch.int8: 2}  # others (float): 0


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    bias_ptr,
    out_ptr,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    W_KIND: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    PDL: tl.constexpr,
):
    m = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    x_row = x_ptr + m * stride_xm
    w = _weight_tile(w_ptr, offs_n, mask_n, 0, K, stride_wn, W_KIND, BLOCK_K)  # no kernel writes weights
    wait_for_previous_kernel(PDL)
    acc = w * _x_tile(x_row, 0, K, BLOCK_K)  # [BLOCK_N, BLOCK_K]
    # num_stages on the loop itself: Triton pipelines loads that feed no tl.dot only when asked here
    for k0 in tl.range(BLOCK_K, K, BLOCK_K, num_stages=NUM_STAGES):
        acc += _weight_tile(w_ptr, offs_n, mask_n, k0, K, stride_wn, W_KIND, BLOCK_K) * _x_tile(x_row, k0, K, BLOCK_K)
    out = tl.sum(acc, axis=1)
    if HAS_SCALE:
        out = out * tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + offs_n, out.to(out_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _rows_dot_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):
    """All M rows of x against BLOCK_N outputs on tensor cores (M padded to BLOCK_M): each program
    reads its [BLOCK_N, K] slab of the weight once, in a pipeline of [BLOCK_N, BLOCK_K] tiles."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    wait_for_previous_kernel(PDL)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k < K)[None, :]
        x = tl.load(x_ptrs + k0, mask=mask_m[:, None] & mask_k, other=0.0)
        w = tl.load(w_ptrs + k0, mask=mask_n[:, None] & mask_k, other=0.0)
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _x_tile(x_row, k0, K, BLOCK_K: tl.constexpr):
    """Inputs [k0, k0 + BLOCK_K) of a row, as a [1, BLOCK_K] fp32 row."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    return tl.load(x_row + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _weight_tile(w_ptr, offs_n, mask_n, k0, K, stride_wn, W_KIND: tl.constexpr, BLOCK_K: tl.constexpr):
    """Weight columns [k0, k0 + BLOCK_K) of rows offs_n, as fp32 (unscaled for fp8/int8)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    w_mask = mask_n[:, None] & (offs_k < K)[None, :]
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
    return w


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    tiles: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """x [M, K] @ (weight * scale[:, None])^T + bias -> [M, N] in x.dtype, for M <= GEMV_MAX_ROWS
    (ELEMENTWISE_MAX_ROWS for fp8/int8 weights).

    weight: [N, K], contiguous in K; fp8/int8 weights need `scale` (fp32 [N]); bias: [N], any float dtype.
    tiles: (BLOCK_N, BLOCK_K, num_warps, num_stages) of the kernel taken, instead of `gemv_tile_sizes`
    (one row: `bench/gemv.py --sweep`) or `dot_tile_sizes` (BLOCK_N at least 16)."""
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
    if w_kind and x.shape[0] > ELEMENTWISE_MAX_ROWS:
        raise ValueError(f"gemv takes at most {ELEMENTWISE_MAX_ROWS} rows with {weight.dtype} weights; got {x.shape[0]}")
    if w_kind and (scale is None or scale.shape != (n,) or scale.dtype != torch.float32 or not scale.is_contiguous()):
        raise ValueError(f"a {weight.dtype} weight needs a contiguous fp32 scale of shape ({n},)")
    if bias is not None and (bias.shape != (n,) or bias.dtype not in _FLOAT_DTYPES or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous float vector of shape ({n},); got {bias.dtype} {tuple(bias.shape)}")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"x and weight must be contiguous in K; got strides {x.stride()}, {weight.stride()}")
    m = x.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    pdl = use_pdl(x, m)
    if w_kind == 0 and m >= DOT_MIN_ROWS and weight.dtype == x.dtype:
        block_n, block_k, num_warps, num_stages = tiles or dot_tile_sizes(n, x.element_size())
        _rows_dot_kernel[(triton.cdiv(n, block_n),)](
            x,
            weight,
            bias if bias is not None else x,
            out,
            m,
            n,
            k,
            x.stride(0),
            weight.stride(0),
            out.stride(0),
            HAS_BIAS=bias is not None,
            BLOCK_M=max(16, triton.next_power_of_2(m)),
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # fp32 models: no TF32, as torch's matmul
            PDL=pdl,
            num_warps=num_warps,
            num_stages=num_stages,
            launch_pdl=pdl,
        )
        return out
    block_n, block_k, num_warps, num_stages = tiles or gemv_tile_sizes(n, k, weight.element_size())
    _gemv_kernel[(m, triton.cdiv(n, block_n))](
        x,
        weight.view(torch.uint8) if w_kind else weight,
        scale if scale is not None else x,
        bias if bias is not None else x,
        out,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        W_KIND=w_kind,
        HAS_SCALE=scale is not None,
        HAS_BIAS=bias is not None,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        NUM_STAGES=num_stages,
        PDL=pdl,
        num_warps=num_warps,
        num_stages=num_stages,
        launch_pdl=pdl,
    )
    return out


def gemv_tile_sizes(n: int, k: int, element_size: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages), from a sweep on an H200 of 32 one-row GEMVs of one
    shape launched back to back as dependents, as a decode step runs them (Llama-3-8B, Qwen2.5-0.5B
    and -7B shapes, bf16 and fp8; bench/runs/2026-12-02-h200-4/chain-sweep*.txt):
    - narrow outputs (o, down; q/k/v of small models): 4 output rows a program, 1024 inputs a row;
      78 -> 91% of copy bandwidth on Llama-3-8B's o_proj, 31 -> 43% on Qwen2.5-0.5B's down;
    - fewer than 2048 outputs of more than 2048 inputs (a small model's down), 16-bit weights: 2 rows
      of 2048 inputs, 8 warps, twice the programs; Qwen2.5-0.5B's down 43 -> 56%, 4.8 -> 3.7 us
      (bench/runs/2026-12-02-h200-6/qsweep.txt; its q/k/v and o, 896 inputs, kept the rule above);
    - up to 8192 (q/k/v): 16 rows of 512 inputs, 8 warps; 74 -> 92% on Llama-3-8B's (fp8 47 -> 67%);
    - wider (gate/up, LM heads): 8 rows of 512 bytes, the rule before, within 0-7 points of the best.
    Within these classes the inputs' length did not change the best tiles.
    Stages (cp.async into shared memory; 1: none, each tile loaded into registers as it is used),
    from the stage sweep of bench/runs/2026-12-03-h200-12/stages.txt: 16-bit weights 1 everywhere
    (3-6 stages cost Llama-3-8B's o and down 7-25 points); 8-bit weights 3 on q/k/v and gate/up
    (fp8 gate/up 82.8 -> 88.1%, q/k/v 68.7 -> 70.9%, int8 q/k/v 54.0 -> 61.9%) and on a small
    model's down (fp8, 4: 23.6 -> 28.4%), 1 on Llama-3-8B's o and down (3 stages: fp8 o 65.5 ->
    49.7%, down 85.3 -> 69.0%)."""
    if n < 2048 and k > 2048 and element_size < 4:
        return (2, 2048, 8, 1) if element_size == 2 else (4, 1024, 4, 4)
    if n <= 4096:
        return 4, 1024, 4, 1
    if n <= 8192:
        return 16, 512, 8, 1 if element_size > 1 else 3
    return 8, 512 // element_size, 4, 1 if element_size > 1 else 3


def dot_tile_sizes(n: int, element_size: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) of the tensor-core kernel, from a sweep on an H200 of
    chains of dependent launches at 2-16 rows (Llama-3-8B's projections, bf16; a scratch script,
    bench/runs/2026-12-02-h200-5/sweep-rows.txt): 512 bytes of inputs
    a row for outputs up to 4096 (o 72%, down 90% of copy bandwidth), 256 up to 8192 (q/k/v 80%),
    64 outputs of 128 bytes wider (gate/up 94%)."""
    if n <= 4096:
        return 32, 512 // element_size, 4, 5
    if n <= 8192:
        return 32, 256 // element_size, 4, 5
    return 64, 128 // element_size, 4, 4


def gemv_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    out = x.float() @ weight.float().t()
    out = out if scale is None else out * scale
    return (out if bias is None else out + bias.float()).to(x.dtype)
