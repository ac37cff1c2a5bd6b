"""4-bit weight GEMV for decode (1..4 rows) in w4_matmul's layout: qweight int32 [K / 8, N], input k
in bits 4 * (k % 8) of packed row k // 8; scales [K / group, N]; zeros uint8 [K / group, N];
W[k, n] = (q - zero) * scale. No tl.dot: CUDA cores, fp32 throughout, written to be bound by reading
the weight rather than by unpacking it (the instruction counts quoted are from sm_90 SASS of this
kernel, compiled with Triton 3.9's ptxas; timings: bench/gemv.py --sweep, bench/RESULTS.md).

- Unpacking without int->float conversions or a shift a nibble: the 4 bits of a nibble, masked in
  place at bit s and OR-ed under the exponent of 2^(23 - s), are the float 2^(23 - s) + q exactly
  (mantissa bit s weighs 1); less 2^(23 - s) + zero (exact: zero <= 255) that is q - zero, exactly,
  which multiplies x[k] as it is: a LOP3, an FADD and an FFMA a weight. Nibbles 0..4 are read in place
  (bits 0..19), 5..7 from packed >> 12 (bit 23 would be the exponent's): one shift an int32.
- A program reads its weight tile once for all its rows (up to 4, unrolled): the unpacking is paid
  once a weight, each row adds an FFMA (and its x loads).
- The tile is [BLOCK_K8, BLOCK_G, BLOCK_N]: BLOCK_G slices of BLOCK_K8 packed rows (a slice is the
  group for groups of 128, and always lies in one group, so its scale and zero are vectors over the
  columns) side by side, to give a narrow column tile enough threads and bytes in flight. The loop over
  K is software-pipelined (cp.async into shared memory, NUM_STAGES deep: weights, scales, zeros and
  x, which is read as 32-bit pairs when 16-bit so that it qualifies), products accumulate per
  (packed row, slice, column), are scaled once a slice, and are reduced across threads once, at the
  end. Per weight that is ~5.2 instructions in the loop for 1 row, ~6.9 for 2, ~10.1 for 4.
- Grid (row blocks, column tiles), the row block fastest: past MAX_ROWS rows, the row blocks of a
  column tile run together and reread its weights from L2."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.pdl import use_pdl, wait_for_previous_kernel
from pdserve.kernels.w4_matmul import _EXP_2_23, _check, _weight
from pdserve.kernels.w8_matmul import _num_sms

MAX_ROWS = 4  # rows a program unrolls; more rows take more programs, each reading the weight again
_X_PAIRS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def _w4_gemv_kernel(
    x_ptr,
    qweight_ptr,
    scales_ptr,
    zeros_ptr,
    out_ptr,
    M,
    N,
    num_slices,
    stride_xm,
    stride_qk,
    stride_sg,
    stride_zg,
    stride_om,
    exp_2_23,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K8: tl.constexpr,
    BLOCK_G: tl.constexpr,
    SLICES_PER_GROUP: tl.constexpr,
    EVEN_SLICES: tl.constexpr,
    X_PAIRS: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)  # rows fastest: one weight tile's programs run together
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
    for s0 in tl.range(0, num_slices, BLOCK_G, num_stages=NUM_STAGES):
        if EVEN_SLICES:
            slices = s0 + g  # [1, G]
            mask = mask_n[None, None, :]
        else:
            mask = ((s0 + g) < num_slices)[:, :, None] & mask_n[None, None, :]
            slices = tl.minimum(s0 + g, num_slices - 1)  # past the end: in bounds, masked to zero weights
        rows = slices * BLOCK_K8 + k8  # [K8, G] packed rows
        groups = (slices // SLICES_PER_GROUP)[:, :, None]
        packed = tl.load(qweight_ptr + rows[:, :, None] * stride_qk + offs_n[None, None, :], mask=mask, other=0)
        scale = tl.load(scales_ptr + groups * stride_sg + offs_n[None, None, :], mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + groups * stride_zg + offs_n[None, None, :], mask=mask, other=0).to(tl.float32)
        high = packed >> 12  # nibbles 5..7 at bits 8..19 (the sign bits above them are masked off)
        p0 = tl.zeros((BLOCK_K8, BLOCK_G, BLOCK_N), dtype=tl.float32)
        p1 = tl.zeros((BLOCK_K8, BLOCK_G, BLOCK_N), dtype=tl.float32)
        p2 = tl.zeros((BLOCK_K8, BLOCK_G, BLOCK_N), dtype=tl.float32)
        p3 = tl.zeros((BLOCK_K8, BLOCK_G, BLOCK_N), dtype=tl.float32)
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
        acc0 = tl.fma(p0, scale, acc0)
        acc1 = tl.fma(p1, scale, acc1)
        acc2 = tl.fma(p2, scale, acc2)
        acc3 = tl.fma(p3, scale, acc3)
    out = out_ptr + m0 * stride_om + offs_n
    _store_row(out, acc0, m0, M, offs_n, mask_n)
    if BLOCK_M > 1:
        _store_row(out + stride_om, acc1, m0 + 1, M, offs_n, mask_n)
    if BLOCK_M > 2:
        _store_row(out + 2 * stride_om, acc2, m0 + 2, M, offs_n, mask_n)
    if BLOCK_M > 3:
        _store_row(out + 3 * stride_om, acc3, m0 + 3, M, offs_n, mask_n)


@triton.jit
def _fma_pair(w_even, w_odd, x_row, rows, JJ: tl.constexpr, X_PAIRS: tl.constexpr, partial):
    """partial + w_even * x[8 row + 2 JJ] + w_odd * x[8 row + 2 JJ + 1]. 16-bit x is read as int32
    pairs: 32-bit loads are ones Triton pipelines (cp.async, with the weights), 16-bit ones wait on L2
    each iteration; bf16 -> fp32 is a shift or a mask, fp16 a conversion."""
    if X_PAIRS == 0:  # fp32
        x_even = tl.load(x_row + rows * 8 + 2 * JJ)
        x_odd = tl.load(x_row + rows * 8 + 2 * JJ + 1)
    else:
        pair = tl.load(x_row + rows * 4 + JJ)  # [K8, G] int32, the even input in the low half
        if X_PAIRS == 1:  # bf16: the high half of an fp32
            x_even = (pair << 16).to(tl.float32, bitcast=True)
            x_odd = (pair & -65536).to(tl.float32, bitcast=True)
        else:  # fp16
            x_even = pair.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            x_odd = (pair >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    partial = tl.fma(w_even, x_even[:, :, None], partial)
    return tl.fma(w_odd, x_odd[:, :, None], partial)


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
    tile_sizes: tuple[int, int, int, int, int] | None = None,
) -> torch.Tensor:
    """x [M, K] @ dequantized W [K, N] -> [M, N] in x.dtype, for decode's few rows: up to MAX_ROWS
    rows read the weight once; more are computed correctly, each MAX_ROWS rows reading it again (use
    w4_matmul there). tile_sizes: gemv_tile_sizes' tuple, to override it (tests, tuning)."""
    _check(x, qweight, scales, zeros, group_size)
    m, k = x.shape
    n = qweight.shape[1]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    block_m = min(m, MAX_ROWS)
    block_n, block_k8, block_g, num_warps, num_stages = tile_sizes or gemv_tile_sizes(
        n, x.device, group_size, triton.cdiv(m, block_m)
    )
    if (group_size // 8) % block_k8:
        raise ValueError(f"BLOCK_K8 {block_k8} does not divide the group's {group_size // 8} packed rows")
    num_slices = k // 8 // block_k8
    x_pairs = _X_PAIRS[x.dtype]
    if x_pairs:  # 16-bit x read as int32 pairs
        if x.stride(0) % 2 or x.storage_offset() % 2:
            x = x.clone(memory_format=torch.contiguous_format)
        x = x.view(torch.int32)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    pdl = use_pdl(out, m)
    _w4_gemv_kernel[grid](
        x,
        qweight,
        scales,
        zeros,
        out,
        m,
        n,
        num_slices,
        x.stride(0),
        qweight.stride(0),
        scales.stride(0),
        zeros.stride(0),
        out.stride(0),
        _EXP_2_23,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K8=block_k8,
        BLOCK_G=block_g,
        SLICES_PER_GROUP=group_size // 8 // block_k8,
        EVEN_SLICES=num_slices % block_g == 0,
        X_PAIRS=x_pairs,
        NUM_STAGES=num_stages,
        PDL=pdl,
        num_warps=num_warps,
        launch_pdl=pdl,
    )
    return out


def gemv_tile_sizes(n: int, device: torch.device, group_size: int = 128, row_blocks: int = 1) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_K8, BLOCK_G, num_warps, num_stages) for w4_gemv.

    BLOCK_K8: the group's packed rows (16 for groups of 128), at most 16, else the largest power of
    two dividing them. BLOCK_N: the widest column tile, 64 down to 16 columns (64 bytes of a packed
    row), whose programs spread over the SMs within 10% as evenly as the best spread (programs /
    (rounds * SMs)); for 132 SMs and one row block, N = 4096 and 28672 take 32 columns, 6144 and 14336
    take 16. BLOCK_G: as many slices as make the tile's scale and zero tiles [BLOCK_G, BLOCK_N] half as
    many elements as the program has threads. That is a Triton layout matter: the loop's arithmetic
    takes the layout of its "expensive" loads (as many elements as threads, or more). Below that the
    weight's own layout wins: each thread holds 16-byte vectors of 4 columns for 2 packed rows of one
    slice (groups of 128), so it shares each scale and zero between its rows and each x value between
    its columns. At as many elements as threads, the scale's layout (a column a thread) took over the
    weight tile in sm_90 builds and the loop went from ~5.2 to ~15 instructions a weight."""
    num_sms = _num_sms(device.index or 0) if device.type == "cuda" else 1
    group_k8 = group_size // 8
    block_k8 = min(16, group_k8 & -group_k8)
    num_warps = 4  # 8 warps: 3-7 points slower on every Llama-3-8B shape (H200 sweep)

    def spread(block_n: int) -> float:
        programs = row_blocks * triton.cdiv(n, block_n)
        return programs / (triton.cdiv(programs, num_sms) * num_sms)

    widths = (64, 32, 16)  # at most 2 * 32 * num_warps / 2: the scale tile's rule below
    best = max(spread(b) for b in widths)
    block_n = next(b for b in widths if spread(b) >= 0.9 * best)
    block_g = max(1, 16 * num_warps // block_n)
    return block_n, block_k8, block_g, num_warps, 4
