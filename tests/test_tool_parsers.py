"""Tool-call parsers on hand-written model replies: whole (vLLM's non-streaming answer, malformed
calls falling back to content) and streamed in pieces of every size (vLLM's delta shape), the
streamed calls adding up to the same calls."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pdserve.router.tool_parsers import (
    HermesStream,
    Llama3JsonStream,
    NamedStream,
    RequiredStream,
    parse_hermes,
    parse_llama3_json,
    parse_required,
)

WEATHER = {"city": "Paris", "days": [1, 2], "detail": {"unit": "c", "note": 'a } and a " inside'}}


def streamed(stream: Any, text: str, piece: int) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """Feed `text` in pieces of `piece` characters; the content, the calls (name, id, arguments
    joined) and every tool-call delta."""
    deltas = []
    for start in range(0, len(text), piece):
        deltas.append(stream.feed(text[start : start + piece]))
    deltas.append(stream.feed("", is_last=True))
    content = "".join(d.get("content", "") for d in deltas)
    tool_deltas = [tc for d in deltas for tc in d.get("tool_calls", [])]
    calls: dict[int, dict[str, Any]] = {}
    for delta in tool_deltas:
        call = calls.setdefault(delta["index"], {"name": None, "id": None, "arguments": ""})
        if "id" in delta:
            assert call["id"] is None and delta["type"] == "function", "a call's first delta comes once"
            call["id"], call["name"] = delta["id"], delta["function"]["name"]
        else:
            assert call["id"] is not None and set(delta["function"]) == {"arguments"}
        call["arguments"] += delta["function"].get("arguments", "")
    return content, [calls[i] for i in sorted(calls)], tool_deltas


def whole_calls(parsed: Any) -> list[tuple[str, Any]]:
    return [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls]


HERMES = (
    "Let me look that up.\n<tool_call>\n"
    + json.dumps({"name": "get_weather", "arguments": WEATHER})
    + '\n</tool_call>\n<tool_call>\n{"arguments": {}, "name": "get_time"}\n</tool_call>'
)


@pytest.mark.parametrize("piece", [1, 2, 5, 13, 10_000])
def test_hermes_whole_and_streamed(piece: int) -> None:
    parsed = parse_hermes(HERMES)
    assert parsed.content == "Let me look that up.\n"
    assert whole_calls(parsed) == [("get_weather", WEATHER), ("get_time", {})]
    assert all(c.id.startswith("chatcmpl-tool-") for c in parsed.tool_calls)
    content, calls, deltas = streamed(HermesStream(), HERMES, piece)
    assert content == parsed.content
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == whole_calls(parsed)
    if piece == 1:
        assert len([d for d in deltas if "id" not in d]) > 10  # the arguments arrive piece by piece


@pytest.mark.parametrize(
    "reply",
    [
        "just text, no calls",
        '<tool_call>\n{"name": "f", "arguments": {"a": </tool_call>',  # broken JSON
        '<tool_call>\n{"arguments": {"a": 1}}\n</tool_call>',  # no name
        '<tool_call>\n{"name": "f"}\n</tool_call>',  # no arguments
        "<tool_call>\n[1, 2]\n</tool_call>",  # not an object
    ],
)
def test_hermes_malformed_replies_are_content(reply: str) -> None:
    parsed = parse_hermes(reply)
    assert parsed.content == reply and parsed.tool_calls == []


def test_hermes_stream_holds_back_a_tag_that_may_still_be_arriving() -> None:
    stream = HermesStream()
    assert stream.feed("Sure <tool_") == {"content": "Sure "}
    assert stream.feed("ca") == {}
    assert stream.feed('ll>{"name": "f"')["tool_calls"][0]["function"] == {"name": "f", "arguments": ""}
    stream = HermesStream()
    assert stream.feed("a <tool_") == {"content": "a "}
    assert stream.feed("box>", is_last=True) == {"content": "<tool_box>"}  # not a tag after all
    assert not stream.has_tool_calls


LLAMA3 = (
    '<|python_tag|>{"name": "get_weather", "parameters": '
    + json.dumps(WEATHER)
    + '}; {"name": "get_time", "arguments": {"tz": "UTC"}}'
)


@pytest.mark.parametrize("piece", [1, 3, 10_000])
def test_llama3_json_whole_and_streamed(piece: int) -> None:
    parsed = parse_llama3_json(LLAMA3)
    assert parsed.content is None
    assert whole_calls(parsed) == [("get_weather", WEATHER), ("get_time", {"tz": "UTC"})]
    content, calls, _ = streamed(Llama3JsonStream(), LLAMA3, piece)
    assert content == ""
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == whole_calls(parsed)
    bare = LLAMA3.removeprefix("<|python_tag|>")
    assert whole_calls(parse_llama3_json(bare)) == whole_calls(parsed)


@pytest.mark.parametrize(
    "reply",
    ["The weather is fine.", ' {"name": "f", "parameters": {}}', '{"name": "f", "parameters": {"a": 1', '{"parameters": {}}'],
)
def test_llama3_json_text_and_malformed_replies_are_content(reply: str) -> None:
    parsed = parse_llama3_json(reply)
    assert parsed.content == reply and parsed.tool_calls == []


def test_llama3_json_stream_of_text_is_content() -> None:
    content, calls, _ = streamed(Llama3JsonStream(), "The weather is fine.", 2)
    assert content == "The weather is fine." and calls == []


def test_required_array_whole_and_streamed() -> None:
    reply = ' [ {"name": "get_weather", "parameters": ' + json.dumps(WEATHER) + '} ,\n{"name":"get_time","parameters":{}}]'
    parsed = parse_required(reply)
    assert whole_calls(parsed) == [("get_weather", WEATHER), ("get_time", {})]
    for piece in (1, 4, 10_000):
        _, calls, _ = streamed(RequiredStream(), reply, piece)
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == whole_calls(parsed)
    assert parse_required('[{"name": "f", "parameters": ').tool_calls == []  # cut short


def test_named_function_stream_sends_the_name_once_then_argument_pieces() -> None:
    stream = NamedStream("get_weather")
    first = stream.feed('{"ci')
    assert first["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"ci'}
    assert stream.feed('ty": "Rome"}') == {"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Rome"}'}}]}
    assert stream.feed("", is_last=True) == {}
