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

from pdserve.engine.tokenizer import Tokenizer
from pdserve.router.chat import PreparedChat, prepare_chat
from pdserve.router.errors import APIError, as_api_error
from pdserve.router.reasoning import split
from pdserve.router.responses_request import PARAMS, ResponsesRequest
from pdserve.router.serving import EventStreamResponse, Serving, TextDelta, collect, json_logprob, token_text
from pdserve.router.tools import ToolOptions


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
