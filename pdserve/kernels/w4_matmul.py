"""4-bit weight matmul with group-wise scales and zero points (the AWQ/GPTQ family, repacked at
load into one layout): qweight int32 [K / 8, N], input k in bits 4 * (k % 8) of row k // 8;
scales [K / group, N] and zeros uint8 [K / group, N]; W[k, n] = (q - zero) * scale. Each of the
three is stored either contiguous in N (as AWQ and GPTQ write them) or N-major (`n_major`: the
transpose of an [N, K / 8] / [N, K / group] tensor, each output's packed inputs contiguous); the
kernels take both through their strides (the engine keeps the first; bench/RESULTS.md).

A tile of the weight is BLOCK_K8 packed rows (8 * BLOCK_K8 inputs, within one group), each int32
read once. Its nibbles become q - zero exactly, small integers that 16-bit floats hold exactly;
they are joined back into k order for one tl.dot with x. The group's scale multiplies the
[BLOCK_M, BLOCK_N] product once, not every weight.
- bf16 x on a GPU (the usual case): w4_gemv's unpacking, nibbles j and j + 4 of an int32 masked
  under the bf16 exponent of 128 (a shift and a LOP3) are the bf16 pair (128 + q) and one bf16x2
  FMA subtracts 128 + zero: two weights for ~3 instructions (inline PTX).
- fp32 and fp16 x (and the interpreter): a nibble masked in place under a float exponent, less that
  power of two and the zero: a LOP3 and an FADD a weight, no int -> float conversion.
- Split-K: where the column tiles leave SMs without two programs (Llama-3-8B's q/k/v, o and down
  at decode rows), programs share a tile's K, and the last of them to finish adds the fp32 partials
  in split order (kernels/split_counters.py), as w8_matmul does.
It is still bound by the unpacking and the layout change before the dot, not by memory: on an H200
it reads Llama-3-8B's projections at 20-30% of copy bandwidth at 8-16 rows, 12-18% at 64 (the AWQ
decode step at batch 8: 8.83 -> 4.45 ms with the bf16x2 unpacking and split-K;
bench/runs/2026-12-03-h200-11/)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.gpus import num_sms
from pdserve.kernels.split_counters import is_last_split, split_counters, sum_of_splits

_X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_EXP_2_23 = 150 << 23  # bits of 2^23 (exponent 127 + 23, empty mantissa)


@triton.jit
def _w4_matmul_kernel(
    x_ptr,
    qweight_ptr,
    scales_ptr,
    zeros_ptr,
    out_ptr,
    partial_ptr,
    counters_ptr,
    M,
    N,
    num_tiles,
    tiles_per_split,
    stride_xm,
    stride_qk,
    stride_qn,
    stride_sg,
    stride_sn,
    stride_zg,
    stride_zn,
    stride_om,
    exp_2_23,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K8: tl.constexpr,
    TILES_PER_GROUP: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    IS_SPLIT: tl.constexpr,
    BF16_PAIRS: tl.constexpr,
):
    pid_n, pid_m, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    first = split * tiles_per_split
    end = tl.minimum(first + tiles_per_split, num_tiles)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    k8 = tl.arange(0, BLOCK_K8)
    offs_k = tl.arange(0, 8 * BLOCK_K8)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in tl.range(first, end, num_stages=NUM_STAGES):
        group = t // TILES_PER_GROUP
        packed = tl.load(
            qweight_ptr + (t * BLOCK_K8 + k8)[:, None] * stride_qk + offs_n[None, :] * stride_qn, mask=mask_n[None, :], other=0
        )
        zero = tl.load(zeros_ptr + group * stride_zg + offs_n * stride_zn, mask=mask_n, other=0)[None, :]
        scale = tl.load(scales_ptr + group * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + t * 8 * BLOCK_K8 + offs_k[None, :], mask=mask_m[:, None], other=0.0)
        if BF16_PAIRS:  # bf16 x on a GPU: nibbles j and j + 4 as one bf16x2 (w4_gemv's unpacking)
            neg_zero = tl.broadcast_to(bf16x2_neg_zero(zero), packed.shape)
            w0, w4 = _bf16_pair(packed, neg_zero, 0)
            w1, w5 = _bf16_pair(packed, neg_zero, 1)
            w2, w6 = _bf16_pair(packed, neg_zero, 2)
            w3, w7 = _bf16_pair(packed, neg_zero, 3)
        else:
            zero = zero.to(tl.float32)
            high = packed >> 12  # nibbles 5..7 at bits 8..19 (bit 23 would be the exponent's)
            w0 = _weight(packed, high, zero, exp_2_23, 0).to(x.dtype)
            w1 = _weight(packed, high, zero, exp_2_23, 1).to(x.dtype)
            w2 = _weight(packed, high, zero, exp_2_23, 2).to(x.dtype)
            w3 = _weight(packed, high, zero, exp_2_23, 3).to(x.dtype)
            w4 = _weight(packed, high, zero, exp_2_23, 4).to(x.dtype)
            w5 = _weight(packed, high, zero, exp_2_23, 5).to(x.dtype)
            w6 = _weight(packed, high, zero, exp_2_23, 6).to(x.dtype)
            w7 = _weight(packed, high, zero, exp_2_23, 7).to(x.dtype)
        w01, w23, w45, w67 = tl.join(w0, w1), tl.join(w2, w3), tl.join(w4, w5), tl.join(w6, w7)
        w = tl.join(tl.join(w01, w23), tl.join(w45, w67))  # [K8, N, 2, 2, 2], nibble j at [..., j % 2, j // 2 % 2, j // 4]
        w = tl.reshape(tl.permute(w, (0, 4, 3, 2, 1)), (8 * BLOCK_K8, BLOCK_N))  # row 8 k8 + j: input k's order
        acc = tl.fma(tl.dot(x, w, input_precision=DOT_PRECISION), scale[None, :], acc)
    out_mask = mask_m[:, None] & mask_n[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    if IS_SPLIT:  # fp32 partials [splits, M, N]; the last program of the tile adds them in split order
        tile_partials = partial_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(tile_partials + split * M * N, acc, mask=out_mask)
        num_splits = tl.num_programs(2)
        if is_last_split(counters_ptr + pid_m * tl.num_programs(0) + pid_n, num_splits):
            total = sum_of_splits(tile_partials, M * N, num_splits, out_mask)
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def bf16x2_neg_zero(zero):
    """uint8 zero points -> int32 bits of the bf16 pair (-(128 + zero), -(128 + zero)), exact for
    zeros below 128: what one bf16x2 FMA adds to the unpacked pair (128 + q) to make it q - zero."""
    return (zero.to(tl.int32) | 0xC300) * 0x10001


@triton.jit
def _bf16_pair(packed, neg_zero, J: tl.constexpr):
    """(q_J - zero, q_J+4 - zero) as two bf16 tensors, exactly: nibbles J and J + 4 masked under the
    bf16 exponent of 128 are the pair (128 + q) (a shift and a LOP3); one bf16x2 FMA adds
    -(128 + zero) (exact for zeros below 128); the halves are the outputs' 16-bit registers."""
    lo, hi = tl.inline_asm_elementwise(
        "{ .reg .b32 t, one; lop3.b32 t, $2, 0x000F000F, 0x43004300, 0xEA; mov.b32 one, 0x3F803F80; "
        "fma.rn.bf16x2 t, t, one, $3; mov.b32 {$0, $1}, t; }",
        "=h,=h,r,r",
        [packed >> (4 * J), neg_zero],  # an arithmetic shift: the bits it brings in are masked off
        dtype=(tl.int16, tl.int16),
        is_pure=True,
        pack=1,
    )
    return lo.to(tl.bfloat16, bitcast=True), hi.to(tl.bfloat16, bitcast=True)


@triton.jit
def _weight(packed, high, zero, exp_2_23, J: tl.constexpr):
    """(q - zero) as fp32 for nibble J of each packed int32: bits 4 J of `packed` for J <= 4, bits
    4 J - 12 of `high` (packed >> 12) after, where bit 23 would be the exponent's."""
    if J < 5:
        w = _nibble(packed, zero, exp_2_23, 4 * J)
    else:
        w = _nibble(high, zero, exp_2_23, 4 * J - 12)
    return w


@triton.jit
def _nibble(bits, zero, exp_2_23, SHIFT: tl.constexpr):
    """(q - zero) as fp32 for the nibble q at bits [SHIFT, SHIFT + 4) of `bits`. The exponent's bits
    come in at run time (exp_2_23): as an immediate next to the mask's, ptxas re-materializes one of
    the two constants before every LOP3 (a MOV a weight, ~20% more instructions in w4_gemv's loop)."""
    value = ((bits & (0xF << SHIFT)) | (exp_2_23 - (SHIFT << 23))).to(tl.float32, bitcast=True)  # 2^(23-SHIFT) + q
    return value - (zero + (1 << (23 - SHIFT)))


def w4_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    *,
    splits: int | None = None,
) -> torch.Tensor:
    """x [M, K] @ dequantized W [K, N] -> [M, N] in x.dtype. splits: programs sharing a tile's K,
    instead of `tile_sizes`' choice."""
    _check(x, qweight, scales, zeros, group_size)
    m, k = x.shape
    n = qweight.shape[1]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    group_k8 = group_size // 8
    block_k8 = min(16, group_k8 & -group_k8)  # the largest power of two dividing the group, at most 16
    num_tiles = k // 8 // block_k8
    block_m, block_n, num_warps, num_stages, rule_splits = tile_sizes(m, n, x.device, num_tiles)
    tiles_per_split = triton.cdiv(num_tiles, splits or rule_splits)
    num_splits = triton.cdiv(num_tiles, tiles_per_split)  # no empty split
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), num_splits)
    partial = counters = out  # unused with one split
    if num_splits > 1:
        partial = torch.empty((num_splits, m, n), dtype=torch.float32, device=x.device)
        counters = split_counters("w4_matmul", x.device, grid[0] * grid[1])
    _w4_matmul_kernel[grid](
        x,
        qweight,
        scales,
        zeros,
        out,
        partial,
        counters,
        m,
        n,
        num_tiles,
        tiles_per_split,
        x.stride(0),
        *qweight.stride(),
        *scales.stride(),
        *zeros.stride(),
        out.stride(0),
        _EXP_2_23,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K8=block_k8,
        TILES_PER_GROUP=group_k8 // block_k8,
        NUM_STAGES=num_stages,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        IS_SPLIT=num_splits > 1,
        BF16_PAIRS=x.dtype == torch.bfloat16 and x.is_cuda,  # inline PTX: not under the interpreter
        num_warps=num_warps,
    )
    return out


def tile_sizes(m: int, n: int, device: torch.device, num_tiles: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, splits) for `num_tiles` tiles of K. Decode rows (up to
    64) in one row block, so the weight is read once, with column tiles narrow enough that every SM
    streams its share (H200 sweep at 1, 16 and 64 rows: 32 columns below 64 rows; at 64 rows 64
    columns when there are enough of them, and 5 tiles in flight); prefill rows: square tiles.
    Where the column tiles give an SM fewer than two programs (Llama-3-8B's q/k/v, o and down:
    128-192 programs for 132 SMs), K is split over up to MAX_SPLITS programs, as w8_matmul does:
    - below 64 rows, to at least two programs an SM (H200, 8-16 rows, unsplit -> the rule's splits:
      q/k/v 17-18 -> 23-25% of copy bandwidth, o 14-15 -> 20-21%, down 16 -> 26-29%);
    - at 64 rows, to at most two an SM (5 stages of 64-row tiles): one wave. o and down read at
      13-15% with 2 splits (256 programs), 9-11% with the 3 that fill SMs (384), 10-11% unsplit."""
    if m > 64:
        return 128, 128, 8, 3, 1
    block_m = max(16, triton.next_power_of_2(m))
    sms = num_sms(device)
    block_n, num_stages = (32, 3) if block_m < 64 else (64 if triton.cdiv(n, 64) >= sms else 32, 5)
    programs = triton.cdiv(n, block_n)
    wanted = triton.cdiv(2 * sms, programs) if block_m < 64 else 2 * sms // programs
    splits = max(1, min(MAX_SPLITS, wanted, num_tiles // MIN_SPLIT_TILES))
    return block_m, block_n, 4, num_stages, splits


MAX_SPLITS = 8
MIN_SPLIT_TILES = 4  # a split's fewest tiles of K (the pipeline's prologue is ~3)


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
    if x.stride(1) != 1:
        raise ValueError(f"x must be contiguous in K; got strides {x.stride()}")
    layouts = {_layout(t) for t in (qweight, scales, zeros)} - {"either"}
    if None in layouts or len(layouts) > 1:
        raise ValueError(
            "qweight, scales and zeros must all be contiguous in N or all N-major (transposes of contiguous "
            f"[N, ...] tensors); got strides {qweight.stride()}, {scales.stride()}, {zeros.stride()}"
        )


def n_major(t: torch.Tensor) -> torch.Tensor:
    """The same [K / 8, N] (or [groups, N]) values, N-major."""
    return t.t().contiguous().t()


def _layout(t: torch.Tensor) -> str | None:
    """ "columns" (unit stride along N), "n_major" (unit stride along K), "either" (one row or
    column, or empty: both readings address it alike), None (neither: refused)."""
    rows, cols = t.shape
    if rows <= 1 or cols <= 1:
        return "either"
    if t.stride(1) == 1:
        return "columns"
    if t.stride(0) == 1:
        return "n_major"
    return None


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
