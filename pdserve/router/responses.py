"""POST /v1/responses: OpenAI's Responses API, stateless, as vLLM serves it without its store.
`instructions` and the `input` items become chat messages (a `function_call` item an assistant
turn's tool call, a `function_call_output` item a tool turn) and take the chat path
(`chat.prepare_chat`: the template, function tools, `text.format` as structured output); the reply
comes back as output items, a `message` with its `output_text` and a `function_call` item per tool
call, whole or as the Responses stream's events (`response.created` ... `response.completed`).
Nothing is stored: `previous_response_id` and `background` are refused, `store` is answered false,
and GET /v1/responses/{id} finds nothing."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError, field_validator

from pdserve.engine.sampling_params import MAX_LOGPROBS
from pdserve.engine.tokenizer import Tokenizer
from pdserve.router.chat import PreparedChat, prepare_chat
from pdserve.router.errors import APIError, as_api_error
from pdserve.router.protocol import INT64_MAX, INT64_MIN, MAX_CACHE_SALT_CHARS, ChatCompletionRequest
from pdserve.router.reasoning import split
from pdserve.router.serving import EventStreamResponse, Serving, TextDelta, collect, json_logprob, token_text
from pdserve.router.structured_output import StructuredOutputsParams
from pdserve.router.tools import ToolOptions

ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
TEXT_PARTS = ("input_text", "output_text", "text")
LOGPROBS_INCLUDE = "message.output_text.logprobs"
# OpenAI's `include` values: the others name output this server never makes (reasoning, images,
# built-in tools' results), so asking for them adds nothing, as on vLLM
INCLUDABLE = frozenset({
    LOGPROBS_INCLUDE, "reasoning.encrypted_content", "message.input_image.image_url", "file_search_call.results",
    "web_search_call.results", "web_search_call.action.sources", "computer_call_output.output.image_url",
    "code_interpreter_call.outputs",
})  # fmt: skip
# a chat field's name in this API, for the errors the chat path raises
PARAMS = {"messages": "input", "max_completion_tokens": "max_output_tokens", "max_tokens": "max_output_tokens",
          "response_format": "text.format", "logprobs": "include"}  # fmt: skip


class ResponsesRequest(BaseModel):
    """OpenAI's fields, and vLLM's sampling extras; what pdserve cannot honour is refused."""

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_logprobs: int | None = None
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    include: list[str] | None = None
    store: bool | None = None  # accepted; nothing is stored (the response says `store: false`)
    previous_response_id: str | None = None
    background: bool | None = None
    reasoning: dict[str, Any] | None = None
    truncation: str | None = None
    max_tool_calls: int | None = Field(None, ge=1)
    metadata: dict[str, str] | None = None
    prompt: dict[str, Any] | None = None  # a stored prompt template: refused
    conversation: str | dict[str, Any] | None = None  # server-side state: refused
    user: str | None = None  # accepted and ignored, like vLLM (so are service_tier, prompt_cache_key, ...)
    # vLLM's extras, as on chat
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | None = None
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_CACHE_SALT_CHARS)

    @field_validator("stream", mode="before")
    @classmethod
    def _stream_null_is_false(cls, stream: object) -> object:
        return False if stream is None else stream

    def check_supported(self) -> None:
        if self.previous_response_id is not None:
            raise APIError(
                400,
                "previous_response_id is not supported: this server stores no responses (send the conversation in `input`)",
                "previous_response_id",
            )
        for field, what in (("prompt", "stored prompt templates"), ("conversation", "stored conversations")):
            if getattr(self, field) is not None:
                raise APIError(
                    400, f"{field} is not supported: this server has no {what} (send the conversation in `input`)", field
                )
        if self.background:
            raise APIError(400, "background responses are not supported", "background")
        if self.truncation not in (None, "disabled"):
            raise APIError(400, f'truncation "{self.truncation}" is not supported (only "disabled")', "truncation")
        if self.reasoning is not None and any(v is not None for v in self.reasoning.values()):
            raise APIError(400, "reasoning options are not supported", "reasoning")
        unknown = [item for item in self.include or [] if item not in INCLUDABLE]
        if unknown:
            raise APIError(400, f'include: "{unknown[0]}" is not one of {", ".join(sorted(INCLUDABLE))}', "include")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}", "top_logprobs")
        if self.max_output_tokens is not None and self.max_output_tokens < 1:
            raise APIError(400, f"max_output_tokens must be at least 1, got {self.max_output_tokens}", "max_output_tokens")

    @property
    def wants_logprobs(self) -> bool:
        return LOGPROBS_INCLUDE in (self.include or [])

    @property
    def max_calls(self) -> int | None:
        """The function calls a reply may make: one without parallel calls, at most max_tool_calls."""
        limits = [n for n in (1 if self.parallel_tool_calls is False else None, self.max_tool_calls) if n is not None]
        return min(limits, default=None)

    def chat_request(self) -> ChatCompletionRequest:
        """The same request as a chat completion (pydantic's complaints as a 400 naming `input`)."""
        try:
            return ChatCompletionRequest(
                model=self.model,
                messages=chat_messages(self.instructions, self.input),  # dicts: validated as ChatMessage here
                max_completion_tokens=self.max_output_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                logprobs=self.wants_logprobs,
                top_logprobs=(self.top_logprobs or 0) if self.wants_logprobs else None,
                tools=chat_tools(self.tools),
                tool_choice=chat_tool_choice(self.tool_choice),
                response_format=response_format(self.text),
                top_k=self.top_k,
                min_p=self.min_p,
                repetition_penalty=self.repetition_penalty,
                seed=self.seed,
                stop=self.stop,
                stop_token_ids=self.stop_token_ids,
                ignore_eos=self.ignore_eos,
                min_tokens=self.min_tokens,
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                logit_bias=self.logit_bias,
                skip_special_tokens=self.skip_special_tokens,
                include_stop_str_in_output=self.include_stop_str_in_output,
                structured_outputs=self.structured_outputs,
                cache_salt=self.cache_salt,
                stream=self.stream,
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise APIError(400, f"{where}: {str(first['msg']).removeprefix('Value error, ')}", "input") from None


def chat_messages(instructions: str | None, items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation as chat messages: `instructions` as the system turn, then the input items
    in order (a function call joins the assistant turn before it, if there is one)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    if isinstance(items, str):
        return [*messages, {"role": "user", "content": items}]
    if not items:
        raise APIError(400, "input is empty", "input")
    for i, item in enumerate(items):
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if not isinstance(role, str) or role not in ROLES:
                raise APIError(400, f"input[{i}].role must be one of {', '.join(ROLES)}, got {role!r}", "input")
            content = _text(item.get("content"), f"input[{i}].content")
            if role == "assistant" and messages and messages[-1]["role"] == "assistant" and messages[-1]["content"] is None:
                messages[-1]["content"] = content  # the text of the turn whose function calls came first
            else:
                messages.append({"role": ROLES[role], "content": content})
        elif kind == "function_call":
            call = {
                "id": _field(item, "call_id", i),
                "type": "function",
                "function": {"name": _field(item, "name", i), "arguments": _field(item, "arguments", i)},
            }
            if not messages or messages[-1]["role"] != "assistant":
                messages.append({"role": "assistant", "content": None})
            messages[-1].setdefault("tool_calls", []).append(call)
        elif kind == "reasoning":
            continue  # an earlier turn's thinking, sent back with its output: templates leave it out, so does this
        elif kind == "function_call_output":
            output = _text(item.get("output"), f"input[{i}].output")
            messages.append({"role": "tool", "content": output, "tool_call_id": _field(item, "call_id", i)})
        else:
            raise APIError(
                400,
                f"input[{i}]: items of type {kind!r} are not supported (message, function_call, function_call_output, reasoning)",
                "input",
            )
    return messages


def _field(item: dict[str, Any], name: str, i: int) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise APIError(400, f"input[{i}].{name} must be a string", "input")
    return value


def _text(content: object, where: str) -> str:
    """A message's text: a string, or its text parts joined with newlines."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [_part_text(part) for part in content]
        if all(isinstance(text, str) for text in texts):
            return "\n".join(texts)  # type: ignore[arg-type]
    raise APIError(400, f"{where}: only text content is supported (a string, or input_text / output_text parts)", "input")


def _part_text(part: object) -> str | None:
    if not isinstance(part, dict):
        return None
    if part.get("type") == "refusal":  # an earlier assistant turn's, fed back
        return part.get("refusal")
    return part.get("text") if part.get("type") in TEXT_PARTS else None


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Function tools in the chat API's shape (the Responses API's are flat)."""
    if tools is None:
        return None
    converted = []
    for i, tool in enumerate(tools):
        if tool.get("type") != "function":
            raise APIError(400, f"tools[{i}]: only function tools are supported, got type {tool.get('type')!r}", "tools")
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
        converted.append({"type": "function", "function": function})
    return converted


def chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise APIError(
                400, 'tool_choice must be "none", "auto", "required" or {"type": "function", "name": ...}', "tool_choice"
            )
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """`text.format` as chat's `response_format`."""
    fmt = (text or {}).get("format")
    if fmt is not None and not isinstance(fmt, dict):
        raise APIError(400, 'text.format must be an object, e.g. {"type": "json_object"}', "text.format")
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": schema}
    raise APIError(400, f"text.format type {fmt.get('type')!r} is not supported (text, json_object, json_schema)", "text.format")


async def create_response(
    serving: Serving, request: ResponsesRequest, tool_options: ToolOptions = ToolOptions(), tenant: str | None = None
) -> Response:
    request.check_supported()
    response_id = f"resp_{uuid.uuid4().hex}"
    try:
        prepared = await prepare_chat(serving, request.chat_request(), tool_options, tenant, response_id)
    except APIError as exc:  # in this API's names
        message = exc.message.replace("response_format", "text.format").replace("max_completion_tokens", "max_output_tokens")
        raise APIError(exc.status_code, message, PARAMS.get(exc.param or "", exc.param)) from None
    builder = _Response(response_id, serving.backend.model_name, serving.backend.tokenizer, prepared, request)
    deltas = prepared.generations[0].deltas()
    if not request.stream:
        return JSONResponse(builder.whole(await collect(deltas)))
    try:  # the first delta before answering: a failure before any output gets its HTTP status
        first = await anext(deltas)
    except BaseException:
        await deltas.aclose()
        raise
    return EventStreamResponse(builder.events(first, deltas))


def not_stored(response_id: str) -> APIError:
    return APIError(404, f"response {response_id} not found: this server stores no responses", "response_id")


class _Response:
    """The response object, whole or as stream events."""

    def __init__(
        self, response_id: str, model: str, tokenizer: Tokenizer, prepared: PreparedChat, request: ResponsesRequest
    ) -> None:  # fmt: skip
        self.id = response_id
        self.created_at = int(time.time())
        self._model = model
        self._tokenizer = tokenizer
        self._generation = prepared.generations[0]
        self._request = request
        self._reader = reader = prepared.reader
        self._new_splitter = prepared.new_splitter
        self._splitter = prepared.new_splitter()
        self._reasoning: int | None = None  # the reasoning item's place among the items
        # streaming: the output items so far, the message item's place among them, each call's
        self._items: list[dict[str, Any]] = []
        self._message: int | None = None
        self._calls: dict[int, int] = {}  # the tool call's index in the reply -> its item's
        self._held_logprobs: list[dict[str, Any]] = []  # of tokens whose text has not been sent yet
        self._closed: set[int] = set()  # the items done
        self._text_stream = None if reader is None else reader[1]()
        self._sequence = 0

    # -- the response object ------------------------------------------------------------------------
    def envelope(self, status: str, output: list[dict[str, Any]], finish_reason: str | None = None) -> dict[str, Any]:
        request = self._request
        body: dict[str, Any] = {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": False,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if finish_reason == "length" else None,
            "instructions": request.instructions,
            "max_output_tokens": request.max_output_tokens,
            "model": self._model,
            "output": output,
            "parallel_tool_calls": True if request.parallel_tool_calls is None else request.parallel_tool_calls,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": False,
            "temperature": 1.0 if request.temperature is None else request.temperature,
            "text": {"format": (request.text or {}).get("format") or {"type": "text"}},
            "tool_choice": request.tool_choice or ("auto" if request.tools else "none"),
            "tools": request.tools or [],
            "top_logprobs": request.top_logprobs or 0,
            "top_p": 1.0 if request.top_p is None else request.top_p,
            "truncation": "disabled",
            "usage": None,
            "user": request.user,
            "metadata": request.metadata or {},
        }
        if status in ("completed", "incomplete"):
            usage = self._generation.usage
            body["usage"] = {
                "input_tokens": usage["prompt_tokens"],
                "input_tokens_details": {
                    "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
                    "cache_write_tokens": 0,
                },
                "output_tokens": usage["completion_tokens"],
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage["total_tokens"],
            }
        return body

    @staticmethod
    def _status(finish_reason: str | None) -> str:
        return "incomplete" if finish_reason == "length" else "completed"

    def whole(self, whole: TextDelta) -> dict[str, Any]:
        status = self._status(whole.finish_reason)
        reasoning, answer = split(self._new_splitter(), whole.text)
        items = [self._reasoning_item(reasoning, status)] if reasoning else []  # as streamed: none when empty
        parsed = None if self._reader is None else self._reader[0](answer)
        if parsed is None or not parsed.tool_calls:
            if answer or not items:  # a reply cut while thinking has no message
                items.append(self._message_item(answer, self._logprobs(whole), status))
            return self.envelope(status, items, whole.finish_reason)
        if parsed.content:
            items.append(self._message_item(parsed.content, self._logprobs(whole), status))
        calls = parsed.tool_calls[: self._request.max_calls]
        items += [self._call_item(call.id, call.name, call.arguments, status) for call in calls]
        return self.envelope(status, items, whole.finish_reason)

    @staticmethod
    def _reasoning_item(text: str, status: str) -> dict[str, Any]:
        content = [{"type": "reasoning_text", "text": text}]
        return {"id": f"rs_{uuid.uuid4().hex}", "type": "reasoning", "summary": [], "content": content, "status": status}

    def _message_item(self, text: str, logprobs: list[dict[str, Any]], status: str) -> dict[str, Any]:
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}
        return {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "status": status, "role": "assistant", "content": [part]}

    @staticmethod
    def _call_item(call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
        return {
            "id": f"fc_{uuid.uuid4().hex}",
            "type": "function_call",
            "call_id": call_id,
            "name": name,
            "arguments": arguments,
            "status": status,
        }

    def _logprobs(self, delta: TextDelta) -> list[dict[str, Any]]:
        if not self._request.wants_logprobs:
            return []
        num_top = self._request.top_logprobs or 0
        return [
            {**self._entry(lp.token_id, lp.logprob), "top_logprobs": [self._entry(i, v) for i, v in lp.top[:num_top]]}
            for lp in delta.logprobs
        ]

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        token = token_text(self._tokenizer, token_id)
        return {"token": token, "bytes": list(token.encode("utf-8")), "logprob": json_logprob(logprob)}

    # -- the stream ---------------------------------------------------------------------------------
    async def events(self, first: TextDelta, rest: AsyncGenerator[TextDelta, None]) -> AsyncGenerator[str, None]:
        """The SSE body. A failure mid-stream becomes an `error` event and `response.failed` (the
        status line went out with the first event)."""
        async with aclosing(rest):
            try:
                yield self._event("response.created", response=self.envelope("in_progress", []))
                yield self._event("response.in_progress", response=self.envelope("in_progress", []))
                for event in self._on_delta(first):
                    yield event
                finish_reason = first.finish_reason
                async for delta in rest:
                    for event in self._on_delta(delta):
                        yield event
                    finish_reason = delta.finish_reason
                for event in self._finish(finish_reason):
                    yield event
            except Exception as exc:  # noqa: BLE001 - reported to the client in the stream
                error = as_api_error(exc)
                yield self._event("error", code=str(error.status_code), message=error.message, param=error.param)
                failed = {**self.envelope("failed", self._items), "error": {"code": "server_error", "message": error.message}}
                yield self._event("response.failed", response=failed)

    def _event(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False, allow_nan=False)}\n\n"

    def _on_delta(self, delta: TextDelta) -> list[str]:
        """The events of a delta's text and calls. Logprobs ride with the next text delta (a tool
        parser may hold text back; the last delta may have none): those still held at the end go
        into the message's `output_text.done`."""
        self._held_logprobs += self._logprobs(delta)
        text, events, is_last = delta.text, [], delta.finish_reason is not None
        if self._splitter is not None:
            reasoning, text = self._splitter.feed(text, is_last)
            events += self._reasoning_text(reasoning) if reasoning else []
        message: dict[str, Any]
        if self._text_stream is None:
            message = {"content": text}
        else:
            message = self._text_stream.feed(text, is_last=is_last)
        events += self._text(message["content"]) if message.get("content") else []
        for call in message.get("tool_calls", []):
            events += self._call(call)
        return events

    def _reasoning_text(self, text: str) -> list[str]:
        events = []
        if self._reasoning is None:
            self._reasoning = len(self._items)
            item = {**self._reasoning_item("", "in_progress"), "content": []}
            self._items.append(item)
            events.append(self._event("response.output_item.added", output_index=self._reasoning, item=item))
            part = {"type": "reasoning_text", "text": ""}
            item["content"].append(part)
            events.append(self._part_event(self._reasoning, "response.content_part.added", part=part))
        self._items[self._reasoning]["content"][0]["text"] += text
        events.append(self._part_event(self._reasoning, "response.reasoning_text.delta", delta=text))
        return events

    def _text(self, text: str) -> list[str]:
        events = []
        if self._reasoning is not None and self._reasoning not in self._closed:  # the thinking is over
            events += self._done(self._reasoning, "completed")
        if self._message in self._closed:  # text after a call: a message of its own
            self._message = None
        if self._message is None:
            self._message = len(self._items)
            item = {**self._message_item("", [], "in_progress"), "content": []}
            self._items.append(item)
            events.append(self._event("response.output_item.added", output_index=self._message, item=item))
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            item["content"].append(part)
            events.append(self._content_event("response.content_part.added", part=part))
        logprobs, self._held_logprobs = self._held_logprobs, []
        part = self._items[self._message]["content"][0]
        part["text"] += text
        part["logprobs"] += logprobs
        events.append(self._content_event("response.output_text.delta", delta=text, logprobs=logprobs))
        return events

    def _content_event(self, kind: str, **fields: Any) -> str:
        assert self._message is not None
        return self._part_event(self._message, kind, **fields)

    def _part_event(self, index: int, kind: str, **fields: Any) -> str:
        """An event of the first content part of item `index`."""
        return self._event(kind, item_id=self._items[index]["id"], output_index=index, content_index=0, **fields)

    def _call(self, call: dict[str, Any]) -> list[str]:
        """A chat tool-call delta (its first: id and name; then pieces of its arguments). The message
        before it is done when the first call starts; calls past `max_calls` are dropped."""
        events, function, index = [], call.get("function") or {}, call["index"]
        if index not in self._calls:
            max_calls = self._request.max_calls
            if max_calls is not None and len(self._calls) >= max_calls:
                return []
            for open_item in (self._reasoning, self._message):
                if open_item is not None and open_item not in self._closed:
                    events += self._done(open_item, "completed")
            self._calls[index] = len(self._items)
            item = self._call_item(call["id"], function["name"], "", "in_progress")
            self._items.append(item)
            events.append(self._event("response.output_item.added", output_index=len(self._items) - 1, item=dict(item)))
        output_index = self._calls[index]
        item = self._items[output_index]
        if function.get("arguments"):
            item["arguments"] += function["arguments"]
            fields = {"item_id": item["id"], "output_index": output_index, "delta": function["arguments"]}
            events.append(self._event("response.function_call_arguments.delta", **fields))
        return events

    def _done(self, index: int, status: str) -> list[str]:
        """An output item's closing events."""
        item, events = self._items[index], []
        if item["type"] == "reasoning":
            part = item["content"][0]
            events.append(self._part_event(index, "response.reasoning_text.done", text=part["text"]))
            events.append(self._part_event(index, "response.content_part.done", part=part))
        elif item["type"] == "message":
            part = item["content"][0]
            part["logprobs"] += self._held_logprobs
            self._held_logprobs = []
            events.append(self._content_event("response.output_text.done", text=part["text"], logprobs=part["logprobs"]))
            events.append(self._content_event("response.content_part.done", part=part))
        else:
            fields = {"item_id": item["id"], "output_index": index, "name": item["name"], "arguments": item["arguments"]}
            events.append(self._event("response.function_call_arguments.done", **fields))
        item["status"] = status
        events.append(self._event("response.output_item.done", output_index=index, item=item))
        self._closed.add(index)
        return events

    def _finish(self, finish_reason: str | None) -> list[str]:
        status = self._status(finish_reason)
        events = [] if self._items else self._text("")  # an empty reply is an empty message
        for index in range(len(self._items)):
            if index not in self._closed:
                events += self._done(index, status)
        kind = "response.incomplete" if status == "incomplete" else "response.completed"
        events.append(self._event(kind, response=self.envelope(status, self._items, finish_reason)))
        return events
