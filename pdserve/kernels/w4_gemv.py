"""4-bit weight GEMV for decode (1..4 rows) in w4_matmul's layout: qweight int32 [K / 8, N], input k
in bits 4 * (k % 8) of packed row k // 8; scales [K / group, N]; zeros uint8 [K / group, N];
W[k, n] = (q - zero) * scale; all three contiguous in N or all N-major (kernels/w4_matmul.py), read
through their strides. No tl.dot: CUDA cores, as few instructions a weight as the unpacking
allows (counts from sm_90 SASS, Triton 3.6; timings: bench/gemv.py --sweep, bench/RESULTS.md).

- bf16 x (the usual model dtype), on a GPU: two weights an instruction. One packed int32's nibbles
  j and j + 4 (bits 4 j and 4 j + 16), masked in place under the bf16 exponent of 128, are the
  bf16 pair (128 + q_j, 128 + q_j+4) exactly: a shift and a LOP3. Less 128 + zero (exact for
  zeros below 128; the 4-bit formats store 0..16) they are q - zero; four bf16x2 FMAs against x's
  pairs (x_j, x_j+4) give two partial sums of four products each, added in fp32, then scaled once a
  group in fp32. ~18 instructions for 8 weights (inline PTX; under TRITON_INTERPRET the same
  arithmetic in Triton, bf16 rounding included). The products and their four-term sums round to
  bf16 (2^-9): per output, an error of the order of rounding the result to bf16, far below the
  4-bit quantization's own.
- fp32 and fp16 x: fp32 throughout, without int->float conversions: a nibble masked in place at bit
  s and OR-ed under the exponent of 2^(23 - s) is the float 2^(23 - s) + q exactly; less
  2^(23 - s) + zero it is q - zero: a LOP3, an FADD and an FFMA a weight.
- A program reads its weight tile once for all its rows (up to 4, unrolled): the unpacking is paid
  once a weight, each row adds its FMAs (and its x loads).
- The tile is [BLOCK_K8, BLOCK_G, BLOCK_N]: BLOCK_G slices of BLOCK_K8 packed rows (a slice is the
  group for groups of 128, and always lies in one group, so its scale and zero are vectors over the
  columns) side by side, to give a narrow column tile enough threads and bytes in flight. The loop over
  K is software-pipelined (cp.async into shared memory, NUM_STAGES deep: weights, scales, zeros and
  x, which is read as 32-bit pairs when 16-bit so that it qualifies), products accumulate per
  (packed row, slice, column), are scaled once a slice, and are reduced across threads once, at the
  end.
- Split-K: when a projection has fewer column tiles than the GPU has SMs (a small model's:
  Qwen2.5-0.5B's 896 outputs are 56 tiles of 16), most SMs would idle. `splits` programs then share
  a column tile's K, each writing its fp32 partial sums; the last of them to finish (an
  atomic counter per tile, kernels/split_counters.py) adds the partials in split order
  (deterministic) and writes the output.
- Grid (row blocks, column tiles, splits), the row block fastest: past MAX_ROWS rows, the row blocks
  of a column tile run together and reread its weights from L2."""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from pdserve.kernels.gpus import by_gpu_name, num_sms
from pdserve.kernels.pdl import use_pdl, wait_for_previous_kernel
from pdserve.kernels.split_counters import is_last_split, split_counters, sum_of_splits
from pdserve.kernels.w4_matmul import _EXP_2_23, _check, _weight, bf16x2_neg_zero

MAX_ROWS = 4  # rows a program unrolls; more rows take more programs, each reading the weight again
MAX_SPLITS = 8
_X_PAIRS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class W4Tiles(NamedTuple):
    """Launch parameters of w4_gemv (`gemv_tile_sizes`)."""

    block_n: int  # columns a program
    block_k8: int  # packed rows a slice (within one group)
    block_g: int  # slices side by side in a tile
    num_warps: int
    num_stages: int
    splits: int  # programs sharing a column tile's K


def _bf16_dot8_asm(rows: int) -> str:
    """PTX: outputs $0..$rows-1 (fp32), inputs the packed int32, the bf16x2 pair -(128 + zero), then
    per row x's bf16x2 pairs (x_0, x_4), (x_1, x_5), (x_2, x_6), (x_3, x_7) of the packed row."""
    packed, neg_zero = f"${rows}", f"${rows + 1}"
    lines = [
        "{",
        ".reg .b32 t0, t1, t2, t3, s, one, nz, a, lo, hi;",
        ".reg .f32 flo, fhi;",
        "mov.b32 one, 0x3F803F80;",  # bf16x2 (1, 1)
        "mov.b32 nz, 0x80008000;",  # bf16x2 (-0, -0): the first FMA is a product
    ]
    for j in range(4):
        source = packed
        if j:
            lines.append(f"shr.u32 s, {packed}, {4 * j};")
            source = "s"
        lines.append(f"lop3.b32 t{j}, {source}, 0x000F000F, 0x43004300, 0xEA;")  # (a & b) | c: 128 + q
        lines.append(f"fma.rn.bf16x2 t{j}, t{j}, one, {neg_zero};")  # q - zero, exactly
    for row in range(rows):
        x = [f"${rows + 2 + 4 * row + j}" for j in range(4)]
        lines.append(f"fma.rn.bf16x2 a, t0, {x[0]}, nz;")
        lines += [f"fma.rn.bf16x2 a, t{j}, {x[j]}, a;" for j in range(1, 4)]
        lines += ["shl.b32 lo, a, 16;", "and.b32 hi, a, 0xFFFF0000;", "mov.b32 flo, lo;", "mov.b32 fhi, hi;"]
        lines.append(f"add.f32 ${row}, flo, fhi;")
    lines.append("}")
    return "\n".join(lines)


_DOT8_1: tl.constexpr = tl.constexpr(_bf16_dot8_asm(1))
_DOT8_2: tl.constexpr = tl.constexpr(_bf16_dot8_asm(2))
_DOT8_3: tl.constexpr = tl.constexpr(_bf16_dot8_asm(3))
_DOT8_4: tl.constexpr = tl.constexpr(_bf16_dot8_asm(4))


@triton.jit
def _w4_gemv_kernel(
    x_ptr,
    qweight_ptr,
    scales_ptr,
    zeros_ptr,
    out_ptr,
    partial_ptr,
    counters_ptr,
    M,
    N,
    num_slices,
    slices_per_split,
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
    BLOCK_G: tl.constexpr,
    SLICES_PER_GROUP: tl.constexpr,
    EVEN_SLICES: tl.constexpr,
    X_PAIRS: tl.constexpr,
    ASM: tl.constexpr,
    IS_SPLIT: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    PDL: tl.constexpr,
):
    pid_m, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)  # rows fastest
    first = split * slices_per_split
    end = tl.minimum(first + slices_per_split, num_slices)
    wait_for_previous_kernel(PDL)
    m0 = pid_m * BLOCK_M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    k8 = tl.arange(0, BLOCK_K8)[:, None]
    g = tl.arange(0, BLOCK_G)[None, :]
    # rows past M read row M - 1 (x needs no masks) and are not stored
    x0 = x_ptr + m0 * stride_xm
    x1 = x_ptr + tl.minimum(m0 + 1, M - 1) * stride_xm
    x2 = x_ptr + tl.minimum(m0 + 2, M - 1) * stride_xm
    x3 = x_ptr + tl.minimum(m0 + 3, M - 1) * stride_xm
    acc0 = tl.zeros((BLOCK_K8, BLOCK_G, BLOCK_N), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_K8, BLOCK_G, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_K8, BLOCK_G, BLOCK_N), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_K8, BLOCK_G, BLOCK_N), dtype=tl.float32)
    # num_stages on the loop itself: Triton pipelines loads that feed no tl.dot only when asked here
    for s0 in tl.range(first, end, BLOCK_G, num_stages=NUM_STAGES):
        if EVEN_SLICES:
            slices = s0 + g  # [1, G]
            mask = mask_n[None, None, :]
        else:
            mask = ((s0 + g) < end)[:, :, None] & mask_n[None, None, :]
            slices = tl.minimum(s0 + g, end - 1)  # past the end: in bounds, masked to zero weights
        rows = slices * BLOCK_K8 + k8  # [K8, G] packed rows
        groups = (slices // SLICES_PER_GROUP)[:, :, None]
        cols = offs_n[None, None, :]
        packed = tl.load(qweight_ptr + rows[:, :, None] * stride_qk + cols * stride_qn, mask=mask, other=0)
        scale = tl.load(scales_ptr + groups * stride_sg + cols * stride_sn, mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + groups * stride_zg + cols * stride_zn, mask=mask, other=0)
        if X_PAIRS == 1:  # bf16 x: bf16x2 arithmetic
            neg_zero = bf16x2_neg_zero(zero)
            p0, p1, p2, p3 = _bf16_dot8_rows(packed, neg_zero, x0, x1, x2, x3, rows, BLOCK_M, ASM)
        else:
            p0, p1, p2, p3 = _fp32_dot8_rows(packed, zero.to(tl.float32), x0, x1, x2, x3, rows, exp_2_23, BLOCK_M, X_PAIRS)
        acc0 = tl.fma(p0, scale, acc0)
        if BLOCK_M > 1:
            acc1 = tl.fma(p1, scale, acc1)
        if BLOCK_M > 2:
            acc2 = tl.fma(p2, scale, acc2)
        if BLOCK_M > 3:
            acc3 = tl.fma(p3, scale, acc3)
    if IS_SPLIT:  # fp32 partials [splits, M, N]; the last program of the tile adds them
        part = partial_ptr + (split * M + m0) * N + offs_n
        _store_rows(part, N, acc0, acc1, acc2, acc3, m0, M, offs_n, mask_n, BLOCK_M)
        num_splits = tl.num_programs(2)
        if is_last_split(counters_ptr + pid_m * tl.num_programs(1) + pid_n, num_splits):
            out = out_ptr + m0 * stride_om + offs_n
            for i in tl.static_range(BLOCK_M):
                is_row = mask_n & (m0 + i + 0 * offs_n < M)
                total = sum_of_splits(partial_ptr + (m0 + i) * N + offs_n, M * N, num_splits, is_row)
                tl.store(out + i * stride_om, total.to(out_ptr.dtype.element_ty), mask=is_row)
    else:
        _store_rows(out_ptr + m0 * stride_om + offs_n, stride_om, acc0, acc1, acc2, acc3, m0, M, offs_n, mask_n, BLOCK_M)


@triton.jit
def _bf16_dot8_rows(packed, neg_zero, x0, x1, x2, x3, rows, BLOCK_M: tl.constexpr, ASM: tl.constexpr):
    """Per row (up to 4; unused ones repeat row 0): sum over j < 8 of (q_j - zero) * x[8 row + j]
    for each packed int32 [K8, G, N], x bf16 read as int32 pairs."""
    a0, a1, a2, a3 = _x_pairs(x0, rows, ASM)
    b0, b1, b2, b3 = a0, a1, a2, a3
    c0, c1, c2, c3 = a0, a1, a2, a3
    d0, d1, d2, d3 = a0, a1, a2, a3
    if BLOCK_M > 1:
        b0, b1, b2, b3 = _x_pairs(x1, rows, ASM)
    if BLOCK_M > 2:
        c0, c1, c2, c3 = _x_pairs(x2, rows, ASM)
    if BLOCK_M > 3:
        d0, d1, d2, d3 = _x_pairs(x3, rows, ASM)
    if ASM:
        if BLOCK_M == 1:
            p0 = tl.inline_asm_elementwise(
                _DOT8_1, "=f,r,r,r,r,r,r", [packed, neg_zero, a0, a1, a2, a3], dtype=tl.float32, is_pure=True, pack=1
            )
            p1, p2, p3 = p0, p0, p0
        elif BLOCK_M == 2:
            p0, p1 = tl.inline_asm_elementwise(
                _DOT8_2, "=f,=f" + ",r" * 10, [packed, neg_zero, a0, a1, a2, a3, b0, b1, b2, b3],
                dtype=(tl.float32, tl.float32), is_pure=True, pack=1,
            )  # fmt: skip
            p2, p3 = p0, p0
        elif BLOCK_M == 3:
            p0, p1, p2 = tl.inline_asm_elementwise(
                _DOT8_3, "=f,=f,=f" + ",r" * 14, [packed, neg_zero, a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3],
                dtype=(tl.float32, tl.float32, tl.float32), is_pure=True, pack=1,
            )  # fmt: skip
            p3 = p0
        else:
            p0, p1, p2, p3 = tl.inline_asm_elementwise(
                _DOT8_4, "=f,=f,=f,=f" + ",r" * 18,
                [packed, neg_zero, a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, d0, d1, d2, d3],
                dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1,
            )  # fmt: skip
    else:
        p0 = _bf16_dot8_emulated(packed, neg_zero, a0, a1, a2, a3)
        p1 = _bf16_dot8_emulated(packed, neg_zero, b0, b1, b2, b3)
        p2 = _bf16_dot8_emulated(packed, neg_zero, c0, c1, c2, c3)
        p3 = _bf16_dot8_emulated(packed, neg_zero, d0, d1, d2, d3)
    return p0, p1, p2, p3


@triton.jit
def _x_pairs(x_row, rows, ASM: tl.constexpr):
    """x's inputs 8 row .. 8 row + 7 as the bf16x2 pairs (x_j, x_j+4), j < 4, that the nibble pairs
    (j, j + 4) of a packed int32 meet; [K8, G, 1] int32, the first of each pair in the low half."""
    p01 = tl.load(x_row + rows * 4)
    p23 = tl.load(x_row + rows * 4 + 1)
    p45 = tl.load(x_row + rows * 4 + 2)
    p67 = tl.load(x_row + rows * 4 + 3)
    if ASM:  # a byte permute a pair
        x04 = tl.inline_asm_elementwise(
            "prmt.b32 $0, $1, $2, 0x5410;", "=r,r,r", [p01, p45], dtype=tl.int32, is_pure=True, pack=1
        )
        x15 = tl.inline_asm_elementwise(
            "prmt.b32 $0, $1, $2, 0x7632;", "=r,r,r", [p01, p45], dtype=tl.int32, is_pure=True, pack=1
        )
        x26 = tl.inline_asm_elementwise(
            "prmt.b32 $0, $1, $2, 0x5410;", "=r,r,r", [p23, p67], dtype=tl.int32, is_pure=True, pack=1
        )
        x37 = tl.inline_asm_elementwise(
            "prmt.b32 $0, $1, $2, 0x7632;", "=r,r,r", [p23, p67], dtype=tl.int32, is_pure=True, pack=1
        )
    else:
        x04 = (p01 & 0xFFFF) | (p45 << 16)
        x15 = ((p01 >> 16) & 0xFFFF) | (p45 & -65536)
        x26 = (p23 & 0xFFFF) | (p67 << 16)
        x37 = ((p23 >> 16) & 0xFFFF) | (p67 & -65536)
    return x04[:, :, None], x15[:, :, None], x26[:, :, None], x37[:, :, None]


@triton.jit
def _bf16_dot8_emulated(packed, neg_zero, x04, x15, x26, x37):
    """The PTX of `_bf16_dot8_asm` for one row in Triton (the interpreter runs no PTX): the same
    operations on the same bits, each bf16x2 FMA as two fp32 FMAs rounded to bf16."""
    z_lo, z_hi = _low_bf16(neg_zero), _high_bf16(neg_zero)
    t = (packed & 0x000F000F) | 0x43004300
    lo = _round_bf16((_low_bf16(t) + z_lo) * _low_bf16(x04))
    hi = _round_bf16((_high_bf16(t) + z_hi) * _high_bf16(x04))
    t = ((packed >> 4) & 0x000F000F) | 0x43004300
    lo = _round_bf16(tl.fma(_low_bf16(t) + z_lo, _low_bf16(x15), lo))
    hi = _round_bf16(tl.fma(_high_bf16(t) + z_hi, _high_bf16(x15), hi))
    t = ((packed >> 8) & 0x000F000F) | 0x43004300
    lo = _round_bf16(tl.fma(_low_bf16(t) + z_lo, _low_bf16(x26), lo))
    hi = _round_bf16(tl.fma(_high_bf16(t) + z_hi, _high_bf16(x26), hi))
    t = ((packed >> 12) & 0x000F000F) | 0x43004300
    lo = _round_bf16(tl.fma(_low_bf16(t) + z_lo, _low_bf16(x37), lo))
    hi = _round_bf16(tl.fma(_high_bf16(t) + z_hi, _high_bf16(x37), hi))
    return lo + hi


@triton.jit
def _low_bf16(pair):
    return (pair << 16).to(tl.float32, bitcast=True)


@triton.jit
def _high_bf16(pair):
    return (pair & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _round_bf16(value):
    """value rounded to the nearest bf16 (ties to even), as fp32: by its bits, as the interpreter's
    own fp32 -> bf16 conversion truncates."""
    bits = value.to(tl.int32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _fp32_dot8_rows(packed, zero, x0, x1, x2, x3, rows, exp_2_23, BLOCK_M: tl.constexpr, X_PAIRS: tl.constexpr):
    """Per row (up to 4; the rest 0): sum over j < 8 of (q_j - zero) * x[8 row + j] in fp32."""
    high = packed >> 12  # nibbles 5..7 at bits 8..19 (the sign bits above them are masked off)
    p0 = tl.zeros(packed.shape, dtype=tl.float32)
    p1 = tl.zeros(packed.shape, dtype=tl.float32)
    p2 = tl.zeros(packed.shape, dtype=tl.float32)
    p3 = tl.zeros(packed.shape, dtype=tl.float32)
    for jj in tl.static_range(4):  # nibbles 2 jj and 2 jj + 1 (inputs 8 row + 2 jj, + 1)
        w_even = _weight(packed, high, zero, exp_2_23, 2 * jj)
        w_odd = _weight(packed, high, zero, exp_2_23, 2 * jj + 1)
        p0 = _fma_pair(w_even, w_odd, x0, rows, jj, X_PAIRS, p0)
        if BLOCK_M > 1:
            p1 = _fma_pair(w_even, w_odd, x1, rows, jj, X_PAIRS, p1)
        if BLOCK_M > 2:
            p2 = _fma_pair(w_even, w_odd, x2, rows, jj, X_PAIRS, p2)
        if BLOCK_M > 3:
            p3 = _fma_pair(w_even, w_odd, x3, rows, jj, X_PAIRS, p3)
    return p0, p1, p2, p3


@triton.jit
def _fma_pair(w_even, w_odd, x_row, rows, JJ: tl.constexpr, X_PAIRS: tl.constexpr, partial):
    """partial + w_even * x[8 row + 2 JJ] + w_odd * x[8 row + 2 JJ + 1]. 16-bit x is read as int32
    pairs: 32-bit loads are ones Triton pipelines (cp.async, with the weights), 16-bit ones wait on L2
    each iteration; fp16 -> fp32 is a conversion."""
    if X_PAIRS == 0:  # fp32
        x_even = tl.load(x_row + rows * 8 + 2 * JJ)
        x_odd = tl.load(x_row + rows * 8 + 2 * JJ + 1)
    else:  # fp16
        pair = tl.load(x_row + rows * 4 + JJ)  # [K8, G] int32, the even input in the low half
        x_even = pair.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        x_odd = (pair >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    partial = tl.fma(w_even, x_even[:, :, None], partial)
    return tl.fma(w_odd, x_odd[:, :, None], partial)


@triton.jit
def _store_rows(out_ptrs, row_stride, acc0, acc1, acc2, acc3, m0, M, offs_n, mask_n, BLOCK_M: tl.constexpr):
    """Rows m0 .. m0 + BLOCK_M - 1 (those below M) from their accumulators, row_stride apart."""
    _store_row(out_ptrs, acc0, m0, M, offs_n, mask_n)
    if BLOCK_M > 1:
        _store_row(out_ptrs + row_stride, acc1, m0 + 1, M, offs_n, mask_n)
    if BLOCK_M > 2:
        _store_row(out_ptrs + 2 * row_stride, acc2, m0 + 2, M, offs_n, mask_n)
    if BLOCK_M > 3:
        _store_row(out_ptrs + 3 * row_stride, acc3, m0 + 3, M, offs_n, mask_n)


@triton.jit
def _store_row(out_ptrs, acc, row, M, offs_n, mask_n):
    """Row `row` of the output: acc [K8, G, N] summed over its packed rows and slices."""
    total = tl.sum(tl.sum(acc, axis=0), axis=0)
    tl.store(out_ptrs, total.to(out_ptrs.dtype.element_ty), mask=mask_n & (row + 0 * offs_n < M))


def w4_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    *,
    tile_sizes: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """x [M, K] @ dequantized W [K, N] -> [M, N] in x.dtype, for decode's few rows: up to MAX_ROWS
    rows read the weight once; more are computed correctly, each MAX_ROWS rows reading it again (use
    w4_matmul there). bf16 x: zero points below 128. tile_sizes: gemv_tile_sizes' tuple, to override
    it (tests, tuning)."""
    _check(x, qweight, scales, zeros, group_size)
    m, k = x.shape
    n = qweight.shape[1]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    block_m = min(m, MAX_ROWS)
    row_blocks = triton.cdiv(m, block_m)
    tiles = W4Tiles(*tile_sizes) if tile_sizes else gemv_tile_sizes(n, k, x.device, group_size, row_blocks, block_m)
    block_n, block_k8, block_g, num_warps, num_stages, splits = tiles
    if (group_size // 8) % block_k8:
        raise ValueError(f"BLOCK_K8 {block_k8} does not divide the group's {group_size // 8} packed rows")
    num_slices = k // 8 // block_k8
    # every split but the last takes a whole number of BLOCK_G slices; no split is empty
    slices_per_split = triton.cdiv(triton.cdiv(num_slices, splits), block_g) * block_g
    splits = triton.cdiv(num_slices, slices_per_split)
    x_pairs = _X_PAIRS[x.dtype]
    if x_pairs:  # 16-bit x read as int32 pairs
        if x.stride(0) % 2 or x.storage_offset() % 2:
            x = x.clone(memory_format=torch.contiguous_format)
        x = x.view(torch.int32)
    col_tiles = triton.cdiv(n, block_n)
    partial = counters = out  # unused with one split
    if splits > 1:
        partial = torch.empty((splits, m, n), dtype=torch.float32, device=out.device)
        counters = split_counters("w4_gemv", out.device, row_blocks * col_tiles)
    pdl = use_pdl(out, m)
    _w4_gemv_kernel[(row_blocks, col_tiles, splits)](
        x,
        qweight,
        scales,
        zeros,
        out,
        partial,
        counters,
        m,
        n,
        num_slices,
        slices_per_split,
        x.stride(0),
        *qweight.stride(),
        *scales.stride(),
        *zeros.stride(),
        out.stride(0),
        _EXP_2_23,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K8=block_k8,
        BLOCK_G=block_g,
        SLICES_PER_GROUP=group_size // 8 // block_k8,
        EVEN_SLICES=num_slices % slices_per_split == 0,
        X_PAIRS=x_pairs,
        ASM=x.is_cuda,
        IS_SPLIT=splits > 1,
        NUM_STAGES=num_stages,
        PDL=pdl,
        num_warps=num_warps,
        launch_pdl=pdl,
    )
    return out


def gemv_tile_sizes(
    n: int, k: int, device: torch.device, group_size: int = 128, row_blocks: int = 1, block_m: int = 1
) -> W4Tiles:
    """W4Tiles for w4_gemv, from a sweep of one-row launches chained as a decode step runs them
    (H200, Llama-3-8B's projections, `bench.gemv --sweep --weights w4`, % of copy bandwidth).

    BLOCK_K8: the group's packed rows (16 for groups of 128), at most 16, else the largest power of
    two dividing them.
    - Narrow outputs (32-column tiles would give an SM fewer than 4 programs): 16 columns, 4 slices
      side by side at one row, 2 at 2-4 rows, whose registers grow with the tile. One row: qkv 38%,
      o_proj 35%, down 47%, against 25-33% at 32 columns; the AWQ step 2.466 ms against
      2.568-2.578 with 2 slices. 2 / 4 rows: 3.20-3.29 / 4.74-4.84 ms with 2 slices, 3.48 / 5.27
      with 4.
    - Wide outputs: 32 columns and 8 slices, 256 weights a thread, which spreads each iteration's
      fixed cost (barriers, addresses, scales and zeros) further: gate_up 58% against 49% at 2
      slices. At one row, a GPU named in WIDE_ONE_ROW_TILES takes its own.
    - K is split only while the column tiles fill less than one program an SM (a small model's
      projections): at Llama-3-8B's widths splitting was no faster (o_proj 4 splits of 32 columns
      27%, down 4 splits of 64 columns 47%)."""
    sms = num_sms(device)
    group_k8 = group_size // 8
    block_k8 = min(16, group_k8 & -group_k8)
    wide = row_blocks * triton.cdiv(n, 32) >= 4 * sms
    block_n, block_g = (32, 8) if wide else (16, 4 if block_m == 1 else 2)
    if wide and row_blocks * block_m == 1:
        block_n, block_g = by_gpu_name(WIDE_ONE_ROW_TILES, device) or (block_n, block_g)
    programs = row_blocks * triton.cdiv(n, block_n)
    iterations = k // 8 // block_k8 // block_g
    splits = max(1, min(MAX_SPLITS, triton.cdiv(sms, programs), iterations // MIN_SPLIT_ITERATIONS))
    return W4Tiles(block_n, block_k8, block_g, num_warps=4, num_stages=4, splits=splits)


# One row's wide tile (BLOCK_N, BLOCK_G) on GPUs whose sweep ranks another above the H200's (32, 8),
# by a part of the device's name. H100 80GB HBM3, Llama-3-8B's gate_up, % of copy: (64, 1) 70%,
# (32, 8) 64% (bench/runs/2026-12-06-h100-29/loan1); on the H200 (32, 8) 57-58%, (64, 1) 52%.
WIDE_ONE_ROW_TILES = {"H100": (64, 1)}


MIN_SPLIT_ITERATIONS = 4  # a split's fewest loop iterations (the pipeline's prologue is ~3)
