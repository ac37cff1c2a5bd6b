"""Prefill attention over the paged KV cache: the new tokens of several requests, causal over the
cached prefix and themselves. Flash-attention tiles: one program per (query tile, request, head)
walks the KV tiles of its request through the block table and stops at the causal limit."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pdserve.kernels.kv_quant import FP8_DTYPE, dequantize_kv_ref, load_kv_tile
from pdserve.kernels.paged_decode_attention import check_paged_inputs


@triton.jit
def _attend_tiles(
    acc,
    m_i,
    l_i,
    q,
    q_positions,
    n_begin,
    n_end,
    kv_end,
    k_cache_ptr,
    v_cache_ptr,
    table_row,
    head_offsets,
    qk_scale,
    stride_cache_block,
    stride_cache_token,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    IS_FP8: tl.constexpr,
):
    """Online-softmax update over the keys [n_begin, n_end); IS_MASKED applies the causal mask."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    for n_start in range(n_begin, n_end, BLOCK_N):
        positions = n_start + offs_n
        is_key = positions < kv_end
        block_ids = tl.load(table_row + positions // BLOCK_SIZE, mask=is_key, other=0).to(tl.int64)
        token_offsets = block_ids * stride_cache_block + (positions % BLOCK_SIZE) * stride_cache_token
        kv_offsets = token_offsets[:, None] + head_offsets[None, :]
        kv_mask = is_key[:, None] & (offs_d < HEAD_DIM)[None, :]
        # [BLOCK_N, HEAD_DIM_PAD] in q's dtype (fp8 caches dequantized here)
        k = load_kv_tile(k_cache_ptr, kv_offsets, kv_mask, q.dtype, IS_FP8)
        v = load_kv_tile(v_cache_ptr, kv_offsets, kv_mask, q.dtype, IS_FP8)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        if IS_MASKED:
            is_visible = (positions[None, :] <= q_positions[:, None]) & is_key[None, :]
            scores = tl.where(is_visible, scores, float("-inf"))
        # Each row saw a key in an earlier tile or sees one in this one, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    cu_seqlens_q_ptr,
    context_lens_ptr,
    out_ptr,
    scale_log2e,
    k_scale,
    v_scale,
    stride_q_token,
    stride_q_head,
    stride_cache_block,
    stride_cache_token,
    stride_cache_head,
    stride_table_seq,
    stride_out_token,
    stride_out_head,
    GROUP_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    IS_FP8: tl.constexpr,
):
    # Late query tiles have the most keys: launch them first.
    q_tile = tl.num_programs(0) - 1 - tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    m_start = q_tile * BLOCK_M
    if m_start >= q_len:
        return
    prefix_len = tl.load(context_lens_ptr + seq) - q_len

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row_mask = (offs_m < q_len)[:, None] & (offs_d < HEAD_DIM)[None, :]
    tokens = (q_start + offs_m).to(tl.int64)
    q_offsets = tokens[:, None] * stride_q_token + head * stride_q_head + offs_d[None, :]
    q = tl.load(q_ptr + q_offsets, mask=row_mask, other=0.0)  # [BLOCK_M, HEAD_DIM_PAD]
    q_positions = prefix_len + offs_m

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_table_seq
    head_offsets = (head // GROUP_SIZE) * stride_cache_head + offs_d
    # Keys [0, full_end) are visible to every row of the tile; [full_end, kv_end) need the mask.
    full_end = (prefix_len + m_start + 1) // BLOCK_N * BLOCK_N
    kv_end = prefix_len + tl.minimum(m_start + BLOCK_M, q_len)
    qk_scale = scale_log2e * k_scale if IS_FP8 else scale_log2e  # fp8: K's dequantization folded in
    acc, m_i, l_i = _attend_tiles(
        acc,
        m_i,
        l_i,
        q,
        q_positions,
        0,
        full_end,
        kv_end,
        k_cache_ptr,
        v_cache_ptr,
        table_row,
        head_offsets,
        qk_scale,
        stride_cache_block,
        stride_cache_token,
        HEAD_DIM,
        HEAD_DIM_PAD,
        BLOCK_SIZE,
        BLOCK_N,
        False,
        DOT_PRECISION,
        IS_FP8,
    )
    acc, m_i, l_i = _attend_tiles(
        acc,
        m_i,
        l_i,
        q,
        q_positions,
        full_end,
        kv_end,
        kv_end,
        k_cache_ptr,
        v_cache_ptr,
        table_row,
        head_offsets,
        qk_scale,
        stride_cache_block,
        stride_cache_token,
        HEAD_DIM,
        HEAD_DIM_PAD,
        BLOCK_SIZE,
        BLOCK_N,
        True,
        DOT_PRECISION,
        IS_FP8,
    )
    out = acc / l_i[:, None]
    if IS_FP8:
        out = out * v_scale  # V's dequantization
    out_offsets = tokens[:, None] * stride_out_token + head * stride_out_head + offs_d[None, :]
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=row_mask)


@dataclass(frozen=True)
class PrefillLaunch:
    block_m: int  # query rows per program
    block_n: int  # keys per loop iteration
    num_warps: int
    num_stages: int


def paged_prefill_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # int32 [num_seqs, max_num_blocks]
    cu_seqlens_q: torch.Tensor,  # int32 [num_seqs + 1]
    context_lens: torch.Tensor,  # int32 [num_seqs]; cached prefix + new tokens
    max_seqlen_q: int,  # host int, >= every request's new-token count
    scale: float,
    out: torch.Tensor | None = None,
    k_scale: float = 1.0,  # fp8 caches: value = stored * scale (kv_quant)
    v_scale: float = 1.0,
) -> torch.Tensor:
    num_seqs = block_tables.shape[0] if block_tables.dim() == 2 else -1
    vectors = {"cu_seqlens_q": (cu_seqlens_q, num_seqs + 1), "context_lens": (context_lens, num_seqs)}
    check_paged_inputs(q, k_cache, v_cache, block_tables, out, num_seqs, vectors, k_scale, v_scale)
    launch = choose_launch(q.dtype, q.shape[2], max_seqlen_q, is_cuda=q.is_cuda)
    return launch_prefill(
        launch,
        q,
        k_cache,
        v_cache,
        block_tables,
        cu_seqlens_q,
        context_lens,
        max_seqlen_q,
        scale,
        out,
        k_scale,
        v_scale,
    )


def choose_launch(dtype: torch.dtype, head_dim: int, max_seqlen_q: int, is_cuda: bool) -> PrefillLaunch:
    """Tile shapes checked to fit Hopper (sm_90) shared memory and registers; the interpreter (CPU)
    gets small tiles."""
    if not is_cuda:
        return PrefillLaunch(block_m=16, block_n=16, num_warps=4, num_stages=1)
    if dtype.itemsize > 2:  # fp32 dots run on FMAs (no TF32): small tiles keep register spills low
        return PrefillLaunch(block_m=32, block_n=16, num_warps=4, num_stages=2)
    if triton.next_power_of_2(head_dim) > 128:  # shared memory bounds the tiles
        return PrefillLaunch(block_m=64, block_n=32, num_warps=8, num_stages=2)
    if max_seqlen_q <= 256:  # short prompts: more, smaller programs
        return PrefillLaunch(block_m=64, block_n=64, num_warps=4, num_stages=3)
    return PrefillLaunch(block_m=128, block_n=64, num_warps=8, num_stages=3)


def launch_prefill(
    launch: PrefillLaunch,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    max_seqlen_q: int,
    scale: float,
    out: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Runs the kernel with an explicit tile shape (the tests and the benchmark pick them)."""
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = context_lens.shape[0]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0 or num_seqs == 0 or max_seqlen_q <= 0:
        return out
    grid = (triton.cdiv(max_seqlen_q, launch.block_m), num_seqs, num_heads)
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        block_tables,
        cu_seqlens_q,
        context_lens,
        out,
        scale * math.log2(math.e),
        k_scale,
        v_scale,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP_SIZE=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=block_size,
        BLOCK_M=launch.block_m,
        BLOCK_N=launch.block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        IS_FP8=k_cache.dtype == FP8_DTYPE,
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
    )
    return out


def paged_prefill_attention_ref(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # int32 [num_seqs, max_num_blocks]
    cu_seqlens_q: torch.Tensor,  # int32 [num_seqs + 1]
    context_lens: torch.Tensor,  # int32 [num_seqs]; cached prefix + new tokens
    max_seqlen_q: int,
    scale: float,
    out: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    if out is None:
        out = torch.empty_like(q)
    cu_seqlens = cu_seqlens_q.tolist()
    for seq, context_len in enumerate(context_lens.tolist()):
        start, end = cu_seqlens[seq], cu_seqlens[seq + 1]
        if end - start > context_len:
            raise ValueError(f"request {seq}: {end - start} new tokens but context_len {context_len}")
        if end > start:
            k, v = _gather_kv(k_cache, v_cache, block_tables[seq], context_len)
            # fp8 caches: code * scale, computed in fp32 as the kernel's folded scales are
            compute_dtype = torch.promote_types(q.dtype, torch.float32)
            k, v = dequantize_kv_ref(k, k_scale, compute_dtype), dequantize_kv_ref(v, v_scale, compute_dtype)
            out[start:end] = _causal_attention(q[start:end], k, v, scale)
    return out


def _gather_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, context_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `context_len` K/V rows of one request, [context_len, num_kv_heads, head_dim]."""
    num_blocks = -(-context_len // k_cache.shape[1])
    block_ids = block_table[:num_blocks].long()
    return k_cache[block_ids].flatten(0, 1)[:context_len], v_cache[block_ids].flatten(0, 1)[:context_len]


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [q_len, num_heads, head_dim] are the last q_len positions of k/v [context_len, num_kv_heads, head_dim]."""
    q_len, num_heads, head_dim = q.shape
    context_len, num_kv_heads = k.shape[0], k.shape[1]
    group_size = num_heads // num_kv_heads
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    # Heads first and the group folded into the rows, so every matmul is one batched GEMM per KV head.
    q_rows = q.to(compute_dtype).view(q_len, num_kv_heads, group_size, head_dim).permute(1, 2, 0, 3)
    q_rows = q_rows.reshape(num_kv_heads, group_size * q_len, head_dim) * scale
    k = k.transpose(0, 1).contiguous().to(compute_dtype)  # [num_kv_heads, len, head_dim]
    v = v.transpose(0, 1).contiguous().to(compute_dtype)
    scores = torch.matmul(q_rows, k.transpose(1, 2)).view(num_kv_heads, group_size, q_len, context_len)
    q_positions = torch.arange(context_len - q_len, context_len, device=q.device)
    is_future = torch.arange(context_len, device=q.device)[None, :] > q_positions[:, None]
    scores.masked_fill_(is_future, float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(num_kv_heads, group_size * q_len, context_len)
    out = torch.matmul(probs, v).view(num_kv_heads, group_size, q_len, head_dim)
    return out.permute(2, 0, 1, 3).reshape(q_len, num_heads, head_dim)
