"""The Triton kernels on a CUDA GPU against the torch references at realistic sizes. The reference
runs in float32 for bf16 inputs and in float64 for fp32 inputs; outputs are poisoned with NaN
first so that every element must be written."""

from __future__ import annotations

import os
import random

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="TRITON_INTERPRET=1 interprets the kernels"),
]

import pdserve.kernels as K  # noqa: E402

TOLERANCE = {torch.bfloat16: 1e-2, torch.float32: 1e-4}
DEVICE = "cuda"


@pytest.fixture(autouse=True)
def _fresh_seed() -> None:
    seed = random.randrange(2**31)
    print(f"seed={seed}")  # shown by pytest when the test fails
    random.seed(seed)
    torch.manual_seed(seed)


def _ref_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float32 else torch.float32


def _assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.shape == ref.shape
    assert torch.isfinite(out).all(), f"{(~torch.isfinite(out)).sum().item()} elements not written or not finite"
    error = ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
    assert error < TOLERANCE[dtype], f"relative error {error:.3e} >= {TOLERANCE[dtype]:.0e}"


def _make_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype):
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=DEVICE)
    return kv_cache[0], kv_cache[1]


def _make_block_tables(context_lens: list[int], block_size: int, extra_columns: int = 3) -> tuple[torch.Tensor, int]:
    """Shuffled block ids, a table wider than needed (as an engine sizes it), -1 past each context."""
    blocks_needed = [-(-length // block_size) for length in context_lens]
    num_blocks = sum(blocks_needed) + 8
    ids = torch.randperm(num_blocks)
    tables = torch.full((len(context_lens), max(blocks_needed) + extra_columns), -1, dtype=torch.int32)
    start = 0
    for seq, count in enumerate(blocks_needed):
        tables[seq, :count] = ids[start : start + count]
        start += count
    return tables.to(DEVICE), num_blocks


def _random_lens(num_seqs: int, max_len: int) -> list[int]:
    lens = [random.randint(1, max_len) for _ in range(num_seqs)]
    lens[0] = max_len
    if num_seqs > 2:
        lens[1] = 0  # a padding row
    return lens


# ---- decode -------------------------------------------------------------------------------------

# (num_seqs, num_heads, num_kv_heads, head_dim, block_size, max_context_len)
DECODE_SHAPES = [
    (1, 32, 8, 128, 16, 4096),
    (7, 32, 8, 128, 16, 1000),
    (32, 32, 8, 128, 16, 4096),
    (64, 32, 8, 128, 16, 4096),
    (13, 8, 8, 64, 32, 777),  # MHA
    (5, 16, 2, 256, 16, 2000),  # group 8, wide heads
    (4, 28, 4, 128, 16, 513),  # group 7 (padded to 16 rows)
    (256, 32, 8, 128, 16, 100),  # enough programs for a single split
]


def _decode_inputs(shape: tuple[int, ...], dtype: torch.dtype):
    num_seqs, num_heads, num_kv_heads, head_dim, block_size, max_len = shape
    lens = _random_lens(num_seqs, max_len)
    block_tables, num_blocks = _make_block_tables(lens, block_size)
    k_cache, v_cache = _make_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype)
    qkv = torch.randn(num_seqs, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, device=DEVICE)
    q = qkv[:, : num_heads * head_dim].view(num_seqs, num_heads, head_dim)  # strided view
    context_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    return q, k_cache, v_cache, block_tables, context_lens, head_dim**-0.5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", DECODE_SHAPES)
def test_paged_decode_attention(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if dtype == torch.float32 and shape[0] * shape[-1] > 32 * 4096:
        pytest.skip("the largest case runs in bf16 only")
    q, k_cache, v_cache, block_tables, context_lens, scale = _decode_inputs(shape, dtype)
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)
    K.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, out=out)
    ref = K.paged_decode_attention_ref(q.to(_ref_dtype(dtype)), k_cache, v_cache, block_tables, context_lens, scale)
    _assert_close(out, ref, dtype)
    assert torch.equal(out[context_lens == 0], torch.zeros_like(out[context_lens == 0]))


def test_paged_decode_attention_cuda_graph_replay() -> None:
    """Captured once, replayed on new q, context lengths and block tables written into the same buffers."""
    shape = (16, 32, 8, 128, 16, 2048)
    q, k_cache, v_cache, block_tables, context_lens, scale = _decode_inputs(shape, torch.bfloat16)
    out = torch.empty(q.shape, dtype=q.dtype, device=DEVICE)
    side_stream = torch.cuda.Stream()
    side_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side_stream):  # compile and warm up outside the capture
        K.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, out=out)
    torch.cuda.current_stream().wait_stream(side_stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        K.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, out=out)

    block_tables.copy_(block_tables[torch.randperm(block_tables.shape[0], device=DEVICE)])  # rows change requests
    capacity = (block_tables >= 0).sum(1).int() * 16
    context_lens.copy_(torch.minimum(torch.randint_like(context_lens, 0, 2048 + 1), capacity))
    q.copy_(torch.randn_like(q))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    ref = K.paged_decode_attention_ref(q.float(), k_cache, v_cache, block_tables, context_lens, scale)
    _assert_close(out, ref, torch.bfloat16)


# ---- prefill ------------------------------------------------------------------------------------

# (num_heads, num_kv_heads, head_dim, block_size, [(new tokens, cached prefix), ...])
PREFILL_CASES = [
    (32, 8, 128, 16, [(2048, 0)]),
    (32, 8, 128, 16, [(1, 0), (100, 300), (777, 1000), (1500, 2596)]),  # last one ends at 4096
    (8, 8, 64, 32, [(513, 0), (64, 64)]),  # MHA
    (28, 4, 128, 16, [(300, 17), (45, 0)]),  # group 7
    (32, 8, 128, 16, [(200, 50), (17, 0), (256, 3840)]),  # short prompts (smaller tiles), a long prefix
    (16, 2, 256, 16, [(300, 100), (5, 9)]),  # group 8, wide heads
]


def _prefill_inputs(case: tuple, dtype: torch.dtype):
    num_heads, num_kv_heads, head_dim, block_size, requests = case
    q_lens = [q_len for q_len, _ in requests]
    lens = [q_len + prefix for q_len, prefix in requests]
    block_tables, num_blocks = _make_block_tables(lens, block_size)
    k_cache, v_cache = _make_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype)
    num_tokens = sum(q_lens)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, device=DEVICE)
    q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    cu_seqlens_q = torch.tensor([0] + q_lens, device=DEVICE).cumsum(0).int()
    context_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    return q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, max(q_lens), head_dim**-0.5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", PREFILL_CASES)
def test_paged_prefill_attention(case: tuple, dtype: torch.dtype) -> None:
    q, *rest = _prefill_inputs(case, dtype)
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)
    K.paged_prefill_attention(q, *rest, out=out)
    ref = K.paged_prefill_attention_ref(q.to(_ref_dtype(dtype)), *rest)
    _assert_close(out, ref, dtype)


# ---- rotary, KV store, norms, activation --------------------------------------------------------

NUM_TOKENS, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4096, 32, 8, 128


def _qkv_views(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    widths = [NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM]
    q, k, v = qkv.split(widths, dim=1)
    return (
        q.unflatten(1, (NUM_HEADS, HEAD_DIM)),
        k.unflatten(1, (NUM_KV_HEADS, HEAD_DIM)),
        v.unflatten(1, (NUM_KV_HEADS, HEAD_DIM)),
    )


def _rotary_inputs(dtype: torch.dtype):
    qkv = torch.randn(NUM_TOKENS, (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM, dtype=dtype, device=DEVICE)
    positions = torch.randint(0, 8192, (NUM_TOKENS,), device=DEVICE)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, HEAD_DIM, 2, device=DEVICE).float() / HEAD_DIM))
    angles = torch.arange(8192, device=DEVICE).float()[:, None] * inv_freq[None, :]
    return qkv, positions, torch.cat([angles.cos(), angles.sin()], dim=1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rotary_store_kv(dtype: torch.dtype) -> None:
    qkv, positions, cos_sin_cache = _rotary_inputs(dtype)
    qkv_ref = qkv.to(_ref_dtype(dtype))
    num_blocks, block_size = NUM_TOKENS // 16 + 4, 16
    slot_mapping = torch.randperm(num_blocks * block_size, device=DEVICE)[:NUM_TOKENS]
    slot_mapping[::7] = -1  # padding
    k_cache, v_cache = _make_cache(num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM, dtype)
    k_cache.fill_(float("nan"))
    v_cache.fill_(float("nan"))
    K.rotary_store_kv(positions, *_qkv_views(qkv), cos_sin_cache, k_cache, v_cache, slot_mapping)
    q_ref, k_ref, v_ref = _qkv_views(qkv_ref)
    K.rotary_embedding_ref(positions, q_ref, k_ref, cos_sin_cache)
    _assert_close(qkv, qkv_ref, dtype)
    stored = slot_mapping[slot_mapping >= 0]
    for cache, expected in [(k_cache, k_ref), (v_cache, v_ref)]:
        flat = cache.view(-1, NUM_KV_HEADS, HEAD_DIM)
        _assert_close(flat[stored], expected[slot_mapping >= 0], dtype)
        unused = torch.ones(flat.shape[0], dtype=torch.bool, device=DEVICE)
        unused[stored] = False
        assert flat[unused].isnan().all(), "a padding slot (-1) or an unmapped slot was written"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rotary_embedding_and_store_kv_cache(dtype: torch.dtype) -> None:
    qkv, positions, cos_sin_cache = _rotary_inputs(dtype)
    qkv_ref = qkv.to(_ref_dtype(dtype))
    q, k, v = _qkv_views(qkv)
    K.rotary_embedding(positions, q, k, cos_sin_cache)
    K.rotary_embedding_ref(positions, *_qkv_views(qkv_ref)[:2], cos_sin_cache)
    _assert_close(qkv, qkv_ref, dtype)
    slot_mapping = torch.arange(NUM_TOKENS, device=DEVICE).flip(0)
    slot_mapping[:5] = -1
    k_cache, v_cache = _make_cache(NUM_TOKENS // 16, 16, NUM_KV_HEADS, HEAD_DIM, dtype)
    k_cache.fill_(float("nan"))
    v_cache.fill_(float("nan"))
    K.store_kv_cache(k, v, k_cache, v_cache, slot_mapping)
    is_stored = slot_mapping >= 0
    assert torch.equal(k_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[slot_mapping[is_stored]], k[is_stored])
    assert torch.equal(v_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[slot_mapping[is_stored]], v[is_stored])
    assert k_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[NUM_TOKENS - 5 :].isnan().all()  # the padding tokens' slots


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hidden", [4096, 5120, 8192])
def test_rms_norm_and_fused_add(dtype: torch.dtype, hidden: int) -> None:
    x = torch.randn(NUM_TOKENS, hidden, dtype=dtype, device=DEVICE)
    residual = torch.randn_like(x)
    weight = torch.rand(hidden, dtype=dtype, device=DEVICE) + 0.5
    ref_dtype = _ref_dtype(dtype)
    _assert_close(K.rms_norm(x, weight, 1e-6), K.rms_norm_ref(x.to(ref_dtype), weight.to(ref_dtype), 1e-6), dtype)
    x_ref, residual_ref = x.to(ref_dtype), residual.to(ref_dtype)
    normed, new_residual = K.fused_add_rms_norm(x, residual, weight, 1e-6)
    normed_ref, residual_ref = K.fused_add_rms_norm_ref(x_ref, residual_ref, weight.to(ref_dtype), 1e-6)
    _assert_close(new_residual, residual_ref, dtype)
    _assert_close(normed, normed_ref, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_silu_and_mul(dtype: torch.dtype) -> None:
    x = torch.randn(NUM_TOKENS, 2 * 14336, dtype=dtype, device=DEVICE)
    _assert_close(K.silu_and_mul(x), K.silu_and_mul_ref(x.to(_ref_dtype(dtype))), dtype)
