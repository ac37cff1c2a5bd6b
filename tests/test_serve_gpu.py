"""`pdserve serve --device cuda` on one GPU: a prefill and a decode worker share it (Ray gives each
half), KV leaves one CUDA cache and lands in the other (CUDA IPC by default, or gRPC); greedy
completions equal the offline engine on the same GPU. Run on the lent GPU machine: `pytest -m gpu`."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from pdserve.engine import LLM, SamplingParams
from tests.servers import free_port, wait_for_http

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPTS = ["Hello", "The key value cache is stored in fixed size blocks; a block table maps every request", "def add(a, b):"]


@pytest.mark.parametrize("kv_transport, expected", [("auto", "cuda_ipc"), ("grpc", "grpc")])
def test_serve_on_a_gpu_matches_the_offline_engine(tmp_path: Path, kv_transport: str, expected: str) -> None:
    from pdserve.engine.demo_model import write_demo_model

    model_dir = write_demo_model(tmp_path / "demo")
    port, log_path = free_port(), tmp_path / "serve.log"
    args = [
        sys.executable,
        "-m",
        "pdserve.deploy.cli",
        "serve",
        "--model",
        str(model_dir),
        "--served-model-name",
        "demo",
        "--device",
        "cuda",
        "--dtype",
        "float32",
        "--port",
        str(port),
        "--kv-cache-memory-gib",
        "1",
        "--max-model-len",
        "1024",
        "--max-num-seqs",
        "32",
        "--kv-transport",
        kv_transport,
        "--admin-token",
        "t",
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(base + "/health", timeout_s=300, process=process, log_path=log_path)
        reference = LLM(
            model=str(model_dir), device="cuda", dtype="float32", kv_cache_memory_gib=1, max_model_len=1024, max_num_seqs=32
        )
        for prompt in PROMPTS:
            body = {
                "model": "demo",
                "prompt": prompt,
                "max_tokens": 40,
                "temperature": 0,
                "ignore_eos": True,
                "logprobs": 0,
                "return_tokens_as_token_ids": True,
            }
            choice = httpx.post(base + "/v1/completions", json=body, timeout=60).json()["choices"][0]
            [want] = reference.generate(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
            assert [int(t.split(":")[1]) for t in choice["logprobs"]["tokens"]] == want.outputs[0].token_ids
            assert choice["text"] == want.outputs[0].text
        workers = {
            w["role"]: w["status"]
            for w in httpx.get(base + "/admin/workers", headers={"Authorization": "Bearer t"}, timeout=10).json()["workers"]
        }
        assert int(workers["prefill"]["kv_bytes_sent"]) == int(workers["decode"]["kv_bytes_received"]) > 0
        assert workers["prefill"]["num_used_blocks"] == workers["decode"]["num_used_blocks"] == 0
        metrics = httpx.get(base + "/metrics", timeout=10).text
        assert f'pdserve:kv_transfer_bytes_total{{model_name="demo",transport="{expected}"}}' in metrics
    finally:
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=60)
    assert returncode == 0, log_path.read_text()[-3000:]
