"""A decode step's rotary + KV store + split-KV attention in one launch (`rotary_store_kv` then
`paged_decode_attention`, which take three): every program rotates its GQA group's q in registers;
the split that holds the new token rotates its k and stores k and v at its slot; the last split of a
(sequence, KV head) to finish merges the splits' partial results (an atomic counter per pair, reset
by that program).

At PDL launches over 16-bit caches (EARLY_TILE), each split reads its first K/V tile before the PDL
wait and takes the new token's k and v from registers, and splits past a short context end at once.
Elsewhere the kernel is the plain one: with no wait to overlap, the early tile only holds registers,
and on fp8 caches every such rewrite measured slower (bench/RESULTS.md, fourteenth and fifteenth
sessions)."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from pdserve.kernels.kv_quant import FP8_DTYPE, kv_compute_dtype, quantize_kv, widen_kv
from pdserve.kernels.kv_store import check_kv_store_inputs
from pdserve.kernels.paged_decode_attention import (
    DecodeLaunch,
    attend_range,
    attend_tile,
    check_paged_inputs,
    launch_for,
    normalize_split,
    scale_decode_q,
    start_softmax,
    store_split_result,
)
from pdserve.kernels.pdl import use_pdl, wait_for_previous_kernel
from pdserve.kernels.split_counters import is_last_split, split_counters


@triton.jit
def _rotate_pair(x1, x2, cos, sin):
    """(x1, x2) turned by the angle, in fp32. The fused multiply-adds are written out, as the compiled
    `rotary_store_kv` has them (FP fusion on: products with x1 fused, with x2 rounded), so that the
    k stored here is bit-equal to its; left to LLVM, a [1, N] row contracts the other way round."""
    return tl.fma(x1, cos, -(x2 * sin)), tl.fma(x1, sin, x2 * cos)


@triton.jit
def _merge_group(
    partial_out_ptr,
    partial_lse_ptr,
    out_row,
    stride_out_head,
    first_row,
    num_splits,
    num_active_splits,
    GROUP_SIZE: tl.constexpr,
    GROUP_P2: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    SPLITS_CHUNK: tl.constexpr,
):
    """All GROUP_SIZE heads of one (seq, kv_head) at once from their first num_active_splits splits'
    partials (head g, split s at row first_row + g * num_splits + s), SPLITS_CHUNK splits at a time
    (~32 fp32 per thread). Loads are .cg: the other programs' stores are in L2, never in this SM's L1."""
    offs_g = tl.arange(0, GROUP_P2)[:, None, None]
    offs_s = tl.arange(0, SPLITS_CHUNK)[None, :, None]
    offs_d = tl.arange(0, HEAD_DIM_PAD)[None, None, :]
    is_head = offs_g < GROUP_SIZE
    rows = first_row + offs_g * num_splits + offs_s  # [GROUP_P2, SPLITS_CHUNK, 1]
    lse_max = tl.full([GROUP_P2, 1, 1], float("-inf"), tl.float32)
    for c in tl.static_range(SPLITS_PAD // SPLITS_CHUNK):
        is_split = is_head & (c * SPLITS_CHUNK + offs_s < num_active_splits)
        lse = tl.load(partial_lse_ptr + rows + c * SPLITS_CHUNK, mask=is_split, other=float("-inf"), cache_modifier=".cg")
        lse_max = tl.maximum(lse_max, tl.max(lse, 1, keep_dims=True))
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # all splits empty: context_len 0
    acc = tl.zeros([GROUP_P2, 1, HEAD_DIM_PAD], tl.float32)
    total = tl.zeros([GROUP_P2, 1, 1], tl.float32)
    for c in tl.static_range(SPLITS_PAD // SPLITS_CHUNK):
        is_split = is_head & (c * SPLITS_CHUNK + offs_s < num_active_splits)
        lse = tl.load(partial_lse_ptr + rows + c * SPLITS_CHUNK, mask=is_split, other=float("-inf"), cache_modifier=".cg")
        weights = tl.exp2(lse - lse_max)  # 0 for empty splits and those past num_active_splits
        mask = is_split & (offs_d < HEAD_DIM)
        ptrs = partial_out_ptr + (rows + c * SPLITS_CHUNK) * HEAD_DIM + offs_d
        partial = tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
        acc += tl.sum(partial * weights, 1, keep_dims=True)
        total += tl.sum(weights, 1, keep_dims=True)
    result = acc / tl.where(total > 0, total, 1.0)
    out_ptrs = out_row + offs_g * stride_out_head + offs_d
    tl.store(out_ptrs, result.to(out_row.dtype.element_ty), mask=is_head & (offs_d < HEAD_DIM))


@triton.jit
def _rotated_q(
    q_ptr, cos_sin_row, seq, kv_head, stride_q_seq, stride_q_head, GROUP_SIZE: tl.constexpr,
    GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
):  # fmt: skip
    """The GQA group's q [GROUP_PAD, HEAD_DIM_PAD], rotated in its load layout: column d pairs with
    d +- half (offs_pair); cos and sin are loaded broadcast over the heads in that layout, which needs
    no layout conversion."""
    half = HEAD_DIM // 2
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    heads = kv_head * GROUP_SIZE + offs_g
    head_mask = (offs_g < GROUP_SIZE)[:, None] & (offs_d < HEAD_DIM)[None, :]
    offs_pair = (offs_d % half)[None, :]
    q_ptrs = q_ptr + seq.to(tl.int64) * stride_q_seq + heads[:, None] * stride_q_head + offs_pair
    cs_ptrs = cos_sin_row + offs_pair + offs_g[:, None] * 0
    q1, q2 = _rotate_pair(
        tl.load(q_ptrs, mask=head_mask, other=0.0).to(tl.float32),
        tl.load(q_ptrs + half, mask=head_mask, other=0.0).to(tl.float32),
        tl.load(cs_ptrs, mask=head_mask, other=0.0),
        tl.load(cs_ptrs + half, mask=head_mask, other=0.0),
    )
    return tl.where((offs_d < half)[None, :], q1, q2).to(q_ptr.dtype.element_ty)


@triton.jit
def _store_partial_and_merge(
    acc, m_i, l_i, out_ptr, partial_out_ptr, partial_lse_ptr, counters_ptr, seq, kv_head, split, num_splits,
    num_active_splits, stride_out_seq, stride_out_head, GROUP_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr,
    GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
    SPLITS_CHUNK: tl.constexpr, MAY_BE_ALONE: tl.constexpr,
):  # fmt: skip
    """A split's partial result stored; the last of the (seq, kv_head)'s num_active_splits splits to
    get here merges them. MAY_BE_ALONE (splits past a short context ended early): the one active
    split of a short context writes the output itself."""
    if MAY_BE_ALONE:
        if num_active_splits == 1:
            store_split_result(
                acc, m_i, l_i, out_ptr, partial_out_ptr, partial_lse_ptr, seq, kv_head, split, num_splits,
                stride_out_seq, stride_out_head, GROUP_SIZE, GROUP_PAD, HEAD_DIM, HEAD_DIM_PAD, True,
            )  # fmt: skip
            return
    store_split_result(
        acc, m_i, l_i, out_ptr, partial_out_ptr, partial_lse_ptr, seq, kv_head, split, num_splits,
        stride_out_seq, stride_out_head, GROUP_SIZE, GROUP_PAD, HEAD_DIM, HEAD_DIM_PAD, False,
    )  # fmt: skip
    group_first_row = (seq.to(tl.int64) * tl.num_programs(0) + kv_head) * GROUP_SIZE * num_splits
    counter = counters_ptr + seq * tl.num_programs(0) + kv_head
    if is_last_split(counter, num_active_splits):  # the last active program of this (seq, kv_head) merges
        out_row = out_ptr + seq.to(tl.int64) * stride_out_seq + kv_head * GROUP_SIZE * stride_out_head
        _merge_group(
            partial_out_ptr,
            partial_lse_ptr,
            out_row,
            stride_out_head,
            group_first_row,
            num_splits,
            num_active_splits,
            GROUP_SIZE,
            GROUP_P2,
            HEAD_DIM,
            HEAD_DIM_PAD,
            SPLITS_PAD,
            SPLITS_CHUNK,
        )


@triton.jit
def _load_first_tile(
    k_cache_ptr, v_cache_ptr, table_row, head_offsets, is_dim, start, end, new_position, stride_cache_block,
    stride_cache_token, BLOCK_SIZE: tl.constexpr, TILE_TOKENS: tl.constexpr,
):  # fmt: skip
    """A split's first tile of K and V [TILE_TOKENS, HEAD_DIM_PAD], as stored (fp8 caches, where a
    test forces it: the codes, half the registers of their fp16 while they wait), with zeros at the
    new token's position and past `end`; and the tile's positions."""
    positions = start + tl.arange(0, TILE_TOKENS)
    is_token = positions < end
    block_ids = tl.load(table_row + positions // BLOCK_SIZE, mask=is_token, other=0).to(tl.int64)
    token_offsets = block_ids * stride_cache_block + (positions % BLOCK_SIZE) * stride_cache_token
    offsets = token_offsets[:, None] + head_offsets[None, :]
    mask = (is_token & (positions != new_position))[:, None] & is_dim[None, :]
    return tl.load(k_cache_ptr + offsets, mask=mask, other=0.0), tl.load(v_cache_ptr + offsets, mask=mask, other=0.0), positions


@triton.jit
def _rotary_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    positions_ptr,
    cos_sin_ptr,
    slot_mapping_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    out_ptr,
    partial_out_ptr,
    partial_lse_ptr,
    counters_ptr,
    scale_log2e,
    num_splits,
    k_scale,
    k_inv_scale,
    v_scale,
    v_inv_scale,
    stride_q_seq,
    stride_q_head,
    stride_k_seq,
    stride_k_head,
    stride_v_seq,
    stride_v_head,
    stride_cos_sin,
    stride_cache_block,
    stride_cache_token,
    stride_cache_head,
    stride_table_seq,
    stride_out_seq,
    stride_out_head,
    GROUP_SIZE: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    GROUP_P2: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    HALF_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_TOKENS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    SPLITS_CHUNK: tl.constexpr,
    IS_SINGLE_SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    IS_FP8: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    PDL: tl.constexpr,
    EARLY_TILE: tl.constexpr,
):
    kv_head = tl.program_id(0)
    seq = tl.program_id(1)
    split = tl.program_id(2)
    # the step's inputs (lengths, positions, slots), the cos/sin table and, at EARLY_TILE, the block
    # table and the cache below the new token: no kernel of the step writes them, so they are read
    # before waiting for the kernel that wrote q, k and v
    context_len = tl.load(context_lens_ptr + seq)
    cos_sin_row = cos_sin_ptr + tl.load(positions_ptr + seq) * stride_cos_sin
    tokens_per_split = tl.cdiv(tl.cdiv(context_len, num_splits), TILE_TOKENS) * TILE_TOKENS
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, context_len)
    half = HEAD_DIM // 2
    # The new token: the split holding position context_len - 1 stores its k (rotated) and v, as
    # rotary_store_kv does. Every program loads them, one stores: all loads come before the stores,
    # which the compiler may not hoist a load above (the pointers may alias).
    if EARLY_TILE:
        # The splits that hold tokens (split 0 alone for a context_len-0 row): the launch fixes the
        # split count from shapes, a short context leaves the last ones empty; they end here, without
        # the PDL wait (PDL takes a program's exit as its trigger; split 0 always waits).
        num_active_splits = tl.where(context_len > 0, tl.cdiv(context_len, tl.maximum(tokens_per_split, 1)), 1)
        if split >= num_active_splits:
            return
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        is_dim = offs_d < HEAD_DIM
        offs_pair = offs_d % half  # k rotated on whole rows, as q is: the tile's layout
        cos = tl.load(cos_sin_row + offs_pair, mask=is_dim, other=0.0)
        sin = tl.load(cos_sin_row + half + offs_pair, mask=is_dim, other=0.0)
        slot = tl.load(slot_mapping_ptr + seq)
        new_position = tl.where(slot >= 0, context_len - 1, -1)  # the new token's position, if stored here
        head_offsets = kv_head * stride_cache_head + offs_d
        table_row = block_tables_ptr + seq.to(tl.int64) * stride_table_seq
        first_k, first_v, first_positions = _load_first_tile(
            k_cache_ptr, v_cache_ptr, table_row, head_offsets, is_dim, start, end, new_position, stride_cache_block,
            stride_cache_token, BLOCK_SIZE, TILE_TOKENS,
        )  # fmt: skip
        wait_for_previous_kernel(PDL)

        q = _rotated_q(
            q_ptr, cos_sin_row, seq, kv_head, stride_q_seq, stride_q_head, GROUP_SIZE, GROUP_PAD, HEAD_DIM, HEAD_DIM_PAD
        )
        k_row = k_ptr + seq.to(tl.int64) * stride_k_seq + kv_head * stride_k_head
        k1, k2 = _rotate_pair(
            tl.load(k_row + offs_pair, mask=is_dim, other=0.0).to(tl.float32),
            tl.load(k_row + half + offs_pair, mask=is_dim, other=0.0).to(tl.float32),
            cos,
            sin,
        )
        v_new = tl.load(v_ptr + seq.to(tl.int64) * stride_v_seq + kv_head * stride_v_head + offs_d, mask=is_dim, other=0.0)
        k_code = quantize_kv(tl.where(offs_d < half, k1, k2).to(k_ptr.dtype.element_ty), k_inv_scale, k_cache_ptr, IS_FP8)
        v_code = quantize_kv(v_new, v_inv_scale, v_cache_ptr, IS_FP8)
        is_stored = (start <= new_position) & (new_position < end)
        slot_offset = (slot // BLOCK_SIZE) * stride_cache_block + (slot % BLOCK_SIZE) * stride_cache_token
        store_mask = offs_d < tl.where(is_stored, HEAD_DIM, 0)
        tl.store(k_cache_ptr + slot_offset + head_offsets, k_code, mask=store_mask)
        tl.store(v_cache_ptr + slot_offset + head_offsets, v_code, mask=store_mask)
        tl.debug_barrier()  # the stores before any thread's (async) load of the slot in a later tile

        q, qk_scale = scale_decode_q(q, scale_log2e, k_scale, IS_FP8, COMPUTE_DTYPE)
        acc, m_i, l_i = start_softmax(GROUP_PAD, HEAD_DIM_PAD)
        if start < end:  # the first tile, the new token patched in from registers, as stored
            is_new = (first_positions == new_position)[:, None]
            k = widen_kv(tl.where(is_new, k_code[None, :], first_k), COMPUTE_DTYPE, IS_FP8)
            v = widen_kv(tl.where(is_new, v_code[None, :], first_v), COMPUTE_DTYPE, IS_FP8)
            acc, m_i, l_i = attend_tile(q, qk_scale, acc, m_i, l_i, k, v, first_positions < end, DOT_PRECISION)
        loop_start = start + TILE_TOKENS
    else:
        num_active_splits = num_splits
        # the loop reads the stored slot back (the barrier orders the stores before the other
        # threads' async copies)
        offs_r = tl.arange(0, HALF_PAD)
        is_half = offs_r < half
        cos = tl.load(cos_sin_row + offs_r, mask=is_half, other=0.0)
        sin = tl.load(cos_sin_row + half + offs_r, mask=is_half, other=0.0)
        slot = tl.load(slot_mapping_ptr + seq)
        wait_for_previous_kernel(PDL)
        k_row = k_ptr + seq.to(tl.int64) * stride_k_seq + kv_head * stride_k_head + offs_r
        v_row = v_ptr + seq.to(tl.int64) * stride_v_seq + kv_head * stride_v_head + offs_r
        k1 = tl.load(k_row, mask=is_half, other=0.0).to(tl.float32)
        k2 = tl.load(k_row + half, mask=is_half, other=0.0).to(tl.float32)
        v1 = tl.load(v_row, mask=is_half, other=0.0)
        v2 = tl.load(v_row + half, mask=is_half, other=0.0)
        q = _rotated_q(
            q_ptr, cos_sin_row, seq, kv_head, stride_q_seq, stride_q_head, GROUP_SIZE, GROUP_PAD, HEAD_DIM, HEAD_DIM_PAD
        )

        k1, k2 = _rotate_pair(k1, k2, cos, sin)
        is_stored = (start <= context_len - 1) & (context_len - 1 < end) & (slot >= 0)
        slot_offset = (slot // BLOCK_SIZE) * stride_cache_block + (slot % BLOCK_SIZE) * stride_cache_token
        k_slot = k_cache_ptr + slot_offset + kv_head * stride_cache_head + offs_r
        v_slot = v_cache_ptr + slot_offset + kv_head * stride_cache_head + offs_r
        store_mask = offs_r < tl.where(is_stored, half, 0)
        k_dtype = k_ptr.dtype.element_ty
        tl.store(k_slot, quantize_kv(k1.to(k_dtype), k_inv_scale, k_cache_ptr, IS_FP8), mask=store_mask)
        tl.store(k_slot + half, quantize_kv(k2.to(k_dtype), k_inv_scale, k_cache_ptr, IS_FP8), mask=store_mask)
        tl.store(v_slot, quantize_kv(v1, v_inv_scale, v_cache_ptr, IS_FP8), mask=store_mask)
        tl.store(v_slot + half, quantize_kv(v2, v_inv_scale, v_cache_ptr, IS_FP8), mask=store_mask)
        tl.debug_barrier()

        table_row = block_tables_ptr + seq.to(tl.int64) * stride_table_seq
        q, qk_scale = scale_decode_q(q, scale_log2e, k_scale, IS_FP8, COMPUTE_DTYPE)
        acc, m_i, l_i = start_softmax(GROUP_PAD, HEAD_DIM_PAD)
        loop_start = start

    acc, m_i, l_i = attend_range(
        q, qk_scale, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table_row, kv_head * stride_cache_head, loop_start,
        end, stride_cache_block, stride_cache_token, HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, TILE_TOKENS,
        DOT_PRECISION, IS_FP8, COMPUTE_DTYPE,
    )  # fmt: skip
    acc = normalize_split(acc, l_i, v_scale, IS_FP8)
    if IS_SINGLE_SPLIT:  # constexpr: no counter (the wrapper passes none) and no merge compiled
        store_split_result(
            acc, m_i, l_i, out_ptr, partial_out_ptr, partial_lse_ptr, seq, kv_head, split, num_splits,
            stride_out_seq, stride_out_head, GROUP_SIZE, GROUP_PAD, HEAD_DIM, HEAD_DIM_PAD, True,
        )  # fmt: skip
    else:
        _store_partial_and_merge(
            acc, m_i, l_i, out_ptr, partial_out_ptr, partial_lse_ptr, counters_ptr, seq, kv_head, split,
            num_splits, num_active_splits, stride_out_seq, stride_out_head, GROUP_SIZE, GROUP_PAD, GROUP_P2,
            HEAD_DIM, HEAD_DIM_PAD, SPLITS_PAD, SPLITS_CHUNK, EARLY_TILE,
        )  # fmt: skip


def rotary_decode_attention(
    positions: torch.Tensor,  # int64 [num_seqs]
    q: torch.Tensor,  # [num_seqs, num_heads, head_dim], not yet rotated (and left so)
    k: torch.Tensor,  # [num_seqs, num_kv_heads, head_dim], likewise
    v: torch.Tensor,
    cos_sin_cache: torch.Tensor,  # float32 [max_positions, head_dim]: cos | sin
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # int64 [num_seqs]: slot of position context_len - 1; negative: not stored
    block_tables: torch.Tensor,  # int32 [num_seqs, max_num_blocks]
    context_lens: torch.Tensor,  # int32 [num_seqs], the new token included; 0 = padding row
    scale: float,
    out: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    launch: DecodeLaunch | None = None,
    early_tile: bool | None = None,
) -> torch.Tensor:
    """`rotary_store_kv` then `paged_decode_attention` in one launch, the caches left as those leave
    them (q, k and v are not rotated in place). `launch`: explicit launch parameters (tests).
    `early_tile`: whether each split loads its first tile before waiting for the kernel before it;
    by default where the kernel launches with PDL (a wait to overlap; tests force either)."""
    num_seqs, num_heads, head_dim = q.shape
    check_kv_store_inputs(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    vectors = {"context_lens": (context_lens, num_seqs)}
    check_paged_inputs(q, k_cache, v_cache, block_tables, out, num_seqs, vectors, k_scale, v_scale)
    if positions.dtype != torch.int64 or head_dim % 2:
        raise ValueError(f"positions must be int64 and head_dim even, got {positions.dtype} and {head_dim}")
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if launch is None:
        launch = launch_for(q, k_cache, block_tables)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_seqs == 0:
        return out
    group_size = num_heads // num_kv_heads
    num_splits = launch.num_splits
    partial_out = partial_lse = counters = out  # unused with a single split
    if num_splits > 1:
        partial_out = torch.empty((num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        partial_lse = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=q.device)
        counters = split_counters("rotary_decode_attention", q.device, num_seqs * num_kv_heads)
    group_p2 = triton.next_power_of_2(group_size)
    splits_pad = triton.next_power_of_2(num_splits)
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    pdl = use_pdl(q, num_seqs)
    is_fp8 = k_cache.dtype == FP8_DTYPE
    _rotary_split_kernel[(num_kv_heads, num_seqs, num_splits)](
        q, k, v, positions, cos_sin_cache, slot_mapping, k_cache, v_cache, block_tables, context_lens,
        out, partial_out, partial_lse, counters,
        scale * math.log2(math.e), num_splits, k_scale, 1.0 / k_scale, v_scale, 1.0 / v_scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP_SIZE=group_size,
        GROUP_PAD=max(16, group_p2),
        GROUP_P2=group_p2,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad,
        HALF_PAD=triton.next_power_of_2(head_dim // 2),
        BLOCK_SIZE=block_size,
        TILE_TOKENS=launch.tile_tokens,
        SPLITS_PAD=splits_pad,
        SPLITS_CHUNK=min(splits_pad, max(1, 32 // group_p2)),
        IS_SINGLE_SPLIT=num_splits == 1,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        IS_FP8=is_fp8,
        COMPUTE_DTYPE=kv_compute_dtype(q.dtype, k_cache.dtype),
        PDL=pdl,
        EARLY_TILE=pdl and not is_fp8 if early_tile is None else early_tile,
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
        launch_pdl=pdl,
    )  # fmt: skip
    return out
