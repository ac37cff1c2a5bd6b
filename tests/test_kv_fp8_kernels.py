"""FP8 KV cache kernels (Triton interpreter on CPU tensors) against their torch references: the
store kernels quantize as `quantize_kv_ref` does, both attention kernels dequantize as their
references do, and the references equal attention over the dequantized cache computed naively."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("CPU-interpreter tests; tests/test_kernels_gpu.py covers the kernels here", allow_module_level=True)
os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`

import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

import pdserve.kernels as K
from pdserve.kernels.kv_quant import FP8_DTYPE, dequantize_kv_ref, quantize_kv_ref

decode_module = importlib.import_module("pdserve.kernels.paged_decode_attention")
prefill_module = importlib.import_module("pdserve.kernels.paged_prefill_attention")

K_SCALE, V_SCALE = 0.05, 0.02  # not 1.0, so that a scale applied twice (or never) shows


def assert_fp8_codes_match(out: torch.Tensor, ref: torch.Tensor) -> None:
    """fp8 codes equal within one code, and those off by one few: the interpreter's numpy emulation
    of fp32 -> e4m3 rounds ties away from zero (torch and the GPU: to even), flushes subnormals to 0
    and loses a rounding's carry into the exponent (torch 2^e, interpreter 2^(e-1)); only entries
    of those kinds may be off, and only that way. tests/test_kernels_gpu.py checks bit equality."""
    max_code_step = 1
    codes, ref_codes = out.view(torch.uint8).int(), ref.view(torch.uint8).int()
    is_exempt = ((ref_codes >> 3) & 0xF == 0) | (ref_codes & 7 == 0)  # subnormal (or 0) | power of two
    assert (codes - ref_codes)[~is_exempt].abs().max() <= max_code_step
    values, ref_values = out.float()[is_exempt], ref.float()[is_exempt]
    is_known_miss = (values == ref_values / 2) | ((values - ref_values).abs() <= 2.0**-9)
    assert (((codes - ref_codes)[is_exempt].abs() <= max_code_step) | is_known_miss).all()
    assert (codes != ref_codes).float().mean() < 0.05


@pytest.fixture(autouse=True)
def _fresh_seed() -> None:
    if not isinstance(tl.sum, InterpretedFunction):
        pytest.fail("triton was imported before this module without TRITON_INTERPRET=1")
    torch.manual_seed(0)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape and not out.isnan().any()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _fp8_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A quantized layer [2, blocks, block_size, kv_heads, head_dim]: codes of magnitude ~20, so
    that K_SCALE / V_SCALE dequantize them to ~1."""
    kv = quantize_kv_ref(torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim) * 20.0, 1.0, FP8_DTYPE)
    return kv[0], kv[1]


def _block_tables(context_lens: list[int], block_size: int, num_blocks: int) -> torch.Tensor:
    needed = [-(-n // block_size) for n in context_lens]
    ids = torch.randperm(num_blocks)
    tables = torch.full((len(context_lens), max(needed) + 1), -1, dtype=torch.int32)
    start = 0
    for seq, count in enumerate(needed):
        tables[seq, :count] = ids[start : start + count]
        start += count
    return tables


def test_quantize_ref_saturates_and_round_trips_within_e4m3_precision() -> None:
    x = torch.tensor([1000.0, -1000.0, 3.0, 0.1, -0.25])
    stored = quantize_kv_ref(x, 2.0, FP8_DTYPE)
    assert stored.dtype == FP8_DTYPE and stored.element_size() == 1
    back = dequantize_kv_ref(stored, 2.0, torch.float32)
    assert back[0] == 896.0 and back[1] == -896.0  # 448 * scale: saturated, never NaN
    assert torch.allclose(back[2:], x[2:], rtol=2.0**-4)  # 3 mantissa bits: half an ulp is 1/16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_cache_quantizes_like_the_ref(dtype: torch.dtype) -> None:
    slots = torch.tensor([3, -1, 7, 20, 0, -5, 39, 12])
    k, v = (torch.randn(8, 2, 32) * 3).to(dtype), (torch.randn(8, 2, 32) * 3).to(dtype)
    k_cache, v_cache = (torch.zeros(10, 4, 2, 32, dtype=FP8_DTYPE) for _ in range(2))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    K.store_kv_cache(k, v, k_cache, v_cache, slots, K_SCALE, V_SCALE)
    K.store_kv_cache_ref(k, v, k_ref, v_ref, slots, K_SCALE, V_SCALE)
    assert_fp8_codes_match(k_cache, k_ref)
    assert_fp8_codes_match(v_cache, v_ref)
    assert k_cache[2].float().abs().sum() == 0  # no slot in block 2: untouched


def test_rotary_store_kv_quantizes_like_the_ref() -> None:
    positions = torch.randint(0, 50, (6,))
    angles = torch.rand(50, 16) * 6.0
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=1)
    slots = torch.tensor([5, -1, 0, 17, 9, 2])
    q, k, v = torch.randn(6, 4, 32), torch.randn(6, 2, 32) * 2, torch.randn(6, 2, 32) * 2
    q_ref, k_ref, v_ref = q.clone(), k.clone(), v.clone()
    caches = [torch.zeros(5, 4, 2, 32, dtype=FP8_DTYPE) for _ in range(4)]
    K.rotary_store_kv(positions, q, k, v, cos_sin, caches[0], caches[1], slots, K_SCALE, V_SCALE)
    K.rotary_store_kv_ref(positions, q_ref, k_ref, v_ref, cos_sin, caches[2], caches[3], slots, K_SCALE, V_SCALE)
    assert _rel_err(q, q_ref) < 1e-6
    assert_fp8_codes_match(caches[0], caches[2])
    assert_fp8_codes_match(caches[1], caches[3])


# fp32 queries only: the interpreter's bf16 attention is wrong with or without fp8 (as in
# tests/test_kernels.py); tests/test_kernels_gpu.py runs bf16 queries on fp8 caches.
@pytest.mark.parametrize("num_splits", [1, 3])
def test_paged_decode_dequantizes_like_the_ref(num_splits: int) -> None:
    lens = [37, 0, 64, 1, 100]
    k_cache, v_cache = _fp8_cache(64, 8, 2, 32)
    tables = _block_tables(lens, 8, 64)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(len(lens), 4, 32)
    ref = K.paged_decode_attention_ref(q, k_cache, v_cache, tables, context_lens, 0.2, None, K_SCALE, V_SCALE)
    launch = decode_module.DecodeLaunch(num_splits=num_splits, tile_tokens=16, num_warps=4, num_stages=1)
    out = torch.full_like(ref, float("nan"))
    decode_module.launch_decode(launch, q, k_cache, v_cache, tables, context_lens, 0.2, out, K_SCALE, V_SCALE)
    assert _rel_err(out, ref) < 1e-4
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_paged_prefill_dequantizes_like_the_ref() -> None:
    q_lens, context = [5, 19, 1], [21, 19, 40]  # cached prefix + new tokens
    k_cache, v_cache = _fp8_cache(32, 4, 2, 32)
    tables = _block_tables(context, 4, 32)
    cu = torch.tensor([0, *q_lens]).cumsum(0).int()  # [0, 5, 24, 25]
    q = torch.randn(25, 4, 32)
    context_lens = torch.tensor(context, dtype=torch.int32)
    ref = K.paged_prefill_attention_ref(q, k_cache, v_cache, tables, cu, context_lens, 19, 0.2, None, K_SCALE, V_SCALE)
    launch = prefill_module.PrefillLaunch(block_m=16, block_n=16, num_warps=4, num_stages=1)
    out = prefill_module.launch_prefill(launch, q, k_cache, v_cache, tables, cu, context_lens, 19, 0.2, None, K_SCALE, V_SCALE)
    assert _rel_err(out, ref) < 1e-4


def test_references_attend_over_the_dequantized_cache() -> None:
    """Reference on fp8 == reference on the fp32 cache `stored * scale` (the dequantization)."""
    lens = [30, 7]
    k_cache, v_cache = _fp8_cache(16, 4, 2, 32)
    tables = _block_tables(lens, 4, 16)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    k_deq, v_deq = k_cache.float() * K_SCALE, v_cache.float() * V_SCALE
    q = torch.randn(2, 4, 32)
    out = K.paged_decode_attention_ref(q, k_cache, v_cache, tables, context_lens, 0.3, None, K_SCALE, V_SCALE)
    assert _rel_err(out, K.paged_decode_attention_ref(q, k_deq, v_deq, tables, context_lens, 0.3)) < 1e-6
    qp, cu = torch.randn(9, 4, 32), torch.tensor([0, 2, 9], dtype=torch.int32)
    out = K.paged_prefill_attention_ref(qp, k_cache, v_cache, tables, cu, context_lens, 7, 0.3, None, K_SCALE, V_SCALE)
    assert _rel_err(out, K.paged_prefill_attention_ref(qp, k_deq, v_deq, tables, cu, context_lens, 7, 0.3)) < 1e-6


def test_copy_kv_blocks_moves_fp8_blocks_bit_exactly() -> None:
    src = quantize_kv_ref(torch.randn(2, 2, 6, 4, 2, 8) * 10, 1.0, FP8_DTYPE)
    dst = torch.zeros(2, 2, 5, 4, 2, 8, dtype=FP8_DTYPE)
    src_ids, dst_ids = torch.tensor([5, 0, 3]), torch.tensor([1, 4, 0])
    K.copy_kv_blocks(src, src_ids, dst, dst_ids)
    assert torch.equal(dst.view(torch.uint8)[:, :, dst_ids], src.view(torch.uint8)[:, :, src_ids])
    ref = torch.zeros_like(dst)
    K.copy_kv_blocks_ref(src, src_ids, ref, dst_ids)
    assert torch.equal(ref.view(torch.uint8), dst.view(torch.uint8))


def test_wrappers_reject_mixed_dtypes_and_bad_scales() -> None:
    k_cache, v_cache = _fp8_cache(4, 4, 2, 32)
    q, tables, lens = torch.randn(1, 4, 32), torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="k_scale must be a positive"):
        K.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.2, None, 0.0, 1.0)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        K.paged_decode_attention(q, k_cache, v_cache.float(), tables, lens, 0.2)
    with pytest.raises(ValueError, match="v_scale must be a positive"):
        K.store_kv_cache(
            torch.randn(1, 2, 32), torch.randn(1, 2, 32), k_cache, v_cache, torch.zeros(1, dtype=torch.long), 1.0, float("nan")
        )


def test_fp8_decode_reads_twice_the_tokens_per_tile() -> None:
    """The same ~16 KB of K (and of V) in flight per iteration: 128 fp8 tokens where bf16 reads 64."""
    common = dict(
        num_seqs=32, num_kv_heads=8, max_num_blocks=256, block_size=16, head_dim=128, dtype=torch.bfloat16, sm_count=132
    )
    assert decode_module.choose_launch(**common).tile_tokens == 64
    assert decode_module.choose_launch(**common, kv_dtype=FP8_DTYPE).tile_tokens == 128
    assert decode_module.choose_launch(**common, kv_dtype=torch.bfloat16).tile_tokens == 64
