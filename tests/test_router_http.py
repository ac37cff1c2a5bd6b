"""The OpenAI-compatible gateway end to end: a real engine on the CPU behind a real uvicorn server,
driven by the official openai client and raw httpx, checked against the offline `LLM`; plus a
scripted backend for the failures a real engine will not produce on demand (timeouts, crashes)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from pdserve.engine import LLM, SamplingParams
from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.outputs import RequestDelta
from pdserve.engine.tokenizer import Tokenizer
from pdserve.proto.deadlines import Deadlines
from pdserve.router.app import create_app
from pdserve.router.backend import BackendStats, BackendUnavailableError, ColocatedBackend
from pdserve.router.config import GatewayConfig
from pdserve.router.metrics import Metrics, SequenceGroup
from tests.servers import DASHBOARD_SERIES, observed_series

MODEL = "demo"
ALIAS = "org/demo-v1"  # a second --served-model-name, a Hub id's "/" in it
MAX_MODEL_LEN = 128
PROMPT = "The little engine ran along the valley"
NUM_TOKENS = 10
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the weather like today?"}]


@contextmanager
def serve(app: object) -> Iterator[str]:
    """A real uvicorn server on a free local port, in a background thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started, timeout_s=10)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def wait_until(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@dataclass
class Server:
    http: httpx.Client
    client: openai.OpenAI
    engine: LLMEngine
    metrics: Metrics

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.core.tokenizer


@pytest.fixture(scope="module")
def server(demo_model_dir: Path) -> Iterator[Server]:
    config = EngineConfig(model=str(demo_model_dir), device="cpu", max_model_len=MAX_MODEL_LEN, num_kv_blocks=64)
    engine = LLMEngine.from_config(config)
    async_engine = AsyncEngine(engine)
    gateway = GatewayConfig(Deadlines(first_token_s=120, request_s=120), model_aliases=(ALIAS,))
    app = create_app(ColocatedBackend(async_engine, MODEL), config=gateway)
    try:
        with serve(app) as url, httpx.Client(base_url=url, timeout=120) as http:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
            yield Server(http, client, engine, app.state.serving.metrics)
    finally:
        async_engine.shutdown()


@pytest.fixture(scope="module")
def llm(demo_model_dir: Path) -> LLM:
    return LLM(str(demo_model_dir), device="cpu", max_model_len=MAX_MODEL_LEN)


def greedy(**overrides: object) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.0, "max_tokens": NUM_TOKENS, "ignore_eos": True, **overrides})


def greedy_body(**overrides: object) -> dict:
    return {"model": MODEL, "max_tokens": NUM_TOKENS, "temperature": 0, "ignore_eos": True, **overrides}


def sse_events(response: httpx.Response) -> list:
    """The decoded `data:` payloads of an SSE response, `[DONE]` kept as a string."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line.removeprefix("data: ")
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def stream(http: httpx.Client, path: str, body: dict) -> list:
    with http.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return sse_events(response)


def metric_samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value for family in text_string_to_metric_families(text) for s in family.samples
    }


def growth(
    before: dict[tuple[str, frozenset], float], after: dict[tuple[str, frozenset], float], name: str, extra: dict | None = None
) -> float:
    """How much the sample `name` (labelled with the model and `extra`) grew between two scrapes."""
    key = (name, frozenset({"model_name": MODEL, **(extra or {})}.items()))
    return after[key] - before.get(key, 0.0)


def assert_kv_freed(engine: LLMEngine) -> None:
    scheduler = engine.scheduler
    wait_until(lambda: engine.core.block_manager.num_used_blocks == 0, timeout_s=5)
    assert not scheduler.running and not scheduler.waiting


# ---- generation against the offline LLM ----


def test_completion_matches_offline_llm(server: Server, llm: LLM) -> None:
    expected = llm.generate(PROMPT, greedy())[0].outputs[0]
    result = server.client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=NUM_TOKENS, temperature=0, extra_body={"ignore_eos": True}
    )
    choice = result.choices[0]
    assert choice.text == expected.text and choice.finish_reason == "length"
    assert result.id.startswith("cmpl-") and result.object == "text_completion" and result.model == MODEL
    num_prompt = len(server.tokenizer.encode(PROMPT))
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == (
        num_prompt,
        NUM_TOKENS,
        num_prompt + NUM_TOKENS,
    )
    # the same prompt as token ids, as a one-element batch, and with `model` left out
    ids = server.tokenizer.encode(PROMPT)
    for prompt in (ids, [ids], [PROMPT]):
        assert server.http.post("/v1/completions", json=greedy_body(prompt=prompt)).json()["choices"][0]["text"] == expected.text
    body = greedy_body(prompt=PROMPT)
    del body["model"]
    assert server.http.post("/v1/completions", json=body).json()["choices"][0]["text"] == expected.text


def test_seeded_sampling_matches_offline_llm(server: Server, llm: LLM) -> None:
    expected = llm.generate(PROMPT, SamplingParams(temperature=1.0, top_k=50, seed=1234, max_tokens=8))[0].outputs[0]
    result = server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, seed=1234, extra_body={"top_k": 50})
    assert result.choices[0].text == expected.text


def test_a_top_k_past_the_vocabulary_keeps_every_token_and_fails_no_other_request(server: Server, llm: LLM) -> None:
    """vLLM's reading of a top_k at or past the vocabulary: every token. Past int64 it once failed
    the engine step, and with it every request in the batch (a 500 for the sender, an error event
    for a stream beside it)."""
    expected = llm.generate(PROMPT, SamplingParams(temperature=1.0, seed=1234, max_tokens=8))[0].outputs[0]
    with ThreadPoolExecutor(1) as pool:
        beside = pool.submit(stream, server.http, "/v1/completions", greedy_body(prompt=PROMPT, max_tokens=MAX_MODEL_LEN - 16))
        for top_k in (server.tokenizer.vocab_size, 2**63):
            result = server.client.completions.create(
                model=MODEL, prompt=PROMPT, max_tokens=8, seed=1234, extra_body={"top_k": top_k}
            )
            assert result.choices[0].text == expected.text
        events = beside.result(timeout=120)
    assert events[-1] == "[DONE]" and not [e for e in events[:-1] if "error" in e], events[-2:]
    assert_kv_freed(server.engine)


def test_streamed_completion_equals_whole(server: Server) -> None:
    body = greedy_body(prompt=PROMPT, logprobs=2)
    whole = server.http.post("/v1/completions", json=body).json()
    events = stream(server.http, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    *chunks, usage_chunk = events[:-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
    choices = [c["choices"][0] for c in chunks]
    assert "".join(c["text"] for c in choices) == whole["choices"][0]["text"]
    assert all(c["text"] for c in choices[:-1]), "empty deltas are merged into the next chunk"
    assert [c["finish_reason"] for c in choices] == [None] * (len(choices) - 1) + ["length"]
    whole_logprobs = whole["choices"][0]["logprobs"]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for c in choices for x in c["logprobs"][key]] == whole_logprobs[key]
    assert all(c["id"] == chunks[0]["id"] and c["object"] == "text_completion" for c in chunks)


def test_chat_matches_templated_prompt(server: Server, llm: LLM) -> None:
    tokenizer = server.tokenizer
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(MESSAGES), add_special_tokens=False)
    expected = llm.generate({"prompt_token_ids": prompt_ids}, greedy())[0].outputs[0].text
    result = server.client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=NUM_TOKENS, temperature=0, extra_body={"ignore_eos": True}
    )
    assert result.choices[0].message.content == expected and result.choices[0].message.role == "assistant"
    assert result.id.startswith("chatcmpl-") and result.object == "chat.completion"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (len(prompt_ids), NUM_TOKENS)
    # text parts and max_completion_tokens mean the same thing
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in MESSAGES]
    body = greedy_body(messages=parts, max_completion_tokens=NUM_TOKENS)
    del body["max_tokens"]
    assert server.http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"] == expected
    chunks = list(
        server.client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=NUM_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == NUM_TOKENS


def test_chat_without_max_tokens_runs_to_the_context_limit(server: Server) -> None:
    messages = [{"role": "user", "content": "The key value cache is stored in fixed size blocks. " * 8}]
    result = server.http.post("/v1/chat/completions", json={"messages": messages, "ignore_eos": True}).json()
    usage = result["usage"]
    assert MAX_MODEL_LEN - usage["prompt_tokens"] < 20, "the prompt should leave only a few tokens"
    assert usage["completion_tokens"] == MAX_MODEL_LEN - usage["prompt_tokens"]
    assert result["choices"][0]["finish_reason"] == "length"


def test_stop_strings_truncate_and_free_kv(server: Server) -> None:
    body = greedy_body(prompt=PROMPT, max_tokens=16)
    full = server.http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = full.index(stop)
    choice = server.http.post("/v1/completions", json={**body, "stop": [stop, "never-generated"]}).json()["choices"][0]
    assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == (full[:cut], "stop", stop)
    kept = server.http.post("/v1/completions", json={**body, "stop": stop, "include_stop_str_in_output": True}).json()
    assert kept["choices"][0]["text"] == full[: cut + len(stop)]
    choices = [e["choices"][0] for e in stream(server.http, "/v1/completions", {**body, "stop": [stop]})[:-1]]
    assert "".join(c["text"] for c in choices) == full[:cut] and choices[-1]["finish_reason"] == "stop"
    assert_kv_freed(server.engine)


def test_the_token_that_stops_a_request_adds_no_text_unless_asked(server: Server) -> None:
    """vLLM's: a stop token id or EOS ends the request; its id is in the output, its text is not
    (unless include_stop_str_in_output), skip_special_tokens or not."""
    body = greedy_body(prompt=PROMPT, max_tokens=16, logprobs=0, return_tokens_as_token_ids=True)
    tokens = [
        int(t.split(":")[1]) for t in server.http.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]["tokens"]
    ]
    decode = server.tokenizer.decode
    first, stop = next((i, t) for i, t in enumerate(tokens) if i > 0 and decode([t]).strip())  # a token with text
    body = {**body, "stop_token_ids": [stop]}
    cut = server.http.post("/v1/completions", json=body).json()["choices"][0]
    assert (cut["text"], cut["finish_reason"], cut["stop_reason"]) == (decode(tokens[:first]), "stop", stop)
    assert len(cut["logprobs"]["tokens"]) == first + 1  # the stop token is an output token
    kept = server.http.post("/v1/completions", json={**body, "include_stop_str_in_output": True}).json()["choices"][0]
    assert kept["text"] == decode(tokens[: first + 1])
    streamed = [e["choices"][0] for e in stream(server.http, "/v1/completions", body)[:-1]]
    assert "".join(c["text"] for c in streamed) == decode(tokens[:first])
    eos = min(server.tokenizer.eos_token_ids)
    body = greedy_body(prompt=PROMPT, max_tokens=8, ignore_eos=False, min_tokens=2, logit_bias={str(eos): 100})
    ended = server.http.post("/v1/completions", json={**body, "skip_special_tokens": False}).json()
    assert ended["usage"]["completion_tokens"] == 3 and ended["choices"][0]["finish_reason"] == "stop"
    assert decode([eos], skip_special_tokens=False) not in ended["choices"][0]["text"]


def test_a_stop_string_within_min_tokens_ends_nothing(server: Server) -> None:
    """vLLM's: stop strings count only in text after the first min_tokens tokens."""
    body = greedy_body(prompt=PROMPT, max_tokens=8, logprobs=0, return_tokens_as_token_ids=True)
    tokens = [
        int(t.split(":")[1]) for t in server.http.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]["tokens"]
    ]
    decode = server.tokenizer.decode
    first = next(i for i, t in enumerate(tokens) if decode([t]).strip())  # the first token with text
    stop = decode(tokens[: first + 1])[-1]  # its last character
    assert decode(tokens[:first]).count(stop) == 0
    body = greedy_body(prompt=PROMPT, max_tokens=8, stop=[stop])
    assert server.http.post("/v1/completions", json=body).json()["usage"]["completion_tokens"] == first + 1
    held = server.http.post("/v1/completions", json={**body, "min_tokens": first + 1}).json()
    text = held["choices"][0]["text"]
    assert held["usage"]["completion_tokens"] > first + 1 and text.startswith(decode(tokens[: first + 1]))
    assert_kv_freed(server.engine)


def test_logprobs_match_offline_llm(server: Server, llm: LLM) -> None:
    expected = llm.generate(PROMPT, greedy(logprobs=3))[0].outputs[0]
    logprobs = server.http.post("/v1/completions", json=greedy_body(prompt=PROMPT, logprobs=3)).json()["choices"][0]["logprobs"]
    tokens = [server.tokenizer.decode([t], skip_special_tokens=False) for t in expected.token_ids]
    assert logprobs["tokens"] == tokens
    assert logprobs["token_logprobs"] == pytest.approx(
        [lp[t].logprob for t, lp in zip(expected.token_ids, expected.logprobs)], abs=1e-4
    )
    for token, value, top in zip(tokens, logprobs["token_logprobs"], logprobs["top_logprobs"]):
        assert token in top and len(top) <= 4
        assert value == pytest.approx(max(top.values()))  # greedy picks the most likely token
    assert logprobs["text_offset"] == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    result = server.http.post("/v1/chat/completions", json=greedy_body(messages=MESSAGES, logprobs=True, top_logprobs=2)).json()
    content = result["choices"][0]["logprobs"]["content"]
    assert len(content) == NUM_TOKENS
    for entry in content:
        assert len(entry["top_logprobs"]) == 2 and entry["bytes"] == list(entry["token"].encode())
        assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"])
    none_asked = server.http.post("/v1/chat/completions", json=greedy_body(messages=MESSAGES, top_logprobs=0))
    assert none_asked.status_code == 200 and none_asked.json()["choices"][0]["logprobs"] is None  # vLLM's: 0 asks nothing


# ---- errors ----

BAD_JSON = b'{"model": "demo", "prompt": '
CASES = [  # (path, body, status, param, words in the message)
    ("/v1/completions", {"max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    ("/v1/completions", {"max_tokens": -1}, 400, "max_tokens", "max_tokens"),
    ("/v1/completions", {"temperature": -1}, 400, "temperature", "temperature"),
    ("/v1/completions", {"top_p": 0}, 400, "top_p", "top_p"),
    ("/v1/completions", {"top_p": 1.5}, 400, "top_p", "top_p"),
    ("/v1/completions", {"n": 65}, 400, "n", "n must be in [1, 64]"),
    ("/v1/completions", {"n": 3, "best_of": 2}, 400, "best_of", "at least n"),
    ("/v1/completions", {"best_of": 3, "stream": True}, 400, "best_of", "cannot be streamed"),
    ("/v1/completions", {"top_k": -2}, 400, "top_k", "top_k"),
    ("/v1/completions", {"logprobs": 21}, 400, "logprobs", "logprobs"),
    ("/v1/completions", {"stop": [""]}, 400, "stop", "stop"),
    ("/v1/completions", {"model": "gpt-4"}, 404, "model", "The model `gpt-4` does not exist."),
    ("/v1/completions", {"prompt": [7] * MAX_MODEL_LEN}, 400, "prompt", "maximum context length"),
    ("/v1/completions", {"prompt": [7] * 100, "max_tokens": 50}, 400, "max_tokens", "maximum context length"),
    ("/v1/completions", {"prompt": [10**6]}, 400, "prompt", "prompt token ids"),
    ("/v1/completions", {"prompt": []}, 400, "prompt", "empty"),
    ("/v1/completions", {"prompt": [[1, 2], [10**6]]}, 400, "prompt", "prompt token ids"),  # one bad prompt fails the request
    ("/v1/completions", {"prompt": [-1]}, 400, "prompt", "prompt token ids must be in [0,"),
    ("/v1/completions", {"prompt": [[5], [3, -7]]}, 400, "prompt", "got -7"),
    ("/v1/completions", {"prompt": [2**40]}, 400, "prompt", "prompt token ids must be in [0,"),
    ("/v1/completions", {"max_tokens": 0}, 400, "max_tokens", "only with echo"),
    ("/v1/completions", {"prompt_logprobs": 21}, 400, "prompt_logprobs", "prompt logprobs of 21"),
    ("/v1/completions", {"prompt_logprobs": 2, "stream": True}, 400, "prompt_logprobs", "not available when `stream=True`"),
    ("/v1/chat/completions", {"prompt_logprobs": 1, "stream": True}, 400, "prompt_logprobs", "not available when `stream=True`"),
    ("/v1/completions", {"prompt": None}, 400, "prompt", "prompt"),
    ("/v1/completions", {"max_tokens": "many"}, 400, "max_tokens", "integer"),
    ("/v1/completions", {"temperature": "hot"}, 400, "temperature", "number"),
    ("/v1/completions", {"stop": 5}, 400, "stop", "stop"),
    ("/v1/completions", {"presence_penalty": 2.5}, 400, "presence_penalty", "[-2, 2]"),
    ("/v1/completions", {"frequency_penalty": -3}, 400, "frequency_penalty", "[-2, 2]"),
    ("/v1/completions", {"repetition_penalty": 0}, 400, "repetition_penalty", "> 0"),
    ("/v1/completions", {"logit_bias": {"five": 1}}, 400, "logit_bias", "integers"),
    ("/v1/completions", {"logit_bias": {"1000000": 1}}, 400, "logit_bias", "must be in [0,"),
    ("/v1/completions", {"allowed_token_ids": [10**6]}, 400, "allowed_token_ids", "must be in [0,"),
    ("/v1/completions", {"allowed_token_ids": []}, 400, "allowed_token_ids", "must not be empty"),
    (
        "/v1/chat/completions",
        {"chat_template_kwargs": {"chat_template": "{{ 'x' }}"}},
        400,
        "chat_template_kwargs",
        "may not set",
    ),
    ("/v1/chat/completions", {"allowed_token_ids": []}, 400, "allowed_token_ids", "must not be empty"),
    ("/v1/completions", {"stream": True, "temperature": -1}, 400, "temperature", "temperature"),
    ("/v1/completions", {"stream_options": {"include_usage": True}}, 400, "stream_options", "stream"),
    ("/v1/chat/completions", {"max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    ("/v1/chat/completions", {"max_completion_tokens": -1}, 400, "max_completion_tokens", "max_completion_tokens"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 25}, 400, "top_logprobs", "greater than max allowed: 20"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": -1}, 400, "top_logprobs", "greater than max allowed: 20"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": -2}, 400, "top_logprobs", "top_logprobs must be >= 0, or -1"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "blocks " * 200}]},
        400,
        "messages",
        "maximum context length",
    ),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages", "list"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "at least 1"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        400,
        "messages",
        "only text content parts",
    ),
    (
        "/v1/chat/completions",
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
        400,
        "tool_choice",
        "requires --enable-auto-tool-choice",
    ),
    ("/v1/chat/completions", {"response_format": {"type": "xml"}}, 400, "response_format", "unknown response_format"),
    ("/v1/chat/completions", {"top_logprobs": 2}, 400, "top_logprobs", "logprobs"),
    ("/v1/chat/completions", {"model": "gpt-4"}, 404, "model", "does not exist"),
    ("/v1/completions", BAD_JSON, 400, None, "not valid JSON"),
    ("/v1/chat/completions", [1, 2], 400, None, "JSON object"),
    ("/tokenize", {"prompt": "a", "messages": MESSAGES}, 400, "prompt", "exactly one"),
    ("/v1/completions", {"priority": 1}, 400, "priority", "--scheduling-policy priority"),
    ("/v1/chat/completions", {"priority": -3}, 400, "priority", "--scheduling-policy priority"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens", "token ids"),
    ("/v1/nothing", {}, 404, None, "Not Found"),
]
DEFAULTS = {
    "/v1/completions": {"model": MODEL, "prompt": PROMPT, "max_tokens": 2},
    "/v1/chat/completions": {"model": MODEL, "messages": MESSAGES, "max_tokens": 2},
}


@pytest.mark.parametrize("path, body, status, param, words", CASES, ids=lambda x: None)
def test_invalid_request_gets_openai_error(
    server: Server, path: str, body: object, status: int, param: str | None, words: str
) -> None:
    if isinstance(body, dict):
        response = server.http.post(path, json={**DEFAULTS.get(path, {}), **body})
    else:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = server.http.post(path, content=content, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(response.json()) == {"error"} and set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and error["param"] == param and words in error["message"]
    assert error["type"] == {400: "BadRequestError", 404: "NotFoundError"}[status]
    assert_serving(server)


def test_a_body_not_sent_as_json_is_told_the_content_type(server: Server) -> None:
    # curl -d '{...}' without -H 'Content-Type: application/json' sends a form's content type
    body = json.dumps(DEFAULTS["/v1/completions"])
    response = server.http.post("/v1/completions", content=body, headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "Content-Type: application/json" in message and "application/x-www-form-urlencoded" in message, message
    response = server.http.post("/v1/completions", content=body)  # no content type at all
    assert response.status_code == 400 and "(this one's: none)" in response.json()["error"]["message"]
    assert server.http.post("/v1/completions", content=body, headers={"content-type": "application/json"}).status_code == 200


def test_invocations_answers_chat_and_completion_requests_by_their_fields(server: Server) -> None:
    """SageMaker's one route, as vLLM serves it: the reply is the one its own route gives."""
    messages = [{"role": "user", "content": "Hello"}]
    for path, body, kind, chunk_kind in (
        ("/v1/chat/completions", greedy_body(messages=messages), "chat.completion", "chat.completion.chunk"),
        ("/v1/completions", greedy_body(prompt="Hello"), "text_completion", "text_completion"),
    ):
        routed, direct = (server.http.post(p, json=body).json() for p in ("/invocations", path))
        assert routed["object"] == kind and routed["choices"] == direct["choices"], (routed, direct)
        streamed = stream(server.http, "/invocations", body)
        assert streamed[-1] == "[DONE]" and streamed[0]["object"] == chunk_kind
    for body, param, words in (
        ({"model": MODEL, "messages": "hi"}, "messages", ""),
        ({"model": MODEL, "prompt": "hi", "max_tokens": -1}, "max_tokens", ""),
        ({"model": MODEL, "input": "hi"}, None, "`messages`"),
        ([1, 2], None, "JSON object"),
    ):
        response = server.http.post("/invocations", json=body)
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == param and words in error["message"], response.text
    for content in (b"{not json", b"[" * 100_000 + b"]" * 100_000):  # too deep for the parser: a 400, not a 500
        response = server.http.post("/invocations", content=content, headers={"content-type": "application/json"})
        assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    response = server.http.post("/invocations", content=b'{"prompt": "hi"}', headers={"content-type": "text/plain"})
    assert response.status_code == 400 and "Content-Type: application/json" in response.json()["error"]["message"]
    assert_serving(server)


def test_return_token_ids_gives_the_prompt_and_output_token_ids_whole_and_streamed(server: Server) -> None:
    """vLLM's `return_token_ids` (what RL rollouts train on): the prompt's token ids (a chat's as
    its template rendered it) and each choice's output ids, which decode to its text; streamed, the
    prompt's once, on the first chunk, and the output's spread over the chunks, adding up to the
    whole's."""
    prompt, messages = "The north road", [{"role": "user", "content": "Hello"}]
    whole = server.http.post("/v1/completions", json=greedy_body(prompt=prompt, n=2, return_token_ids=True)).json()
    for choice in whole["choices"]:
        assert choice["prompt_token_ids"] == server.tokenizer.encode(prompt)
        assert len(choice["token_ids"]) == NUM_TOKENS and server.tokenizer.decode(choice["token_ids"]) == choice["text"]
    chunks = stream(server.http, "/v1/completions", greedy_body(prompt=prompt, return_token_ids=True))[:-1]
    assert chunks[0]["choices"][0]["prompt_token_ids"] == server.tokenizer.encode(prompt)
    assert not any("prompt_token_ids" in c["choices"][0] for c in chunks[1:])
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == whole["choices"][0]["token_ids"]

    rendered = server.http.post("/tokenize", json={"model": MODEL, "messages": messages}).json()["tokens"]
    reply = server.http.post("/v1/chat/completions", json=greedy_body(messages=messages, return_token_ids=True)).json()
    choice = reply["choices"][0]
    assert reply["prompt_token_ids"] == rendered and server.tokenizer.decode(choice["token_ids"]) == choice["message"]["content"]
    chunks = stream(server.http, "/v1/chat/completions", greedy_body(messages=messages, return_token_ids=True, n=2))[:-1]
    firsts = [c for c in chunks if "prompt_token_ids" in c]  # each choice's first chunk, as vLLM sends them
    assert [c["prompt_token_ids"] for c in firsts] == [rendered] * 2 and {c["choices"][0]["index"] for c in firsts} == {0, 1}
    for index in (0, 1):
        ids = [t for c in chunks if c["choices"][0]["index"] == index for t in c["choices"][0].get("token_ids", [])]
        assert ids == choice["token_ids"]
    plain = server.http.post("/v1/chat/completions", json=greedy_body(messages=messages)).json()
    assert "prompt_token_ids" not in plain and "token_ids" not in plain["choices"][0]


def test_continue_final_message_continues_the_assistants_message(server: Server, llm: LLM) -> None:
    """vLLM's `continue_final_message`: the prompt ends inside the last (assistant) message, whose
    start the reply continues; greedy equals the offline engine's chat with the same option."""
    messages = [{"role": "user", "content": "Who wrote the letter?"}, {"role": "assistant", "content": "The letter was"}]
    body = greedy_body(messages=messages, add_generation_prompt=False, continue_final_message=True, return_token_ids=True)
    reply = server.http.post("/v1/chat/completions", json=body).json()
    rendered = server.tokenizer.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    assert rendered.endswith("<|im_start|>assistant\nThe letter was")
    assert reply["prompt_token_ids"] == server.tokenizer.encode(rendered, add_special_tokens=False)
    [expected] = llm.chat(messages, greedy(), add_generation_prompt=False, continue_final_message=True)
    assert reply["choices"][0]["message"]["content"] == expected.outputs[0].text
    tokenized = server.http.post(
        "/tokenize", json={"model": MODEL, "messages": messages, "add_generation_prompt": False, "continue_final_message": True}
    )
    assert tokenized.json()["tokens"] == reply["prompt_token_ids"]
    for path in ("/v1/chat/completions", "/tokenize"):
        both = server.http.post(path, json={"model": MODEL, "messages": messages, "continue_final_message": True})
        assert both.status_code == 400 and both.json()["error"]["param"] == "continue_final_message", both.text
    # vLLM's echo: the continued message's text before the reply's, whole and streamed; none when
    # the last message's role is not the reply's
    echoed = server.http.post("/v1/chat/completions", json={**body, "echo": True}).json()["choices"][0]["message"]
    assert echoed["content"] == "The letter was" + expected.outputs[0].text
    events = stream(server.http, "/v1/chat/completions", {**body, "echo": True})[:-1]
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]) == echoed["content"]
    asked = {**greedy_body(messages=messages[:1]), "echo": True}
    assert not server.http.post("/v1/chat/completions", json=asked).json()["choices"][0]["message"]["content"].startswith("Who")


def test_tokenize_counts_a_text_of_any_length(server: Server) -> None:
    """vLLM's /tokenize has no context check: clients measure long documents with it before cutting them."""
    huge = " ".join(["Where did they go? The north road."] * 3000)  # far beyond what the context could hold
    response = server.http.post("/tokenize", json={"model": MODEL, "prompt": huge})
    assert response.status_code == 200 and response.json()["count"] == len(server.tokenizer.encode(huge))


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(server: Server, llm: LLM) -> None:
    """vLLM's `truncate_prompt_tokens`: a prompt longer than the context runs on its last k tokens
    (echoed as such), as text or as token ids, on both endpoints; k out of range is a 400."""
    text = " ".join(["Where did they go? The north road."] * 40)
    ids = server.tokenizer.encode(text)  # BOS first
    assert len(ids) > MAX_MODEL_LEN and ids[0] == server.tokenizer.bos_token_id
    kept = [ids[0], *ids[-31:]]  # as a tokenizer truncating on the left keeps them: BOS, then the text's last
    body = greedy_body(prompt=text, truncate_prompt_tokens=32, return_token_ids=True, echo=True)
    choice = server.http.post("/v1/completions", json=body).json()["choices"][0]
    [expected] = llm.generate([{"prompt_token_ids": kept}], greedy())
    assert choice["prompt_token_ids"] == kept and choice["token_ids"] == expected.outputs[0].token_ids
    assert choice["text"] == server.tokenizer.decode(ids[-31:], skip_special_tokens=False) + expected.outputs[0].text
    short = server.http.post("/v1/completions", json=greedy_body(prompt="The north road", truncate_prompt_tokens=32, echo=True))
    assert short.json()["choices"][0]["text"].startswith("The north road")  # nothing cut: echoed as sent
    huge = " ".join(["Where did they go? The north road."] * 3000)  # far beyond what the context could hold
    body = greedy_body(prompt=huge, truncate_prompt_tokens=32, return_token_ids=True, max_tokens=1)
    assert server.http.post("/v1/completions", json=body).json()["choices"][0]["prompt_token_ids"] == [
        ids[0],
        *server.tokenizer.encode(huge, add_special_tokens=False)[-31:],
    ]
    as_ids = server.http.post("/v1/completions", json=greedy_body(prompt=ids, truncate_prompt_tokens=32)).json()
    [from_ids] = llm.generate([{"prompt_token_ids": ids[-32:]}], greedy())  # token ids are cut as they are
    assert as_ids["choices"][0]["text"] == from_ids.outputs[0].text and as_ids["usage"]["prompt_tokens"] == 32

    messages = [{"role": "user", "content": text}]
    reply = server.http.post(
        "/v1/chat/completions", json=greedy_body(messages=messages, truncate_prompt_tokens=-1, max_tokens=None)
    )
    assert (
        reply.status_code == 400 and "maximum context length" in reply.json()["error"]["message"]
    )  # -1: all the context, none left
    body = greedy_body(messages=messages, truncate_prompt_tokens=40, return_token_ids=True)
    rendered = server.tokenizer.encode(server.tokenizer.apply_chat_template(messages), add_special_tokens=False)
    assert server.http.post("/v1/chat/completions", json=body).json()["prompt_token_ids"] == rendered[-40:]
    for path, extra in (("/v1/completions", {"prompt": "Hi"}), ("/v1/chat/completions", {"messages": messages})):
        for value in (0, -2, MAX_MODEL_LEN + 1):
            answer = server.http.post(path, json=greedy_body(**extra, truncate_prompt_tokens=value))
            assert answer.status_code == 400 and answer.json()["error"]["param"] == "truncate_prompt_tokens", answer.text


def assert_serving(server: Server) -> None:
    result = server.http.post("/v1/completions", json=DEFAULTS["/v1/completions"])
    assert result.status_code == 200 and result.json()["usage"]["completion_tokens"] >= 1


def test_openai_client_raises_typed_errors(server: Server) -> None:
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        server.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "go " * 300}])
    with pytest.raises(openai.NotFoundError):
        server.client.chat.completions.create(model="gpt-4", messages=MESSAGES)
    assert_serving(server)


def test_concurrent_requests_are_batched_and_finish(server: Server, llm: LLM) -> None:
    prompts = [PROMPT, "What is the weather like today?", "A function returns a value", "The key value cache"]
    expected = [out.outputs[0].text for out in llm.generate(prompts, greedy())]

    def run(prompt: str) -> str:
        events = stream(server.http, "/v1/completions", greedy_body(prompt=prompt))
        return "".join(e["choices"][0]["text"] for e in events[:-1])

    with ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(run, prompts)) == expected
    assert_kv_freed(server.engine)


def test_stream_client_disconnect_aborts_request(server: Server) -> None:
    aborted = ("vllm:request_success_total", frozenset({"model_name": MODEL, "finished_reason": "abort"}.items()))
    num_aborted = metric_samples(server.http.get("/metrics").text).get(aborted, 0.0)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_MODEL_LEN - 16, "ignore_eos": True, "stream": True}
    with (
        httpx.Client(base_url=str(server.http.base_url), timeout=60) as http,
        http.stream("POST", "/v1/completions", json=body) as response,
    ):
        first = next(line for line in response.iter_lines() if line.startswith("data: "))
        assert json.loads(first.removeprefix("data: "))["choices"][0]["text"]
    # leaving the blocks closed the connection mid-stream
    assert_kv_freed(server.engine)
    assert metric_samples(server.http.get("/metrics").text)[aborted] == num_aborted + 1
    assert_serving(server)


# ---- models, health, tokenizer, metrics ----


def test_stream_null_is_a_whole_response(server: Server) -> None:
    """OpenAI types `stream` as boolean | null: clients that send every field, unset ones as null,
    get the whole response."""
    for path in DEFAULTS:
        response = server.http.post(path, json={**DEFAULTS[path], "stream": None})
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 2


def test_metrics_keep_vllm_names_whatever_the_scraper_asks(server: Server) -> None:
    """Prometheus asks for OpenMetrics first; prometheus_client's OpenMetrics would rename vllm:*
    series vllm_*, which dashboards do not query, so every scrape gets the text format."""
    asked = server.http.get("/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0,text/plain;q=0.5"})
    assert asked.headers["content-type"].startswith("text/plain")
    names = {sample.name for family in text_string_to_metric_families(asked.text) for sample in family.samples}
    assert "vllm:request_success_total" in names and not any(name.startswith("vllm_") for name in names)


def test_models_and_health(server: Server) -> None:
    cards = server.client.models.list().data
    assert [(c.id, c.owned_by, c.model_dump()["max_model_len"]) for c in cards] == [
        (MODEL, "pdserve", MAX_MODEL_LEN),
        (ALIAS, "pdserve", MAX_MODEL_LEN),
    ]
    assert server.client.models.retrieve(ALIAS).id == ALIAS
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        server.client.models.retrieve("other")
    assert server.http.get("/health").status_code == 200
    assert server.http.get("/ping").status_code == server.http.post("/ping").status_code == 200


def test_any_served_name_is_the_model_and_the_reply_carries_the_one_asked_for(server: Server) -> None:
    """Several --served-model-name (vLLM's): a request may name any, and its reply names that one
    (vLLM's, which clients and proxies routing by name check); without a name, the first."""
    reply = server.client.completions.create(model=ALIAS, prompt=PROMPT, max_tokens=2)
    assert reply.model == ALIAS and reply.usage.completion_tokens == 2
    chat = server.client.chat.completions.create(model=ALIAS, messages=MESSAGES, max_tokens=2)
    assert chat.model == ALIAS
    streamed = list(server.client.chat.completions.create(model=ALIAS, messages=MESSAGES, max_tokens=2, stream=True))
    assert {chunk.model for chunk in streamed} == {ALIAS}
    assert server.client.responses.create(model=ALIAS, input="Hello", max_output_tokens=2).model == ALIAS
    unnamed = server.http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}).json()
    assert unnamed["model"] == MODEL
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="demo-v1", prompt=PROMPT, max_tokens=2)


def test_tokenize_detokenize_round_trip(server: Server) -> None:
    tokenizer = server.tokenizer
    result = server.http.post("/tokenize", json={"model": MODEL, "prompt": PROMPT}).json()
    assert result == {"count": len(tokenizer.encode(PROMPT)), "max_model_len": MAX_MODEL_LEN, "tokens": tokenizer.encode(PROMPT)}
    plain = server.http.post("/tokenize", json={"prompt": PROMPT, "add_special_tokens": False}).json()["tokens"]
    assert server.http.post("/detokenize", json={"tokens": plain}).json() == {"prompt": PROMPT}
    assert server.http.post("/detokenize", json={"tokens": result["tokens"]}).json()["prompt"].endswith(PROMPT)
    chat = server.http.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    assert chat == tokenizer.encode(tokenizer.apply_chat_template(MESSAGES), add_special_tokens=False)


def test_metrics_use_vllm_names_and_count_requests(server: Server) -> None:
    labels = frozenset({"model_name": MODEL}.items())
    before = metric_samples(server.http.get("/metrics").text)
    server.http.post("/v1/completions", json=greedy_body(prompt=PROMPT, max_tokens=4))
    server.metrics.observe_kv_transfer(4096, 0.002, "cuda_ipc", 3)
    text = server.http.get("/metrics").text
    after = metric_samples(text)
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:num_preemptions_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_count",
        "vllm:inter_token_latency_seconds_count",
        "vllm:e2e_request_latency_seconds_count",
        "pdserve:kv_transfer_seconds_count",
    ):
        assert (name, labels) in after, name
    assert f'vllm:generation_tokens_total{{model_name="{MODEL}"}}' in text

    def grew(name: str, extra: dict | None = None) -> float:
        return growth(before, after, name, extra)

    assert grew("vllm:generation_tokens_total") == 4
    assert grew("vllm:prompt_tokens_total") == len(server.tokenizer.encode(PROMPT))
    assert grew("vllm:request_success_total", {"finished_reason": "length"}) == 1
    assert grew("vllm:time_to_first_token_seconds_count") == 1 and grew("vllm:e2e_request_latency_seconds_count") == 1
    assert grew("vllm:inter_token_latency_seconds_count") == 3
    assert grew("pdserve:kv_transfer_bytes_total", {"transport": "cuda_ipc"}) == 4096
    assert grew("pdserve:kv_transfer_kept_blocks_total") == 3
    assert after[("vllm:num_requests_running", labels)] == 0 and 0 <= after[("vllm:kv_cache_usage_perc", labels)] <= 1


def test_metrics_count_each_of_n_sequences_as_a_request_as_vllm_does(server: Server) -> None:
    """vLLM runs a request with n > 1 as n child requests: each is a finished request in
    `request_success` and the per-request histograms; the request's n and its longest sequence are
    observed once. The prompt is computed once here, and counted once."""
    before = metric_samples(server.http.get("/metrics").text)
    body = greedy_body(prompt=PROMPT, n=3, temperature=1.0, seed=5, max_tokens=4)
    usage = server.http.post("/v1/completions", json=body).json()["usage"]
    after = metric_samples(server.http.get("/metrics").text)

    def grew(name: str, extra: dict | None = None) -> float:
        return growth(before, after, name, extra)

    assert usage["completion_tokens"] == 12
    assert grew("vllm:request_success_total", {"finished_reason": "length"}) == 3
    assert grew("vllm:e2e_request_latency_seconds_count") == 3 and grew("vllm:time_to_first_token_seconds_count") == 3
    assert grew("vllm:request_generation_tokens_count") == 3 and grew("vllm:request_generation_tokens_sum") == 12
    assert grew("vllm:generation_tokens_total") == 12
    assert grew("vllm:prompt_tokens_total") == usage["prompt_tokens"]
    assert grew("vllm:request_params_n_count") == 1 and grew("vllm:request_params_n_sum") == 3
    assert grew("vllm:request_max_num_generation_tokens_count") == 1
    assert grew("vllm:request_max_num_generation_tokens_sum") == 4


def test_a_request_s_longest_sequence_is_observed_when_its_last_sequence_ends() -> None:
    metrics = Metrics(MODEL)
    group = SequenceGroup(metrics, 2)
    first, second = (metrics.track_request(5, SamplingParams(n=2, max_tokens=9), group, index) for index in (0, 1))
    first.on_tokens(3)
    second.on_tokens(7)
    first.on_finish("stop")
    samples = metric_samples(metrics.render().decode())
    key = ("vllm:request_max_num_generation_tokens_count", frozenset({"model_name": MODEL}.items()))
    assert samples.get(key, 0.0) == 0  # one sequence still runs
    second.on_finish("length")
    samples = metric_samples(metrics.render().decode())
    labels = frozenset({"model_name": MODEL}.items())
    assert samples[("vllm:request_max_num_generation_tokens_count", labels)] == 1
    assert samples[("vllm:request_max_num_generation_tokens_sum", labels)] == 7
    assert samples[("vllm:request_params_n_sum", labels)] == 2
    assert samples[("vllm:request_generation_tokens_sum", labels)] == 10
    assert samples[("vllm:prompt_tokens_total", labels)] == 5


# ---- failures, with a scripted backend ----


class ScriptedBackend:
    """A Backend whose requests follow `script`: a list of steps, each a RequestDelta to yield, a
    number of seconds to sleep, or an exception to raise. Counts requests closed before their end."""

    model_name = "scripted"
    max_model_len = 64
    max_logprobs = 20

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.script: list = []
        self.is_up = True
        self.num_aborted = 0

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> AsyncIterator[RequestDelta]:
        is_finished = False
        try:
            for step in self.script:
                if isinstance(step, BaseException):
                    raise step
                if isinstance(step, (int, float)):
                    await asyncio.sleep(step)
                    continue
                is_finished = step.finish_reason is not None
                yield RequestDelta(
                    request_id,
                    list(step.token_ids),
                    finish_reason=step.finish_reason,
                    error=step.error,
                    num_prompt_tokens=len(prompt_token_ids),
                    num_cached_tokens=step.num_cached_tokens,
                )
        finally:
            self.num_aborted += not is_finished

    async def stats(self) -> BackendStats:
        return BackendStats(num_running=3, num_waiting=2, kv_cache_usage=0.25, num_preemptions=7)

    async def is_healthy(self) -> bool:
        return self.is_up

    async def close(self) -> None:
        pass


@dataclass
class Scripted:
    http: httpx.Client
    backend: ScriptedBackend
    token: int
    text: str  # the token's text


@pytest.fixture(scope="module")
def scripted(demo_model_dir: Path) -> Iterator[Scripted]:
    tokenizer = Tokenizer.from_pretrained(demo_model_dir)
    backend = ScriptedBackend(tokenizer)
    config = GatewayConfig(Deadlines(first_token_s=1.0, request_s=1.0))
    with serve(create_app(backend, config=config)) as url, httpx.Client(base_url=url, timeout=30) as http:
        token = tokenizer.encode(" the", add_special_tokens=False)[0]
        yield Scripted(http, backend, token, tokenizer.decode([token]))


def tokens(token: int, n: int, finish_reason: str | None = None, **kw: object) -> RequestDelta:
    return RequestDelta("", [token] * n, finish_reason=finish_reason, **kw)


BODY = {"prompt": "hi", "max_tokens": 8}


def test_backend_failures_map_to_http_errors(scripted: Scripted) -> None:
    cases = [  # (script, status, words)
        ([BackendUnavailableError("all workers are busy")], 503, "all workers are busy"),
        ([RuntimeError("boom")], 500, "boom"),
        ([RequestDelta("", [], finish_reason="error", error="worker died")], 500, "worker died"),
        ([3600], 504, "no first token within 1 s"),
    ]
    chat = {"messages": MESSAGES, "max_tokens": 8}
    for script, status, words in cases:
        scripted.backend.script = script
        # nothing was generated yet, so even a stream answers with a plain HTTP error (no role chunk)
        for path, body in (("/v1/completions", BODY), ("/v1/chat/completions", chat)):
            for is_stream in (False, True):
                response = scripted.http.post(path, json={**body, "stream": is_stream})
                assert response.status_code == status and words in response.json()["error"]["message"]
                assert response.json()["error"]["code"] == status
                assert response.headers.get("retry-after") == ("1" if status == 503 else None)
    scripted.backend.script = [tokens(scripted.token, 2), tokens(scripted.token, 1, "length", num_cached_tokens=16)]
    result = scripted.http.post("/v1/completions", json=BODY).json()
    assert result["choices"][0]["text"] == scripted.text * 3
    assert result["usage"]["prompt_tokens_details"] == {"cached_tokens": 16}


def test_failure_mid_stream_sends_error_event(scripted: Scripted) -> None:
    for tail, code in (([3600], 504), ([RequestDelta("", [], finish_reason="error", error="worker died")], 500)):
        scripted.backend.script = [tokens(scripted.token, 1), *tail]
        num_aborted = scripted.backend.num_aborted
        events = stream(scripted.http, "/v1/chat/completions", {"messages": MESSAGES})
        assert [e["choices"][0]["delta"] for e in events[:2]] == [
            {"role": "assistant", "content": ""},
            {"content": scripted.text},
        ]
        assert events[2]["error"]["code"] == code and events[3] == "[DONE]" and len(events) == 4
        assert scripted.backend.num_aborted == num_aborted + (code == 504)


def test_client_disconnect_aborts_non_streaming_request(scripted: Scripted) -> None:
    scripted.backend.script = [tokens(scripted.token, 1), 3600]
    num_aborted = scripted.backend.num_aborted
    with pytest.raises(httpx.ReadTimeout):
        scripted.http.post("/v1/completions", json=BODY, timeout=0.3)
    wait_until(lambda: scripted.backend.num_aborted == num_aborted + 1, timeout_s=2)


def test_health_and_stats_follow_the_backend(scripted: Scripted) -> None:
    samples = metric_samples(scripted.http.get("/metrics").text)
    labels = frozenset({"model_name": "scripted"}.items())
    assert samples[("vllm:num_requests_running", labels)] == 3 and samples[("vllm:num_requests_waiting", labels)] == 2
    assert samples[("vllm:kv_cache_usage_perc", labels)] == 0.25 and samples[("vllm:num_preemptions_total", labels)] == 7
    scripted.backend.is_up = False
    down = scripted.http.get("/health")
    assert down.status_code == 503 and down.headers["retry-after"] == "1"
    scripted.backend.is_up = True
    assert scripted.http.get("/health").status_code == 200


def test_penalties_logit_bias_and_allowed_tokens_equal_the_offline_engine(server: Server, demo_model_dir: Path) -> None:
    reference = LLM(model=str(demo_model_dir), device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN)
    extra = {"repetition_penalty": 1.3, "frequency_penalty": 0.5, "presence_penalty": -0.5, "logit_bias": {"40": 3.0}}
    body = greedy_body(prompt=PROMPT, max_tokens=12, logprobs=0, return_tokens_as_token_ids=True, **extra)
    choice = server.http.post("/v1/completions", json=body).json()["choices"][0]
    params = SamplingParams(
        temperature=0.0,
        max_tokens=12,
        ignore_eos=True,
        logit_bias={40: 3.0},
        **{k: v for k, v in extra.items() if k != "logit_bias"},
    )
    [want] = reference.generate(PROMPT, params)
    assert [int(t.split(":")[1]) for t in choice["logprobs"]["tokens"]] == want.outputs[0].token_ids
    allowed = [40, 41, 42]
    body = greedy_body(prompt=PROMPT, max_tokens=8, logprobs=0, return_tokens_as_token_ids=True, allowed_token_ids=allowed)
    tokens = server.http.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]["tokens"]
    assert {int(t.split(":")[1]) for t in tokens} <= set(allowed)
    # a bias past OpenAI's [-100, 100] is clamped to it, as vLLM does, not refused
    biased = [
        server.http.post("/v1/completions", json=greedy_body(prompt=PROMPT, max_tokens=4, logit_bias={"40": bias}))
        for bias in (-100, -1e6, 100, 1e6)
    ]
    assert [b.status_code for b in biased] == [200] * 4, biased[1].text
    texts = [b.json()["choices"][0]["text"] for b in biased]
    assert texts[0] == texts[1] and texts[2] == texts[3] and texts[0] != texts[2]


def test_every_dashboard_series_has_samples_after_a_little_load(server: Server) -> None:
    for _ in range(2):  # the same long prompt twice: the second finds its blocks cached
        server.http.post("/v1/completions", json=greedy_body(prompt=PROMPT * 6, max_tokens=4))
    series = observed_series(server.http.get("/metrics").text)
    missing = [name for name in DASHBOARD_SERIES if name not in series]
    assert not missing, missing
    empty = [
        name
        for name in DASHBOARD_SERIES
        if series[name] == 0
        and name
        not in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc")
    ]
    assert not empty, empty  # counters, histograms and info gauges moved under load


def test_requests_leaving_sampling_out_take_the_checkpoint_s_generation_config(server: Server, demo_model_dir: Path) -> None:
    """vLLM's `--generation-config auto`: a request's sampling fields it leaves out come from the
    checkpoint's generation_config.json (here temperature 0 and max_new_tokens 6); its own win; a
    response object reports the values used."""
    config = EngineConfig(model=str(demo_model_dir), device="cpu", max_model_len=MAX_MODEL_LEN, num_kv_blocks=64)
    async_engine = AsyncEngine(LLMEngine.from_config(config))
    gateway = GatewayConfig(Deadlines(first_token_s=120, request_s=120), sampling_defaults={"temperature": 0.0, "max_tokens": 6})
    try:
        with (
            serve(create_app(ColocatedBackend(async_engine, MODEL), config=gateway)) as url,
            httpx.Client(base_url=url, timeout=120) as http,
        ):
            body = {"model": MODEL, "messages": MESSAGES, "ignore_eos": True}
            greedy = server.http.post("/v1/chat/completions", json={**body, "temperature": 0, "max_tokens": 6}).json()
            defaulted = http.post("/v1/chat/completions", json=body).json()
            assert defaulted["usage"]["completion_tokens"] == 6
            assert defaulted["choices"][0]["message"]["content"] == greedy["choices"][0]["message"]["content"]
            own = [
                http.post("/v1/chat/completions", json={**body, "temperature": 1.0, "seed": s, "max_tokens": 8}).json()
                for s in range(3)
            ]
            assert all(reply["usage"]["completion_tokens"] == 8 for reply in own)
            assert any(reply["choices"][0]["message"]["content"] != greedy["choices"][0]["message"]["content"] for reply in own)
            # a response object reports the settings it was sampled with, as vLLM's does
            asked = {"model": MODEL, "input": "Hi", "max_output_tokens": 2}
            response = http.post("/v1/responses", json=asked).json()
            assert (response["temperature"], response["top_p"]) == (0.0, 1.0)
            response = http.post("/v1/responses", json={**asked, "temperature": 0.7, "top_p": 0.9}).json()
            assert (response["temperature"], response["top_p"]) == (0.7, 0.9)
    finally:
        async_engine.shutdown()


def test_a_chat_template_given_replaces_the_checkpoint_s(demo_model_dir: Path) -> None:
    """vLLM's `--chat-template`: chats render with it (here a bare one) on every route, /tokenize too."""
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    tokenizer = Tokenizer.from_pretrained(demo_model_dir)
    backend = ScriptedBackend(tokenizer)
    config = GatewayConfig(Deadlines(first_token_s=5, request_s=5), chat_template=template)
    with serve(create_app(backend, config=config)) as url, httpx.Client(base_url=url, timeout=30) as http:
        tokens = http.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
        expected = "<system>Be brief.\n<user>What is the weather like today?\n<assistant>"
        assert tokens == tokenizer.encode(expected, add_special_tokens=False)
        assert http.get("/tokenizer_info").json()["chat_template"] == template


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_continuous_usage_counts_each_choice_s_own_tokens(server: Server, path: str) -> None:
    """vLLM's continuous_usage_stats: every chunk carries the prompt and its choice's tokens so far
    (the role chunk none); the last chunk, all choices' tokens."""
    fields = {"messages": MESSAGES} if path.endswith("chat/completions") else {"prompt": PROMPT}
    options = {"include_usage": True, "continuous_usage_stats": True}
    body = greedy_body(**fields, n=2, temperature=1.0, seed=3, max_tokens=6, stream_options=options)
    events = stream(server.http, path, body)[:-1]
    *chunks, final = events
    num_prompt = final["usage"]["prompt_tokens"]
    assert final["usage"]["completion_tokens"] == 12 and not final["choices"]
    seen = {0: 0, 1: 0}
    for chunk in chunks:
        [choice] = chunk["choices"]
        usage = chunk["usage"]
        assert usage["prompt_tokens"] == num_prompt and usage["total_tokens"] == num_prompt + usage["completion_tokens"]
        if "role" in choice.get("delta", {}):
            assert usage["completion_tokens"] == 0
        else:
            assert seen[choice["index"]] <= usage["completion_tokens"] <= 6
            seen[choice["index"]] = usage["completion_tokens"]
    assert seen == {0: 6, 1: 6}


def test_iteration_token_buckets_are_written_as_vllm_s_exporter_writes_them(server: Server) -> None:
    """prometheus_client writes a bound of 1 as le="1.0"; a fleet of vLLM and pdserve gateways must
    not split one bucket into two series."""
    server.http.post("/v1/completions", json=greedy_body(prompt=PROMPT, max_tokens=2))
    text = server.http.get("/metrics").text
    bounds = [
        line.split('le="')[1].split('"')[0] for line in text.splitlines() if line.startswith("vllm:iteration_tokens_total_bucket")
    ]
    assert bounds[:3] == ["1.0", "8.0", "16.0"] and bounds[-1] == "+Inf"
