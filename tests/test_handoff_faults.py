"""A decode worker killed (SIGKILL) in the middle of a hand-off: the prefill worker's transfer fails
well within its deadline, its KV blocks come back, and the next request, to a new decode worker,
is served exactly. On the CPU over gRPC and NCCL's gloo form; on a GPU over CUDA IPC and gRPC."""

from __future__ import annotations

import time
from concurrent.futures import Future
from pathlib import Path

import grpc
import pytest
import torch

from pdserve.deploy.worker_host import WorkerHost, WorkerSpec
from pdserve.engine import LLM
from pdserve.engine.config import EngineConfig
from pdserve.proto import auth
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from tests.servers import CLUSTER_SECRET, worker_process
from tests.test_workers import Result, Worker, expected_tokens, generate_request, greedy, prefill_request, reserve, run

pytestmark = pytest.mark.slow
FAIL_WITHIN_S = 30.0  # far below the hand-off's own deadlines (the lease, 60 s RPCs)
CASES = [
    pytest.param("cpu", "grpc", id="cpu-grpc"),
    pytest.param("cpu", "nccl", id="cpu-gloo"),
    pytest.param("cuda", "cuda_ipc", id="gpu-cuda_ipc", marks=pytest.mark.gpu),
    pytest.param("cuda", "grpc", id="gpu-grpc", marks=pytest.mark.gpu),
]


def engine(model: Path, device: str, **overrides: object) -> EngineConfig:
    kwargs = dict(device=device, dtype="float32", kv_cache_memory_gib=0.25, max_model_len=512, max_num_seqs=16) | overrides
    return EngineConfig(model=str(model), **kwargs)


def decode_worker(model: Path, device: str) -> object:
    return worker_process("decode", model, "--device", device, "--kv-cache-memory-gib", "0.25", "--max-model-len", "512")


def connect(host: WorkerHost, address: str, role: str) -> Worker:
    channel = auth.blocking_channel(address, CLUSTER_SECRET, "test-gateway")
    stub = pb_grpc.PrefillWorkerStub(channel) if role == "prefill" else pb_grpc.DecodeWorkerStub(channel)
    return Worker(role, host, address, channel, stub)


@pytest.mark.parametrize("device, transport", CASES)
def test_a_decode_worker_killed_mid_hand_off_fails_the_transfer_frees_the_blocks_and_the_next_request_is_served(
    device: str, transport: str, checkpoints: dict[str, Path]
) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = checkpoints["llama"]
    reference = LLM(
        model=str(model), device=device, dtype="float32", kv_cache_memory_gib=0.25, max_model_len=512, max_num_seqs=16
    )
    prompt = reference.get_tokenizer().encode("the decode worker goes away while the prompt is computed " * 40)[:400]
    # One token a step: the prompt is still being computed when its decode worker dies.
    spec = WorkerSpec(
        "prefill", engine(model, device, max_num_batched_tokens=1), "m", kv_transport=transport, cluster_secret=CLUSTER_SECRET
    )
    host = WorkerHost(spec)
    prefill = connect(host, host.start().address, "prefill")
    try:
        with decode_worker(model, device) as (process, address):
            decode = connect(None, address, "decode")
            warm = run(prefill, decode, prompt[:20], greedy(4))  # the peer is handshaken and cached
            assert warm.token_ids == expected_tokens(reference, prompt[:20], greedy(4))
            assert warm.prefill.kv_transport == transport
            request = generate_request(prompt, greedy(4), "killed-mid-hand-off", lease_s=300)
            stream, reservation = reserve(decode, request)
            call: Future = prefill.stub.Prefill.future(prefill_request(request, reservation), timeout=300)
            deadline = time.monotonic() + 60
            while prefill.status().num_used_blocks == 0:  # admitted and computing
                assert time.monotonic() < deadline and not call.done()
                time.sleep(0.002)
            process.kill()
            killed_at = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                call.result(timeout=FAIL_WITHIN_S + 5)
            assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED), caught.value.details()
            assert time.monotonic() - killed_at < FAIL_WITHIN_S
            decode.channel.close()
        prefill.wait_idle(timeout_s=10)  # every block back
        with decode_worker(model, device) as (process, address):
            decode = connect(None, address, "decode")
            result = run(prefill, decode, prompt[:30], greedy(6))
            assert result.token_ids == expected_tokens(reference, prompt[:30], greedy(6))
            assert isinstance(result, Result) and result.finished.finish_reason == "length"
            decode.wait_idle()
            decode.channel.close()
        prefill.wait_idle()
    finally:
        prefill.channel.close()
        host.stop()
