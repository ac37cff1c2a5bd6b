"""`n` and `best_of` (issue 10): a request's n sequences share its prompt's KV — one prefill, one
KV transfer, blocks forked on the decode worker — and with a seed, sequence i draws from seed + i:
distinct, reproducible, and the same whether colocated, disaggregated or offline."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pdserve.engine import LLM, SamplingParams
from tests.servers import colocated_gateway, disaggregated_gateway

pytestmark = pytest.mark.slow
MAX_MODEL_LEN = 256
PROMPT = [5, 9, 13, 2, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 40, 41]  # 20 tokens: a partial last block
SAMPLED = {"temperature": 1.0, "seed": 11, "max_tokens": 8, "ignore_eos": True}


@pytest.fixture(scope="module")
def reference(checkpoints: dict[str, Path]) -> LLM:
    return LLM(model=str(checkpoints["llama"]), device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN, num_kv_blocks=64)


def test_offline_sequences_equal_single_requests_seeded_seed_plus_i_and_free_every_block(reference: LLM) -> None:
    [output] = reference.generate({"prompt_token_ids": PROMPT}, SamplingParams(n=3, **SAMPLED))
    sequences = [c.token_ids for c in output.outputs]
    assert [c.index for c in output.outputs] == [0, 1, 2] and len({tuple(s) for s in sequences}) == 3
    for i, sequence in enumerate(sequences):  # the forked KV (a partial block copied) is exactly the prompt's
        single = SamplingParams(**{**SAMPLED, "seed": SAMPLED["seed"] + i})
        assert reference.generate({"prompt_token_ids": PROMPT}, single)[0].outputs[0].token_ids == sequence
    assert reference.engine.core.block_manager.num_used_blocks == 0
    before = reference.engine.iteration_tokens.total
    [again] = reference.generate({"prompt_token_ids": PROMPT}, SamplingParams(n=3, **SAMPLED))
    computed = reference.engine.iteration_tokens.total - before
    assert computed == len(PROMPT) - again.num_cached_tokens + 3 * (SAMPLED["max_tokens"] - 1)  # one prefill


@pytest.fixture(scope="module", params=["colocated", "disaggregated"])
def server(
    request: pytest.FixtureRequest, checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    with (
        colocated_gateway(checkpoints["llama"], MAX_MODEL_LEN)
        if request.param == "colocated"
        else disaggregated_gateway(checkpoints["llama"], log_path, MAX_MODEL_LEN)
    ) as url:
        yield request.param, url


def complete(url: str, **body: object) -> dict:
    base = {"model": "m", "prompt": PROMPT, "logprobs": 0, "return_tokens_as_token_ids": True}
    response = httpx.post(url + "/v1/completions", json={**base, **SAMPLED, **body}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def tokens_of(choice: dict) -> list[int]:
    return [int(t.split(":")[1]) for t in choice["logprobs"]["tokens"]]


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


def test_n_sequences_are_distinct_reproducible_exact_and_cost_one_prefill(server: tuple[str, str], reference: LLM) -> None:
    mode, url = server
    before = metrics(url)
    response = complete(url, n=3)
    after = metrics(url)
    choices = response["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    [want] = reference.generate({"prompt_token_ids": PROMPT}, SamplingParams(n=3, **SAMPLED))
    assert [tokens_of(c) for c in choices] == [c.token_ids for c in want.outputs]  # exact, across the split too
    assert len({tuple(tokens_of(c)) for c in choices}) == 3
    assert [tokens_of(c) for c in complete(url, n=3)["choices"]] == [tokens_of(c) for c in choices]  # reproducible
    usage = response["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (len(PROMPT), 24, len(PROMPT) + 24)
    assert after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"] == len(PROMPT)  # counted once
    if mode == "disaggregated":  # one prefill's KV moved once, forked on the decode worker
        assert after["pdserve:kv_transfer_seconds_count"] - before["pdserve:kv_transfer_seconds_count"] == 1
        moved = after["pdserve:kv_transfer_bytes_total"] - before.get("pdserve:kv_transfer_bytes_total", 0.0)
        kept = after["pdserve:kv_transfer_kept_blocks_total"] - before["pdserve:kv_transfer_kept_blocks_total"]
        # 2 blocks (less those the decode worker kept from an earlier request) x 16 tokens x 2 layers x K,V x 2 heads x 16 dims x fp32
        assert moved == (2 - kept) * 16 * 2 * 2 * 2 * 16 * 4
    else:
        computed = after["vllm:iteration_tokens_total_sum"] - before["vllm:iteration_tokens_total_sum"]
        cached = response["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert computed == len(PROMPT) - cached + 3 * (SAMPLED["max_tokens"] - 1)  # the prompt computed once


def test_best_of_returns_the_n_most_likely_of_its_candidates(server: tuple[str, str], reference: LLM) -> None:
    _, url = server
    response = complete(url, n=2, best_of=4, logprobs=None)
    [candidates] = reference.generate({"prompt_token_ids": PROMPT}, SamplingParams(n=4, logprobs=0, **SAMPLED))
    ranked = sorted(candidates.outputs, key=lambda c: -c.cumulative_logprob)[:2]
    texts = [c["text"] for c in response["choices"]]
    assert texts == [c.text for c in ranked] and [c["index"] for c in response["choices"]] == [0, 1]
    assert all(c["logprobs"] is None for c in response["choices"])  # not asked for
    assert response["usage"]["completion_tokens"] == 4 * SAMPLED["max_tokens"]


def test_every_choice_carries_the_prompt_s_logprobs(server: tuple[str, str]) -> None:
    """With n > 1 or best_of, the prompt's logprobs are the request's: every choice has them, echoed
    or as `prompt_logprobs` (they once came with the first sequence's choice only)."""
    _, url = server
    scored = {"echo": True, "logprobs": 1, "max_tokens": 2}
    single = complete(url, **scored)["choices"][0]["logprobs"]["token_logprobs"][: len(PROMPT)]
    assert single[0] is None and None not in single[1:]
    for body in ({"n": 2}, {"n": 1, "best_of": 3}):
        choices = complete(url, **scored, **body)["choices"]
        for choice in choices:
            assert choice["logprobs"]["token_logprobs"][: len(PROMPT)] == pytest.approx(single, abs=1e-4), body
    choices = complete(url, n=2, prompt_logprobs=1, max_tokens=2)["choices"]
    assert len(choices[0]["prompt_logprobs"]) == len(PROMPT)
    assert choices[1]["prompt_logprobs"] == choices[0]["prompt_logprobs"]


def test_streamed_chat_with_n_gives_every_choice_its_role_and_finish(server: tuple[str, str]) -> None:
    _, url = server
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "Hello"}],
        "n": 2,
        "stream": True,
        "max_tokens": 5,
        "temperature": 1.0,
        "seed": 3,
        "ignore_eos": True,
    }
    roles, finished, texts = set(), set(), {0: "", 1: ""}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    roles |= {choice["index"]} if choice["delta"].get("role") else set()
                    texts[choice["index"]] += choice["delta"].get("content") or ""
                    finished |= {choice["index"]} if choice["finish_reason"] else set()
    whole = httpx.post(url + "/v1/chat/completions", json={**body, "stream": False}, timeout=60).json()
    assert roles == finished == {0, 1}
    assert [texts[0], texts[1]] == [c["message"]["content"] for c in whole["choices"]]
