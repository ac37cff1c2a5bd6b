"""Decode GEMV: the few rows of a decode step (M <= GEMV_MAX_ROWS) times a weight that is read once,
at memory speed. The weight is bf16/fp16/fp32, or fp8 (e4m3) / int8 with one fp32 scale per output
channel, stored [N, K] as nn.Linear stores it; an optional bias is added in the epilogue.

Three kernels. One row (and fp8/int8 weights up to ELEMENTWISE_MAX_ROWS): no tensor cores; every
program owns BLOCK_N outputs of one row, streams its [BLOCK_N, K] slab of the weight in
[BLOCK_N, BLOCK_K] tiles with elementwise FMAs into a 2-D fp32 accumulator, and reduces it once at
the end (the tiles after the first loaded into registers as used, or, with num_stages > 1, through
a cp.async pipeline in shared memory); row m is the fastest program id, so the M programs that read
one slab run together and L2 serves the repeats. 8-bit weights with 16-bit x (a bf16/fp16 model's
fp8 or int8 weights) take `_gemv_8bit_kernel`, the same loop in f16x2 arithmetic (see there). Float
weights of x's dtype from DOT_MIN_ROWS rows: `tl.dot` (tensor cores for 16-bit weights; fp32 ones in
full precision, no TF32), all rows of x (padded to 16) against each program's slab, read once.
Within a model's PDL row limit (kernels/pdl.py) the kernels launch as dependents of the kernel
before them; the one-row kernel reads its first weight tile before it waits for the kernel that
wrote x."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.gpus import by_gpu_name
from pdserve.kernels.pdl import use_pdl, wait_for_previous_kernel
from pdserve.kernels.silu_and_mul import silu_and_mul, silu_mul
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
    residual_ptr,
    residual_out_ptr,
    norm_weight_ptr,
    N,
    K,
    eps,
    stride_xm,
    stride_wn,
    stride_om,
    W_KIND: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SWIGLU: tl.constexpr,
    NORM: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    PDL: tl.constexpr,
):
    """NORM (`gemv_add_rms_norm`, one row): x is x + residual normed, as `fused_add_rms_norm` makes
    it; every program reads the whole row, sums its squares alongside the dot and scales its outputs
    by 1 / rms, and program 0 writes x + residual to residual_out."""
    m = tl.program_id(0).to(tl.int64)
    offs_n, mask_n = _weight_rows(tl.program_id(1), N, BLOCK_N, SWIGLU)
    x_row = x_ptr + m * stride_xm
    w = _weight_tile(w_ptr, offs_n, mask_n, 0, K, stride_wn, W_KIND, BLOCK_K)  # no kernel writes weights
    wait_for_previous_kernel(PDL)
    if NORM:
        is_writer = tl.program_id(1) == 0
        x, squares = _added_tile(x_row, residual_ptr, residual_out_ptr, norm_weight_ptr, 0, K, BLOCK_K, is_writer)
        acc = w * x
        for k0 in tl.range(BLOCK_K, K, BLOCK_K, num_stages=NUM_STAGES):
            x, tile_squares = _added_tile(x_row, residual_ptr, residual_out_ptr, norm_weight_ptr, k0, K, BLOCK_K, is_writer)
            acc += _weight_tile(w_ptr, offs_n, mask_n, k0, K, stride_wn, W_KIND, BLOCK_K) * x
            squares += tile_squares
        out = tl.sum(acc, axis=1) * tl.rsqrt(tl.sum(squares, 0) / K + eps)
    else:
        acc = w * _x_tile(x_row, 0, K, BLOCK_K)  # [BLOCK_N, BLOCK_K]
        # num_stages on the loop itself: Triton pipelines loads that feed no tl.dot only when asked here
        for k0 in tl.range(BLOCK_K, K, BLOCK_K, num_stages=NUM_STAGES):
            acc += _weight_tile(w_ptr, offs_n, mask_n, k0, K, stride_wn, W_KIND, BLOCK_K) * _x_tile(x_row, k0, K, BLOCK_K)
        out = tl.sum(acc, axis=1)
    if HAS_SCALE:
        out = out * tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    _store_outputs(out_ptr + m * stride_om, out, tl.program_id(1), N, BLOCK_N, SWIGLU)


@triton.jit
def _weight_rows(pid_n, N, BLOCK_N: tl.constexpr, SWIGLU: tl.constexpr):
    """The weight rows a program reads (int64) and which are in bounds. With SWIGLU the weight is
    [gate | up] (2 N rows, N outputs): the first BLOCK_N / 2 rows are gate rows, the others the up
    rows of the same outputs."""
    local = tl.arange(0, BLOCK_N)
    if SWIGLU:
        cols = pid_n * (BLOCK_N // 2) + local % (BLOCK_N // 2)
        return (cols + (local // (BLOCK_N // 2)) * N).to(tl.int64), cols < N
    cols = pid_n * BLOCK_N + local
    return cols.to(tl.int64), cols < N


@triton.jit
def _store_outputs(out_row, out, pid_n, N, BLOCK_N: tl.constexpr, SWIGLU: tl.constexpr):
    """A program's BLOCK_N fp32 outputs into its row of the output; with SWIGLU, silu(gate) * up of
    its BLOCK_N / 2 (gate, up) pairs, rounded as the projection's output stored and read back by
    kernels/silu_and_mul.py would be (the same arithmetic, bit for bit)."""
    dtype = out_row.dtype.element_ty
    if SWIGLU:
        pairs = tl.trans(tl.reshape(out.to(dtype).to(tl.float32), (2, BLOCK_N // 2)))
        gate, up = tl.split(pairs)
        cols = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(out_row + cols, silu_mul(gate, up, dtype).to(dtype), mask=cols < N)
    else:
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(out_row + cols, out.to(dtype), mask=cols < N)


# 8-bit weights, 16-bit x: x is scaled by 2^-_X_SHIFT into fp16, its 8-term sums of products kept
# below fp16's 65504: one product of the largest weight (448, e4m3) stays finite up to |x| ~37,000,
# an 8-term sum of largest weights and inputs of one sign up to ~4,600. Scaled x below 2^-14 is an
# fp16 subnormal (|x| < 2^-6), whose step, 2^-16 in x's units, is bf16's own at |x| = 2^-9: x keeps
# bf16's precision down to there, and its absolute error stays that below. The output is scaled
# back in fp32.
_X_SHIFT = 8
_X_DOWN: tl.constexpr = tl.constexpr(2.0**-_X_SHIFT)
_X_UP: tl.constexpr = tl.constexpr(2.0**_X_SHIFT)


def _f16x2_dot16_asm(w_kind: int) -> str:
    """PTX: $0 (fp32) = the 16 products of one 16-byte chunk of a weight row ($1..$4: 4 bytes each,
    input k at byte k) and x's 16 inputs ($5..$8: 4 fp16 each, already scaled): the bytes widened to
    f16x2 pairs (k, k + 1), eight f16x2 FMAs into one pair of 8-term sums (even and odd k), added in
    fp32."""
    lines = ["{", ".reg .b16 b<8>;", ".reg .b32 w<8>, y<8>, t, s, e, z;", ".reg .b16 sl, sh;", ".reg .f32 fl, fh;"]
    if w_kind == 2:
        lines += ["mov.b32 e, 0x64646464;", "mov.b32 z, 0x64806480;"]  # fp16 exponent bytes; (1152, 1152)
    for j in range(4):
        if w_kind == 1:  # fp8 e4m3: the hardware's widening, two bytes an instruction
            lines.append(f"mov.b32 {{b{2 * j}, b{2 * j + 1}}}, ${1 + j};")
            lines += [f"cvt.rn.f16x2.e4m3x2 w{2 * j + h}, b{2 * j + h};" for h in range(2)]
        else:  # int8: byte ^ 0x80 under fp16's exponent of 1024 is 1024 + 128 + q; less 1152, q exactly
            lines.append(f"xor.b32 t, ${1 + j}, 0x80808080;")
            lines.append(f"prmt.b32 w{2 * j}, t, e, 0x4140;")
            lines.append(f"prmt.b32 w{2 * j + 1}, t, e, 0x4342;")
            lines += [f"sub.rn.f16x2 w{2 * j + h}, w{2 * j + h}, z;" for h in range(2)]
        lines.append(f"mov.b64 {{y{2 * j}, y{2 * j + 1}}}, ${5 + j};")
    lines.append("mul.rn.f16x2 s, w0, y0;")
    lines += [f"fma.rn.f16x2 s, w{p}, y{p}, s;" for p in range(1, 8)]
    lines += ["mov.b32 {sl, sh}, s;", "cvt.f32.f16 fl, sl;", "cvt.f32.f16 fh, sh;", "add.f32 $0, fl, fh;", "}"]
    return "\n".join(lines)


_DOT16_FP8: tl.constexpr = tl.constexpr(_f16x2_dot16_asm(1))
_DOT16_INT8: tl.constexpr = tl.constexpr(_f16x2_dot16_asm(2))
_X_SCALE = f"0f{(127 - _X_SHIFT) << 23:08X}"  # 2^-_X_SHIFT as a PTX fp32 literal
_X_SCALE_F16X2 = f"0x{((15 - _X_SHIFT) << 10) * 0x10001:08X}"  # (2^-_X_SHIFT, 2^-_X_SHIFT) as f16x2 bits
# x's 4 inputs (bf16 or fp16, one int64) -> the same 4 times 2^-_X_SHIFT in fp16 (one int64)
_X4_BF16: tl.constexpr = tl.constexpr(
    "{ .reg .b32 p, q, r, s; .reg .f32 a, b, c, d; mov.b64 {p, q}, $1; "
    "shl.b32 a, p, 16; and.b32 b, p, 0xFFFF0000; shl.b32 c, q, 16; and.b32 d, q, 0xFFFF0000; "
    f"mul.f32 a, a, {_X_SCALE}; mul.f32 b, b, {_X_SCALE}; mul.f32 c, c, {_X_SCALE}; mul.f32 d, d, {_X_SCALE}; "
    "cvt.rn.f16x2.f32 r, b, a; cvt.rn.f16x2.f32 s, d, c; mov.b64 $0, {r, s}; }"
)
_X4_FP16: tl.constexpr = tl.constexpr(
    f"{{ .reg .b32 p, q, c; mov.b64 {{p, q}}, $1; mov.b32 c, {_X_SCALE_F16X2}; "
    "mul.rn.f16x2 p, p, c; mul.rn.f16x2 q, q, c; mov.b64 $0, {p, q}; }"
)


@triton.jit
def _gemv_8bit_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    bias_ptr,
    out_ptr,
    N,
    num_chunks,
    stride_xm,
    stride_wn,
    stride_om,
    W_KIND: tl.constexpr,
    X_FP16: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    EVEN_C: tl.constexpr,
    SWIGLU: tl.constexpr,
    ASM: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    PDL: tl.constexpr,
):
    """`_gemv_kernel` for 8-bit weights [N, K] (read as int32, 4 inputs each) and 16-bit x (read as
    int64, 4 inputs each), K a multiple of 16: tiles of BLOCK_N rows x BLOCK_C 16-byte chunks. A
    chunk's 16 products are 8 f16x2 FMAs (`_f16x2_dot16_asm`) and its fp32 accumulator one value,
    so a program of a few rows needs few registers: 28-30 at the tiles of `gemv_8bit_tile_sizes`'
    2 rows, against 64-72 for the fp32 kernel (whose accumulator is the tile), and the loop issues
    3.9 (fp8) / 4.6 (int8) sm_90 instructions a weight against 4.2 / 5.9. The fp32 kernel at the
    same tiles reads 4-27 points slower (bench/runs/2026-12-04-h200-17/). x is widened once a
    chunk and thread, for the rows the thread holds. Rows past the end read row 0 and chunks past
    the end the last chunk, against x zeros for the chunks (no masks in the loop); their outputs are
    not stored."""
    m = tl.program_id(0).to(tl.int64)
    rows, mask_n = _weight_rows(tl.program_id(1), N, BLOCK_N, SWIGLU)
    rows = tl.where(mask_n, rows, 0)
    offs_c = tl.arange(0, BLOCK_C)
    w_row = w_ptr + rows[:, None, None] * stride_wn + tl.arange(0, 4)[None, None, :]
    x_row = x_ptr + m * stride_xm + tl.arange(0, 4)[None, :]
    w = _chunk_words(w_row, offs_c, num_chunks, EVEN_C)  # no kernel writes weights
    wait_for_previous_kernel(PDL)
    acc = _dot_chunks(w, _x_chunks(x_row, offs_c, num_chunks, EVEN_C, X_FP16, ASM), W_KIND, ASM)
    for c0 in tl.range(BLOCK_C, num_chunks, BLOCK_C, num_stages=NUM_STAGES):
        w = _chunk_words(w_row, c0 + offs_c, num_chunks, EVEN_C)
        acc += _dot_chunks(w, _x_chunks(x_row, c0 + offs_c, num_chunks, EVEN_C, X_FP16, ASM), W_KIND, ASM)
    out = tl.sum(acc, axis=1) * _X_UP * tl.load(scale_ptr + rows)
    if HAS_BIAS:
        out += tl.load(bias_ptr + rows).to(tl.float32)
    _store_outputs(out_ptr + m * stride_om, out, tl.program_id(1), N, BLOCK_N, SWIGLU)


@triton.jit
def _chunk_words(w_row, chunks, num_chunks, EVEN_C: tl.constexpr):
    """The 4 int32 of each chunk of each row: [BLOCK_N, BLOCK_C, 4]; chunks past the end read the last."""
    if not EVEN_C:
        chunks = tl.minimum(chunks, num_chunks - 1)
    return tl.load(w_row + chunks[None, :, None] * 4)


@triton.jit
def _x_chunks(x_row, chunks, num_chunks, EVEN_C: tl.constexpr, X_FP16: tl.constexpr, ASM: tl.constexpr):
    """x's inputs of each chunk, times 2^-_X_SHIFT in fp16, as 4 int64 of 4 inputs: [BLOCK_C, 4]
    (zeros past the end)."""
    ptrs = x_row + chunks[:, None] * 4
    if EVEN_C:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=(chunks < num_chunks)[:, None], other=0)
    if not ASM:
        return _x4_emulated(x, X_FP16)
    if X_FP16:
        return tl.inline_asm_elementwise(_X4_FP16, "=l,l", [x], dtype=tl.int64, is_pure=True, pack=1)
    return tl.inline_asm_elementwise(_X4_BF16, "=l,l", [x], dtype=tl.int64, is_pure=True, pack=1)


@triton.jit
def _dot_chunks(w, x, W_KIND: tl.constexpr, ASM: tl.constexpr):
    """[BLOCK_N, BLOCK_C] fp32: each row's chunk (w [BLOCK_N, BLOCK_C, 4] int32) against x's
    ([BLOCK_C, 4] int64 of scaled fp16)."""
    w02, w13 = tl.split(tl.reshape(w, (w.shape[0], w.shape[1], 2, 2)))
    w0, w2 = tl.split(w02)
    w1, w3 = tl.split(w13)
    x02, x13 = tl.split(tl.reshape(x, (x.shape[0], 2, 2)))
    x0, x2 = tl.split(x02)
    x1, x3 = tl.split(x13)
    x0, x1, x2, x3 = x0[None, :], x1[None, :], x2[None, :], x3[None, :]
    if ASM and W_KIND == 1:
        return tl.inline_asm_elementwise(
            _DOT16_FP8, "=f,r,r,r,r,l,l,l,l", [w0, w1, w2, w3, x0, x1, x2, x3], dtype=tl.float32, is_pure=True, pack=1
        )
    if ASM:
        return tl.inline_asm_elementwise(
            _DOT16_INT8, "=f,r,r,r,r,l,l,l,l", [w0, w1, w2, w3, x0, x1, x2, x3], dtype=tl.float32, is_pure=True, pack=1
        )
    # the PTX's steps in Triton (the interpreter runs no PTX), each f16x2 FMA as two fp32 FMAs
    # rounded to fp16
    s_even = tl.zeros(w0.shape, dtype=tl.float32)
    s_odd = tl.zeros(w0.shape, dtype=tl.float32)
    s_even, s_odd = _pair_fma(w0, x0, 0, s_even, s_odd, W_KIND)
    s_even, s_odd = _pair_fma(w0, x0, 1, s_even, s_odd, W_KIND)
    s_even, s_odd = _pair_fma(w1, x1, 0, s_even, s_odd, W_KIND)
    s_even, s_odd = _pair_fma(w1, x1, 1, s_even, s_odd, W_KIND)
    s_even, s_odd = _pair_fma(w2, x2, 0, s_even, s_odd, W_KIND)
    s_even, s_odd = _pair_fma(w2, x2, 1, s_even, s_odd, W_KIND)
    s_even, s_odd = _pair_fma(w3, x3, 0, s_even, s_odd, W_KIND)
    s_even, s_odd = _pair_fma(w3, x3, 1, s_even, s_odd, W_KIND)
    return s_even + s_odd


@triton.jit
def _pair_fma(w_word, x_word, H: tl.constexpr, s_even, s_odd, W_KIND: tl.constexpr):
    """Bytes 2 H and 2 H + 1 of w_word times x_word's fp16 inputs 2 H and 2 H + 1, into the sums."""
    s_even = _f16(tl.fma(_byte(w_word, 2 * H, W_KIND), _half(x_word, 2 * H), s_even))
    s_odd = _f16(tl.fma(_byte(w_word, 2 * H + 1, W_KIND), _half(x_word, 2 * H + 1), s_odd))
    return s_even, s_odd


@triton.jit
def _byte(word, B: tl.constexpr, W_KIND: tl.constexpr):
    """Byte B of an int32 as the weight it holds (fp8 e4m3 or int8), fp32."""
    return _widen_byte(((word >> (8 * B)) & 0xFF).to(tl.uint8), W_KIND)


@triton.jit
def _half(word, H: tl.constexpr):
    """16-bit lane H of an int64 as fp16, widened to fp32."""
    return ((word >> (16 * H)) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _f16(value):
    return value.to(tl.float16).to(tl.float32)


@triton.jit
def _x4_emulated(x, X_FP16: tl.constexpr):
    """`_X4_BF16` / `_X4_FP16` in Triton: each 16-bit lane widened, times 2^-_X_SHIFT, rounded to fp16."""
    out = tl.zeros(x.shape, dtype=tl.int64)
    for h in tl.static_range(4):
        bits = (x >> (16 * h)) & 0xFFFF
        if X_FP16:
            value = bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        else:
            value = (bits << 16).to(tl.int32).to(tl.float32, bitcast=True)
        half = (value * _X_DOWN).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int64) & 0xFFFF
        out |= half << (16 * h)
    return out


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
def _added_tile(x_row, residual_ptr, residual_out_ptr, norm_weight_ptr, k0, K, BLOCK_K: tl.constexpr, is_writer):
    """Inputs [k0, k0 + BLOCK_K) of h = x + residual, rounded to x's dtype as the norm kernel's add
    (stored to residual_out by the writer), times the norm's weight, as a [1, BLOCK_K] fp32 row; and
    h's squares [BLOCK_K]."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = offs_k < K
    x = tl.load(x_row + offs_k, mask=mask, other=0.0)
    h = (x.to(tl.float32) + tl.load(residual_ptr + offs_k, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
    tl.store(residual_out_ptr + offs_k, h, mask=offs_k < tl.where(is_writer, K, 0))
    h = h.to(tl.float32)
    return (h * tl.load(norm_weight_ptr + offs_k, mask=mask, other=0.0).to(tl.float32))[None, :], h * h


@triton.jit
def _weight_tile(w_ptr, offs_n, mask_n, k0, K, stride_wn, W_KIND: tl.constexpr, BLOCK_K: tl.constexpr):
    """Weight columns [k0, k0 + BLOCK_K) of rows offs_n, as fp32 (unscaled for fp8/int8)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    w_mask = mask_n[:, None] & (offs_k < K)[None, :]
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :]
    if W_KIND:  # fp8 e4m3 / int8, read as bytes (0 is 0.0)
        return _widen_byte(tl.load(w_ptrs, mask=w_mask, other=0), W_KIND)
    return tl.load(w_ptrs, mask=w_mask, other=0.0).to(tl.float32)


@triton.jit
def _widen_byte(b, W_KIND: tl.constexpr):
    """uint8 weight bytes as fp32: fp8 e4m3 (W_KIND 1) or int8 (2), the latter without an int->float
    conversion: the byte, biased to 0..255 (xor 0x80), put in the mantissa of 2^23, minus 2^23 + 128,
    is its value exactly."""
    if W_KIND == 1:
        return b.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    bits = b.to(tl.int32) & 0xFF
    return ((bits ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    tiles: tuple[int, int, int, int] | None = None,
    swiglu: bool = False,
) -> torch.Tensor:
    """x [M, K] @ (weight * scale[:, None])^T + bias -> [M, N] in x.dtype, for M <= GEMV_MAX_ROWS
    (ELEMENTWISE_MAX_ROWS for fp8/int8 weights).

    weight: [N, K], contiguous in K; fp8/int8 weights need `scale` (fp32 [N]); bias: [N], any float dtype.
    tiles: (BLOCK_N, BLOCK_K, num_warps, num_stages) of the kernel taken, instead of `gemv_tile_sizes`
    (one row: `bench/gemv.py --sweep`) or `dot_tile_sizes` (BLOCK_N at least 16).
    swiglu: the weight's rows are [gate | up] (N even); returns silu(gate) * up, [M, N / 2], equal
    bit for bit to `silu_and_mul` of the projection. The one-row kernels apply it in their epilogue
    (no SwiGLU launch in the step); the tensor-core kernel's rows take `silu_and_mul` after it."""
    w_kind = _check_gemv_inputs(x, weight, scale, bias, swiglu)
    (m, k), n = x.shape, weight.shape[0]
    takes_dot = w_kind == 0 and m >= DOT_MIN_ROWS and weight.dtype == x.dtype
    if takes_dot and swiglu:
        return silu_and_mul(gemv(x, weight, scale, bias, tiles=tiles))
    n_out = n // 2 if swiglu else n
    out = torch.empty((m, n_out), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    pdl = use_pdl(x, m)
    if takes_dot:
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
    if takes_8bit_kernel(weight.dtype, x.dtype, n, k):
        block_n, block_k, num_warps, num_stages = tiles or gemv_8bit_tile_sizes(n, k, x.device)
        block_n = max(block_n, 2) if swiglu else block_n  # a (gate, up) pair at least
        if block_k % 16:
            raise ValueError(f"BLOCK_K {block_k} of 8-bit weights must be a multiple of 16 bytes")
        if x.stride(0) % 4 or x.storage_offset() % 4:  # x is read as int64, 4 inputs each
            x = x.clone(memory_format=torch.contiguous_format)
        num_chunks = k // 16
        _gemv_8bit_kernel[(m, triton.cdiv(n, block_n))](
            x.view(torch.int64),
            weight.view(torch.int32),
            scale,
            bias if bias is not None else x,
            out,
            n_out,
            num_chunks,
            x.stride(0) // 4,
            weight.stride(0) // 4,
            out.stride(0),
            W_KIND=w_kind,
            X_FP16=x.dtype == torch.float16,
            HAS_BIAS=bias is not None,
            BLOCK_N=block_n,
            BLOCK_C=block_k // 16,
            EVEN_C=num_chunks % (block_k // 16) == 0,
            SWIGLU=swiglu,
            ASM=x.is_cuda,
            NUM_STAGES=num_stages,
            PDL=pdl,
            num_warps=num_warps,
            num_stages=num_stages,
            launch_pdl=pdl,
        )
        return out
    _launch_one_row_kernel(x, weight, scale, bias, out, w_kind, swiglu, tiles, pdl)
    return out


def gemv_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    tiles: tuple[int, int, int, int] | None = None,
    swiglu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`fused_add_rms_norm(x, residual, norm_weight, eps)` then `gemv` of its normed row, in one
    launch: one row x [1, K], a float weight. Returns (the projection, x + residual); the sum is a
    new tensor, not written into residual (the launch's other programs still read it). The norm is
    not rounded to x's dtype before the projection, as the two kernels round it: the result is as
    close to the exact one, not bit-equal to theirs."""
    if x.dim() != 2 or x.shape[0] != 1 or weight.dtype in _W_KINDS:
        raise ValueError(f"gemv_add_rms_norm takes one row and a float weight; got x {tuple(x.shape)}, a {weight.dtype} weight")
    _check_gemv_inputs(x, weight, None, bias, swiglu)
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device or residual.stride(1) != 1:
        raise ValueError(
            f"residual must match x ({x.dtype} {tuple(x.shape)} on {x.device}), got {residual.dtype} {tuple(residual.shape)}"
        )
    if norm_weight.shape != (x.shape[1],) or norm_weight.dtype not in _FLOAT_DTYPES or not norm_weight.is_contiguous():
        raise ValueError(
            f"norm_weight must be a contiguous float vector of shape ({x.shape[1]},); got {tuple(norm_weight.shape)}"
        )
    n = weight.shape[0]
    out = torch.empty((1, n // 2 if swiglu else n), dtype=x.dtype, device=x.device)
    residual_out = torch.empty_like(x)
    norm = (residual, residual_out, norm_weight, eps)
    _launch_one_row_kernel(x, weight, None, bias, out, 0, swiglu, tiles, use_pdl(x, 1), norm)
    return out, residual_out


def _check_gemv_inputs(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None, swiglu: bool
) -> int:
    """Raises on inputs `gemv` does not take; returns the weight's kind (0 float, 1 fp8, 2 int8)."""
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
    if swiglu and n % 2:
        raise ValueError(f"swiglu needs [gate | up] weight rows, an even count; got {n}")
    return w_kind


def _launch_one_row_kernel(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    w_kind: int,
    swiglu: bool,
    tiles: tuple[int, int, int, int] | None,
    pdl: bool,
    norm: tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None = None,
) -> None:
    """`_gemv_kernel` over x's rows; `norm`: (residual, residual_out, norm weight, eps) of NORM."""
    n, k = weight.shape
    block_n, block_k, num_warps, num_stages = tiles or gemv_tile_sizes(n, k, weight.element_size())
    block_n = max(block_n, 2) if swiglu else block_n
    residual, residual_out, norm_weight, eps = norm or (x, x, x, 0.0)
    _gemv_kernel[(x.shape[0], triton.cdiv(n, block_n))](
        x,
        weight.view(torch.uint8) if w_kind else weight,
        scale if scale is not None else x,
        bias if bias is not None else x,
        out,
        residual,
        residual_out,
        norm_weight,
        out.shape[1],
        k,
        eps,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        W_KIND=w_kind,
        HAS_SCALE=scale is not None,
        HAS_BIAS=bias is not None,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        SWIGLU=swiglu,
        NORM=norm is not None,
        NUM_STAGES=num_stages,
        PDL=pdl,
        num_warps=num_warps,
        num_stages=num_stages,
        launch_pdl=pdl,
    )


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


def takes_8bit_kernel(weight_dtype: torch.dtype, x_dtype: torch.dtype, n: int, k: int) -> bool:
    """Whether `gemv` runs a one-row launch on `_gemv_8bit_kernel`: 8-bit weights, 16-bit x, K a
    multiple of 16; but fp8 at q/k/v widths keeps the fp32 kernel's cp.async pipeline (70.9% of
    copy bandwidth against 67.3% in chains; the Llama-3-8B fp8 step 1.3% faster with it,
    bench/runs/2026-12-04-h200-17/)."""
    w_kind = _W_KINDS.get(weight_dtype, 0)
    return w_kind != 0 and x_dtype != torch.float32 and k % 16 == 0 and not (w_kind == 1 and 4096 < n <= 8192)


def gemv_8bit_tile_sizes(n: int, k: int, device: torch.device | None = None) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K in bytes, num_warps, num_stages) of `_gemv_8bit_kernel`, from a sweep on an
    H200 of 19 tiles in chains of one-row launches of one shape (Llama-3-8B's and Qwen2.5-0.5B's
    projections, fp8 and int8; bench/runs/2026-12-04-h200-17/): few rows a program and many
    programs, as the fp32 kernel's tiles take, rather than many rows a thread.
    - Wide outputs (gate/up): 4 rows of 1024 bytes, 2 warps: fp8 91.7%, int8 88.7% of copy
      bandwidth (fp32 kernel 88.0 / 80.3%); Qwen2.5-0.5B's 42.1% (38.6%).
    - A small model's down (fewer than 2048 outputs of more than 2048 inputs): 2 rows of 2048 bytes,
      8 warps: 31.1% (28.7%).
    - Others: 2 rows of 1024 bytes, 4 warps: o fp8 70.6% (64.9%), down 88.7% (85.2%); int8 o 68.3%
      (59.8%), q/k/v 66.4% (62.0%), down 86.8% (76.8%). fp8 q/k/v read 67.3% against the fp32
      kernel's 70.9% (its cp.async pipeline), so `gemv` keeps that kernel for them.
    No stage count above 1 helped any shape. On a CUDA device named in LARGE_8BIT_TILES, projections
    of at least 4096 outputs and 4096 inputs take that GPU's own tile."""
    tile = by_gpu_name(LARGE_8BIT_TILES, device) if n >= 4096 and k >= 4096 else None
    if tile is not None:
        return tile
    if n > 8192:
        return 4, 1024, 2, 1
    if n < 2048 and k > 2048:
        return 2, 2048, 8, 1
    return 2, 1024, 4, 1


# The 8-bit GEMV's tile (BLOCK_N, BLOCK_K bytes, num_warps, num_stages) for projections of at least
# 4096 outputs and 4096 inputs, on GPUs where it beats the H200's rule, by a part of the device's
# name; measured at one row. H100 80GB HBM3: Llama-3-8B's batch-1 decode step int8 3.260 -> 3.196-3.201 ms, fp8 3.225 ->
# 3.190-3.192 ms; with the tile on q/k/v and gate/up only (o_proj and down on the rule, where the
# sweep ranks fp8 at 83% of copy against 79%), 3.223 and 3.215 ms: the step, not the one-shape
# sweep, decides (bench/runs/2026-12-06-h100-31/loan3).
LARGE_8BIT_TILES = {"H100": (4, 2048, 4, 1)}


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
