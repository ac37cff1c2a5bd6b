"""`SamplingParams`: how one request picks its tokens and when it stops (vLLM's field names), and
`StructuredOutput`: the grammar its output must match."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

MAX_N = 64
# vLLM's structured-output kinds: a JSON schema, any JSON object, a regex, one of a list of strings,
# a Lark or EBNF (GBNF) grammar.
STRUCTURED_OUTPUT_KINDS = ("json", "json_object", "regex", "choice", "grammar")
MAX_CACHE_SALT_CHARS = 256
ALL_LOGPROBS = -1  # a logprobs / prompt_logprobs count asking for the whole vocabulary (vLLM's)


class InvalidRequestError(ValueError):
    """A request field out of range; `param` names the field (OpenAI's error `param`)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Thinking:
    """A reasoning model's thinking, which a grammar waits out (vLLM's structured output under a
    reasoning parser): no token is constrained from `start_token_id` (`<think>`) to `end_token_id`
    (`</think>`), the grammar constrains the answer after it. `starts_thinking`: the reply thinks from
    its first token (DeepSeek-R1, a prompt ending in an open `<think>`); otherwise it thinks only if its
    first token is `start_token_id`, and the first token may be that or what the grammar allows."""

    start_token_id: int
    end_token_id: int
    starts_thinking: bool


@dataclass(frozen=True)
class StructuredOutput:
    """The constraint on a request's output, as the client gave it (compiled by the engine, see
    `engine/structured_output.py`). `spec`: the schema as JSON text (json), "" (json_object), the
    regex, a JSON list of strings (choice), or the grammar's text."""

    kind: str
    spec: str = ""
    disable_any_whitespace: bool = False  # JSON without whitespace between its tokens
    whitespace_pattern: str | None = None  # JSON whitespace as this regex instead
    thinking: Thinking | None = None  # None: the grammar constrains the reply from its first token

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_OUTPUT_KINDS:
            raise InvalidRequestError(
                f"unknown structured output kind {self.kind!r} (one of {', '.join(STRUCTURED_OUTPUT_KINDS)})",
                "structured_outputs",
            )


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
    prompt_logprobs: int | None = None  # logprobs of the prompt's tokens, with this many top alternatives
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | tuple[tuple[int, float], ...] | None = ()  # token id -> added to its logit
    bad_words_token_ids: tuple[tuple[int, ...], ...] | list[list[int]] | None = ()  # never generate these sequences
    allowed_token_ids: tuple[int, ...] | list[int] | None = ()  # when set, only these
    structured_output: StructuredOutput | None = None  # the output must match this grammar
    # Prefix-cache isolation: blocks are shared only between requests with the same salt (vLLM's
    # `cache_salt`). It selects no token; it travels with the sampling parameters to every worker.
    cache_salt: str | None = None
    # Under `--scheduling-policy priority`, lower is served first (vLLM's); it too selects no token.
    priority: int = 0
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Normalise list-ish fields to tuples so params are hashable and immutable.
        stop = self.stop
        object.__setattr__(self, "stop", (stop,) if isinstance(stop, str) else tuple(stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        bias = self.logit_bias or ()
        object.__setattr__(
            self, "logit_bias", tuple(sorted((int(t), float(v)) for t, v in (bias.items() if isinstance(bias, dict) else bias)))
        )
        object.__setattr__(self, "bad_words_token_ids", tuple(tuple(word) for word in self.bad_words_token_ids or ()))
        object.__setattr__(self, "allowed_token_ids", tuple(self.allowed_token_ids or ()))
        self._validate()

    def _validate(self) -> None:
        def fail(message: str, param: str) -> None:
            raise InvalidRequestError(message, param)

        if not 1 <= self.n <= MAX_N:
            fail(f"n must be in [1, {MAX_N}], got {self.n}", "n")
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
        for name in ("logprobs", "prompt_logprobs"):  # their limit is the engine's --max-logprobs (EngineCore.validate)
            value = getattr(self, name)
            if value is not None and value < ALL_LOGPROBS:
                fail(f"{name} must be >= 0, or -1 for the whole vocabulary; got {value}", name)
        if any(not s for s in self.stop):
            fail("stop strings must be non-empty", "stop")
        if any(t < 0 for t in self.stop_token_ids):
            fail("stop_token_ids must be non-negative", "stop_token_ids")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:  # OpenAI's range (NaN fails it too)
                fail(f"{name} must be in [-2, 2], got {value}", name)
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            fail(f"repetition_penalty must be > 0, got {self.repetition_penalty}", "repetition_penalty")
        if any(not -100.0 <= v <= 100.0 for _, v in self.logit_bias):  # OpenAI's range
            fail("logit_bias values must be in [-100, 100]", "logit_bias")
        if any(not word for word in self.bad_words_token_ids):
            fail("bad words must be non-empty", "bad_words")
        token_ids = (
            [t for t, _ in self.logit_bias] + list(self.allowed_token_ids) + [t for w in self.bad_words_token_ids for t in w]
        )
        if any(t < 0 for t in token_ids):
            fail("token ids in logit_bias, allowed_token_ids and bad words must be non-negative", "logit_bias")
        if self.cache_salt is not None and not 0 < len(self.cache_salt) <= MAX_CACHE_SALT_CHARS:
            fail(f"cache_salt must be a non-empty string of at most {MAX_CACHE_SALT_CHARS} characters", "cache_salt")
        if not -(2**31) <= self.priority < 2**31:
            fail(f"priority must be a 32-bit integer, got {self.priority}", "priority")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < 1e-5


def check_logprobs(params: SamplingParams, max_logprobs: int, vocab_size: int) -> None:
    """vLLM's refusal (InvalidRequestError) of more logprobs or prompt_logprobs than the server's
    --max-logprobs allows: `max_logprobs` as the engine resolves it (its -1: `vocab_size`), and a
    count of -1 asks for `vocab_size`."""
    for kind, name in (("sample", "logprobs"), ("prompt", "prompt_logprobs")):
        asked = getattr(params, name)
        num_asked = vocab_size if asked == ALL_LOGPROBS else asked
        if num_asked is not None and num_asked > max_logprobs:
            message = f"Requested {kind} logprobs of {num_asked}, which is greater than max allowed: {max_logprobs}"
            whole = "; -1 asks for the whole vocabulary" if asked == ALL_LOGPROBS else ""
            raise InvalidRequestError(f"{message} (--max-logprobs{whole})", name)


def with_vocab_logprobs(params: SamplingParams, vocab_size: int) -> SamplingParams:
    """`params` with a logprobs or prompt_logprobs count of -1 made the `vocab_size` it asks for:
    what the engine computes and returns."""
    counts = {name: vocab_size for name in ("logprobs", "prompt_logprobs") if getattr(params, name) == ALL_LOGPROBS}
    return replace(params, **counts) if counts else params
