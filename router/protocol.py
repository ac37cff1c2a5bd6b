"""Request bodies of the OpenAI-compatible API: OpenAI's fields plus vLLM's sampling extras.
Pydantic checks the types; what pdserve cannot honour is rejected with a 400, never ignored."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.sampling_params import SamplingParams
from router.errors import APIError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_CACHE_SALT_CHARS = 1024


class StreamOptions(BaseModel):
    include_usage: bool = False


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
                    raise ValueError("only text content parts ({\"type\": \"text\", \"text\": ...}) are supported")
        return content

    def for_template(self) -> dict[str, Any]:
        """Text parts joined with newlines, as vLLM renders them for string-content templates."""
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            message["content"] = "\n".join(part["text"] for part in self.content)
        return message


class GenerationRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions. None means "the default"."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted and ignored, like vLLM
    # vLLM's extras
    return_tokens_as_token_ids: bool = False  # logprobs name tokens "token_id:N"
    top_k: int | None = None
    min_p: float | None = None
    min_tokens: int = 0
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Prefix-cache isolation (vLLM's field): cached prefixes are shared only between requests with
    # the same salt (and, with API keys, the same key). Should be random and secret, e.g. 256 bits.
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_CACHE_SALT_CHARS)

    def check_supported(self) -> None:
        """Reject what pdserve does not implement rather than silently sampling without it."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                raise APIError(400, f"{name} is not supported (only 0)", name)
        if self.repetition_penalty not in (None, 1):
            raise APIError(400, "repetition_penalty is not supported (only 1)", "repetition_penalty")
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options can only be set when stream is true", "stream_options")

    @property
    def include_usage_in_stream(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(self, max_tokens: int, logprobs: int | None, cache_salt: str | None = None) -> SamplingParams:
        """Raises `InvalidRequestError` naming the field for out-of-range values. `cache_salt`: the
        salt the workers use, derived from `self.cache_salt` and the caller's key (`router/auth.py`)."""
        return SamplingParams(
            n=1 if self.n is None else self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k in (None, 0) else self.top_k,  # vLLM: 0 and -1 both mean "all tokens"
            min_p=0.0 if self.min_p is None else self.min_p,
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
        )


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
        if self.echo:
            raise APIError(400, "echo is not supported", "echo")
        if self.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        if self.best_of not in (None, 1):
            raise APIError(400, "best_of must be 1", "best_of")

    def single_prompt(self) -> str | list[int]:
        """The one prompt: text or token ids. A batch of several prompts is rejected."""
        prompt = self.prompt
        if isinstance(prompt, str) or all(isinstance(t, int) for t in prompt):
            return prompt
        if len(prompt) != 1:
            raise APIError(400, "only one prompt per request is supported", "prompt")
        return prompt[0]


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # None: up to the context limit, like vLLM
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool = False  # the template already adds BOS and friends

    def check_supported(self) -> None:
        super().check_supported()
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise APIError(400, "response_format is not supported (only {\"type\": \"text\"})", "response_format")
        if self.tools:
            raise APIError(400, "tools are not supported", "tools")
        if self.tool_choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice is not supported", "tool_choice")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs to be true", "top_logprobs")

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
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]
