"""POST /v1/chat/completions: the chat template renders the messages, then one generation,
whole or streamed (a first chunk with the assistant role, then the content deltas)."""
from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi.responses import JSONResponse, Response

from engine.tokenizer import Tokenizer
from router.auth import cache_salt_of
from router.errors import APIError
from router.protocol import ChatCompletionRequest, ChatMessage
from router.serving import Generation, Serving, TextDelta, collect, json_logprob, start_stream, token_text

RESERVED_TEMPLATE_KWARGS = ("messages", "add_generation_prompt", "tools")


def render_chat(
    tokenizer: Tokenizer, messages: list[ChatMessage], add_generation_prompt: bool, kwargs: dict[str, Any] | None
) -> str:
    """The prompt text of a conversation; template failures are the client's (HTTP 400)."""
    kwargs = kwargs or {}
    reserved = [k for k in RESERVED_TEMPLATE_KWARGS if k in kwargs]
    if reserved:
        raise APIError(400, f"chat_template_kwargs may not set {', '.join(reserved)}", "chat_template_kwargs")
    try:
        return tokenizer.apply_chat_template(
            [m.for_template() for m in messages], add_generation_prompt=add_generation_prompt, **kwargs
        )
    except (ValueError, TypeError) as error:
        raise APIError(400, f"cannot apply the chat template: {error}", "messages") from error


async def create_chat_completion(serving: Serving, request: ChatCompletionRequest, tenant: str | None = None) -> Response:
    """`tenant`: the caller's API-key identity, which isolates its prefix cache."""
    serving.check_model(request.model)
    request.check_supported()
    tokenizer = serving.backend.tokenizer
    prompt = await serving.in_thread(
        render_chat, tokenizer, request.messages, request.add_generation_prompt, request.chat_template_kwargs
    )
    prompt_token_ids = await serving.encode(prompt, request.add_special_tokens, "messages")
    max_tokens = serving.max_tokens(len(prompt_token_ids), request.requested_max_tokens, "messages")
    params = request.sampling_params(max_tokens, request.num_logprobs, cache_salt_of(tenant, request.cache_salt))
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    generation = serving.generation(request_id, prompt_token_ids, params)
    chat = _ChatCompletion(request_id, serving.backend.model_name, tokenizer, generation, request.return_tokens_as_token_ids)
    if request.stream:
        return await start_stream(generation.deltas(), chat.chunks, lambda: chat.final_chunks(request))
    whole = await collect(generation.deltas())
    return JSONResponse(chat.response(whole))


class _ChatCompletion:
    """The response's JSON, whole or chunk by chunk."""

    def __init__(
        self, request_id: str, model: str, tokenizer: Tokenizer, generation: Generation, as_token_ids: bool = False
    ) -> None:
        self._as_token_ids = as_token_ids
        self.request_id = request_id
        self.model = model
        self.created = int(time.time())
        self._tokenizer = tokenizer
        self._generation = generation
        self._is_role_sent = False

    def _envelope(self, obj: str, choices: list[dict]) -> dict:
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def _logprobs(self, delta: TextDelta) -> dict | None:
        num_top = self._generation.params.logprobs
        if num_top is None:
            return None
        return {"content": [
            {**self._entry(lp.token_id, lp.logprob), "top_logprobs": [self._entry(i, v) for i, v in lp.top[:num_top]]}
            for lp in delta.logprobs
        ]}

    def _entry(self, token_id: int, logprob: float) -> dict:
        token = token_text(self._tokenizer, token_id, self._as_token_ids)
        return {"token": token, "logprob": json_logprob(logprob), "bytes": list(token.encode("utf-8"))}

    def response(self, whole: TextDelta) -> dict:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": whole.text},
            "logprobs": self._logprobs(whole),
            "finish_reason": whole.finish_reason,
            "stop_reason": whole.stop_reason,
        }
        return {**self._envelope("chat.completion", [choice]), "usage": self._generation.usage}

    def chunks(self, delta: TextDelta) -> list[dict]:
        chunks = []
        if not self._is_role_sent:  # vLLM's first chunk: the role, sent once there is output
            self._is_role_sent = True
            chunks.append(self._chunk({"role": "assistant", "content": ""}, None, TextDelta("")))
        chunks.append(self._chunk({"content": delta.text}, self._logprobs(delta), delta))
        return chunks

    def _chunk(self, message: dict, logprobs: dict | None, delta: TextDelta) -> dict:
        choice = {"index": 0, "delta": message, "logprobs": logprobs, "finish_reason": delta.finish_reason,
                  "stop_reason": delta.stop_reason}
        return self._envelope("chat.completion.chunk", [choice])

    def final_chunks(self, request: ChatCompletionRequest) -> list[dict]:
        if not request.include_usage_in_stream:
            return []
        return [{**self._envelope("chat.completion.chunk", []), "usage": self._generation.usage}]
