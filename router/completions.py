"""POST /v1/completions: OpenAI's text completion of one prompt, whole or streamed."""
from __future__ import annotations

import time
import uuid

from fastapi.responses import JSONResponse, Response

from engine.tokenizer import Tokenizer
from router.auth import cache_salt_of
from router.protocol import CompletionRequest
from router.serving import Generation, Serving, TextDelta, collect, json_logprob, start_stream, token_text


async def create_completion(serving: Serving, request: CompletionRequest, tenant: str | None = None) -> Response:
    """`tenant`: the caller's API-key identity, which isolates its prefix cache."""
    serving.check_model(request.model)
    request.check_supported()
    tokenizer = serving.backend.tokenizer
    prompt = request.single_prompt()
    if isinstance(prompt, str):
        prompt_token_ids = await serving.encode(prompt, request.add_special_tokens, "prompt")
    else:
        prompt_token_ids = list(prompt)
    max_tokens = serving.max_tokens(len(prompt_token_ids), request.max_tokens, "prompt")
    params = request.sampling_params(max_tokens, request.logprobs, cache_salt_of(tenant, request.cache_salt))
    request_id = f"cmpl-{uuid.uuid4().hex}"
    generation = serving.generation(request_id, prompt_token_ids, params)
    completion = _Completion(request_id, serving.backend.model_name, tokenizer, generation, request.return_tokens_as_token_ids)
    if request.stream:
        return await start_stream(generation.deltas(), completion.chunks, lambda: completion.final_chunks(request))
    whole = await collect(generation.deltas())
    return JSONResponse(completion.response(whole))


class _Completion:
    """The response's JSON, whole or chunk by chunk."""

    def __init__(
        self, request_id: str, model: str, tokenizer: Tokenizer, generation: Generation, as_token_ids: bool = False
    ) -> None:
        self.request_id = request_id
        self._as_token_ids = as_token_ids
        self.model = model
        self.created = int(time.time())
        self._tokenizer = tokenizer
        self._generation = generation
        self._text_offset = 0  # chars of output before the next token, for logprobs' text_offset

    def _envelope(self, choices: list[dict]) -> dict:
        return {"id": self.request_id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices}

    def _choice(self, delta: TextDelta) -> dict:
        return {
            "index": 0,
            "text": delta.text,
            "logprobs": self._logprobs(delta) if self._generation.params.logprobs is not None else None,
            "finish_reason": delta.finish_reason,
            "stop_reason": delta.stop_reason,
        }

    def response(self, whole: TextDelta) -> dict:
        return {**self._envelope([self._choice(whole)]), "usage": self._generation.usage}

    def chunks(self, delta: TextDelta) -> list[dict]:
        return [self._envelope([self._choice(delta)])]

    def final_chunks(self, request: CompletionRequest) -> list[dict]:
        if not request.include_usage_in_stream:
            return []
        return [{**self._envelope([]), "usage": self._generation.usage}]

    def _logprobs(self, delta: TextDelta) -> dict:
        """OpenAI's legacy shape; each token's top_logprobs holds the top-n and the token itself."""
        tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
        for lp in delta.logprobs:
            token = token_text(self._tokenizer, lp.token_id, self._as_token_ids)
            tokens.append(token)
            token_logprobs.append(json_logprob(lp.logprob))
            top = {token_text(self._tokenizer, i, self._as_token_ids): json_logprob(v) for i, v in lp.top}
            top_logprobs.append({token: json_logprob(lp.logprob), **top})
            text_offset.append(self._text_offset)
            self._text_offset += len(token)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": text_offset}
