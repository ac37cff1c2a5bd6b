"""The Triton kernels (run on CPU tensors by the Triton interpreter) against their torch
references, and each reference against an independent naive computation. All in fp32."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    # Interpreting would also turn the GPU tests' kernels into interpreted ones (one process).
    pytest.skip("CPU-interpreter tests; tests/test_kernels_gpu.py covers the kernels here", allow_module_level=True)
os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`

import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import pdserve.kernels as K  # noqa: E402

# The package re-exports functions under the module names; the tests need the modules too.
decode_module = importlib.import_module("pdserve.kernels.paged_decode_attention")
prefill_module = importlib.import_module("pdserve.kernels.paged_prefill_attention")

# False when another test module imported triton first without the flag: nothing can run then.
_IS_INTERPRETED = isinstance(tl.sum, InterpretedFunction)


@pytest.fixture(autouse=True)
def _fresh_seed() -> None:
    if not _IS_INTERPRETED:
        pytest.fail(
            "triton was imported before tests/test_kernels.py without TRITON_INTERPRET=1; "
            "run `TRITON_INTERPRET=1 pytest ...` or this file on its own"
        )
    torch.manual_seed(0)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape and not out.isnan().any()
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _make_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    # One layer of the contract's layout: [2, num_blocks, block_size, num_kv_heads, head_dim].
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim)
    return kv_cache[0], kv_cache[1]


def _make_block_tables(context_lens: list[int], block_size: int, num_blocks: int) -> torch.Tensor:
    """Shuffled, non-contiguous block ids; entries past a request's context are -1."""
    blocks_needed = [-(-length // block_size) for length in context_lens]
    max_blocks = max(blocks_needed) + 1
    ids = torch.randperm(num_blocks)
    tables = torch.full((len(context_lens), max_blocks), -1, dtype=torch.int32)
    start = 0
    for seq, count in enumerate(blocks_needed):
        tables[seq, :count] = ids[start : start + count]
        start += count
    return tables


def _fused_qkv(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """A projection output and its q/k/v views (token stride > heads * head_dim: 8 spare columns)."""
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim + 8)
    return (qkv, *_split_qkv(qkv, num_heads, num_kv_heads, head_dim))


def _split_qkv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    widths = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    q, k, v = qkv[:, : sum(widths)].split(widths, dim=1)
    return (
        q.unflatten(1, (num_heads, head_dim)),
        k.unflatten(1, (num_kv_heads, head_dim)),
        v.unflatten(1, (num_kv_heads, head_dim)),
    )


def _gather_contiguous(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """Naive gather, token by token: [length, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    rows = [cache[int(block_table[p // block_size]), p % block_size] for p in range(length)]
    return torch.stack(rows) if rows else cache.new_zeros(0, *cache.shape[2:])


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, is_visible: torch.Tensor) -> torch.Tensor:
    """Plain SDPA for one request: q [q_len, H, D], k/v [len, KVH, D], is_visible [q_len, len]."""
    group_size = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group_size, dim=1).transpose(0, 1)
    v = v.repeat_interleave(group_size, dim=1).transpose(0, 1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=is_visible, scale=scale)
    return out.transpose(0, 1)


# ---- decode -------------------------------------------------------------------------------------

DECODE_LENS = [37, 0, 64, 1, 100]  # a padding row, a block-aligned context, a one-token context


def _decode_inputs(group_size: int, block_size: int, head_dim: int = 32, num_kv_heads: int = 2):
    num_heads = num_kv_heads * group_size
    k_cache, v_cache = _make_cache(64, block_size, num_kv_heads, head_dim)
    block_tables = _make_block_tables(DECODE_LENS, block_size, 64)
    context_lens = torch.tensor(DECODE_LENS, dtype=torch.int32)
    _, q, _, _ = _fused_qkv(len(DECODE_LENS), num_heads, num_kv_heads, head_dim)
    return q, k_cache, v_cache, block_tables, context_lens


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("block_size", [16, 8])
@pytest.mark.parametrize("group_size", [1, 2, 4])
def test_paged_decode_matches_ref(group_size: int, block_size: int, num_splits: int) -> None:
    q, k_cache, v_cache, block_tables, context_lens = _decode_inputs(group_size, block_size)
    ref = K.paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, 0.2)
    launch = decode_module.DecodeLaunch(num_splits=num_splits, tile_tokens=32, num_warps=4, num_stages=1)
    out = torch.full_like(ref, float("nan"))
    decode_module.launch_decode(launch, q, k_cache, v_cache, block_tables, context_lens, 0.2, out)
    assert _rel_err(out, ref) < 1e-4
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # context_len 0


def test_paged_decode_public_wrapper_odd_head_dim() -> None:
    q, k_cache, v_cache, block_tables, context_lens = _decode_inputs(group_size=3, block_size=16, head_dim=40)
    ref = K.paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, 0.15)
    out = K.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, 0.15)
    assert _rel_err(out, ref) < 1e-4


def test_decode_launch_depends_on_shapes_only() -> None:
    choose = decode_module.choose_launch
    common = dict(num_kv_heads=8, block_size=16, head_dim=128, dtype=torch.bfloat16, sm_count=132)
    assert choose(num_seqs=32, max_num_blocks=256, **common).num_splits == 2  # 256 programs -> 512 of 528 slots
    assert choose(num_seqs=64, max_num_blocks=64, **common).num_splits == 1  # 512 programs: one wave, no split
    fp8 = dict(common, kv_dtype=torch.float8_e4m3fn)
    assert choose(num_seqs=32, max_num_blocks=256, **fp8, deep_pipeline=True).num_splits == 1  # fills at half the programs
    assert choose(num_seqs=8, max_num_blocks=256, **fp8, deep_pipeline=True).num_splits == 4
    assert choose(num_seqs=32, max_num_blocks=256, **fp8).num_splits == 2  # 3 stages: as 16-bit caches
    assert choose(num_seqs=1, max_num_blocks=256, **common).num_splits == 32  # capped at _MAX_SPLITS
    assert choose(num_seqs=1, max_num_blocks=16, **common).num_splits == 4  # capped by length: one 64-token tile each
    assert choose(num_seqs=256, max_num_blocks=256, **common).num_splits == 1
    assert choose(num_seqs=4, max_num_blocks=1, **common).num_splits == 1
    assert choose(num_seqs=32, max_num_blocks=256, **common).tile_tokens == 64


def test_decode_ref_matches_naive_sdpa() -> None:
    q, k_cache, v_cache, block_tables, context_lens = _decode_inputs(group_size=4, block_size=8)
    out = K.paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, 0.3)
    for seq, length in enumerate(DECODE_LENS):
        if length == 0:
            assert torch.equal(out[seq], torch.zeros_like(out[seq]))
            continue
        k = _gather_contiguous(k_cache, block_tables[seq], length)
        v = _gather_contiguous(v_cache, block_tables[seq], length)
        expected = _sdpa(q[seq : seq + 1], k, v, 0.3, torch.ones(1, length, dtype=torch.bool))
        assert _rel_err(out[seq], expected[0]) < 1e-5


# ---- prefill ------------------------------------------------------------------------------------

# (new tokens, context_len): a cached prefix, a fresh prompt over several tiles, a prefix ending
# mid-block, and a single new token.
PREFILL_REQUESTS = [(5, 70), (40, 40), (17, 33), (1, 9)]


def _prefill_inputs(group_size: int, block_size: int, head_dim: int = 32, num_kv_heads: int = 2):
    q_lens = [q_len for q_len, _ in PREFILL_REQUESTS]
    context_lens = [length for _, length in PREFILL_REQUESTS]
    k_cache, v_cache = _make_cache(64, block_size, num_kv_heads, head_dim)
    block_tables = _make_block_tables(context_lens, block_size, 64)
    cu_seqlens_q = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    _, q, _, _ = _fused_qkv(sum(q_lens), num_kv_heads * group_size, num_kv_heads, head_dim)
    return q, k_cache, v_cache, block_tables, cu_seqlens_q, torch.tensor(context_lens, dtype=torch.int32), max(q_lens)


@pytest.mark.parametrize("block_size", [16, 8])
@pytest.mark.parametrize("group_size", [1, 2, 4])
def test_paged_prefill_matches_ref(group_size: int, block_size: int) -> None:
    inputs = _prefill_inputs(group_size, block_size)
    ref = K.paged_prefill_attention_ref(*inputs, 0.2)
    out = torch.full_like(ref, float("nan"))
    K.paged_prefill_attention(*inputs, 0.2, out=out)
    assert _rel_err(out, ref) < 1e-4


@pytest.mark.parametrize(("block_m", "block_n"), [(32, 16), (16, 32)])
def test_paged_prefill_other_tiles_and_head_dim(block_m: int, block_n: int) -> None:
    inputs = _prefill_inputs(group_size=2, block_size=16, head_dim=24)
    ref = K.paged_prefill_attention_ref(*inputs, 0.25)
    launch = prefill_module.PrefillLaunch(block_m, block_n, num_warps=4, num_stages=1)
    out = prefill_module.launch_prefill(launch, *inputs, 0.25)
    assert _rel_err(out, ref) < 1e-4


def test_prefill_ref_matches_naive_sdpa() -> None:
    q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, max_seqlen_q = _prefill_inputs(4, 8)
    out = K.paged_prefill_attention_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, max_seqlen_q, 0.3)
    for seq, (q_len, length) in enumerate(PREFILL_REQUESTS):
        start = int(cu_seqlens_q[seq])
        k = _gather_contiguous(k_cache, block_tables[seq], length)
        v = _gather_contiguous(v_cache, block_tables[seq], length)
        q_positions = torch.arange(length - q_len, length)
        is_visible = torch.arange(length)[None, :] <= q_positions[:, None]
        expected = _sdpa(q[start : start + q_len], k, v, 0.3, is_visible)
        assert _rel_err(out[start : start + q_len], expected) < 1e-5


# ---- rotary + KV store --------------------------------------------------------------------------

NUM_TOKENS, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 9, 4, 2, 32
SLOTS = [3, -1, 7, 20, 0, -5, 39, 12, -1]  # negatives are padding


def _rotary_inputs() -> tuple[torch.Tensor, ...]:
    positions = torch.randint(0, 50, (NUM_TOKENS,))
    angles = torch.rand(50, HEAD_DIM // 2) * 6.0
    cos_sin_cache = torch.cat([angles.cos(), angles.sin()], dim=1)
    return positions, cos_sin_cache


def test_rotary_embedding_matches_ref_on_fused_qkv() -> None:
    positions, cos_sin_cache = _rotary_inputs()
    qkv, q, k, _ = _fused_qkv(NUM_TOKENS, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM)
    qkv_ref = qkv.clone()
    q_ref, k_ref, _ = _split_qkv(qkv_ref, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM)
    K.rotary_embedding(positions, q, k, cos_sin_cache)
    K.rotary_embedding_ref(positions, q_ref, k_ref, cos_sin_cache)
    assert _rel_err(qkv, qkv_ref) < 1e-6  # v and the spare columns untouched in both


def test_rotary_store_kv_matches_ref() -> None:
    positions, cos_sin_cache = _rotary_inputs()
    slot_mapping = torch.tensor(SLOTS)
    qkv, q, k, v = _fused_qkv(NUM_TOKENS, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM)
    qkv_ref = qkv.clone()
    k_cache, v_cache = _make_cache(10, 4, NUM_KV_HEADS, HEAD_DIM)
    k_cache_ref, v_cache_ref = k_cache.clone(), v_cache.clone()
    K.rotary_store_kv(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping)
    q_ref, k_ref, v_ref = _split_qkv(qkv_ref, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM)
    K.rotary_store_kv_ref(positions, q_ref, k_ref, v_ref, cos_sin_cache, k_cache_ref, v_cache_ref, slot_mapping)
    assert _rel_err(qkv, qkv_ref) < 1e-6
    assert _rel_err(k_cache, k_cache_ref) < 1e-6 and torch.equal(v_cache, v_cache_ref)


def test_rotary_ref_matches_hf_rotate_half() -> None:
    positions, cos_sin_cache = _rotary_inputs()
    _, q, k, _ = _fused_qkv(NUM_TOKENS, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM)
    half = HEAD_DIM // 2
    cos = cos_sin_cache[positions, :half].repeat(1, 2)[:, None, :]  # HF: cat((freqs, freqs)).cos()
    sin = cos_sin_cache[positions, half:].repeat(1, 2)[:, None, :]
    rotate_half = lambda x: torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # noqa: E731
    q_expected, k_expected = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    K.rotary_embedding_ref(positions, q, k, cos_sin_cache)
    assert _rel_err(q, q_expected) < 1e-6 and _rel_err(k, k_expected) < 1e-6


def test_store_kv_cache_matches_ref_and_skips_negative_slots() -> None:
    slot_mapping = torch.tensor(SLOTS)
    _, _, k, v = _fused_qkv(NUM_TOKENS, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM)
    k_cache, v_cache = _make_cache(10, 4, NUM_KV_HEADS, HEAD_DIM)
    k_cache_ref, v_cache_ref = k_cache.clone(), v_cache.clone()
    k_cache_naive, v_cache_naive = k_cache.clone(), v_cache.clone()
    K.store_kv_cache(k, v, k_cache, v_cache, slot_mapping)
    K.store_kv_cache_ref(k, v, k_cache_ref, v_cache_ref, slot_mapping)
    for token, slot in enumerate(SLOTS):
        if slot >= 0:
            k_cache_naive[slot // 4, slot % 4] = k[token]
            v_cache_naive[slot // 4, slot % 4] = v[token]
    for cache, ref, naive in [(k_cache, k_cache_ref, k_cache_naive), (v_cache, v_cache_ref, v_cache_naive)]:
        assert torch.equal(cache, ref) and torch.equal(ref, naive)


# ---- norms and activation -----------------------------------------------------------------------


def test_rms_norm_matches_ref_on_strided_rows() -> None:
    x = torch.randn(6, 208)[:, :200]  # row stride 208, hidden 200 (not a power of two)
    weight = torch.randn(200)
    out = K.rms_norm(x, weight, 1e-6)
    assert out.shape == x.shape and _rel_err(out, K.rms_norm_ref(x, weight, 1e-6)) < 1e-5


def test_rms_norm_ref_matches_torch() -> None:
    x, weight = torch.randn(6, 200), torch.randn(200)
    assert _rel_err(K.rms_norm_ref(x, weight, 1e-6), F.rms_norm(x, (200,), weight, 1e-6)) < 1e-6


def test_fused_add_rms_norm_matches_ref() -> None:
    x, residual, weight = torch.randn(6, 200), torch.randn(6, 200), torch.randn(200)
    expected_residual = x + residual
    expected_normed = F.rms_norm(expected_residual, (200,), weight, 1e-6)
    x_ref, residual_ref = x.clone(), residual.clone()
    normed, new_residual = K.fused_add_rms_norm(x, residual, weight, 1e-6)
    normed_ref, new_residual_ref = K.fused_add_rms_norm_ref(x_ref, residual_ref, weight, 1e-6)
    assert _rel_err(normed, normed_ref) < 1e-5 and torch.equal(new_residual, new_residual_ref)
    assert _rel_err(normed_ref, expected_normed) < 1e-6 and torch.equal(new_residual_ref, expected_residual)


def test_silu_and_mul_matches_ref_and_naive() -> None:
    x = torch.randn(5, 2 * 1500)  # d = 1500 spans two column tiles
    gate, up = x[:, :1500], x[:, 1500:]
    ref = K.silu_and_mul_ref(x)
    assert _rel_err(K.silu_and_mul(x), ref) < 1e-6
    assert _rel_err(ref, gate * torch.sigmoid(gate) * up) < 1e-6


# ---- input checks -------------------------------------------------------------------------------


def test_wrappers_reject_bad_inputs_with_value_errors() -> None:
    q, k_cache, v_cache, block_tables, context_lens = _decode_inputs(group_size=2, block_size=16)
    with pytest.raises(ValueError, match="block_tables must be int32"):
        K.paged_decode_attention(q, k_cache, v_cache, block_tables.long(), context_lens, 0.1)
    with pytest.raises(ValueError, match="must share one of"):
        K.paged_decode_attention(q.double(), k_cache, v_cache, block_tables, context_lens, 0.1)
    with pytest.raises(ValueError, match="contiguous in its last dim"):
        q_strided = q.transpose(1, 2).contiguous().transpose(1, 2)  # head_dim not contiguous
        K.paged_decode_attention(q_strided, k_cache, v_cache, block_tables, context_lens, 0.1)
    inputs = list(_prefill_inputs(group_size=2, block_size=16))
    inputs[4] = inputs[4][:-1]  # cu_seqlens_q one short
    with pytest.raises(ValueError, match="cu_seqlens_q must be int32"):
        K.paged_prefill_attention(*inputs, 0.1)
    _, _, k, v = _fused_qkv(NUM_TOKENS, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM)
    cache_k, cache_v = _make_cache(10, 4, NUM_KV_HEADS, HEAD_DIM)
    with pytest.raises(ValueError, match="slot_mapping must be int64"):
        K.store_kv_cache(k, v, cache_k, cache_v, torch.tensor(SLOTS, dtype=torch.int32))
    with pytest.raises(ValueError, match="weight must be"):
        K.rms_norm(torch.randn(3, 8), torch.randn(7), 1e-6)
    with pytest.raises(ValueError, match=r"\[\.\.\., 2 \* d\]"):
        K.silu_and_mul(torch.randn(3, 7))


@pytest.mark.parametrize("shape", [(3, 4, 2, 8), (2, 16, 1, 12)], ids=["pow2", "odd-head-dim"])
def test_copy_kv_blocks_moves_exactly_the_named_blocks(shape: tuple[int, ...]) -> None:
    num_layers, block_size, num_kv_heads, head_dim = shape
    src = torch.randn(num_layers, 2, 9, block_size, num_kv_heads, head_dim)
    dst = torch.full((num_layers, 2, 7, block_size, num_kv_heads, head_dim), float("nan"))
    src_ids, dst_ids = torch.tensor([8, 0, 3]), torch.tensor([2, 6, 0])
    K.copy_kv_blocks(src, src_ids, dst, dst_ids)
    assert torch.equal(dst[:, :, dst_ids], src[:, :, src_ids])
    assert dst[:, :, [1, 3, 4, 5]].isnan().all()  # nothing else written
    ref = torch.zeros_like(dst)
    K.copy_kv_blocks_ref(src, src_ids, ref, dst_ids)
    assert torch.equal(ref[:, :, dst_ids], dst[:, :, dst_ids])
