"""`SamplingParams`: how one request picks its tokens and when it stops (vLLM's field names)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_LOGPROBS = 20
MAX_CACHE_SALT_CHARS = 256


class InvalidRequestError(ValueError):
    """A request field out of range; `param` names the field (OpenAI's error `param`)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: tuple[str, ...] | list[str] | str | None = ()
    stop_token_ids: tuple[int, ...] | list[int] | None = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Prefix-cache isolation: blocks are shared only between requests with the same salt (vLLM's
    # `cache_salt`). It selects no token; it travels with the sampling parameters to every worker.
    cache_salt: str | None = None
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Normalise list-ish fields to tuples so params are hashable and immutable.
        stop = self.stop
        object.__setattr__(self, "stop", (stop,) if isinstance(stop, str) else tuple(stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        self._validate()

    def _validate(self) -> None:
        def fail(message: str, param: str) -> None:
            raise InvalidRequestError(message, param)

        if self.n != 1:
            fail(f"n must be 1, got {self.n}", "n")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            fail(f"temperature must be a number >= 0, got {self.temperature}", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            fail(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k == 0 or self.top_k < -1:
            fail(f"top_k must be -1 (disabled) or at least 1, got {self.top_k}", "top_k")
        if not 0.0 <= self.min_p <= 1.0:
            fail(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if self.max_tokens is not None and self.max_tokens < 1:
            fail(f"max_tokens must be at least 1, got {self.max_tokens}", "max_tokens")
        if self.min_tokens < 0:
            fail(f"min_tokens must be >= 0, got {self.min_tokens}", "min_tokens")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})", "min_tokens")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            fail(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}", "logprobs")
        if any(not s for s in self.stop):
            fail("stop strings must be non-empty", "stop")
        if any(t < 0 for t in self.stop_token_ids):
            fail("stop_token_ids must be non-negative", "stop_token_ids")
        if self.cache_salt is not None and not 0 < len(self.cache_salt) <= MAX_CACHE_SALT_CHARS:
            fail(f"cache_salt must be a non-empty string of at most {MAX_CACHE_SALT_CHARS} characters", "cache_salt")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < 1e-5
