"""KV hand-off on a GPU: the block-copy kernel against its reference, and prefill -> decode workers in
two processes over CUDA IPC (and the other GPU transports) giving the offline engine's tokens, with
layer groups streamed while the prompt computes. Run on the lent GPU machine: `pytest -m gpu`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pdserve import kernels
from pdserve.deploy.worker_host import WorkerHost, WorkerSpec
from pdserve.engine import LLM
from tests.conftest import write_hf_checkpoint
from tests.servers import CLUSTER_SECRET, worker_process
from tests.test_handoff_faults import connect, engine
from tests.test_workers import expected_tokens, greedy, run

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn])
@pytest.mark.parametrize("shape", [(4, 16, 8, 128), (3, 1, 2, 64), (2, 32, 4, 80)], ids=["llama", "block-of-1", "odd-head-dim"])
def test_block_copy_kernel_moves_exactly_the_named_blocks(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    num_layers, block_size, num_kv_heads, head_dim = shape
    src = (torch.randn(num_layers, 2, 40, block_size, num_kv_heads, head_dim, device="cuda") * 8).to(dtype)
    dst = torch.full((num_layers, 2, 50, block_size, num_kv_heads, head_dim), float("nan"), device="cuda").to(dtype)
    src_ids, dst_ids = torch.randperm(40, device="cuda")[:17], torch.randperm(50, device="cuda")[:17]
    expected = dst.clone()
    kernels.copy_kv_blocks_ref(src, src_ids, expected, dst_ids)
    kernels.copy_kv_blocks(src, src_ids, dst, dst_ids)
    torch.cuda.synchronize()
    assert torch.equal(dst.view(torch.uint8), expected.view(torch.uint8))  # bit for bit; the rest still NaN
    others = [b for b in range(50) if b not in dst_ids.tolist()]
    assert dst[:, :, others].float().isnan().all()


def test_block_copy_kernel_refuses_mismatched_inputs() -> None:
    src = torch.zeros(2, 2, 4, 16, 2, 8, device="cuda")
    ids = torch.arange(2, device="cuda")
    with pytest.raises(ValueError, match="differ outside the block dim"):
        kernels.copy_kv_blocks(src, ids, torch.zeros(2, 2, 4, 8, 2, 8, device="cuda"), ids)
    with pytest.raises(ValueError, match="share one of"):
        kernels.copy_kv_blocks(src, ids, torch.zeros(2, 2, 4, 16, 2, 8, device="cuda", dtype=torch.bfloat16), ids)
    with pytest.raises(ValueError, match="int64"):
        kernels.copy_kv_blocks(src, ids.int(), src, ids.int())


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Path:
    """9 layers: layer groups of 4 make three groups, the last a short one."""
    return write_hf_checkpoint(tmp_path_factory.mktemp("deep") / "llama", "llama", demo_model_dir, num_layers=9)


@pytest.mark.parametrize("transport, expected", [("auto", "cuda_ipc"), ("cuda_ipc", "cuda_ipc"), ("grpc", "grpc")])
def test_prefill_and_decode_processes_on_one_gpu_give_the_offline_engines_tokens(
    deep_llama: Path, transport: str, expected: str
) -> None:
    reference = LLM(
        model=str(deep_llama), device="cuda", dtype="float32", kv_cache_memory_gib=0.25, max_model_len=512, max_num_seqs=16
    )
    text = "the keys and values of every layer move to the decode worker while the prompt computes " * 30
    ids = reference.get_tokenizer().encode(text)
    host = WorkerHost(
        WorkerSpec("prefill", engine(deep_llama, "cuda"), "m", kv_transport=transport, cluster_secret=CLUSTER_SECRET)
    )
    prefill = connect(host, host.start().address, "prefill")
    try:
        with worker_process("decode", deep_llama, "--device", "cuda", "--kv-cache-memory-gib", "0.25") as (_, address):
            decode = connect(None, address, "decode")
            # Each length a chain of its own (cache_salt), then the longest again: the decode worker
            # keeps the 29 full blocks of its first 479 tokens and is sent the last block only.
            for length, salt, present in [(n, f"length {n}", 0) for n in (1, 15, 16, 17, 100, 480)] + [(480, "length 480", 29)]:
                params = greedy(12, cache_salt=salt)
                result = run(prefill, decode, ids[:length], params)
                assert result.token_ids == expected_tokens(reference, ids[:length], params), (length, present)
                assert result.prefill.kv_transport == expected
                assert result.prefill.kv_present_blocks == present
                assert (
                    result.prefill.kv_bytes == (-(-length // 16) - present) * 16 * 9 * 2 * 2 * 16 * 4
                )  # blocks x layers x K,V x heads x dim x fp32
            decode.wait_idle()
            status = decode.status()
            assert status.kv_bytes_received == prefill.status().kv_bytes_sent
            decode.channel.close()
        prefill.wait_idle()
    finally:
        prefill.channel.close()
        host.stop()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (NCCL refuses two ranks on one)")
@pytest.mark.parametrize("transport", ["nccl", "cuda_ipc"])
def test_two_gpus_of_one_host_give_the_offline_engines_tokens(deep_llama: Path, transport: str) -> None:
    reference = LLM(
        model=str(deep_llama), device="cuda", dtype="float32", kv_cache_memory_gib=0.25, max_model_len=512, max_num_seqs=16
    )
    ids = reference.get_tokenizer().encode("two GPUs, one process each, the KV between them " * 20)
    host = WorkerHost(
        WorkerSpec("prefill", engine(deep_llama, "cuda:0"), "m", kv_transport=transport, cluster_secret=CLUSTER_SECRET)
    )
    prefill = connect(host, host.start().address, "prefill")
    try:
        with worker_process("decode", deep_llama, "--device", "cuda:1", "--kv-cache-memory-gib", "0.25") as (_, address):
            decode = connect(None, address, "decode")
            for length in (7, 200):
                result = run(prefill, decode, ids[:length], greedy(10))
                assert result.token_ids == expected_tokens(reference, ids[:length], greedy(10))
                assert result.prefill.kv_transport == transport
            decode.channel.close()
    finally:
        prefill.channel.close()
        host.stop()
