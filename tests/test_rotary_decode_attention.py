"""rotary_decode_attention (rotary + KV store + split-KV decode attention in one kernel) against the
two calls it replaces, rotary_store_kv then paged_decode_attention: the output within the dtype's
tolerance, the caches equal (bit for bit on the GPU; the interpreter's fma rounds unlike a GPU's).
On the CPU under TRITON_INTERPRET=1, on a GPU otherwise (`pytest -m gpu`)."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from pdserve.kernels.kv_quant import FP8_DTYPE, quantize_kv_ref
from pdserve.kernels.paged_decode_attention import DecodeLaunch, paged_decode_attention_ref
from pdserve.kernels.rotary_embedding import rotary_store_kv, rotary_store_kv_ref
from pdserve.kernels.split_counters import split_counters

fused = importlib.import_module("pdserve.kernels.rotary_decode_attention")  # the package's name is the function

IS_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not IS_INTERPRETED else "cpu"
pytestmark = [
    pytest.mark.skipif(DEVICE == "cpu" and not IS_INTERPRETED, reason="TRITON_INTERPRET=1 or a GPU"),
    *([pytest.mark.gpu] if DEVICE == "cuda" else []),
]
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}
CONTEXT_LENS = [33, 0, 64, 1, 65, 100]  # padding row, mid-block, tile edge, new token alone, ...


def _step(num_heads, num_kv_heads, head_dim, lens, dtype, kv_dtype=None, block_size=16):
    kv_dtype = kv_dtype or dtype
    need = [-(-n // block_size) for n in lens]
    num_blocks = sum(need) + 4
    ids = torch.randperm(num_blocks)
    tables = torch.full((len(lens), max(need) + 2), -1, dtype=torch.int32)
    slots, start = [], 0
    for seq, (n, count) in enumerate(zip(lens, need)):
        tables[seq, :count] = ids[start : start + count]
        start += count
        slots.append(int(tables[seq, (n - 1) // block_size]) * block_size + (n - 1) % block_size if n else -1)
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.randn(len(lens), width + 8).to(dtype).to(DEVICE)
    q, k, v = qkv[:, :width].split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], 1)
    q, k, v = (x.unflatten(1, (-1, head_dim)) for x in (q, k, v))
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.arange(max(lens) + 1).float()[:, None] * inv_freq[None, :]
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim)
    scales = (0.05, 0.02) if kv_dtype == FP8_DTYPE else (1.0, 1.0)
    cache = quantize_kv_ref(cache, scales[0], FP8_DTYPE) if kv_dtype == FP8_DTYPE else cache.to(dtype)
    cache = cache.to(DEVICE)
    return dict(
        positions=torch.tensor([max(n - 1, 0) for n in lens], device=DEVICE),
        q=q, k=k, v=v,
        cos_sin_cache=torch.cat([angles.cos(), angles.sin()], 1).to(DEVICE),
        k_cache=cache[0], v_cache=cache[1],
        slot_mapping=torch.tensor(slots, device=DEVICE),
        block_tables=tables.to(DEVICE),
        context_lens=torch.tensor(lens, dtype=torch.int32, device=DEVICE),
        scale=head_dim**-0.5, k_scale=scales[0], v_scale=scales[1],
    )  # fmt: skip


def _two_calls(s, store):
    q, k, kc, vc = s["q"].clone(), s["k"].clone(), s["k_cache"].clone(), s["v_cache"].clone()
    scales = (s["k_scale"], s["v_scale"])
    store(s["positions"], q, k, s["v"], s["cos_sin_cache"], kc, vc, s["slot_mapping"], *scales)
    out = paged_decode_attention_ref(q, kc, vc, s["block_tables"], s["context_lens"], s["scale"], None, *scales)
    return out, kc, vc


def _check(s, launch, early_tile=None):
    is_fp8 = s["k_cache"].dtype == FP8_DTYPE
    ref, kc_ref, vc_ref = _two_calls(s, rotary_store_kv if IS_INTERPRETED and is_fp8 else rotary_store_kv_ref)
    _, kc_kernel, vc_kernel = _two_calls(s, rotary_store_kv)
    q_before = s["q"].clone()
    out = torch.full(s["q"].shape, float("nan"), dtype=s["q"].dtype, device=DEVICE)
    args = [s[n] for n in ("positions", "q", "k", "v", "cos_sin_cache", "k_cache", "v_cache", "slot_mapping")]
    args += [s["block_tables"], s["context_lens"], s["scale"], out, s["k_scale"], s["v_scale"]]
    fused.rotary_decode_attention(*args, launch=launch, early_tile=early_tile)
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err < TOLERANCE[s["q"].dtype], err
    assert torch.equal(out[s["context_lens"] == 0], torch.zeros_like(out[s["context_lens"] == 0]))
    assert torch.equal(s["q"], q_before)
    if DEVICE == "cuda":  # same fma pattern as the compiled rotary_store_kv: bit-equal
        assert torch.equal(s["k_cache"].view(torch.uint8), kc_kernel.view(torch.uint8))
    else:
        assert torch.allclose(s["k_cache"].float(), kc_kernel.float(), rtol=1e-2 if is_fp8 else 1e-6, atol=1e-6)
    assert torch.equal(s["v_cache"].view(torch.uint8), vc_kernel.view(torch.uint8))


LAUNCHES = {
    "one-split": DecodeLaunch(num_splits=1, tile_tokens=32, num_warps=4, num_stages=1),
    "three-splits": DecodeLaunch(num_splits=3, tile_tokens=32, num_warps=4, num_stages=1),
    "nine-splits": DecodeLaunch(num_splits=9, tile_tokens=16, num_warps=4, num_stages=1),
}


EARLY_TILE = pytest.mark.parametrize("early_tile", [False, True], ids=["tiles-after-wait", "first-tile-early"])


@EARLY_TILE
@pytest.mark.parametrize("launch", LAUNCHES.values(), ids=LAUNCHES.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(("h", "kvh", "d"), [(4, 4, 64), (8, 2, 128), (16, 2, 64), (28, 4, 64)])
def test_equals_two_calls(h, kvh, d, dtype, launch, early_tile):
    torch.manual_seed(0)
    _check(_step(h, kvh, d, CONTEXT_LENS, dtype), launch, early_tile)


@EARLY_TILE
@pytest.mark.parametrize("launch", LAUNCHES.values(), ids=LAUNCHES.keys())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_fp8_cache(dtype, launch, early_tile):
    torch.manual_seed(0)
    _check(_step(8, 2, 64, CONTEXT_LENS, dtype, FP8_DTYPE), launch, early_tile)


@EARLY_TILE
@pytest.mark.parametrize("launch", LAUNCHES.values(), ids=LAUNCHES.keys())
def test_unstored_token_is_read_from_the_cache(launch, early_tile):
    """A negative slot stores nothing: the attention reads position context_len - 1 from the cache,
    as rotary_store_kv then paged_decode_attention would, whichever tile and split holds it."""
    torch.manual_seed(0)
    s = _step(8, 2, 64, CONTEXT_LENS, torch.float32)
    s["slot_mapping"][[0, 3, 4]] = -1  # lengths 33, 1 and 65
    cache_before = s["k_cache"].clone()
    _check(s, launch, early_tile)
    assert not torch.equal(s["k_cache"], cache_before)  # the other rows still stored theirs


@EARLY_TILE
def test_counters_zero_again(early_tile):
    """The last split resets its counter: a second launch merges as the first did (with the early
    tile, short rows' empty splits end without counting)."""
    torch.manual_seed(0)
    s = _step(8, 2, 64, CONTEXT_LENS, torch.float32)
    _check(s, LAUNCHES["three-splits"], early_tile)
    _check(s, LAUNCHES["three-splits"], early_tile)
    assert not split_counters("rotary_decode_attention", s["q"].device, 1).any()


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs")
@pytest.mark.parametrize("kv_dtype", [None, FP8_DTYPE], ids=["bf16-cache", "fp8-cache"])
def test_llama3_8b_shape_in_a_cuda_graph(kv_dtype):
    """Llama-3-8B's heads, batch 1 (many splits) and 64, captured once and replayed twice: each replay
    equals the two calls (the counters were reset by the replay before)."""
    for batch in (1, 64):
        torch.manual_seed(batch)
        s = _step(32, 8, 128, [1000 + 37 * i for i in range(batch)], torch.bfloat16, kv_dtype)
        ref, _, _ = _two_calls(s, rotary_store_kv)
        args = [s[n] for n in ("positions", "q", "k", "v", "cos_sin_cache", "k_cache", "v_cache", "slot_mapping")]
        args += [s["block_tables"], s["context_lens"], s["scale"], None, s["k_scale"], s["v_scale"]]
        fused.rotary_decode_attention(*args)  # compiles and sizes the counters outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fused.rotary_decode_attention(*args)
        for _ in range(2):
            out.zero_()
            graph.replay()
            torch.cuda.synchronize()
            err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
            assert err < TOLERANCE[torch.bfloat16], (batch, err)
