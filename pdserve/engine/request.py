"""`Request`: one generation's tokens, KV block table and progress, as the schedulers see it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pdserve.engine.outputs import TokenLogprobs
from pdserve.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch

    from pdserve.engine.structured_output import Grammar


class RequestPhase(enum.Enum):
    """Where a request is in its life. A worker sees only some phases: a prefill worker queued ->
    prefilling -> handing_off -> done; a decode worker queued (waiting for blocks) -> handing_off
    (blocks reserved, waiting for the KV) -> decoding -> done; the colocated engine queued ->
    prefilling -> decoding -> done (and back to queued when preempted)."""

    QUEUED = "queued"
    PREFILLING = "prefilling"
    HANDING_OFF = "handing_off"
    DECODING = "decoding"
    DONE = "done"


def scoped_salt(cache_salt: str | None, kv_source: str | None) -> str | None:
    """The salt a prefix-cache chain starts from: the client's, scoped to the KV's source if any."""
    return cache_salt if kv_source is None else f"kv-from {len(kv_source)}:{kv_source}:{cache_salt or ''}"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)
    # With params.prompt_logprobs: entry i for prompt token i (entry 0 is None: nothing predicts it).
    prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # prompt tokens that came from the prefix cache at admission
    num_preemptions: int = 0
    scheduled_time: float | None = None  # time.monotonic() when first scheduled
    first_token_time: float | None = None
    phase: RequestPhase = RequestPhase.QUEUED
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    generator: torch.Generator | None = None
    index: int = 0  # which of the request's n sequences this is
    parent: Request | None = None  # sequences 1..n-1: the first sequence, which computes the prompt
    siblings: list[Request] = field(default_factory=list)  # on the first sequence: the others
    # On a decode worker: who computed the prompt's KV (the name its sender signs with). The
    # request's cached blocks chain from it, so KV received under one name serves only prompts
    # handed off under the same name (docs/security.md says what that does not cover).
    kv_source: str | None = None

    @property
    def root_id(self) -> str:
        """The id the client knows: the first sequence's."""
        return self.parent.request_id if self.parent is not None else self.request_id

    @property
    def family(self) -> list[Request]:
        """All n sequences of the request (call on the first)."""
        return [self, *self.siblings]

    @property
    def has_unforked_siblings(self) -> bool:
        """Its siblings still wait for the first token: the prompt's next sample is theirs too."""
        return bool(self.siblings) and not self.siblings[0].output_token_ids

    grammar: Grammar | None = None  # advanced with every output token (structured output)

    @property
    def cache_salt(self) -> str | None:
        """What its blocks' prefix-cache chain starts from: the client's `cache_salt`, scoped to
        `kv_source` when another worker computed the prompt."""
        return scoped_salt(self.params.cache_salt, self.kv_source)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def last_token_id(self) -> int:
        return (self.output_token_ids or self.prompt_token_ids)[-1]

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.phase is RequestPhase.DONE

    @property
    def is_prefill_done(self) -> bool:
        return self.num_computed_tokens >= self.num_prompt_tokens

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.phase = RequestPhase.DONE
        self.finish_reason = reason
        self.stop_reason = stop_reason

    def check_stop(self, max_model_len: int) -> bool:
        """Token-level stop conditions after a new token was appended; marks the request finished."""
        token = self.output_token_ids[-1]
        num_output = len(self.output_token_ids)
        params = self.params
        if num_output >= params.min_tokens:
            if not params.ignore_eos and token in self.eos_token_ids:
                self.finish("stop")
                return True
            if token in params.stop_token_ids:
                self.finish("stop", token)
                return True
        if self.grammar is not None and self.grammar.is_terminated:  # complete: only EOS could follow
            self.finish("stop")
            return True
        if self.ends_by_length(num_output, max_model_len):
            self.finish("length")
            return True
        return False

    def ends_by_length(self, num_output: int, max_model_len: int) -> bool:
        """Whether `num_output` output tokens reach max_tokens or the context length."""
        max_tokens = self.params.max_tokens
        return (max_tokens is not None and num_output >= max_tokens) or self.num_prompt_tokens + num_output >= max_model_len


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's share of a step: `num_tokens` tokens from `request.num_computed_tokens` on."""

    request: Request
    num_tokens: int

    @property
    def is_sampled(self) -> bool:
        """The chunk reaches the last known token, so its logits give the next token."""
        return self.request.num_computed_tokens + self.num_tokens == self.request.num_tokens

    def token_ids(self) -> list[int]:
        r, start = self.request, self.request.num_computed_tokens
        end, num_prompt = start + self.num_tokens, r.num_prompt_tokens
        if start >= num_prompt:
            return r.output_token_ids[start - num_prompt : end - num_prompt]
        if end <= num_prompt:
            return r.prompt_token_ids[start:end]
        return r.prompt_token_ids[start:] + r.output_token_ids[: end - num_prompt]
