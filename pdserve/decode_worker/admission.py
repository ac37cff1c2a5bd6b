"""What a decode worker lets in: leases within bounds, a bound on the requests not yet decoding
(queued for blocks or waiting for their KV), in all and per caller, a per-caller share of the
batch slots and KV blocks that reservations waiting for KV may hold (so that one caller's flood of
reservations whose KV never comes cannot take the worker from everyone else), and commits that
fit their request."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from pdserve.engine.outputs import TokenLogprobs
from pdserve.engine.sampling_params import InvalidRequestError
from pdserve.kvtransfer.receiver import KVCommitInfo


class DecodeQueueFullError(RuntimeError):
    """No room for one more request of this caller now (RESOURCE_EXHAUSTED: the gateway answers 503)."""


@dataclass(frozen=True)
class DecodeLimits:
    max_lease_s: float = 600.0  # a reservation waits at most this long for its KV
    max_num_pending: int = 1024  # requests not yet decoding, all callers together
    max_num_pending_per_caller: int = 512
    # Of max_num_seqs and of the KV blocks: what one caller's reservations waiting for KV may hold
    # (one reservation is always allowed, so a prompt larger than the share still gets in).
    reserved_share_per_caller: float = 0.5

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_lease_s) and self.max_lease_s > 0):
            raise ValueError(f"max_lease_s must be a positive number of seconds, got {self.max_lease_s}")
        if not 1 <= self.max_num_pending_per_caller <= self.max_num_pending:
            raise ValueError("need 1 <= max_num_pending_per_caller <= max_num_pending")
        if not 0.0 < self.reserved_share_per_caller <= 1.0:
            raise ValueError(f"reserved_share_per_caller must be in (0, 1], got {self.reserved_share_per_caller}")

    def check_lease(self, lease_s: float) -> None:
        if not (math.isfinite(lease_s) and 0 < lease_s <= self.max_lease_s):
            raise InvalidRequestError(f"lease_seconds must be in (0, {self.max_lease_s:g}], got {lease_s}", "lease_seconds")

    def check_pending(self, pending_callers: Iterable[str], caller: str) -> None:
        """Raises DecodeQueueFullError if one more pending request of `caller` passes a bound;
        `pending_callers`: the caller of every request here not yet decoding."""
        counts = Counter(pending_callers)
        total = sum(counts.values())
        if total >= self.max_num_pending:
            raise DecodeQueueFullError(f"the decode worker has {total} requests waiting (limit {self.max_num_pending})")
        if counts[caller] >= self.max_num_pending_per_caller:
            raise DecodeQueueFullError(
                f"caller {caller} has {counts[caller]} requests waiting on this decode worker (limit {self.max_num_pending_per_caller})"
            )


class ReservedShares:
    """One pass of reservations: the batch slots and blocks each caller's reservations waiting for
    KV hold, against its share."""

    def __init__(self, limits: DecodeLimits, max_num_seqs: int, num_blocks: int, reserved: Iterable[tuple[str, int]]) -> None:
        """`reserved`: (caller, num_blocks) of every reservation waiting for its KV."""
        self.max_num_seqs = max(1, int(max_num_seqs * limits.reserved_share_per_caller))
        self.max_num_blocks = max(1, int(num_blocks * limits.reserved_share_per_caller))
        self._num_seqs: Counter[str] = Counter()
        self._num_blocks: Counter[str] = Counter()
        for caller, num_reserved in reserved:
            self.add(caller, num_reserved)

    def allows(self, caller: str, num_blocks: int) -> bool:
        if self._num_seqs[caller] == 0:
            return True
        return self._num_seqs[caller] < self.max_num_seqs and self._num_blocks[caller] + num_blocks <= self.max_num_blocks

    def add(self, caller: str, num_blocks: int) -> None:
        self._num_seqs[caller] += 1
        self._num_blocks[caller] += num_blocks


def check_commit(info: KVCommitInfo, num_prompt_tokens: int, num_sequences: int, num_logprobs: int, vocab_size: int) -> None:
    """A commit must fit its reservation's request, or it is refused (ValueError: INVALID_ARGUMENT)
    and changes nothing: a token outside the vocabulary would fail every request of the batch.
    `num_logprobs`: the alternatives the request asked for with each token (its params.logprobs)."""
    if info.num_prompt_tokens != num_prompt_tokens:
        raise ValueError(f"the commit is for {info.num_prompt_tokens} prompt tokens, the reservation for {num_prompt_tokens}")
    if len(info.sibling_token_ids) != num_sequences - 1 or len(info.sibling_logprobs) > num_sequences - 1:
        raise ValueError(f"the commit has {1 + len(info.sibling_token_ids)} first tokens, the request {num_sequences} sequences")
    for first_token_id, logprobs in first_tokens(info):
        _check_first_token(first_token_id, logprobs, num_logprobs, vocab_size)


def first_tokens(info: KVCommitInfo) -> list[tuple[int, TokenLogprobs | None]]:
    """Each sequence's first token and its logprobs (None for the siblings' when none were sent)."""
    num_siblings = len(info.sibling_token_ids)
    sibling_logprobs = info.sibling_logprobs if len(info.sibling_logprobs) == num_siblings else (None,) * num_siblings
    return [(info.first_token_id, info.first_logprobs), *zip(info.sibling_token_ids, sibling_logprobs)]


def _check_first_token(first_token_id: int, logprobs: TokenLogprobs | None, num_logprobs: int, vocab_size: int) -> None:
    if not 0 <= first_token_id < vocab_size:
        raise ValueError(f"first_token_id {first_token_id} is outside the vocabulary [0, {vocab_size})")
    if logprobs is None:
        return
    token_ids = [logprobs.token_id, *(token_id for token_id, _ in logprobs.top)]
    values = [logprobs.logprob, *(value for _, value in logprobs.top)]
    if logprobs.token_id != first_token_id or not all(0 <= t < vocab_size for t in token_ids):
        raise ValueError(f"first_logprobs names token ids outside the vocabulary [0, {vocab_size}) or another first token")
    if len(logprobs.top) > num_logprobs or logprobs.rank < 1 or any(math.isnan(v) or v > 0 for v in values):
        raise ValueError(f"first_logprobs has more than {num_logprobs} entries, a rank below 1 or a logprob that is not <= 0")
