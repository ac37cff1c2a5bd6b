"""The gateway's one retry of a hand-off that failed before its first token, landing on the same
prefill worker (the pool's only one) while the first attempt is still ending there: the retry is
served, exactly, not refused as a duplicate request (which reached the client as a 400)."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest

from pdserve.deploy.worker_host import WorkerHost, WorkerSpec
from pdserve.engine import LLM
from pdserve.engine.config import EngineConfig
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.tokenizer import Tokenizer
from pdserve.router.disaggregated import DisaggregatedBackend
from pdserve.router.registry import InMemoryRegistry
from pdserve.router.workers import WorkerPool
from tests.servers import CLUSTER_SECRET

pytestmark = pytest.mark.slow
MAX_MODEL_LEN = 512
FREEZE_S = 8.0  # the frozen decode worker's gRPC loop: longer than the health checks take to notice


def engine(model: Path, **overrides: object) -> EngineConfig:
    kwargs = dict(device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN, num_kv_blocks=128) | overrides
    return EngineConfig(model=str(model), **kwargs)


def test_a_retry_on_the_same_prefill_worker_is_served_while_the_first_attempt_ends(checkpoints: dict[str, Path]) -> None:
    model = checkpoints["llama"]
    tokenizer = Tokenizer.from_pretrained(model)
    prompt = tokenizer.encode("the decode worker freezes while the prompt is computed " * 40)[:400]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    [expected] = LLM(str(model), device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN).generate(
        [{"prompt_token_ids": prompt}], params
    )

    def spec(role: str, name: str, **overrides: object) -> WorkerSpec:
        return WorkerSpec(
            role, engine(model, **overrides), "m", worker_id=name, kv_transport="grpc", cluster_secret=CLUSTER_SECRET
        )

    # Eight prompt tokens a step: the prompt is still being computed when its decode worker freezes.
    hosts = {
        "prefill": WorkerHost(spec("prefill", "prefill", max_num_batched_tokens=8)),
        "decode-a": WorkerHost(spec("decode", "decode-a")),
        "decode-b": WorkerHost(spec("decode", "decode-b")),
    }
    records = [host.start() for host in hosts.values()]
    frozen: list[str] = []
    frozen_at = [0.0]

    async def main() -> list[int]:
        pool = WorkerPool(InMemoryRegistry(records), CLUSTER_SECRET, poll_interval_s=0.2, rpc_timeout_s=1.0)
        await pool.start()
        assert await pool.wait_ready(30)
        backend = DisaggregatedBackend(pool, tokenizer, "m", MAX_MODEL_LEN)

        async def freeze_the_decode_worker_once_the_prompt_is_computed() -> None:
            while not frozen:
                await asyncio.sleep(0.01)
                busy = [w for w in pool.workers.values() if w.record.role == "decode" and w.num_in_flight]
                if busy and hosts["prefill"].worker.status()["num_used_blocks"]:
                    frozen.append(busy[0].record.worker_id)
                    frozen_at[0] = time.monotonic()
                    hosts[frozen[0]]._loop.call_soon_threadsafe(time.sleep, FREEZE_S)  # as a stopped process: no answers

        freezer = asyncio.create_task(freeze_the_decode_worker_once_the_prompt_is_computed())
        try:
            tokens = []
            async for delta in backend.generate(uuid.uuid4().hex, prompt, params):
                tokens += delta.token_ids
            return tokens
        finally:
            freezer.cancel()
            await backend.close()

    try:
        tokens = asyncio.run(main())
        assert frozen, "the decode worker was never frozen mid-prefill"
        assert tokens == expected.outputs[0].token_ids  # served by the retry, on the other decode worker
        deadline = time.monotonic() + FREEZE_S + 10
        while hosts["prefill"].worker.status()["num_used_blocks"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert hosts["prefill"].worker.status()["num_used_blocks"] == 0
    finally:
        time.sleep(max(0.0, frozen_at[0] + FREEZE_S - time.monotonic()))  # the frozen loop wakes before its host stops
        for host in hosts.values():
            host.stop()
