"""POST /v1/responses: OpenAI's Responses API. `instructions` and the conversation's items become
chat messages (a `function_call` item an assistant turn's tool call, a `function_call_output` item a
tool turn) and take the chat path (`chat.prepare_chat`: the template, function tools, `text.format`
as structured output); the reply comes back as output items, a `message` with its `output_text` and
a `function_call` item per tool call, whole or as the Responses stream's events (`response.created`
... `response.completed`). Unless `store` is false, the final response and its conversation are kept
(`response_store.py`) before the client gets it: `previous_response_id` continues that conversation
(the input items it answered, then its output, then the new `input`; its `instructions` are not
carried over, as on OpenAI). `background`, `conversation` and `prompt` are refused."""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from fastapi.responses import JSONResponse, Response

from pdserve.router.chat import prepare_chat
from pdserve.router.errors import APIError, as_api_error
from pdserve.router.response_object import ResponseObject
from pdserve.router.response_store import ResponseStore, check_item_ids, input_items, previous_conversation
from pdserve.router.responses_request import PARAMS, ResponsesRequest
from pdserve.router.serving import EventStreamResponse, Serving, TextDelta, collect
from pdserve.router.tools import ToolOptions


async def create_response(
    serving: Serving,
    request: ResponsesRequest,
    tool_options: ToolOptions = ToolOptions(),
    tenant: str | None = None,
    store: ResponseStore | None = None,
) -> Response:
    request.check_supported()
    items = [*await previous_conversation(store, tenant, request.previous_response_id), *input_items(request.input)]
    check_item_ids(items)
    response_id = f"resp_{uuid.uuid4().hex}"
    try:
        prepared = await prepare_chat(serving, request.chat_request(items), tool_options, tenant, response_id)
    except APIError as exc:  # in this API's names
        message = exc.message.replace("response_format", "text.format").replace("max_completion_tokens", "max_output_tokens")
        raise APIError(exc.status_code, message, PARAMS.get(exc.param or "", exc.param)) from None
    keep = None if store is None or request.store is False else functools.partial(store.put, tenant, input_items=items)
    built = (
        serving.reply_model(request.model),
        serving.backend.tokenizer,
        prepared,
        request,
        keep,
        serving.return_tokens_as_token_ids,
    )
    deltas = prepared.generations[0].deltas()
    if not request.stream:
        response = ResponseObject(response_id, *built).whole(await collect(deltas))
        if keep is not None and not await keep(response):
            response["store"] = False  # too big, or the store failed: a continuation would not find it
        return JSONResponse(response)
    try:  # the first delta before answering: a failure before any output gets its HTTP status
        first = await anext(deltas)
    except BaseException:
        await deltas.aclose()
        raise
    return EventStreamResponse(_ResponseStream(response_id, *built).events(first, deltas))


class _ResponseStream(ResponseObject):
    """The response as the Responses stream's events, its output items built as the reply streams."""

    def __init__(self, *args: Any) -> None:
        """`ResponseObject`'s arguments."""
        super().__init__(*args)
        self._splitter = self._new_splitter()
        self._reasoning: int | None = None  # the reasoning item's place among the items
        # the output items so far, the message item's place among them, each call's
        self._items: list[dict[str, Any]] = []
        self._message: int | None = None
        self._calls: dict[int, int] = {}  # the tool call's index in the reply -> its item's
        self._held_logprobs: list[dict[str, Any]] = []  # of tokens whose text has not been sent yet
        self._closed: set[int] = set()  # the items done
        self._text_stream = None if self._reader is None else self._reader[1]()
        self._sequence = 0

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
                for event in self._close_items(finish_reason):
                    yield event
                final = self.envelope(self._status(finish_reason), self._items, finish_reason)
                # kept before the client sees the end: a retrieve right after it finds the response
                if self._keep is not None and not await self._keep(final):
                    final = {**final, "store": False}
                yield self._event(f"response.{'incomplete' if final['status'] == 'incomplete' else 'completed'}", response=final)
            except Exception as exc:  # noqa: BLE001 - reported to the client in the stream; a failed response is not kept
                error = as_api_error(exc)
                failed = {**self.envelope("failed", self._items), "store": False}
                failed["error"] = {"code": "server_error", "message": error.message}
                yield self._event("error", code=str(error.status_code), message=error.message, param=error.param)
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

    def _close_items(self, finish_reason: str | None) -> list[str]:
        """The events that close the items still open (an empty reply is an empty message)."""
        status = self._status(finish_reason)
        events = [] if self._items else self._text("")
        for index in range(len(self._items)):
            if index not in self._closed:
                events += self._done(index, status)
        return events
