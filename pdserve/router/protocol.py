"""Request bodies of the OpenAI-compatible API: OpenAI's fields plus vLLM's sampling extras.
Pydantic checks the types; what pdserve cannot honour is rejected with a 400, never ignored."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pdserve.engine.sampling_params import ALL_LOGPROBS, SamplingParams, StructuredOutput
from pdserve.engine.tokenizer import Tokenizer
from pdserve.router.errors import APIError
from pdserve.router.structured_output import StructuredOutputsParams, structured_output_of

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_TOKEN_ID = 2**31  # token ids travel as int32 (proto/pdserve.proto)
MAX_CACHE_SALT_CHARS = 1024


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage so far on every chunk


class ChatMessage(BaseModel):
    """One chat turn. Extra fields (name, tool_call_id, ...) reach the chat template untouched."""

    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, content: str | list[dict[str, Any]] | None) -> str | list[dict[str, Any]] | None:
        if isinstance(content, list):
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError('only text content parts ({"type": "text", "text": ...}) are supported')
        return content

    def for_template(self) -> dict[str, Any]:
        """Text parts joined with newlines, as vLLM renders them for string-content templates; an
        assistant's earlier tool calls with their JSON arguments as objects, as templates expect."""
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            message["content"] = "\n".join(part["text"] for part in self.content)
        for call in message.get("tool_calls") or []:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                try:
                    function["arguments"] = json.loads(function["arguments"])
                except json.JSONDecodeError:
                    pass  # left as the text the client sent
        return message


class SamplingFields(BaseModel):
    """The sampling fields every generation endpoint takes (/v1/responses as well): OpenAI's and
    vLLM's extras. None means "the default"."""

    model: str | None = None
    stream: bool = False
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted and ignored, like vLLM
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    min_tokens: int = 0
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | None = None
    # Prefix-cache isolation (vLLM's field): cached prefixes are shared only between requests with
    # the same salt (and, with API keys, the same key). Should be random and secret, e.g. 256 bits.
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_CACHE_SALT_CHARS)
    priority: int = 0  # vLLM's: lower served first, under --scheduling-policy priority (else only 0)

    @field_validator("stream", mode="before")
    @classmethod
    def _stream_null_is_false(cls, stream: object) -> object:
        """OpenAI types `stream` as boolean | null (vLLM: Optional[bool] = False): null streams nothing."""
        return False if stream is None else stream

    def sampling_fields(self) -> dict[str, Any]:
        """These fields as they were given (to build another request from them)."""
        return self.model_dump(include=set(SamplingFields.model_fields), exclude_unset=True)


class GenerationRequest(SamplingFields):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    stream_options: StreamOptions | None = None
    n: int | None = None
    # vLLM's extras
    # logprobs name tokens "token_id:N"; None: the server's --return-tokens-as-token-ids (Serving.as_token_ids)
    return_tokens_as_token_ids: bool | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=-1)  # keep only the prompt's last tokens (-1: as many as fit the context)
    return_token_ids: bool | None = None  # the prompt's and each choice's token ids beside the text (RL rollouts)
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    prompt_logprobs: int | None = None
    # structured output: OpenAI's response_format, vLLM's guided_* (and structured_outputs, above)
    response_format: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None

    def check_supported(self) -> None:
        """Reject what pdserve does not implement rather than silently sampling without it."""
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options can only be set when stream is true", "stream_options")
        if self.stream and self.prompt_logprobs not in (None, 0):  # vLLM's 400: a stream's chunks have no place for them
            raise APIError(400, "`prompt_logprobs` are not available when `stream=True`.", "prompt_logprobs")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:  # vLLM's 400: no token could be sampled
            raise APIError(400, "allowed_token_ids must not be empty", "allowed_token_ids")

    @property
    def include_usage_in_stream(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def include_usage_in_every_chunk(self) -> bool:
        return self.include_usage_in_stream and self.stream_options.continuous_usage_stats

    def sampling_params(
        self,
        max_tokens: int,
        logprobs: int | None,
        tokenizer: Tokenizer,
        forced_output: StructuredOutput | None = None,
        cache_salt: str | None = None,
        defaults: Mapping[str, float] | None = None,
    ) -> SamplingParams:
        """Raises `InvalidRequestError` naming the field for out-of-range values. `forced_output`:
        the grammar of a forced tool call (chat), which excludes any other structured output.
        `cache_salt`: the salt the workers use, derived from `self.cache_salt` and the caller's key
        (`router/auth.py`). `defaults`: for the sampling fields left out (the checkpoint's
        generation_config.json), before vLLM's own."""
        defaults = defaults or {}
        top_k = self.top_k if self.top_k is not None else defaults.get("top_k")
        return SamplingParams(
            structured_output=structured_output_of(self, forced_output),  # APIError 400 for an unknown or broken one
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=_given(self.repetition_penalty, defaults, "repetition_penalty", 1.0),
            logit_bias=_logit_bias(self.logit_bias),
            bad_words_token_ids=_bad_words(self.bad_words, tokenizer),
            allowed_token_ids=self.allowed_token_ids,
            prompt_logprobs=self.prompt_logprobs,
            n=1 if self.n is None else self.n,
            temperature=_given(self.temperature, defaults, "temperature", 1.0),
            top_p=_given(self.top_p, defaults, "top_p", 1.0),
            top_k=-1
            if top_k in (None, 0) or top_k >= tokenizer.vocab_size
            else top_k,  # vLLM: 0, -1 and past the vocabulary: all tokens
            min_p=_given(self.min_p, defaults, "min_p", 0.0),
            seed=self.seed,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            cache_salt=cache_salt,
            priority=self.priority,
        )


def _given(value: float | None, defaults: Mapping[str, float], name: str, fallback: float) -> float:
    """A sampling field as the request gave it, else the checkpoint's default, else vLLM's."""
    return value if value is not None else float(defaults.get(name, fallback))


def _logit_bias(logit_bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI sends token ids as JSON object keys (strings). Biases are clamped to OpenAI's [-100, 100]
    (vLLM's: a client's 1000 works as 100); NaN is left to be refused."""
    try:
        return {
            int(token_id): min(100.0, max(-100.0, bias)) if bias == bias else bias
            for token_id, bias in (logit_bias or {}).items()
        }
    except ValueError:
        raise APIError(400, "logit_bias keys must be token ids (integers)", "logit_bias") from None


def _bad_words(words: list[str] | None, tokenizer: Tokenizer) -> list[list[int]]:
    """Each word's tokens alone and after a space, as vLLM forbids them (wherever they start)."""
    sequences = []
    for word in words or []:
        for text in (word, " " + word.lstrip()):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if ids and ids not in sequences:
                sequences.append(ids)
    return sequences


class CompletionRequest(GenerationRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's and vLLM's default for /v1/completions
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: bool = True

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        if self.best_of is not None and self.best_of < (self.n or 1):
            raise APIError(400, f"best_of ({self.best_of}) must be at least n ({self.n or 1})", "best_of")
        if self.best_of is not None and self.best_of > (self.n or 1) and self.stream:
            raise APIError(400, "best_of > n cannot be streamed (the best are known only at the end)", "best_of")
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens must be at least 1 (0 only with echo)", "max_tokens")

    def prompt_list(self) -> list[str | list[int]]:
        """The prompts: one text or token-id list, or a batch of either (a choice each). Token ids
        are checked here only against what the tokenizer and the wire can hold (a worker checks
        them against the model's vocabulary)."""
        prompt = self.prompt
        prompts: list[str | list[int]]
        if isinstance(prompt, str) or all(isinstance(t, int) for t in prompt):
            prompts = [prompt]  # a text, or one list of ids
        elif not prompt:
            raise APIError(400, "the prompt list is empty", "prompt")
        else:
            prompts = list(prompt)
        for ids in prompts:
            bad = [] if isinstance(ids, str) else [t for t in ids if not 0 <= t < MAX_TOKEN_ID]
            if bad:
                raise APIError(400, f"prompt token ids must be in [0, {MAX_TOKEN_ID}), got {bad[0]}", "prompt")
        return prompts

    def sampling_params(
        self,
        max_tokens: int,
        logprobs: int | None,
        tokenizer: Tokenizer,
        forced_output: StructuredOutput | None = None,
        cache_salt: str | None = None,
        defaults: Mapping[str, float] | None = None,
    ) -> SamplingParams:
        params = super().sampling_params(max_tokens, logprobs, tokenizer, forced_output, cache_salt, defaults)
        if self.echo and logprobs is not None and self.prompt_logprobs is None:  # the echoed prompt's logprobs
            return dataclasses.replace(params, prompt_logprobs=logprobs)
        return params


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # None: up to the context limit, like vLLM
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # the reply continues the last (assistant) message: its start given
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool = False  # the template already adds BOS and friends
    echo: bool | None = None  # vLLM's: the last message's text before the reply's, when it has the reply's role

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs and not self.logprobs:  # 0 asks for nothing (vLLM's)
            raise APIError(400, "top_logprobs needs logprobs to be true", "top_logprobs")
        # -1 asks for the whole vocabulary; the limit: --max-logprobs (Serving.check_logprobs)
        if self.top_logprobs is not None and self.top_logprobs < ALL_LOGPROBS:
            message = f"top_logprobs must be >= 0, or -1 for the whole vocabulary; got {self.top_logprobs}"
            raise APIError(400, message, "top_logprobs")
        if self.max_completion_tokens is not None and self.max_completion_tokens < 1:
            message = f"max_completion_tokens must be at least 1, got {self.max_completion_tokens}"
            raise APIError(400, message, "max_completion_tokens")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: either a `prompt` or chat `messages`."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None  # rendered with the messages, as in a chat request
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]
