"""`echo` + `logprobs` and `prompt_logprobs` through the HTTP API, as lm-eval's loglikelihood tasks
use them, in both modes (colocated in-process; `pdserve serve` with a prefill and a decode worker,
where the prompt's logprobs are computed on the prefill worker): every prompt token's logprob
equals transformers' log-softmax of the same checkpoint within 1e-4 (fp32), for all four families;
several prompts in one request come back as choices in order."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
import transformers

from tests.conftest import FAMILIES
from tests.servers import colocated_gateway, disaggregated_gateway

pytestmark = pytest.mark.slow
MAX_MODEL_LEN = 256
TEXT = "The key value cache is stored in fixed size blocks; the decode worker reserves them first."
TOKEN_LISTS = [[5, 77, 300, 12, 9], [400, 401, 402], [7, 7, 7, 7, 7, 7, 7, 8]]


@pytest.fixture(
    scope="module", params=[(f, m) for f in FAMILIES for m in ("colocated", "disaggregated")], ids=lambda p: f"{p[0]}-{p[1]}"
)
def server(
    request: pytest.FixtureRequest, checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    family, mode = request.param
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    with (
        colocated_gateway(checkpoints[family], MAX_MODEL_LEN)
        if mode == "colocated"
        else disaggregated_gateway(checkpoints[family], log_path, MAX_MODEL_LEN) as url
    ):
        yield family, url


@pytest.fixture(scope="module")
def hf(checkpoints: dict[str, Path]) -> dict[str, transformers.PreTrainedModel]:
    return {f: transformers.AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for f, p in checkpoints.items()}


def hf_prompt_logprobs(model: transformers.PreTrainedModel, tokens: list[int]) -> list[float]:
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([tokens])).logits[0].double(), dim=-1)
    return [logprobs[i, tokens[i + 1]].item() for i in range(len(tokens) - 1)]


def test_lm_evals_loglikelihood_request_gets_every_prompt_tokens_logprob(server: tuple[str, str], hf: dict) -> None:
    family, url = server
    body = {"model": "m", "prompt": TEXT, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1}
    choice = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    tokens = httpx.post(url + "/tokenize", json={"prompt": TEXT}, timeout=10).json()["tokens"]
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(tokens) + 1 and choice["text"].startswith(TEXT)
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    want = hf_prompt_logprobs(hf[family], tokens)
    got = logprobs["token_logprobs"][1 : len(tokens)]
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4
    for token, top in zip(logprobs["tokens"][1:], logprobs["top_logprobs"][1:]):
        assert token in top and 1 <= len(top) <= 2  # the token itself and the top-1


def test_several_prompts_come_back_as_choices_in_order_prompt_only_with_max_tokens_0(server: tuple[str, str], hf: dict) -> None:
    family, url = server
    body = {"model": "m", "prompt": TOKEN_LISTS, "max_tokens": 0, "echo": True, "logprobs": 0, "return_tokens_as_token_ids": True}
    response = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
    assert [c["index"] for c in response["choices"]] == [0, 1, 2]
    for tokens, choice in zip(TOKEN_LISTS, response["choices"]):
        assert [int(t.split(":")[1]) for t in choice["logprobs"]["tokens"]] == tokens  # the prompt only
        got = choice["logprobs"]["token_logprobs"]
        assert got[0] is None and max(abs(a - b) for a, b in zip(got[1:], hf_prompt_logprobs(hf[family], tokens))) < 1e-4
    usage = response["usage"]
    assert usage["prompt_tokens"] == sum(map(len, TOKEN_LISTS)) and usage["completion_tokens"] == 0


@pytest.mark.parametrize("echo", [False, True])
def test_prompt_logprobs_field_in_vllms_shape(server: tuple[str, str], hf: dict, echo: bool) -> None:
    """As vLLM answers: the field is there whether or not the prompt is echoed."""
    family, url = server
    tokens = TOKEN_LISTS[0]
    body = {"model": "m", "prompt": tokens, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 3, "echo": echo}
    choice = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    assert choice["logprobs"] is None  # not asked for
    entries = choice["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(tokens)
    for token, entry, want in zip(tokens[1:], entries[1:], hf_prompt_logprobs(hf[family], tokens)):
        assert abs(entry[str(token)]["logprob"] - want) < 1e-4
        assert {e["rank"] for e in entry.values()} >= {1, 2, 3}  # the top 3, ranked


def test_streamed_batch_of_prompts_carries_every_index(server: tuple[str, str]) -> None:
    _, url = server
    body = {
        "model": "m",
        "prompt": ["Hello", "Good morning", "Why"],
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    texts: dict[int, str] = {0: "", 1: "", 2: ""}
    finished, usage = set(), None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                texts[choice["index"]] += choice["text"]
                if choice["finish_reason"]:
                    finished.add(choice["index"])
    plain = {k: v for k, v in body.items() if k != "stream_options"} | {"stream": False}
    whole = httpx.post(url + "/v1/completions", json=plain, timeout=60).json()
    assert finished == {0, 1, 2} and usage["completion_tokens"] == 12
    assert [texts[i] for i in range(3)] == [c["text"] for c in whole["choices"]]


def test_a_streamed_echo_carries_the_prompt_s_logprobs_once(server: tuple[str, str]) -> None:
    """Streamed `echo` + `logprobs`: the chunks' logprobs, joined, are the whole response's (the
    prompt's first); no chunk repeats the prompt's as `prompt_logprobs`, which vLLM never streams."""
    _, url = server
    body = {"model": "m", "prompt": TEXT, "max_tokens": 3, "temperature": 0, "echo": True, "logprobs": 1, "ignore_eos": True}
    whole = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    tokens, chunks = [], 0
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:])["choices"]:
                chunks += 1
                assert "prompt_logprobs" not in choice
                tokens += choice["logprobs"]["tokens"]
    assert chunks > 1 and tokens == whole["logprobs"]["tokens"]
