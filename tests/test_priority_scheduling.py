"""`--scheduling-policy priority` (vLLM's): waiting requests are served by their `priority` (lower
first), then by arrival; when KV blocks run out, the running request served last goes first. Under
the default first come, first served, a request that asks for a priority is refused by name."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.request import Request
from pdserve.engine.sampling_params import InvalidRequestError, SamplingParams


def engine(path: Path, policy: str, **overrides: object) -> LLMEngine:
    config = EngineConfig(model=str(path), device="cpu", dtype="float32", scheduling_policy=policy, **overrides)
    return LLMEngine.from_config(config)


def greedy(max_tokens: int, priority: int = 0) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, priority=priority)


def run(llm: LLMEngine) -> list[str]:
    """Steps until every request is done; the request ids in the order they finished."""
    finished: list[str] = []
    while llm.has_unfinished_requests():
        finished += [r.request_id for r in llm.step() if r.is_finished and r.request_id not in finished]
    assert llm.core.block_manager.num_used_blocks == 0
    return finished


def prompts(num: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(length)] for _ in range(num)]


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_waiting_requests_are_served_by_priority_then_arrival(demo_model_dir: Path, policy: str) -> None:
    """One request at a time: the order they finish is the order they were served."""
    llm = engine(demo_model_dir, policy, max_num_seqs=1)
    names_and_priorities = [("low", 5), ("urgent-1", -1), ("mid", 1), ("urgent-2", -1), ("default", 0)]
    for (name, priority), prompt in zip(names_and_priorities, prompts(5, 12)):
        llm.add_request(name, prompt, greedy(3, priority if policy == "priority" else 0))
    expected = ["urgent-1", "urgent-2", "default", "mid", "low"] if policy == "priority" else [n for n, _ in names_and_priorities]
    assert run(llm) == expected


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_when_blocks_run_out_the_request_served_last_is_preempted(demo_model_dir: Path, policy: str) -> None:
    """Two requests that cannot both grow to their length in 8 blocks of 4 tokens, the second
    arriving while the first runs: under fcfs the later one is preempted, under priority the one of
    lower priority though it came first. Both still produce the tokens they produce alone."""
    early, late = prompts(2, 10, seed=1)
    priorities = {"early": 3, "late": 0} if policy == "priority" else {"early": 0, "late": 0}
    llm = engine(demo_model_dir, policy, block_size=4, num_kv_blocks=8, max_model_len=32)
    requests = {"early": llm.add_request("early", early, greedy(18, priorities["early"]))}
    for _ in range(2):  # running alone first: admitted before the other arrives
        llm.step()
    requests["late"] = llm.add_request("late", late, greedy(18, priorities["late"]))
    run(llm)
    victim, kept = ("early", "late") if policy == "priority" else ("late", "early")
    assert requests[victim].num_preemptions > 0 and requests[kept].num_preemptions == 0
    for name, prompt in (("early", early), ("late", late)):
        solo = engine(demo_model_dir, policy, block_size=4, num_kv_blocks=16, max_model_len=64)
        expected = solo.add_request(name, prompt, greedy(18))
        run(solo)
        assert requests[name].output_token_ids == expected.output_token_ids


def test_a_priority_under_first_come_first_served_is_refused_by_name(demo_model_dir: Path) -> None:
    llm = engine(demo_model_dir, "fcfs")
    with pytest.raises(InvalidRequestError, match="--scheduling-policy priority") as refused:
        llm.add_request("r", [5, 6, 7], greedy(2, priority=1))
    assert refused.value.param == "priority"
    assert not llm.has_unfinished_requests()
    with pytest.raises(InvalidRequestError, match="32-bit"):
        greedy(2, priority=2**31)


def test_the_gateway_passes_each_request_its_priority(demo_model_dir: Path) -> None:
    """Over HTTP (completions, chat, responses), with the engine on the priority policy: each
    request reaches the scheduler with the priority its body gave."""
    import openai

    from pdserve.engine.async_engine import AsyncEngine
    from pdserve.router.app import create_app
    from pdserve.router.backend import ColocatedBackend
    from tests.test_router_http import serve

    llm = engine(demo_model_dir, "priority", max_num_seqs=1, max_model_len=256)
    served: list[int] = []
    add = llm.scheduler.add

    def recording(request: Request) -> None:
        served.append(request.params.priority)
        add(request)

    llm.scheduler.add = recording  # type: ignore[method-assign]
    async_engine = AsyncEngine(llm)
    try:
        with serve(create_app(ColocatedBackend(async_engine, "demo"))) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
            client.completions.create(model="demo", prompt="Hello", max_tokens=2, extra_body={"priority": 7})
            client.chat.completions.create(
                model="demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, extra_body={"priority": -2}
            )
            client.responses.create(model="demo", input="Hi", max_output_tokens=2, extra_body={"priority": 4})
    finally:
        async_engine.shutdown()
    assert served == [7, -2, 4]


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_a_decode_worker_grants_queued_reservations_by_priority_then_arrival(demo_model_dir: Path, policy: str) -> None:
    """A decode worker with room for one request: reservations queued behind it are granted, as
    each one before is cancelled, by priority (under that policy), else in the order they came."""
    import threading

    from pdserve.decode_worker.admission import DecodeLimits
    from tests.test_worker_inputs import start
    from tests.test_workers import generate_request, reserve

    decode = start("decode", demo_model_dir, DecodeLimits(), scheduling_policy=policy, max_num_seqs=1)
    granted: list[str] = []
    try:
        first, _ = reserve(decode, generate_request(prompts(1, 12)[0], greedy(4), "first"))
        names_and_priorities = [("low", 5), ("urgent", -1), ("mid", 1), ("default", 0)]

        def wait_for_grant(name: str, priority: int, prompt: list[int]) -> None:
            stream, _ = reserve(decode, generate_request(prompt, greedy(4, priority if policy == "priority" else 0), name))
            granted.append(name)
            stream.cancel()  # frees its blocks and its place: the next one is granted

        threads = []
        for (name, priority), prompt in zip(names_and_priorities, prompts(4, 12, seed=2)):
            threads.append(threading.Thread(target=wait_for_grant, args=(name, priority, prompt), daemon=True))
            threads[-1].start()
            while decode.status().num_waiting < len(threads) + 1:  # queued, in this order
                time.sleep(0.01)
        assert granted == []
        first.cancel()
        for thread in threads:
            thread.join(30)
        expected = ["urgent", "default", "mid", "low"] if policy == "priority" else [n for n, _ in names_and_priorities]
        assert granted == expected
        decode.wait_idle()
    finally:
        decode.channel.close()
        decode.host.stop()
