"""What generation returns: vLLM's `RequestOutput` / `CompletionOutput` / `Logprob` shapes for users, and the
plain `TokenLogprobs` / `RequestDelta` records that move between the engine, workers and gateway. No torch."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: dict = field(default_factory=dict)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # entry 0 is None, as in vLLM


@dataclass(frozen=True)
class TokenLogprobs:
    """Logprobs of one generated token: its own, its rank, and the top-n alternatives."""

    token_id: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...]


@dataclass
class RequestDelta:
    """New tokens of one request; the last delta of a request carries its finish_reason."""

    request_id: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0  # the request's generated tokens so far
    error: str | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # on the first delta, when asked for
    index: int = 0  # which of the request's n sequences
    queue_seconds: float | None = None  # on the first delta: arrival -> first scheduled
    prefill_seconds: float | None = None  # on the first delta: first scheduled -> first token
