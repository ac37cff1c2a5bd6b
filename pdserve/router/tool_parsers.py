"""Tool calls in a model's reply, read as vLLM's `--tool-call-parser`s read them (`hermes`:
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks after optional text;
`llama3_json`: `{"name": ..., "parameters": {...}}` objects separated by `;`, after an optional
`<|python_tag|>`) and the forced forms (a named function's arguments; "required"'s JSON array).
`parse_*` read a whole reply (malformed calls: no calls, the text is content, as vLLM answers);
`*Stream` classes read it as it arrives, in vLLM's delta shape: a call's first delta carries its
id, type and name, the next ones pieces of `function.arguments` (the model's own JSON text)."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from pdserve.router.partial_call import PartialCall, scan_call

HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"
HERMES_CALLS = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)
PYTHON_TAG = "<|python_tag|>"


def new_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=new_call_id)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParsedReply:
    content: str | None
    tool_calls: list[ToolCall]


# -- whole replies ----------------------------------------------------------------------------------
def parse_hermes(text: str) -> ParsedReply:
    if HERMES_START not in text:
        return ParsedReply(text, [])
    try:
        calls = [_call(json.loads(closed or unclosed), ("arguments",)) for closed, unclosed in HERMES_CALLS.findall(text)]
    except (ValueError, KeyError, TypeError):
        return ParsedReply(text, [])
    return ParsedReply(text[: text.index(HERMES_START)] or None, calls)


def parse_llama3_json(text: str) -> ParsedReply:
    if not (text.startswith(PYTHON_TAG) or text.startswith("{")):
        return ParsedReply(text, [])
    decoder, position, calls = json.JSONDecoder(), len(PYTHON_TAG) if text.startswith(PYTHON_TAG) else 0, []
    try:
        while position < len(text):
            value, position = decoder.raw_decode(text, position)
            calls.append(_call(value, ("arguments", "parameters")))
            position = _skip_separator(text, position, ";")
    except (ValueError, KeyError, TypeError):
        return ParsedReply(text, [])
    return ParsedReply(None, calls)


def parse_required(text: str) -> ParsedReply:
    """The JSON array `tool_choice: "required"` constrains the reply to."""
    try:
        calls = [_call(value, ("parameters",)) for value in json.loads(text)]
    except (ValueError, KeyError, TypeError):
        return ParsedReply(text, [])
    return ParsedReply(None, calls)


def _call(value: object, argument_keys: tuple[str, ...]) -> ToolCall:
    """Raises KeyError/TypeError when `value` is not a call object with a name and arguments."""
    if not isinstance(value, dict) or not isinstance(value["name"], str):
        raise TypeError("a tool call is an object with a string name")
    key = next(k for k in argument_keys if k in value) if any(k in value for k in argument_keys) else argument_keys[0]
    return ToolCall(value["name"], json.dumps(value[key], ensure_ascii=False))


def _skip_separator(text: str, position: int, separator: str) -> int:
    """Past whitespace, one `separator` and whitespace."""
    while position < len(text) and text[position].isspace():
        position += 1
    if text.startswith(separator, position):
        position += len(separator)
    while position < len(text) and text[position].isspace():
        position += 1
    return position


# -- streams --------------------------------------------------------------------------------------------
@dataclass
class _Streamed:
    id: str
    name: str
    arguments: str = ""  # sent so far


class _CallListStream:
    """Calls as JSON objects at points `_seek` finds; each streamed as it arrives."""

    argument_keys: tuple[str, ...] = ("arguments",)

    def __init__(self) -> None:
        self.text = ""
        self.position = 0  # the text before it is handled
        self.call_start: int | None = None  # the call object being read
        self.calls: list[_Streamed] = []
        self.is_call_sent = False  # the call at `call_start` has had its first delta
        self.is_done = False  # nothing after this point is read

    @property
    def has_tool_calls(self) -> bool:
        return bool(self.calls)

    def feed(self, text: str, is_last: bool = False) -> dict[str, Any]:
        """The delta message (`content` and/or `tool_calls`, maybe neither) for `text`, the reply's next piece."""
        self.text += text
        content, tool_calls = "", []
        while not self.is_done:
            if self.call_start is None:
                piece, self.call_start = self._seek(is_last)
                content += piece
                if self.call_start is None:
                    break
                self.is_call_sent = False
            call = scan_call(self.text, self.call_start, self.argument_keys)
            tool_calls += self._stream(call)
            if call.end is None:
                break
            self.position, self.call_start = call.end, None
        return _delta(content, tool_calls)

    def _seek(self, is_last: bool) -> tuple[str, int | None]:
        """Content up to the next call object and where it starts (None: not arrived yet)."""
        raise NotImplementedError

    def _stream(self, call: PartialCall) -> list[dict[str, Any]]:
        """The deltas of what arrived of the call at `call_start`."""
        deltas = []
        if not self.is_call_sent:
            if call.name is None:
                self.is_done = call.end is not None  # a complete object without a name is no call
                return []
            self.calls.append(_Streamed(new_call_id(), call.name))
            self.is_call_sent = True
            deltas.append(
                {
                    "index": len(self.calls) - 1,
                    "id": self.calls[-1].id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": ""},
                }
            )
        streamed = self.calls[-1]
        arguments = call.arguments or ("{}" if call.end is not None else "")
        if arguments.startswith(streamed.arguments) and len(arguments) > len(streamed.arguments):
            deltas.append({"index": len(self.calls) - 1, "function": {"arguments": arguments[len(streamed.arguments) :]}})
            streamed.arguments = arguments
        return deltas

    def _next_object(self, separator: str | None) -> int | None:
        """Past whitespace (and `separator`) to a "{"; None while only whitespace has arrived; anything
        else ends the reading."""
        position = self.position
        text = self.text
        while position < len(text) and text[position].isspace():
            position += 1
        if separator is not None and text.startswith(separator, position):
            position = _skip_separator(text, position, separator)
        if position >= len(text):
            return None
        if text[position] != "{":
            self.is_done = True
            return None
        return position


class HermesStream(_CallListStream):
    """Text up to the first `<tool_call>` is content; each block's object is a call; what lies
    between and after blocks is dropped (vLLM's non-streaming answer)."""

    def __init__(self) -> None:
        super().__init__()
        self.in_block = False

    def _seek(self, is_last: bool) -> tuple[str, int | None]:
        if not self.in_block:
            start = self.text.find(HERMES_START, self.position)
            if start < 0:
                end = len(self.text) if is_last else _safe_end(self.text, self.position, HERMES_START)
                piece = self.text[self.position : end] if not self.calls else ""
                self.position = end
                return piece, None
            piece = self.text[self.position : start] if not self.calls else ""
            self.position, self.in_block = start + len(HERMES_START), True
            return piece, self._next_object(None)
        return "", self._next_object(None)

    def _stream(self, call: PartialCall) -> list[dict[str, Any]]:
        if call.end is not None:
            self.in_block = False
        return super()._stream(call)


class Llama3JsonStream(_CallListStream):
    """`{...}; {...}` after an optional `<|python_tag|>`; a reply that starts otherwise is content."""

    argument_keys = ("arguments", "parameters")

    def __init__(self) -> None:
        super().__init__()
        self.is_content = False

    def _seek(self, is_last: bool) -> tuple[str, int | None]:
        if self.is_content:
            piece, self.position = self.text[self.position :], len(self.text)
            return piece, None
        if not self.calls and self.position == 0:
            if self.text.startswith(PYTHON_TAG):
                self.position = len(PYTHON_TAG)
            elif PYTHON_TAG.startswith(self.text) and not is_last:
                return "", None  # maybe the tag, still arriving
            elif not self.text.startswith("{"):
                self.is_content = True
                return self._seek(is_last)
            return "", self._next_object(None)
        return "", self._next_object(";")


class RequiredStream(_CallListStream):
    """`[{"name": ..., "parameters": {...}}, ...]`: the reply `tool_choice: "required"` forces."""

    argument_keys = ("parameters",)

    def _seek(self, is_last: bool) -> tuple[str, int | None]:
        if not self.calls and self.position == 0:
            start = self.text.find("[")
            if start < 0:
                return "", None
            self.position = start + 1
            return "", self._next_object(None)
        return "", self._next_object(",")


class NamedStream:
    """The reply is the arguments of `function`, which `tool_choice` named."""

    def __init__(self, function: str) -> None:
        self.function = function
        self.call_id: str | None = None

    @property
    def has_tool_calls(self) -> bool:
        return self.call_id is not None

    def feed(self, text: str, is_last: bool = False) -> dict[str, Any]:
        if self.call_id is None:
            if not text:
                return {}
            self.call_id = new_call_id()
            return {
                "tool_calls": [
                    {"index": 0, "id": self.call_id, "type": "function", "function": {"name": self.function, "arguments": text}}
                ]
            }
        return {"tool_calls": [{"index": 0, "function": {"arguments": text}}]} if text else {}


def _delta(content: str, tool_calls: list[dict[str, Any]]) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if content:
        delta["content"] = content
    if tool_calls:
        delta["tool_calls"] = tool_calls
    return delta


def _safe_end(text: str, start: int, tag: str) -> int:
    """Where the text can be cut without splitting a `tag` that may still be arriving."""
    for keep in range(min(len(tag) - 1, len(text) - start), 0, -1):
        if tag.startswith(text[len(text) - keep :]):
            return len(text) - keep
    return len(text)


# vLLM's `--tool-call-parser` names: the whole-reply parser and the stream class.
PARSERS = {"hermes": (parse_hermes, HermesStream), "llama3_json": (parse_llama3_json, Llama3JsonStream)}
