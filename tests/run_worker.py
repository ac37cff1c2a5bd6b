"""One worker in a process of its own, for tests that kill it:
`python -m tests.run_worker ROLE MODEL_DIR [--device D] [--kv-transport T] [--kv-cache-memory-gib G]
[--max-model-len N] [--max-num-seqs N] [--max-num-batched-tokens N] [--redis-url URL]
[--kv-cache-dtype auto|fp8]` with PDSERVE_CLUSTER_SECRET set. Prints `ADDRESS host:port` once it
serves (and heartbeats to Redis, given a URL), then serves until killed."""

from __future__ import annotations

import argparse
import os
import sys
import threading

from pdserve.deploy.worker_host import GIL_SWITCH_INTERVAL_S, WorkerHost, WorkerSpec
from pdserve.engine.config import EngineConfig
from pdserve.proto.cluster_secret import ENV_VAR, ClusterSecret


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["prefill", "decode"])
    parser.add_argument("model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-transport", default="auto")
    parser.add_argument("--kv-cache-memory-gib", type=float, default=0.25)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--kv-cache-dtype", default="auto")
    args = parser.parse_args()
    device = args.device
    if device.startswith("cuda:"):  # that GPU first: it is cuda:0 to every thread here, the others follow
        index = device.split(":")[1]
        others = [str(i) for i in range(8) if str(i) != index]
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join([index, *others[: _num_gpus() - 1]])
        device = "cuda"
    engine = EngineConfig(
        model=args.model,
        device=device,
        dtype=args.dtype,
        kv_cache_memory_gib=args.kv_cache_memory_gib,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # as in a Ray worker process
    secret = ClusterSecret(os.environ[ENV_VAR])
    spec = WorkerSpec(
        args.role, engine, model_name="m", kv_transport=args.kv_transport, redis_url=args.redis_url, cluster_secret=secret
    )
    host = WorkerHost(spec)
    print(f"ADDRESS {host.start().address}", flush=True)
    threading.Event().wait()  # `host` stays referenced: its gRPC server lives as long as it does


def _num_gpus() -> int:
    import subprocess

    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True).stdout
    return len([line for line in out.splitlines() if line.startswith("GPU ")])


if __name__ == "__main__":
    main()
