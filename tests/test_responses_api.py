"""POST /v1/responses, OpenAI's Responses API, driven by the official openai client (its typed
events and its stream helper, which rebuilds the response from the events) against a real engine
on the CPU behind the real HTTP server: a response is the chat reply to the same conversation, its
stream adds up to the whole, its logprobs are chat's, and what pdserve cannot do is a 400 naming the
field. Function tools and structured output: tests/test_structured_serve.py; the response store
(`previous_response_id`, GET/DELETE): tests/test_responses_store.py."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from pdserve.engine import LLM, SamplingParams
from pdserve.engine.outputs import RequestDelta
from tests.test_router_http import (  # noqa: F401
    MAX_MODEL_LEN,
    MESSAGES,
    MODEL,
    Scripted,
    Server,
    assert_kv_freed,
    llm,
    scripted,
    server,
    tokens,
)

NUM_TOKENS = 10
INSTRUCTIONS, QUESTION = MESSAGES[0]["content"], MESSAGES[1]["content"]


def chat_reply(server: Server, llm: LLM, messages: list[dict], max_tokens: int = NUM_TOKENS) -> str:  # noqa: F811
    tokenizer = server.tokenizer
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
    return (
        llm.generate({"prompt_token_ids": prompt_ids}, SamplingParams(temperature=0.0, max_tokens=max_tokens))[0].outputs[0].text
    )


def test_a_response_is_the_chat_reply_to_the_same_conversation(server: Server, llm: LLM) -> None:  # noqa: F811
    expected = chat_reply(server, llm, MESSAGES)
    response = server.client.responses.create(
        model=MODEL, instructions=INSTRUCTIONS, input=QUESTION, max_output_tokens=NUM_TOKENS, temperature=0
    )
    assert response.output_text == expected
    assert response.id.startswith("resp_") and response.object == "response" and response.model == MODEL
    [message] = response.output
    assert (message.type, message.role, message.content[0].type) == ("message", "assistant", "output_text")
    tokenizer = server.tokenizer
    num_prompt = len(tokenizer.encode(tokenizer.apply_chat_template(MESSAGES), add_special_tokens=False))
    assert response.usage.input_tokens == num_prompt and response.usage.total_tokens == num_prompt + response.usage.output_tokens
    if response.usage.output_tokens == NUM_TOKENS:  # cut by max_output_tokens (the random model rarely ends sooner)
        assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    else:
        assert response.status == "completed" and response.incomplete_details is None
    assert response.store is True and response.instructions == INSTRUCTIONS
    assert response.tool_choice == "auto" and response.tools == []  # the default, as OpenAI reports it

    # the same conversation as input items: a developer turn, text parts
    items = [
        {"role": "developer", "content": INSTRUCTIONS},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": QUESTION}]},
    ]
    again = server.client.responses.create(model=MODEL, input=items, max_output_tokens=NUM_TOKENS, temperature=0)
    assert again.output_text == expected and again.id != response.id

    # an earlier assistant turn, as the previous response's output item it was
    turns = [*items, message.model_dump(), {"role": "user", "content": "And tomorrow?"}]
    follow_up = server.client.responses.create(model=MODEL, input=turns, max_output_tokens=NUM_TOKENS, temperature=0)
    history = [*MESSAGES, {"role": "assistant", "content": expected}, {"role": "user", "content": "And tomorrow?"}]
    assert follow_up.output_text == chat_reply(server, llm, history)


def test_a_streamed_response_adds_up_to_the_whole_one(server: Server) -> None:  # noqa: F811
    body = {"model": MODEL, "instructions": INSTRUCTIONS, "input": QUESTION, "max_output_tokens": NUM_TOKENS, "temperature": 0}
    whole = server.client.responses.create(**body)
    events = list(server.client.responses.create(**body, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    closing = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-4:] == [*closing, f"response.{whole.status}"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-4].text == events[-1].response.output_text
    assert events[0].response.status == "in_progress" and events[-1].response.usage.output_tokens == whole.usage.output_tokens
    assert all(e.item_id == events[2].item.id for e in events if e.type == "response.output_text.delta")

    with server.client.responses.stream(**body) as stream:  # the SDK's helper rebuilds the response from the events
        helped = list(stream)
    assert [e.snapshot for e in helped if e.type == "response.output_text.delta"][-1] == whole.output_text
    assert helped[-1].type == f"response.{whole.status}" and helped[-1].response.output_text == whole.output_text


def test_response_logprobs_are_the_chat_completions(server: Server) -> None:  # noqa: F811
    response = server.client.responses.create(
        model=MODEL,
        instructions=INSTRUCTIONS,
        input=QUESTION,
        max_output_tokens=NUM_TOKENS,
        temperature=0,
        include=["message.output_text.logprobs"],
        top_logprobs=3,
    )
    chat = server.client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=NUM_TOKENS, temperature=0, logprobs=True, top_logprobs=3
    )
    logprobs = response.output[0].content[0].logprobs
    expected = chat.choices[0].logprobs.content
    assert len(logprobs) == response.usage.output_tokens == len(expected)
    for got, want in zip(logprobs, expected, strict=True):
        assert (got.token, got.bytes) == (want.token, want.bytes) and got.logprob == pytest.approx(want.logprob, abs=1e-4)
        assert [t.token for t in got.top_logprobs] == [t.token for t in want.top_logprobs]
    plain = server.client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=2, temperature=0)
    assert plain.output[0].content[0].logprobs == []  # not asked for
    # streamed, a token whose text is held back brings its logprobs with a later delta or the end
    body = {
        "model": MODEL,
        "input": QUESTION,
        "max_output_tokens": 60,
        "temperature": 0,
        "include": ["message.output_text.logprobs"],
    }
    whole = server.client.responses.create(**body).output[0].content[0].logprobs
    events = list(server.client.responses.create(**body, stream=True))
    streamed = [lp for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    [done] = [e for e in events if e.type == "response.output_text.done"]
    assert (
        [lp.token for lp in done.logprobs]
        == [lp.token for lp in whole]
        == [lp.token for lp in events[-1].response.output[0].content[0].logprobs]
    )
    assert [lp.token for lp in streamed] == [lp.token for lp in whole[: len(streamed)]] and len(whole) == 60


def test_vllm_sampling_extras_are_honoured_as_on_chat(server: Server) -> None:  # noqa: F811
    body = {"model": MODEL, "max_tokens": 16, "temperature": 0, "messages": MESSAGES}
    full = server.http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    chat = server.http.post("/v1/chat/completions", json={**body, "stop": [stop]}).json()["choices"][0]["message"]["content"]
    response = server.client.responses.create(
        model=MODEL, instructions=INSTRUCTIONS, input=QUESTION, max_output_tokens=16, temperature=0, extra_body={"stop": [stop]}
    )
    assert response.output_text == chat == full[: full.index(stop)] and response.status == "completed"


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"background": True}, "background", "background"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input", "only text"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input", "not supported"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input", "messages"),  # left out: nothing remains
        ({"input": [{"role": "robot", "content": "hi"}]}, "input", "role"),
        ({"input": []}, "input", "empty"),
        ({"tools": [{"type": "web_search"}]}, "tools", "only function tools"),
        ({"include": ["everything"]}, "include", "not one of"),
        ({"input": [{"role": ["user"], "content": "hi"}]}, "input", "role"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt", "no stored prompt"),
        ({"conversation": "conv_1"}, "conversation", "no stored conversation"),
        ({"max_tool_calls": 0}, "max_tool_calls", ""),
        ({"text": {"format": {"type": "grammar"}}}, "text.format", "not supported"),
        ({"text": {"format": "json"}}, "text.format", "object"),
        ({"max_output_tokens": 0}, "max_output_tokens", "at least 1"),
        ({"max_output_tokens": MAX_MODEL_LEN}, "max_output_tokens", ""),
        ({"input": "many words " * MAX_MODEL_LEN}, "input", ""),
        ({"truncation": "auto"}, "truncation", "disabled"),
        ({"input": 3}, "input", ""),
    ],
)
def test_what_pdserve_cannot_do_is_a_400_naming_the_field(server: Server, body: dict, param: str, words: str) -> None:  # noqa: F811
    answer = server.http.post("/v1/responses", json={"model": MODEL, "input": QUESTION, **body})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_an_unknown_response_and_a_wrong_model_are_not_found(server: Server) -> None:  # noqa: F811
    with pytest.raises(openai.NotFoundError, match="not found"):
        server.client.responses.retrieve("resp_123")
    for method, path in (("DELETE", ""), ("GET", "/input_items"), ("POST", "/cancel")):
        answer = server.http.request(method, f"/v1/responses/resp_123{path}")
        assert answer.status_code == 404 and "not found" in answer.json()["error"]["message"]
    answer = server.http.post("/v1/responses", json={"model": MODEL, "input": QUESTION, "previous_response_id": "resp_1"})
    assert answer.status_code == 404 and answer.json()["error"]["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        server.client.responses.create(model="no-such-model", input=QUESTION)


def test_leaving_a_streamed_response_aborts_it(server: Server) -> None:  # noqa: F811
    body = {"model": MODEL, "input": QUESTION, "max_output_tokens": MAX_MODEL_LEN - 40, "stream": True}
    with (
        httpx.Client(base_url=str(server.http.base_url), timeout=60) as http,
        http.stream("POST", "/v1/responses", json=body) as response,
    ):
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: ") and json.loads(line.removeprefix("data: "))["type"] == "response.output_text.delta":
                break
    assert_kv_freed(server.engine)


def test_a_failure_mid_stream_ends_it_with_an_error_and_response_failed(scripted: Scripted) -> None:  # noqa: F811
    for tail, code in (([3600], "504"), ([RequestDelta("", [], finish_reason="error", error="worker died")], "500")):
        scripted.backend.script = [tokens(scripted.token, 1), *tail]
        num_aborted = scripted.backend.num_aborted
        with scripted.http.stream("POST", "/v1/responses", json={"input": "hi", "stream": True}) as response:
            events = [json.loads(line.removeprefix("data: ")) for line in response.iter_lines() if line.startswith("data: ")]
        kinds = [e["type"] for e in events]
        assert kinds[-2:] == ["error", "response.failed"] and "response.output_text.delta" in kinds, kinds
        assert events[-2]["code"] == code and events[-1]["response"]["status"] == "failed"
        assert events[-1]["response"]["output"][0]["content"][0]["text"] == scripted.text
        assert scripted.backend.num_aborted == num_aborted + (code == "504")
