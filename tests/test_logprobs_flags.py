"""The server's logprobs flags, as vLLM's. `--max-logprobs`: a server started with it serves that
many alternatives a token (completions' `logprobs` and `prompt_logprobs`, chat's `top_logprobs`),
the same as HF transformers ranks them, and refuses more with an OpenAI 400 naming the request's own
field; colocated, and over a prefill and a decode worker (the first token's alternatives come from
the prefill worker, the others from the decode worker). Offline, `LLM(max_logprobs=...)` likewise,
-1 the whole vocabulary. A request's count of -1 (vLLM's) asks for the whole vocabulary: served
under `--max-logprobs -1`, a 400 naming the limit under any smaller one. `--return-tokens-as-token-ids`:
logprobs name tokens "token_id:N" unless a request says false (the Responses API, which has no such
field, always)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
import transformers

from pdserve.engine import LLM
from pdserve.engine.config import ConfigError, EngineConfig
from pdserve.engine.sampling_params import InvalidRequestError, SamplingParams
from tests.servers import pdserve

MAX_LOGPROBS = 30
PROMPT_IDS = [1, 450, 217, 601, 273, 341, 278, 717, 322, 769, 115]  # the demo tokenizer has 832 tokens
NUM_TOKENS = 3


def serve_llama(
    mode: str, checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, *flags: str
) -> AbstractContextManager[tuple[str, Any]]:
    """`pdserve serve` of the llama checkpoint, colocated or disaggregated, naming tokens by id."""
    args = ["--model", str(checkpoints["llama"]), "--served-model-name", "m", "--device", "cpu", "--dtype", "float32"]
    args += ["--max-model-len", "256", "--return-tokens-as-token-ids", *flags]
    if mode == "colocated":
        args.append("--colocated")
    return pdserve("serve", *args, "--log-level", "warning", log_path=tmp_path_factory.mktemp("serve") / "serve.log")


@pytest.fixture(scope="module", params=["colocated", "disaggregated"])
def server(
    request: pytest.FixtureRequest, checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    with serve_llama(request.param, checkpoints, tmp_path_factory, "--max-logprobs", str(MAX_LOGPROBS)) as (url, _):
        yield url


@pytest.fixture(scope="module", params=["colocated", "disaggregated"])
def whole_vocab_server(
    request: pytest.FixtureRequest, checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    with serve_llama(request.param, checkpoints, tmp_path_factory, "--max-logprobs", "-1") as (url, _):
        yield url


@pytest.fixture(scope="module")
def default_server(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """With the default --max-logprobs (20)."""
    with serve_llama("colocated", checkpoints, tmp_path_factory) as (url, _):
        yield url


@pytest.fixture(scope="module")
def hf(checkpoints: dict[str, Path]) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(checkpoints["llama"], dtype=torch.float32).eval()


def hf_top(model: transformers.PreTrainedModel, token_ids: list[int], k: int) -> list[dict[int, float]]:
    """Per position of `token_ids`, the k most likely next tokens and their log-probabilities."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([token_ids])).logits[0].double(), dim=-1)
    values, ids = logprobs.topk(k, dim=-1)
    return [dict(zip(i.tolist(), v.tolist())) for i, v in zip(ids, values)]


def assert_same_top(served: dict[int, float], expected: dict[int, float]) -> None:
    assert sorted(served) == sorted(expected)
    for token_id, value in expected.items():
        assert served[token_id] == pytest.approx(value, abs=2e-3)


def test_the_server_gives_max_logprobs_alternatives_as_transformers_ranks_them(
    server: str, hf: transformers.PreTrainedModel
) -> None:
    body = {
        "model": "m",
        "prompt": PROMPT_IDS,
        "max_tokens": NUM_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": MAX_LOGPROBS,
        "prompt_logprobs": MAX_LOGPROBS,
    }  # the server's --return-tokens-as-token-ids: "token_id:N" keys, so two tokens of the same text stay two
    response = httpx.post(f"{server}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    generated = [int(token.removeprefix("token_id:")) for token in choice["logprobs"]["tokens"]]
    expected = hf_top(hf, PROMPT_IDS + generated, MAX_LOGPROBS)
    assert len(generated) == NUM_TOKENS
    for i, top in enumerate(choice["logprobs"]["top_logprobs"]):
        served = {int(token.removeprefix("token_id:")): value for token, value in top.items()}
        assert generated[i] == max(expected[len(PROMPT_IDS) - 1 + i], key=expected[len(PROMPT_IDS) - 1 + i].get)
        assert_same_top(served, expected[len(PROMPT_IDS) - 1 + i])
    prompt_logprobs = choice["prompt_logprobs"]
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == len(PROMPT_IDS)
    for position, entry in enumerate(prompt_logprobs[1:]):  # alternatives, plus the prompt's own token when not among them
        served = {int(t): v["logprob"] for t, v in entry.items() if v["rank"] <= MAX_LOGPROBS}
        assert_same_top(served, expected[position])


@pytest.mark.parametrize(
    "path, fields, param",
    [
        ("/v1/completions", {"prompt": PROMPT_IDS, "logprobs": MAX_LOGPROBS + 1}, "logprobs"),
        ("/v1/completions", {"prompt": PROMPT_IDS, "prompt_logprobs": MAX_LOGPROBS + 1}, "prompt_logprobs"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": MAX_LOGPROBS + 1},
            "top_logprobs",
        ),
        (
            "/v1/responses",
            {"input": "hi", "include": ["message.output_text.logprobs"], "top_logprobs": MAX_LOGPROBS + 1},
            "top_logprobs",
        ),
    ],
)
def test_more_than_max_logprobs_is_a_400_naming_the_field(server: str, path: str, fields: dict, param: str) -> None:
    budget = {"max_output_tokens": 2} if path == "/v1/responses" else {"max_tokens": 2}
    response = httpx.post(f"{server}{path}", json={"model": "m", **budget, **fields}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert f"logprobs of {MAX_LOGPROBS + 1}, which is greater than max allowed: {MAX_LOGPROBS}" in error["message"]
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)
    reply = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2, logprobs=True, top_logprobs=MAX_LOGPROBS
    )
    assert len(reply.choices[0].logprobs.content[0].top_logprobs) == MAX_LOGPROBS  # the server serves on


def token_id(token: str) -> int:
    return int(token.removeprefix("token_id:"))


def test_minus_one_is_the_whole_vocabulary_on_a_server_without_a_limit(
    whole_vocab_server: str, hf: transformers.PreTrainedModel
) -> None:
    vocab_size = hf.config.vocab_size
    client = openai.OpenAI(base_url=f"{whole_vocab_server}/v1", api_key="none", max_retries=0)
    completion = client.completions.create(
        model="m",
        prompt=PROMPT_IDS,
        max_tokens=NUM_TOKENS,
        temperature=0,
        logprobs=-1,
        extra_body={"ignore_eos": True, "prompt_logprobs": -1},
    )
    choice = completion.choices[0]
    generated = [token_id(token) for token in choice.logprobs.tokens]
    expected = hf_top(hf, PROMPT_IDS + generated, vocab_size)  # every token's log_softmax
    assert len(generated) == NUM_TOKENS
    for i, top in enumerate(choice.logprobs.top_logprobs):
        assert len(top) == vocab_size
        assert_same_top({token_id(token): value for token, value in top.items()}, expected[len(PROMPT_IDS) - 1 + i])
    prompt_logprobs = choice.model_extra["prompt_logprobs"]
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == len(PROMPT_IDS)
    for position, entry in enumerate(prompt_logprobs[1:]):
        assert len(entry) == vocab_size
        assert_same_top({int(t): v["logprob"] for t, v in entry.items()}, expected[position])

    reply = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=NUM_TOKENS,
        temperature=0,
        logprobs=True,
        top_logprobs=-1,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    content = reply.choices[0].logprobs.content
    chat_ids = [token_id(entry.token) for entry in content]
    expected = hf_top(hf, reply.model_extra["prompt_token_ids"] + chat_ids, vocab_size)
    assert len(content) == NUM_TOKENS
    for i, entry in enumerate(content):
        assert len(entry.top_logprobs) == vocab_size
        top = {token_id(t.token): t.logprob for t in entry.top_logprobs}
        assert_same_top(top, expected[len(reply.model_extra["prompt_token_ids"]) - 1 + i])

    response = client.responses.create(
        model="m", input="hi", max_output_tokens=2, include=["message.output_text.logprobs"], top_logprobs=-1
    )
    for logprob in response.output[0].content[0].logprobs:
        assert len(logprob.top_logprobs) == vocab_size
        assert math.fsum(math.exp(t.logprob) for t in logprob.top_logprobs) == pytest.approx(1, abs=1e-3)


MINUS_ONE_REQUESTS = [
    ("/v1/completions", {"prompt": PROMPT_IDS, "logprobs": -1}, "logprobs"),
    ("/v1/completions", {"prompt": PROMPT_IDS, "prompt_logprobs": -1}, "prompt_logprobs"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": -1},
        "top_logprobs",
    ),
    ("/v1/responses", {"input": "hi", "include": ["message.output_text.logprobs"], "top_logprobs": -1}, "top_logprobs"),
]


def post(url: str, path: str, fields: dict) -> httpx.Response:
    budget = {"max_output_tokens": 2} if path == "/v1/responses" else {"max_tokens": 2}
    return httpx.post(f"{url}{path}", json={"model": "m", **budget, **fields}, timeout=60)


@pytest.mark.parametrize("path, fields, param", MINUS_ONE_REQUESTS)
def test_minus_one_is_a_400_naming_the_limit_on_a_server_with_one(
    server: str, default_server: str, hf: transformers.PreTrainedModel, path: str, fields: dict, param: str
) -> None:
    for url, limit in ((default_server, 20), (server, MAX_LOGPROBS)):
        response = post(url, path, fields)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and error["type"] == "BadRequestError"
        assert f"logprobs of {hf.config.vocab_size}, which is greater than max allowed: {limit}" in error["message"]
        assert "-1 asks for the whole vocabulary" in error["message"]


@pytest.mark.parametrize("path, fields, param", MINUS_ONE_REQUESTS)
def test_a_count_below_minus_one_is_a_400_naming_the_field(default_server: str, path: str, fields: dict, param: str) -> None:
    response = post(default_server, path, {**fields, param: -2})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert f"{param} must be >= 0, or -1 for the whole vocabulary; got -2" in error["message"]


def test_offline_llm_takes_max_logprobs_and_minus_one_is_the_vocabulary(checkpoints: dict[str, Path]) -> None:
    llm = LLM(model=str(checkpoints["llama"]), device="cpu", dtype="float32", max_model_len=64, max_logprobs=-1)
    vocab_size = llm.engine.core.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=2, logprobs=vocab_size)
    [output] = llm.generate({"prompt_token_ids": PROMPT_IDS}, params)
    for logprobs in output.outputs[0].logprobs:
        assert len(logprobs) == vocab_size
        assert sum(lp.logprob for lp in logprobs.values()) < 0 and torch.tensor(
            [lp.logprob for lp in logprobs.values()]
        ).exp().sum() == pytest.approx(1, abs=1e-3)
    with pytest.raises(InvalidRequestError, match=f"greater than max allowed: {vocab_size}") as caught:
        llm.generate({"prompt_token_ids": PROMPT_IDS}, SamplingParams(max_tokens=1, prompt_logprobs=vocab_size + 1))
    assert caught.value.param == "prompt_logprobs"
    with pytest.raises(ConfigError, match="max_logprobs must be >= 0, or -1"):
        EngineConfig(model=str(checkpoints["llama"]), max_logprobs=-2)


def test_offline_llm_refuses_more_than_twenty_by_default(checkpoints: dict[str, Path]) -> None:
    llm = LLM(model=str(checkpoints["llama"]), device="cpu", dtype="float32", max_model_len=64)
    with pytest.raises(
        InvalidRequestError, match="Requested sample logprobs of 21, which is greater than max allowed: 20"
    ) as caught:
        llm.generate({"prompt_token_ids": PROMPT_IDS}, SamplingParams(max_tokens=1, logprobs=21))
    assert caught.value.param == "logprobs"
    [output] = llm.generate({"prompt_token_ids": PROMPT_IDS}, SamplingParams(temperature=0, max_tokens=1, logprobs=20))
    assert len(output.outputs[0].logprobs[0]) in (20, 21)  # the chosen token joins when not among them


def test_offline_llm_minus_one_is_the_vocabulary_under_minus_one_and_refused_under_twenty(
    checkpoints: dict[str, Path],
) -> None:
    llm = LLM(model=str(checkpoints["llama"]), device="cpu", dtype="float32", max_model_len=64, max_logprobs=-1)
    vocab_size = llm.engine.core.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=2, logprobs=-1, prompt_logprobs=-1)
    [output] = llm.generate({"prompt_token_ids": PROMPT_IDS}, params)
    assert [len(logprobs) for logprobs in output.outputs[0].logprobs] == [vocab_size] * 2
    assert output.prompt_logprobs[0] is None
    assert [len(logprobs) for logprobs in output.prompt_logprobs[1:]] == [vocab_size] * (len(PROMPT_IDS) - 1)
    limited = LLM(model=str(checkpoints["llama"]), device="cpu", dtype="float32", max_model_len=64)
    for name, kind in (("logprobs", "sample"), ("prompt_logprobs", "prompt")):
        message = f"Requested {kind} logprobs of {vocab_size}, which is greater than max allowed: 20"
        with pytest.raises(InvalidRequestError, match=message) as caught:
            limited.generate({"prompt_token_ids": PROMPT_IDS}, SamplingParams(max_tokens=1, **{name: -1}))
        assert caught.value.param == name


def test_a_request_may_name_tokens_by_their_text_on_a_server_that_names_them_by_id(server: str) -> None:
    def tokens(**fields: object) -> list[str]:
        body = {"model": "m", "prompt": PROMPT_IDS, "max_tokens": 2, "temperature": 0, "logprobs": 1, **fields}
        response = httpx.post(f"{server}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["logprobs"]["tokens"]

    by_id, by_text = tokens(), tokens(return_tokens_as_token_ids=False)
    assert all(token.startswith("token_id:") for token in by_id)
    assert len(by_text) == len(by_id) and not any(token.startswith("token_id:") for token in by_text)
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)
    reply = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2, logprobs=True, top_logprobs=2
    )
    entry = reply.choices[0].logprobs.content[0]
    assert entry.token.startswith("token_id:") and all(top.token.startswith("token_id:") for top in entry.top_logprobs)
    response = client.responses.create(
        model="m", input="hi", max_output_tokens=2, include=["message.output_text.logprobs"], top_logprobs=2
    )
    [logprob, *_] = response.output[0].content[0].logprobs  # the Responses API has no field of its own: the server's
    assert logprob.token.startswith("token_id:") and all(top.token.startswith("token_id:") for top in logprob.top_logprobs)


def test_minus_one_with_many_sequences_reaches_every_sequence(whole_vocab_server: str, hf: transformers.PreTrainedModel) -> None:
    """n sequences, each with the whole vocabulary's alternatives: disaggregated, the alternatives of
    all n first tokens cross from the prefill to the decode worker in one KV commit (here 16 x 832)."""
    vocab_size = hf.config.vocab_size
    client = openai.OpenAI(base_url=f"{whole_vocab_server}/v1", api_key="none", max_retries=0)
    completion = client.completions.create(
        model="m", prompt=PROMPT_IDS, max_tokens=2, n=16, temperature=1.0, seed=7, logprobs=-1, extra_body={"ignore_eos": True}
    )
    assert len(completion.choices) == 16
    for choice in completion.choices:
        assert [len(top) for top in choice.logprobs.top_logprobs] == [vocab_size, vocab_size]
