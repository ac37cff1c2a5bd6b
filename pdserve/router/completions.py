"""POST /v1/completions: OpenAI's text completion of one prompt or several (a choice each, indexed
in order), whole or streamed; `echo` returns the prompt before the completion, with its tokens'
logprobs when `logprobs` is set (the first token's null), as lm-eval reads them."""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass

from fastapi.responses import JSONResponse, Response

from pdserve.engine.outputs import TokenLogprobs
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.tokenizer import Tokenizer
from pdserve.router.auth import cache_salt_of
from pdserve.router.protocol import CompletionRequest
from pdserve.router.serving import (
    Generation,
    Serving,
    TextDelta,
    collect_all,
    json_logprob,
    merge_deltas,
    start_stream,
    token_text,
    vllm_prompt_logprobs,
)


@dataclass
class _Prompt:
    text: str  # as the client sent it, or its tokens decoded
    token_ids: list[int]


async def create_completion(serving: Serving, request: CompletionRequest, tenant: str | None = None) -> Response:
    """`tenant`: the caller's API-key identity, which isolates its prefix cache."""
    serving.check_model(request.model)
    request.check_supported()
    request.return_tokens_as_token_ids = serving.as_token_ids(request.return_tokens_as_token_ids)
    tokenizer = serving.backend.tokenizer
    truncate = request.truncate_prompt_tokens
    prompts = [await _encode(serving, prompt, request.add_special_tokens, truncate) for prompt in request.prompt_list()]
    is_prompt_only = request.echo and request.max_tokens == 0  # OpenAI's way to score a prompt
    cache_salt = cache_salt_of(tenant, request.cache_salt)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    planned = []
    for prompt in prompts:  # every prompt checked before any runs
        max_tokens = serving.max_tokens(len(prompt.token_ids), 1 if is_prompt_only else request.max_tokens, "prompt")
        params = request.sampling_params(
            max_tokens, request.logprobs, tokenizer, cache_salt=cache_salt, defaults=serving.sampling_defaults
        )
        serving.check_logprobs(params)
        planned.append((prompt, _candidates(params, request)))
    # One backend request per prompt; its n (or best_of) sequences share the prompt's KV.
    runs = [serving.generations(f"{request_id}-{i}", prompt.token_ids, params) for i, (prompt, params) in enumerate(planned)]
    flat = [run for group in runs for run in group]
    completion = _Completion(
        request_id,
        serving.reply_model(request.model),
        tokenizer,
        request,
        [p for p, _ in planned for _ in range(len(runs[0]))],
        flat,
    )
    if request.stream:
        deltas = flat[0].deltas() if len(flat) == 1 else merge_deltas([run.deltas() for run in flat])
        return await start_stream(deltas, completion.chunks, completion.final_chunks)
    wholes = await collect_all(flat)
    for position, whole in enumerate(wholes):
        whole.index = position  # its run; `response` renumbers the choices kept
    return JSONResponse(completion.response(_best(wholes, request, len(runs[0]))))


def _candidates(params: SamplingParams, request: CompletionRequest) -> SamplingParams:
    """With best_of > n: best_of sequences, their logprobs kept to rank them."""
    best_of = request.best_of or params.n
    if best_of == params.n:
        return params
    return dataclasses.replace(params, n=best_of, logprobs=params.logprobs or 0)


def _best(wholes: list[TextDelta], request: CompletionRequest, per_prompt: int) -> list[TextDelta]:
    """Per prompt, the n sequences of highest cumulative logprob among its best_of (OpenAI's best_of)."""
    n = request.n or 1
    if per_prompt == n:
        return wholes
    kept = []
    for start in range(0, len(wholes), per_prompt):
        group = wholes[start : start + per_prompt]
        kept += sorted(group, key=lambda w: -sum(lp.logprob for lp in w.logprobs))[:n]
    return kept


async def _encode(serving: Serving, prompt: str | list[int], add_special_tokens: bool, truncate: int | None) -> _Prompt:
    """Tokenized (or decoded, for token ids) on a tokenizer thread; `truncate`: only the last tokens
    kept (`truncate_prompt_tokens`), and echoed."""
    decode = serving.backend.tokenizer.decode
    if isinstance(prompt, str):
        if truncate is None:
            return _Prompt(prompt, await serving.encode(prompt, add_special_tokens, "prompt"))
        last = await serving.encode_last(prompt, add_special_tokens, truncate)
        text = prompt if not last.is_cut else await serving.in_thread(decode, last.text_ids, False)
        return _Prompt(text, last.token_ids)
    token_ids = list(prompt) if truncate is None else list(prompt)[-serving.truncation(truncate) :]
    return _Prompt(await serving.in_thread(decode, token_ids, False), token_ids)


class _Completion:
    """The response's JSON, whole or chunk by chunk."""

    def __init__(
        self,
        request_id: str,
        model: str,
        tokenizer: Tokenizer,
        request: CompletionRequest,
        prompts: list[_Prompt],
        runs: list[Generation],
    ) -> None:
        self.request_id = request_id
        self.model = model
        self.created = int(time.time())
        self._request = request
        self._tokenizer = tokenizer
        self._prompts = prompts
        self._runs = runs
        self._is_prompt_only = bool(request.echo) and request.max_tokens == 0
        self._text_offsets = [0] * len(runs)  # chars before each choice's next token, for text_offset
        self._is_echoed = [False] * len(runs)
        self._has_prompt_ids: set[int] = set()  # the choices whose prompt_token_ids went out (return_token_ids)

    def _envelope(self, choices: list[dict]) -> dict:
        return {
            "id": self.request_id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def _choice(self, delta: TextDelta, source: int | None = None) -> dict:
        """`source`: the run the delta came from, when it differs from the choice's index (best_of)."""
        index = delta.index
        at = index if source is None else source  # the run, its prompt, its echo and offsets
        text, logprobs = delta.text, delta.logprobs
        if self._is_prompt_only:
            text, logprobs = "", []
        echoed: list[TokenLogprobs | None] = []
        if self._request.echo and not self._is_echoed[at]:  # the prompt goes before the first output
            self._is_echoed[at] = True
            text = self._prompts[at].text + text
            echoed = self._prompt_entries(at)
        choice = {
            "index": index,
            "text": text,
            "logprobs": None,
            "finish_reason": delta.finish_reason,
            "stop_reason": delta.stop_reason,
        }
        if self._request.logprobs is not None:
            choice["logprobs"] = self._logprobs(at, [*echoed, *logprobs], len(echoed))
        if self._is_prompt_only and delta.finish_reason is not None:
            choice["finish_reason"] = "length"
        if self._request.return_token_ids:  # vLLM's: the prompt's ids with a choice's first chunk, then its tokens'
            if index not in self._has_prompt_ids:
                self._has_prompt_ids.add(index)
                choice["prompt_token_ids"] = self._prompts[at].token_ids
            choice["token_ids"] = [] if self._is_prompt_only else delta.token_ids
        return choice

    def response(self, wholes: list[TextDelta]) -> dict:
        choices = []
        for index, whole in enumerate(wholes):
            source, whole.index = whole.index, index
            choice = self._choice(whole, source)
            run = self._runs[source]
            if run.params.prompt_logprobs is not None:  # vLLM's: echo (+ logprobs) or asked for; never streamed
                choice["prompt_logprobs"] = vllm_prompt_logprobs(self._tokenizer, run.prompt_logprobs)
            choices.append(choice)
        return {**self._envelope(choices), "usage": self._usage()}

    def chunks(self, delta: TextDelta) -> list[dict]:
        chunk = self._envelope([self._choice(delta)])
        if self._request.include_usage_in_every_chunk:  # vLLM's: the choice's own prompt and tokens so far
            usage = self._runs[delta.index].usage
            num_output = 0 if self._is_prompt_only else usage["completion_tokens"]
            chunk["usage"] = {**usage, "completion_tokens": num_output, "total_tokens": usage["prompt_tokens"] + num_output}
        return [chunk]

    def final_chunks(self) -> list[dict]:
        if not self._request.include_usage_in_stream:
            return []
        return [{**self._envelope([]), "usage": self._usage()}]

    def _usage(self) -> dict:
        usages = [run.usage for run in self._runs]
        num_prompt = sum(u["prompt_tokens"] for u, run in zip(usages, self._runs) if run.index == 0)  # once per prompt
        num_output = 0 if self._is_prompt_only else sum(u["completion_tokens"] for u in usages)
        num_cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u, run in zip(usages, self._runs) if run.index == 0)
        return {
            "prompt_tokens": num_prompt,
            "completion_tokens": num_output,
            "total_tokens": num_prompt + num_output,
            "prompt_tokens_details": {"cached_tokens": num_cached},
        }

    def _prompt_entries(self, index: int) -> list[TokenLogprobs | None]:
        """The prompt's tokens as logprob entries (None where there is no logprob: the first token,
        or every token when `logprobs` was not asked for)."""
        prompt_ids = self._prompts[index].token_ids
        computed = self._runs[index].prompt_logprobs or []
        entries: list[TokenLogprobs | None] = [computed[i] if i < len(computed) else None for i in range(len(prompt_ids))]
        return [entry if entry is not None else _bare(token_id) for entry, token_id in zip(entries, prompt_ids)]

    def _logprobs(self, index: int, entries: list[TokenLogprobs], num_echoed: int) -> dict:
        """OpenAI's legacy shape; each token's top_logprobs holds the top-n and the token itself.
        Echoed prompt tokens without a logprob (the first) get null in both lists."""
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top_logprobs: list[dict[str, float] | None] = []
        text_offset: list[int] = []
        as_ids = bool(self._request.return_tokens_as_token_ids)  # resolved by create_completion
        for position, lp in enumerate(entries):
            token = token_text(self._tokenizer, lp.token_id, as_ids)
            tokens.append(token)
            if position < num_echoed and lp.rank == 0:  # no logprob for it
                token_logprobs.append(None)
                top_logprobs.append(None)
            else:
                token_logprobs.append(json_logprob(lp.logprob))
                top = {token_text(self._tokenizer, i, as_ids): json_logprob(v) for i, v in lp.top}
                top_logprobs.append({token: json_logprob(lp.logprob), **top})
            text_offset.append(self._text_offsets[index])
            self._text_offsets[index] += len(token)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": text_offset}


def _bare(token_id: int) -> TokenLogprobs:
    """A prompt token without a logprob (rank 0 marks it)."""
    return TokenLogprobs(token_id, 0.0, 0, ())
