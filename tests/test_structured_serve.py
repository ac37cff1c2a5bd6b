"""Structured output and tools against `pdserve serve` on the CPU, disaggregated (Ray-placed prefill
and decode workers, KV over gRPC) and colocated, driven by the official openai client. The
checkpoint has random weights: only the constraints make its output meaningful, so every sample
must parse and validate; greedy constrained output equals the offline engine's."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from pdserve.engine import LLM, SamplingParams
from pdserve.engine.sampling_params import StructuredOutput
from tests.test_serve_e2e import Server, serving

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 1024
CONCURRENCY = 16
COMPACT = {"structured_outputs": {"disable_any_whitespace": True}}  # vLLM's option: no whitespace in the JSON
SCHEMAS = {
    "flat-with-enum": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 10},
            "size": {"enum": ["small", "medium", "large"]},
            "ok": {"type": "boolean"},
        },
        "required": ["name", "size", "ok"],
        "additionalProperties": False,
    },
    "nested-object": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 999},
            "owner": {
                "type": "object",
                "properties": {
                    "first": {"type": "string", "maxLength": 6},
                    "age": {"type": "integer", "minimum": 18, "maximum": 99},
                },
                "required": ["first", "age"],
                "additionalProperties": False,
            },
            "note": {"type": ["string", "null"], "maxLength": 8},
        },
        "required": ["id", "owner"],
        "additionalProperties": False,
    },
    "array-of-objects": {
        "type": "object",
        "properties": {
            "points": {
                "type": "array",
                "minItems": 1,
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {"x": {"type": "number", "minimum": -10, "maximum": 10}, "label": {"enum": ["a", "b"]}},
                    "required": ["x", "label"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["points"],
        "additionalProperties": False,
    },
    "refs-and-patterns": {
        "$defs": {"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"}},
        "type": "object",
        "properties": {
            "codes": {"type": "array", "items": {"$ref": "#/$defs/code"}, "maxItems": 2},
            "primary": {"$ref": "#/$defs/code"},
        },
        "required": ["primary", "codes"],
        "additionalProperties": False,
    },
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER_TOOL, TIME_TOOL]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module", params=["disaggregated", "colocated"])
def server(request: pytest.FixtureRequest, tool_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    args = ["--max-model-len", str(MAX_MODEL_LEN), "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    args += ["--colocated"] if request.param == "colocated" else []
    with serving(tool_checkpoint, log_path, *args) as server:
        yield server


@pytest.fixture(scope="module")
def reference(tool_checkpoint: Path) -> LLM:
    return LLM(model=str(tool_checkpoint), device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN)


def chat(server: Server, **body: Any) -> Any:
    extra = body.pop("extra_body", {})
    return server.client().chat.completions.create(
        model=server.model, messages=body.pop("messages", MESSAGES), extra_body=extra, **body
    )


def in_parallel(fn: Any, items: list[Any]) -> list[Any]:
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        return list(pool.map(fn, items))


# -- structured output ------------------------------------------------------------------------------
def test_json_schema_samples_always_parse_and_validate(server: Server) -> None:
    """Hundreds of seeded samples at temperature 1, compact JSON, over four schemas (nested objects,
    arrays, enums, required fields, $ref, patterns, numeric bounds)."""
    jobs = [(name, seed) for name in SCHEMAS for seed in range(50)]

    def run(job: tuple[str, int]) -> tuple[str, str, str | None]:
        name, seed = job
        response_format = {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name]}}
        reply = chat(server, response_format=response_format, temperature=1.0, seed=seed, max_tokens=200, extra_body=COMPACT)
        return name, reply.choices[0].message.content, reply.choices[0].finish_reason

    for name, text, finish_reason in in_parallel(run, jobs):
        assert finish_reason == "stop", (name, text)
        jsonschema.validate(json.loads(text), SCHEMAS[name])


def test_json_schema_with_free_whitespace_and_json_object(server: Server) -> None:
    """vLLM's default JSON whitespace (any), on chat and on completions (`response_format` there too)."""
    schema = SCHEMAS["nested-object"]

    def run(seed: int) -> Any:
        if seed % 2:
            return chat(
                server,
                response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
                temperature=1.0,
                seed=seed,
                max_tokens=400,
            ).choices[0]
        choice = (
            server.client()
            .completions.create(
                model=server.model, prompt="JSON:", temperature=1.0, seed=seed, max_tokens=400, extra_body={"guided_json": schema}
            )
            .choices[0]
        )
        choice.message = type("Message", (), {"content": choice.text})
        return choice

    for choice in in_parallel(run, list(range(32))):
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)
    objects = in_parallel(
        lambda seed: chat(
            server, response_format={"type": "json_object"}, temperature=1.0, seed=seed, max_tokens=100, extra_body=COMPACT
        ).choices[0],
        list(range(16)),
    )
    assert all(c.message.content.startswith("{") for c in objects)
    assert all(isinstance(json.loads(c.message.content), dict) for c in objects if c.finish_reason == "stop")


def test_guided_choice_returns_one_of_the_choices(server: Server) -> None:
    choices = ["sunny", "rain", "snow and ice", "fog"]
    replies = in_parallel(
        lambda seed: chat(server, temperature=1.0, seed=seed, max_tokens=20, extra_body={"guided_choice": choices}),
        list(range(24)),
    )
    assert {r.choices[0].message.content for r in replies} <= set(choices)
    assert {r.choices[0].finish_reason for r in replies} == {"stop"}
    newer = chat(server, temperature=1.0, seed=3, max_tokens=20, extra_body={"structured_outputs": {"choice": choices}})
    assert newer.choices[0].message.content in choices


def test_guided_regex_and_grammar_match_fully(server: Server) -> None:
    pattern = r"[A-Z][a-z]{1,6} [0-9]{1,3}(st|nd|rd|th)?"
    for seed in range(8):
        text = (
            server.client()
            .completions.create(
                model=server.model,
                prompt="Street:",
                temperature=1.0,
                seed=seed,
                max_tokens=30,
                extra_body={"guided_regex": pattern},
            )
            .choices[0]
            .text
        )
        assert re.fullmatch(pattern, text), text
    grammar = 'start: "(" NUMBER ("+" NUMBER){0,3} ")"\nNUMBER: /[1-9][0-9]?/'
    text = chat(server, temperature=1.0, seed=5, max_tokens=40, extra_body={"guided_grammar": grammar}).choices[0].message.content
    assert re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?){0,3}\)", text), text


def test_greedy_constrained_output_equals_the_offline_engine(server: Server, reference: LLM) -> None:
    """The prefill worker samples the first token under the grammar, the decode worker the rest
    with its grammar advanced past that token: the same tokens as one engine."""
    tokenizer = reference.get_tokenizer()
    cases = [
        (
            StructuredOutput("json", json.dumps(SCHEMAS["nested-object"]), disable_any_whitespace=True),
            {"guided_json": SCHEMAS["nested-object"], **COMPACT},
        ),
        (StructuredOutput("regex", "[a-z]{2,9}( [a-z]{2,9}){3}"), {"guided_regex": "[a-z]{2,9}( [a-z]{2,9}){3}"}),
    ]
    for spec, extra in cases:
        for prompt in ("The key value cache", "Who wrote the letter?"):
            [want] = reference.generate(prompt, SamplingParams(temperature=0.0, max_tokens=120, structured_output=spec))
            got = (
                server.client()
                .completions.create(
                    model=server.model,
                    prompt=prompt,
                    max_tokens=120,
                    temperature=0.0,
                    logprobs=0,
                    extra_body={**extra, "return_tokens_as_token_ids": True},
                )
                .choices[0]
            )
            assert [int(t.split(":")[1]) for t in got.logprobs.tokens] == want.outputs[0].token_ids
            assert got.text == want.outputs[0].text == tokenizer.decode(want.outputs[0].token_ids)
            assert got.finish_reason == want.outputs[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "json_schema.schema"),
        ({"guided_regex": "[a-", "guided_choice": ["a"]}, "guided_choice", "only one kind"),
        ({"guided_regex": "(unclosed"}, "guided_regex", "invalid regex"),
        ({"guided_json": {"type": "object", "properties": {"a": {"type": "wat"}}}}, "guided_json", "invalid JSON schema"),
        ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
        ({"guided_choice": []}, "guided_choice", "at least one"),
        ({"guided_grammar": "start: nothing_here"}, "guided_grammar", "invalid grammar"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "one of"),
        ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs", "not supported"),
        ({"structured_outputs": {"json": {}, "whatever": 1}}, "structured_outputs", "Extra inputs"),
        ({"guided_regex": "a+", "guided_decoding_backend": "xgrammar"}, "guided_decoding_backend", "llguidance"),
        ({"tool_choice": "required"}, "tool_choice", "`tools` must be set"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "does not match"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "Invalid value"),
        ({"tools": [{"type": "function"}]}, "tools", "tools[0]"),
        ({"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}, "tool_choice", "cannot be combined"),
    ],
)
def test_unknown_or_broken_forms_are_a_400_naming_the_field(server: Server, body: dict, param: str, words: str) -> None:
    response = httpx.post(
        server.base_url + "/v1/chat/completions", json={"model": server.model, "messages": MESSAGES, **body}, timeout=60
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error


# -- tools ------------------------------------------------------------------------------------------
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def test_a_forced_function_call_comes_back_in_tool_calls(server: Server) -> None:
    parameters = WEATHER_TOOL["function"]["parameters"]
    for seed in range(6):
        reply = chat(server, tools=TOOLS, tool_choice=NAMED, temperature=1.0, seed=seed, max_tokens=300).choices[0]
        assert reply.finish_reason == "stop" and not reply.message.content  # forced, not chosen: OpenAI's and vLLM's
        [call] = reply.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("chatcmpl-tool-")
        jsonschema.validate(json.loads(call.function.arguments), parameters)


def test_a_forced_function_call_streams_its_arguments(server: Server) -> None:
    """vLLM's delta shape: the first tool-call delta has the id, type and name, the rest add
    pieces of `function.arguments`; the streamed call equals the non-streamed one."""
    whole = chat(server, tools=TOOLS, tool_choice=NAMED, temperature=1.0, seed=11, max_tokens=300).choices[0]
    chunks = [
        c
        for c in chat(server, tools=TOOLS, tool_choice=NAMED, temperature=1.0, seed=11, max_tokens=300, stream=True)
        if c.choices
    ]
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].type == "function" and deltas[0].function.name == "get_weather"
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in deltas[1:]) and len(deltas) > 3
    arguments = "".join(d.function.arguments or "" for d in deltas)
    assert arguments == whole.message.tool_calls[0].function.arguments
    jsonschema.validate(json.loads(arguments), WEATHER_TOOL["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)


def test_required_tool_choice_calls_at_least_one_tool(server: Server) -> None:
    reply = chat(
        server, tools=TOOLS, tool_choice="required", temperature=1.0, seed=2, max_tokens=400, extra_body=COMPACT
    ).choices[0]
    assert reply.finish_reason == "tool_calls" and reply.message.tool_calls
    parameters = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for call in reply.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), parameters[call.function.name])


def test_tool_choice_none_renders_the_tools_and_answers_text(server: Server) -> None:
    with_tools = chat(server, tools=TOOLS, tool_choice="none", temperature=0.0, max_tokens=8).choices[0]
    assert with_tools.message.tool_calls is None and with_tools.finish_reason == "length"
    assert isinstance(with_tools.message.content, str) and with_tools.message.content
    prompt = httpx.post(server.base_url + "/tokenize", json={"messages": MESSAGES}, timeout=30).json()["count"]
    usage = chat(server, tools=TOOLS, tool_choice="none", temperature=0.0, max_tokens=1).usage
    assert usage.prompt_tokens > prompt + 40  # the tools are in the prompt
    # /tokenize renders them too, as vLLM's does: a client budgeting its context counts the real prompt
    with_tools = httpx.post(server.base_url + "/tokenize", json={"messages": MESSAGES, "tools": TOOLS}, timeout=30).json()
    assert with_tools["count"] == usage.prompt_tokens
    bad = httpx.post(server.base_url + "/tokenize", json={"messages": MESSAGES, "tools": [{"type": "x"}]}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tools"


HERMES_CALL = (
    r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[a-z]{2,8}", "unit": "(celsius|fahrenheit)"\}\}\n</tool_call>'
)


@pytest.mark.parametrize("stream", [False, True])
def test_auto_tool_choice_parses_hermes_calls_out_of_the_reply(server: Server, stream: bool) -> None:
    """`--tool-call-parser hermes` on a reply that is a Hermes call (the regex makes the random model
    write one) and on one that is plain text."""
    regex = "Calling it\\.\\n" + HERMES_CALL
    body = {"tools": TOOLS, "temperature": 1.0, "seed": 4, "max_tokens": 100, "extra_body": {"guided_regex": regex}}
    if not stream:
        reply = chat(server, **body).choices[0]
        content, finish = reply.message.content, reply.finish_reason
        calls = [(c.function.name, c.function.arguments) for c in reply.message.tool_calls]
    else:
        chunks = [c for c in chat(server, stream=True, **body) if c.choices]
        content = "".join(c.choices[0].delta.content or "" for c in chunks)
        deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
        calls = [(deltas[0].function.name, "".join(d.function.arguments or "" for d in deltas))]
        finish = chunks[-1].choices[0].finish_reason
    assert content == "Calling it.\n" and finish == "tool_calls"
    [(name, arguments)] = calls
    assert name == "get_weather"
    jsonschema.validate(json.loads(arguments), WEATHER_TOOL["function"]["parameters"])
    text = chat(server, tools=TOOLS, temperature=1.0, seed=4, max_tokens=10, extra_body={"guided_regex": "[a-z ]{20}"}).choices[0]
    assert text.message.tool_calls is None and len(text.message.content) == 20 and text.finish_reason == "stop"


# -- the Responses API: function calls as output items, tool results as input items, text.format ------
RESPONSES_TOOLS = [{"type": "function", **tool["function"]} for tool in TOOLS]  # the Responses API's are flat
QUESTION = MESSAGES[0]["content"]


def respond(server: Server, **body: Any) -> Any:
    extra = body.pop("extra_body", {})
    return server.client().responses.create(model=server.model, input=body.pop("input", QUESTION), extra_body=extra, **body)


def test_a_forced_function_call_is_a_function_call_item_whole_and_streamed(server: Server) -> None:
    """The call equals chat's for the same seeded request; streamed, its arguments arrive in pieces
    that add up to it."""
    named = {"type": "function", "name": "get_weather"}
    body = {
        "tools": RESPONSES_TOOLS,
        "tool_choice": named,
        "temperature": 1.0,
        "max_output_tokens": 300,
        "extra_body": {"seed": 5},
    }
    whole = respond(server, **body)
    [call] = whole.output
    assert (call.type, call.name, call.status, whole.status) == ("function_call", "get_weather", "completed", "completed")
    jsonschema.validate(json.loads(call.arguments), WEATHER_TOOL["function"]["parameters"])
    chat_call = (
        chat(server, tools=TOOLS, tool_choice=NAMED, temperature=1.0, seed=5, max_tokens=300).choices[0].message.tool_calls[0]
    )
    assert chat_call.function.arguments == call.arguments

    events = list(respond(server, stream=True, **body))
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert events[2].item.type == "function_call" and events[2].item.name == "get_weather" and events[2].item.arguments == ""
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(deltas) > 3 and "".join(deltas) == done.arguments == call.arguments
    assert kinds[-2:] == ["response.output_item.done", "response.completed"]
    assert (
        events[-1].response.output[0].arguments == call.arguments
        and events[-1].response.output[0].call_id == events[2].item.call_id
    )


@pytest.mark.parametrize("stream", [False, True])
def test_auto_tool_choice_gives_a_message_and_a_function_call_item(server: Server, stream: bool) -> None:
    """`--tool-call-parser hermes` on a reply that is text and then a Hermes call (the regex makes
    the random model write one): a message item with the text, then the call."""
    body = {
        "tools": RESPONSES_TOOLS,
        "temperature": 1.0,
        "max_output_tokens": 100,
        "extra_body": {"seed": 4, "structured_outputs": {"regex": "Calling it\\.\\n" + HERMES_CALL}},
    }
    if stream:
        events = list(respond(server, stream=True, **body))
        response = events[-1].response
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
        assert text == response.output[0].content[0].text and arguments == response.output[1].arguments
    else:
        response = respond(server, **body)
    message, call = response.output
    assert (message.type, message.content[0].text, call.type, call.name) == (
        "message",
        "Calling it.\n",
        "function_call",
        "get_weather",
    )
    jsonschema.validate(json.loads(call.arguments), WEATHER_TOOL["function"]["parameters"])


def test_a_tool_result_turn_is_answered_as_the_chat_turn(server: Server) -> None:
    """function_call and function_call_output input items render as chat's assistant tool call and
    tool message: the same prompt, the same greedy reply."""
    arguments = '{"city": "paris", "unit": "celsius"}'
    items = [
        {"role": "user", "content": QUESTION},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": arguments},
        {"type": "function_call_output", "call_id": "call_1", "output": "18 degrees and sunny"},
    ]
    response = respond(server, input=items, tools=RESPONSES_TOOLS, tool_choice="none", temperature=0.0, max_output_tokens=8)
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    messages = [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"},
    ]
    reply = chat(server, messages=messages, tools=TOOLS, tool_choice="none", temperature=0.0, max_tokens=8)
    assert response.usage.input_tokens == reply.usage.prompt_tokens
    assert response.output_text == reply.choices[0].message.content and response.output_text


def test_text_format_json_schema_samples_parse_and_validate(server: Server) -> None:
    schema = SCHEMAS["flat-with-enum"]
    fmt = {"type": "json_schema", "name": "flat", "schema": schema, "strict": True}

    def run(seed: int) -> Any:
        return respond(server, text={"format": fmt}, temperature=1.0, max_output_tokens=200, extra_body={"seed": seed, **COMPACT})

    for response in in_parallel(run, list(range(8))):
        assert response.status == "completed", response.output_text
        jsonschema.validate(json.loads(response.output_text), schema)
        assert response.text.format.type == "json_schema"
    conflict = httpx.post(
        server.base_url + "/v1/responses",
        json={"model": server.model, "input": QUESTION, "text": {"format": fmt}, "structured_outputs": {"regex": "a"}},
        timeout=30,
    )
    error = conflict.json()["error"]
    assert conflict.status_code == 400 and error["param"] == "structured_outputs", conflict.text
    assert "text.format" in error["message"] and "response_format" not in error["message"]


def test_parallel_tool_calls_false_keeps_the_first_call(server: Server) -> None:
    regex = HERMES_CALL + "\\n" + HERMES_CALL  # the random model writes two calls
    body = {
        "tools": RESPONSES_TOOLS,
        "temperature": 1.0,
        "max_output_tokens": 200,
        "extra_body": {"seed": 4, "structured_outputs": {"regex": regex}},
    }
    both = respond(server, **body)
    assert [item.type for item in both.output] == ["function_call", "function_call"] and both.parallel_tool_calls is True
    one = respond(server, parallel_tool_calls=False, **body)
    assert [item.arguments for item in one.output] == [both.output[0].arguments] and one.parallel_tool_calls is False
    streamed = list(respond(server, stream=True, parallel_tool_calls=False, **body))
    assert [item.arguments for item in streamed[-1].response.output] == [both.output[0].arguments]
    assert sum(e.type == "response.output_item.added" for e in streamed) == 1
