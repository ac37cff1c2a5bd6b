"""The fp8 KV cache on a CUDA GPU: the store kernels quantize bit for bit as torch does, both
attention kernels read fp8 caches as their references do at realistic sizes, CUDA-graph decode
equals eager decode, accuracy against the bf16 cache, and an fp8 hand-off between two processes
(CUDA IPC, gRPC) equals the colocated fp8 engine. Run on the lent GPU machine: `pytest -m gpu`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="TRITON_INTERPRET=1 interprets the kernels"),
]

import pdserve.kernels as K
from pdserve.deploy.worker_host import WorkerHost, WorkerSpec
from pdserve.engine import LLM
from pdserve.engine.config import EngineConfig
from pdserve.engine.core import EngineCore
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kernels.kv_quant import FP8_DTYPE, quantize_kv_ref
from tests.servers import CLUSTER_SECRET, worker_process
from tests.test_handoff_faults import connect, engine
from tests.test_kernels_gpu import _decode_inputs, _prefill_inputs
from tests.test_kv_fp8_accuracy import (
    MAX_MEAN_KL,
    MIN_TOP1_AGREEMENT,
    NEAR_TIE,
    PROMPTS,
    measure,
)
from tests.test_workers import expected_tokens, greedy, run

DEVICE = "cuda"
K_SCALE, V_SCALE = 0.5, 0.25
TOLERANCE = 1e-2  # bf16 queries, as tests/test_kernels_gpu.py


def _to_fp8(cache: torch.Tensor) -> torch.Tensor:
    return quantize_kv_ref(cache.float() * 4, 1.0, FP8_DTYPE)  # codes up to ~16: values up to ~4-8 after scaling


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("shape", [(32, 32, 8, 128, 16, 4096), (7, 32, 8, 128, 16, 1000), (5, 16, 2, 256, 16, 2000)])
def test_paged_decode_attention_reads_fp8_like_its_reference(shape: tuple[int, ...]) -> None:
    q, k_cache, v_cache, block_tables, context_lens, scale = _decode_inputs(shape, torch.bfloat16)
    k8, v8 = _to_fp8(k_cache), _to_fp8(v_cache)
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=DEVICE)
    K.paged_decode_attention(q, k8, v8, block_tables, context_lens, scale, out, K_SCALE, V_SCALE)
    ref = K.paged_decode_attention_ref(q, k8, v8, block_tables, context_lens, scale, None, K_SCALE, V_SCALE)
    assert _rel_err(out, ref) < TOLERANCE


@pytest.mark.parametrize("case_index", [0, 1, 4])
def test_paged_prefill_attention_reads_fp8_like_its_reference(case_index: int) -> None:
    from tests.test_kernels_gpu import PREFILL_CASES

    q, k_cache, v_cache, *rest = _prefill_inputs(PREFILL_CASES[case_index], torch.bfloat16)
    k8, v8 = _to_fp8(k_cache), _to_fp8(v_cache)
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=DEVICE)
    K.paged_prefill_attention(q, k8, v8, *rest, out=out, k_scale=K_SCALE, v_scale=V_SCALE)
    ref = K.paged_prefill_attention_ref(q, k8, v8, *rest, k_scale=K_SCALE, v_scale=V_SCALE)
    assert _rel_err(out, ref) < TOLERANCE


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_store_kv_cache_quantizes_bit_for_bit_like_torch(dtype: torch.dtype) -> None:
    k, v = (torch.randn(4096, 8, 128, device=DEVICE) * 100).to(dtype), torch.randn(4096, 8, 128, device=DEVICE).to(dtype)
    slots = torch.randperm(300 * 16, device=DEVICE)[:4096]
    slots[::7] = -1
    caches = [torch.zeros(300, 16, 8, 128, dtype=FP8_DTYPE, device=DEVICE) for _ in range(4)]
    K.store_kv_cache(k, v, caches[0], caches[1], slots, K_SCALE, V_SCALE)
    K.store_kv_cache_ref(k, v, caches[2], caches[3], slots, K_SCALE, V_SCALE)
    assert torch.equal(caches[0].view(torch.uint8), caches[2].view(torch.uint8))  # saturated values too (k * 100)
    assert torch.equal(caches[1].view(torch.uint8), caches[3].view(torch.uint8))


def test_rotary_store_kv_quantizes_like_torch() -> None:
    from tests.test_kernels_gpu import _qkv_views, _rotary_inputs

    qkv, positions, cos_sin = _rotary_inputs(torch.bfloat16)
    qkv_ref = qkv.clone()
    slots = torch.randperm(300 * 16, device=DEVICE)[: qkv.shape[0]]
    caches = [torch.zeros(300, 16, 8, 128, dtype=FP8_DTYPE, device=DEVICE) for _ in range(4)]
    K.rotary_store_kv(positions, *_qkv_views(qkv), cos_sin, caches[0], caches[1], slots, K_SCALE, V_SCALE)
    K.rotary_store_kv_ref(positions, *_qkv_views(qkv_ref), cos_sin, caches[2], caches[3], slots, K_SCALE, V_SCALE)
    assert torch.equal(caches[1].view(torch.uint8), caches[3].view(torch.uint8))  # v: not rotated, bit for bit
    # rotated k: the bf16 rotation may round differently (as in test_kernels_gpu), which moves a value
    # to the neighbouring e4m3 code at most (2^-3 of it, or a subnormal step near 0), and rarely
    k_out, k_ref = caches[0].float() * K_SCALE, caches[2].float() * K_SCALE
    step = 2.0**-3 * torch.maximum(k_out.abs(), k_ref.abs()) + 2.0**-9 * K_SCALE
    assert ((k_out - k_ref).abs() <= step).all()
    assert (caches[0].view(torch.uint8) != caches[2].view(torch.uint8)).float().mean() < 0.01


@pytest.fixture(scope="module")
def llama_dir(checkpoints: dict[str, Path]) -> Path:
    return checkpoints["llama"]


def test_fp8_cuda_graph_decode_equals_eager_decode(llama_dir: Path) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    outputs = []
    for enforce_eager in (False, True):
        llm = LLM(
            str(llama_dir),
            device="cuda",
            dtype="float32",
            kv_cache_dtype="fp8",
            kv_cache_memory_gib=0.1,
            max_model_len=256,
            enforce_eager=enforce_eager,
        )
        outputs.append([o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)])
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_fp8_kv_stays_close_to_the_bf16_cache_on_the_gpu(checkpoints: dict[str, Path], family: str) -> None:
    def runner(kv_cache_dtype: str) -> object:
        config = EngineConfig(
            model=str(checkpoints[family]),
            device="cuda",
            dtype="bfloat16",
            kv_cache_dtype=kv_cache_dtype,
            num_kv_blocks=32,
            max_model_len=256,
            enforce_eager=True,
        )
        return EngineCore.load(config)

    reference, fp8 = runner("auto"), runner("fp8")
    prompts = [reference.tokenizer.encode(p) for p in PROMPTS]
    m = measure(reference.runner, fp8.runner, prompts)
    print(f"{family} (bf16 model, cuda): " + ", ".join(f"{name} {value:.3g}" for name, value in m.items()))
    assert m["kl"] <= MAX_MEAN_KL and m["top1"] >= MIN_TOP1_AGREEMENT and m["max_flip_margin"] < NEAR_TIE


@pytest.mark.parametrize("transport, expected", [("auto", "cuda_ipc"), ("grpc", "grpc")])
def test_fp8_hand_off_between_processes_equals_the_colocated_fp8_engine(llama_dir: Path, transport: str, expected: str) -> None:
    reference = LLM(
        model=str(llama_dir),
        device="cuda",
        dtype="float32",
        kv_cache_memory_gib=0.25,
        max_model_len=512,
        max_num_seqs=16,
        kv_cache_dtype="fp8",
    )
    ids = reference.get_tokenizer().encode("fp8 keys and values move between the workers as raw bytes " * 30)
    host = WorkerHost(
        WorkerSpec(
            "prefill", engine(llama_dir, "cuda", kv_cache_dtype="fp8"), "m", kv_transport=transport, cluster_secret=CLUSTER_SECRET
        )
    )
    prefill = connect(host, host.start().address, "prefill")
    try:
        args = ("--device", "cuda", "--kv-cache-memory-gib", "0.25", "--kv-cache-dtype", "fp8")
        with worker_process("decode", llama_dir, *args) as (_, address):
            decode = connect(None, address, "decode")
            # Each length a chain of its own (cache_salt), then the longest again: the decode worker
            # keeps the 18 full blocks of its first 299 tokens (fp8 KV, cached) and is sent the rest.
            for length, salt, present in [(n, f"length {n}", 0) for n in (1, 17, 300)] + [(300, "length 300", 18)]:
                params = greedy(12, cache_salt=salt)
                result = run(prefill, decode, ids[:length], params)
                assert result.token_ids == expected_tokens(reference, ids[:length], params), (length, present)
                assert result.prefill.kv_transport == expected
                assert result.prefill.kv_present_blocks == present
                assert (
                    result.prefill.kv_bytes == (-(-length // 16) - present) * 16 * 2 * 2 * 2 * 16
                )  # blocks x layers x K,V x heads x dim, 1 byte
            decode.wait_idle()
            decode.channel.close()
        prefill.wait_idle()
    finally:
        prefill.channel.close()
        host.stop()
