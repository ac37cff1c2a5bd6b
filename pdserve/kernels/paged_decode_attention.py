"""Decode attention over the paged KV cache: one query token per request. Split-KV
(flash-decoding): each program reads one KV head of one request over a range of its context for
all query heads of that GQA group, and a second kernel merges the per-split partial results."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pdserve.kernels.gpus import num_sms, shared_memory_per_sm
from pdserve.kernels.kv_quant import FP8_DTYPE, check_scale, dequantize_kv_ref, kv_compute_dtype, load_kv_tile

_PROGRAMS_PER_SM = 4  # enough resident programs per SM to keep HBM busy
_MIN_TOKENS_PER_SPLIT = 64  # one tile: small batches spread short contexts over more SMs
_MAX_SPLITS = 32
_CPU_SM_COUNT = 4  # TRITON_INTERPRET runs have no SMs; any small number exercises splitting
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    out_ptr,
    partial_out_ptr,
    partial_lse_ptr,
    scale_log2e,
    num_splits,
    k_scale,
    v_scale,
    stride_q_seq,
    stride_q_head,
    stride_cache_block,
    stride_cache_token,
    stride_cache_head,
    stride_table_seq,
    stride_out_seq,
    stride_out_head,
    GROUP_SIZE: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_TOKENS: tl.constexpr,
    IS_SINGLE_SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    IS_FP8: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    # KV heads vary fastest over the launch: programs running together read whole cache blocks.
    kv_head = tl.program_id(0)
    seq = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    # Every split of a request gets an equal, tile-aligned share of that request's context.
    tokens_per_split = tl.cdiv(tl.cdiv(context_len, num_splits), TILE_TOKENS) * TILE_TOKENS
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, context_len)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    heads = kv_head * GROUP_SIZE + offs_g
    head_mask = (offs_g < GROUP_SIZE)[:, None] & (offs_d < HEAD_DIM)[None, :]
    q_offsets = seq.to(tl.int64) * stride_q_seq + heads[:, None] * stride_q_head + offs_d[None, :]
    q = tl.load(q_ptr + q_offsets, mask=head_mask, other=0.0)  # [GROUP_PAD, HEAD_DIM_PAD]
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_table_seq
    q, qk_scale = scale_decode_q(q, scale_log2e, k_scale, IS_FP8, COMPUTE_DTYPE)
    acc, m_i, l_i = start_softmax(GROUP_PAD, HEAD_DIM_PAD)
    acc, m_i, l_i = attend_range(
        q, qk_scale, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table_row, kv_head * stride_cache_head, start, end,
        stride_cache_block, stride_cache_token, HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, TILE_TOKENS, DOT_PRECISION,
        IS_FP8, COMPUTE_DTYPE,
    )  # fmt: skip
    acc = normalize_split(acc, l_i, v_scale, IS_FP8)
    store_split_result(
        acc, m_i, l_i, out_ptr, partial_out_ptr, partial_lse_ptr, seq, kv_head, split, num_splits,
        stride_out_seq, stride_out_head, GROUP_SIZE, GROUP_PAD, HEAD_DIM, HEAD_DIM_PAD, IS_SINGLE_SPLIT,
    )  # fmt: skip


@triton.jit
def scale_decode_q(q, scale_log2e, k_scale, IS_FP8: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """A GQA group's queries [GROUP_PAD, HEAD_DIM_PAD] (rotated, q's dtype) as the tiles take them,
    and the scale of their scores (log2 domain). fp8 caches: K's dequantization folded into the score
    scale; q pre-scaled (clamped to fp16's range, which |q * scale| stays far inside) and cast to the
    compute dtype, fp16 for 16-bit models: e4m3 codes widen to fp16 in one instruction per pair, to
    bf16 only through fp32."""
    if IS_FP8:
        q = tl.minimum(tl.maximum(q.to(tl.float32) * scale_log2e, -65504.0), 65504.0).to(COMPUTE_DTYPE)
        return q, k_scale
    return q, scale_log2e


@triton.jit
def start_softmax(GROUP_PAD: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    """The online softmax before any tile: (acc, running max m_i, running sum l_i), log2 domain."""
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)  # sum of exp2(score - m_i)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    return acc, m_i, l_i


@triton.jit
def attend_tile(q, qk_scale, acc, m_i, l_i, k, v, is_token, DOT_PRECISION: tl.constexpr):
    """One tile of K and V [TILE_TOKENS, HEAD_DIM_PAD] (compute dtype; is_token: its real tokens, at
    least one) folded into the online softmax (acc, running max m_i, running sum l_i)."""
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    scores = tl.where(is_token[None, :], scores, float("-inf"))  # [GROUP_PAD, TILE_TOKENS]
    m_new = tl.maximum(m_i, tl.max(scores, 1))  # finite: the tile holds a token
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def attend_range(
    q,  # from scale_decode_q
    qk_scale,
    acc,  # [GROUP_PAD, HEAD_DIM_PAD] fp32: the online softmax so far (zeros, -inf, zeros before any tile)
    m_i,
    l_i,
    k_cache_ptr,
    v_cache_ptr,
    table_row,  # the sequence's block table row
    head_offset,  # kv_head * stride_cache_head
    start,
    end,
    stride_cache_block,
    stride_cache_token,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_TOKENS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    IS_FP8: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """The group's attention over cache positions [start, end), tile by tile, added to (acc, m_i,
    l_i). Shared by the decode kernels (this file's and `rotary_decode_attention`'s)."""
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_n = tl.arange(0, TILE_TOKENS)
    head_offsets = head_offset + offs_d
    for tile_start in range(start, end, TILE_TOKENS):
        positions = tile_start + offs_n
        is_token = positions < end
        block_ids = tl.load(table_row + positions // BLOCK_SIZE, mask=is_token, other=0).to(tl.int64)
        token_offsets = block_ids * stride_cache_block + (positions % BLOCK_SIZE) * stride_cache_token
        kv_offsets = token_offsets[:, None] + head_offsets[None, :]
        kv_mask = is_token[:, None] & (offs_d < HEAD_DIM)[None, :]
        # [TILE_TOKENS, HEAD_DIM_PAD] in the compute dtype (fp8 caches dequantized here)
        k = load_kv_tile(k_cache_ptr, kv_offsets, kv_mask, COMPUTE_DTYPE, IS_FP8)
        v = load_kv_tile(v_cache_ptr, kv_offsets, kv_mask, COMPUTE_DTYPE, IS_FP8)
        acc, m_i, l_i = attend_tile(q, qk_scale, acc, m_i, l_i, k, v, is_token, DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def normalize_split(acc, l_i, v_scale, IS_FP8: tl.constexpr):
    """A split's output: acc over its softmax sum, V dequantized (fp8: every split alike, so the
    merge is unchanged). An empty split (or a context_len-0 row), l_i == 0 and acc == 0, gives zeros."""
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if IS_FP8:
        acc = acc * v_scale
    return acc


@triton.jit
def store_split_result(
    acc,
    m_i,
    l_i,
    out_ptr,
    partial_out_ptr,
    partial_lse_ptr,
    seq,
    kv_head,
    split,
    num_splits,
    stride_out_seq,
    stride_out_head,
    GROUP_SIZE: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    IS_SINGLE_SPLIT: tl.constexpr,
):
    """A split's result: the output itself when it is the only one, else its partial output and
    log-sum-exp, partial_out [num_seqs, num_heads, num_splits, HEAD_DIM] and partial_lse
    [num_seqs, num_heads, num_splits] (grid axis 0: the KV heads)."""
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    heads = kv_head * GROUP_SIZE + offs_g
    head_mask = (offs_g < GROUP_SIZE)[:, None] & (offs_d < HEAD_DIM)[None, :]
    if IS_SINGLE_SPLIT:
        out_offsets = seq.to(tl.int64) * stride_out_seq + heads[:, None] * stride_out_head + offs_d[None, :]
        tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=head_mask)
    else:
        rows = (seq.to(tl.int64) * tl.num_programs(0) * GROUP_SIZE + heads) * num_splits + split
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(partial_lse_ptr + rows, lse, mask=offs_g < GROUP_SIZE)
        tl.store(partial_out_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=head_mask)


@triton.jit
def _combine_kernel(
    partial_out_ptr,
    partial_lse_ptr,
    out_ptr,
    num_splits,
    stride_out_seq,
    stride_out_head,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    rows = (seq.to(tl.int64) * tl.num_programs(1) + head) * num_splits + offs_s
    is_split = offs_s < num_splits
    lse = tl.load(partial_lse_ptr + rows, mask=is_split, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # all splits empty: context_len 0
    weights = tl.exp2(lse - lse_max)  # 0 for empty splits
    mask = is_split[:, None] & (offs_d < HEAD_DIM)[None, :]
    partial = tl.load(partial_out_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)
    total = tl.sum(weights, 0)
    result = tl.sum(partial * weights[:, None], 0) / tl.where(total > 0, total, 1.0)
    out_offsets = seq.to(tl.int64) * stride_out_seq + head * stride_out_head + offs_d
    tl.store(out_ptr + out_offsets, result.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


@dataclass(frozen=True)
class DecodeLaunch:
    num_splits: int
    tile_tokens: int  # KV tokens per loop iteration (several whole blocks when block_size is small)
    num_warps: int
    num_stages: int


def paged_decode_attention(
    q: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # int32 [num_seqs, max_num_blocks]
    context_lens: torch.Tensor,  # int32 [num_seqs]; 0 = padding row (zeros out)
    scale: float,
    out: torch.Tensor | None = None,
    k_scale: float = 1.0,  # fp8 caches: value = stored * scale (kv_quant)
    v_scale: float = 1.0,
) -> torch.Tensor:
    num_seqs = q.shape[0] if q.dim() == 3 else -1
    vectors = {"context_lens": (context_lens, num_seqs)}
    check_paged_inputs(q, k_cache, v_cache, block_tables, out, num_seqs, vectors, k_scale, v_scale)
    launch = launch_for(q, k_cache, block_tables)
    return launch_decode(launch, q, k_cache, v_cache, block_tables, context_lens, scale, out, k_scale, v_scale)


def choose_launch(
    num_seqs: int,
    num_kv_heads: int,
    max_num_blocks: int,
    block_size: int,
    head_dim: int,
    dtype: torch.dtype,
    sm_count: int,
    kv_dtype: torch.dtype | None = None,
    deep_pipeline: bool = False,
) -> DecodeLaunch:
    """Launch parameters from shapes only (never tensor values), so the call is graph-capturable.
    `kv_dtype`: the cache's element type when it differs from q's (fp8). `deep_pipeline`: the GPU
    has >= 200 KiB of shared memory per SM (Hopper)."""
    # ~16 KB of K (and of V) per iteration in 16-bit types: 64 tokens at head_dim 128; an fp8 cache
    # reads twice the tokens for the same bytes in flight.
    tile_elements = 16384 if kv_dtype is not None and kv_dtype.itemsize == 1 else 8192
    tile_tokens = min(128, max(16, tile_elements // triton.next_power_of_2(head_dim)))
    is_wide = dtype.itemsize > 2
    # fp8 on GPUs with Hopper's shared memory: deeper pipelining (5 stages: 58% of copy bandwidth at
    # batch 32, context 4096 on an H200, against 51% with 3), the loads in flight longer while each
    # tile widens to fp16; 5 stages of 32 KB would not fit an sm89's or an A100's shared memory
    is_deep = not is_wide and tile_elements > 8192 and deep_pipeline
    num_stages = 2 if is_wide else 5 if is_deep else 3
    # Split a sequence's context only while its programs fill less than one wave: each split repeats
    # the prologue and adds a merge. H200 (`bench.attention_kernel --splits-sweep`): batch 64 x 8 KV
    # heads (512 programs) reads at 94.4% of copy bandwidth in one split, 87.0% in two; the deep
    # fp8 pipeline, with its shared memory, fills at half the programs (batch 32, context 4096:
    # 67.2% in one split, 59.7% in two).
    programs_per_sm = _PROGRAMS_PER_SM // 2 if is_deep else _PROGRAMS_PER_SM
    splits_to_fill_gpu = programs_per_sm * sm_count // max(1, num_seqs * num_kv_heads)
    splits_by_length = triton.cdiv(max_num_blocks * block_size, _MIN_TOKENS_PER_SPLIT)
    num_splits = max(1, min(splits_to_fill_gpu, splits_by_length, _MAX_SPLITS))
    return DecodeLaunch(num_splits, tile_tokens, num_warps=4, num_stages=num_stages)


def launch_for(q: torch.Tensor, k_cache: torch.Tensor, block_tables: torch.Tensor) -> DecodeLaunch:
    """`choose_launch` for a decode step's q [num_seqs, num_heads, head_dim], cache and block
    tables on their device: what both decode kernels run when not given a launch."""
    return choose_launch(
        num_seqs=q.shape[0],
        num_kv_heads=k_cache.shape[2],
        max_num_blocks=block_tables.shape[1],
        block_size=k_cache.shape[1],
        head_dim=q.shape[2],
        dtype=q.dtype,
        sm_count=num_sms(q.device, on_cpu=_CPU_SM_COUNT),
        kv_dtype=k_cache.dtype,
        deep_pipeline=shared_memory_per_sm(q.device) >= 200 * 1024,  # 0 (unknown): 3 stages
    )


def launch_decode(
    launch: DecodeLaunch,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Runs the kernels with explicit launch parameters (the tests and the benchmark pick them)."""
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group_size = num_heads // num_kv_heads
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_seqs == 0:
        return out
    num_splits = launch.num_splits
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    partial_out = partial_lse = out  # unused when there is a single split
    if num_splits > 1:
        partial_out = torch.empty((num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        partial_lse = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=q.device)
    _split_kernel[(num_kv_heads, num_seqs, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        partial_out,
        partial_lse,
        scale * math.log2(math.e),
        num_splits,
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
        GROUP_SIZE=group_size,
        GROUP_PAD=max(16, triton.next_power_of_2(group_size)),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=block_size,
        TILE_TOKENS=launch.tile_tokens,
        IS_SINGLE_SPLIT=num_splits == 1,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        IS_FP8=k_cache.dtype == FP8_DTYPE,
        COMPUTE_DTYPE=kv_compute_dtype(q.dtype, k_cache.dtype),
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
    )
    if num_splits > 1:
        _combine_kernel[(num_seqs, num_heads)](
            partial_out,
            partial_lse,
            out,
            num_splits,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            HEAD_DIM_PAD=head_dim_pad,
            SPLITS_PAD=triton.next_power_of_2(num_splits),
            num_warps=4,
        )
    return out


def check_paged_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    out: torch.Tensor | None,
    num_seqs: int,
    int32_vectors: dict[str, tuple[torch.Tensor, int]],  # name -> (tensor, required length)
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Raises ValueError unless the inputs of paged (decode or prefill) attention fit the contract."""
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(
            "q must be [tokens, num_heads, head_dim] and k_cache [num_blocks, block_size, num_kv_heads, head_dim], "
            f"got {tuple(q.shape)} and {tuple(k_cache.shape)}"
        )
    if v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride():
        raise ValueError(f"v_cache must match k_cache in shape and strides, got {v_cache.shape}, {k_cache.shape}")
    num_heads, head_dim = q.shape[1], q.shape[2]
    if k_cache.shape[3] != head_dim or num_heads % k_cache.shape[2] != 0:
        raise ValueError(f"q {tuple(q.shape)} does not fit a cache of {k_cache.shape[2]} KV heads x {k_cache.shape[3]}")
    if q.dtype not in _DTYPES or k_cache.dtype not in (q.dtype, FP8_DTYPE) or v_cache.dtype != k_cache.dtype:
        dtypes = f"{q.dtype}/{k_cache.dtype}/{v_cache.dtype}"
        raise ValueError(f"q/k_cache/v_cache must share one of {_DTYPES} (or k_cache/v_cache {FP8_DTYPE}), got {dtypes}")
    check_scale("k_scale", k_scale)
    check_scale("v_scale", v_scale)
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(
            f"block_tables must be int32 [{num_seqs}, max_num_blocks], got {block_tables.dtype} {tuple(block_tables.shape)}"
        )
    for name, (vector, length) in int32_vectors.items():
        if vector.dtype != torch.int32 or vector.shape != (length,):
            raise ValueError(f"{name} must be int32 [{length}], got {vector.dtype} {tuple(vector.shape)}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype):
        raise ValueError(f"out must be {q.dtype} {tuple(q.shape)}, got {out.dtype} {tuple(out.shape)}")
    tensors = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "block_tables": block_tables, "out": out}
    tensors.update({name: vector for name, (vector, _) in int32_vectors.items()})
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if tensor.device != q.device:
            raise ValueError(f"{name} is on {tensor.device}, q on {q.device}")
        if tensor.numel() > 0 and tensor.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim, got strides {tensor.stride()}")


def paged_decode_attention_ref(
    q: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # int32 [num_seqs, max_num_blocks]
    context_lens: torch.Tensor,  # int32 [num_seqs]; 0 = padding row
    scale: float,
    out: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group_size = num_heads // num_kv_heads
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    max_len = int(context_lens.max()) if num_seqs > 0 else 0
    num_used_blocks = -(-max_len // block_size)

    lens = context_lens.to(device=q.device, dtype=torch.long)[:, None]
    positions = torch.arange(num_used_blocks * block_size, device=q.device)
    is_valid = positions[None, :] < lens  # [num_seqs, max_len_padded]
    # Table entries past a request's context may hold anything: read block 0 there instead.
    is_used = torch.arange(num_used_blocks, device=q.device)[None, :] * block_size < lens
    block_ids = torch.where(is_used, block_tables[:, :num_used_blocks].long(), 0)
    # [num_seqs, num_kv_heads, len, head_dim], contiguous so that the matmuls need no other copy
    # (fp8 caches: code * scale, computed in fp32 as the kernel's folded scales are)
    k = dequantize_kv_ref(k_cache[block_ids], k_scale, compute_dtype).flatten(1, 2).transpose(1, 2).contiguous()
    v = dequantize_kv_ref(v_cache[block_ids], v_scale, compute_dtype).flatten(1, 2).transpose(1, 2).contiguous()

    q_groups = q.to(compute_dtype).view(num_seqs, num_kv_heads, group_size, head_dim) * scale
    scores = torch.matmul(q_groups, k.transpose(-1, -2))  # [num_seqs, num_kv_heads, group, len]
    scores.masked_fill_(~is_valid[:, None, None, :], float("-inf"))
    # A context_len-0 row is all -inf: softmax gives NaN there, and the row must be zeros.
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)
    result = torch.matmul(probs, v).reshape(num_seqs, num_heads, head_dim)
    if out is None:
        return result.to(q.dtype)
    return out.copy_(result)
