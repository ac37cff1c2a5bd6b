"""A /v1/responses response object: the request's settings echoed around its output items
(`reasoning`, `message` with its `output_text`, a `function_call` per tool call) and its usage, built
from the whole reply (`ResponseObject.whole`); the stream (`responses._ResponseStream`) builds the
same items event by event."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from pdserve.engine.sampling_params import ALL_LOGPROBS
from pdserve.engine.tokenizer import Tokenizer
from pdserve.router.chat import PreparedChat
from pdserve.router.reasoning import split
from pdserve.router.responses_request import ResponsesRequest
from pdserve.router.serving import TextDelta, json_logprob, token_text

Keep = Callable[[dict[str, Any]], Awaitable[bool]]  # stores the final response object


class ResponseObject:
    """The response object of one request, and the output items it is made of."""

    def __init__(
        self,
        response_id: str,
        model: str,
        tokenizer: Tokenizer,
        prepared: PreparedChat,
        request: ResponsesRequest,
        keep: Keep | None,  # None: not stored
        as_token_ids: bool = False,  # logprobs name tokens "token_id:N" (--return-tokens-as-token-ids)
    ) -> None:
        self.id = response_id
        self._keep = keep
        self.created_at = int(time.time())
        self._model = model
        self._tokenizer = tokenizer
        self._generation = prepared.generations[0]
        self._request = request
        self._reader = prepared.reader
        self._new_splitter = prepared.new_splitter
        self._as_token_ids = as_token_ids

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
            "previous_response_id": request.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "store": self._keep is not None,
            "temperature": self._generation.params.temperature,  # as sampled: the checkpoint's default if left out (vLLM)
            "text": {"format": (request.text or {}).get("format") or {"type": "text"}},
            "tool_choice": request.tool_choice or "auto",  # the default, as OpenAI and vLLM report it, tools or not
            "tools": request.tools or [],
            "top_logprobs": request.top_logprobs or 0,
            "top_p": self._generation.params.top_p,
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
        shown = None if num_top == ALL_LOGPROBS else num_top  # -1: all the worker sent, the whole vocabulary
        return [
            {**self._entry(lp.token_id, lp.logprob), "top_logprobs": [self._entry(i, v) for i, v in lp.top[:shown]]}
            for lp in delta.logprobs
        ]

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        token = token_text(self._tokenizer, token_id, self._as_token_ids)
        return {"token": token, "bytes": list(token.encode("utf-8")), "logprob": json_logprob(logprob)}
