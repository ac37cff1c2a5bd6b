"""What a request asks done to its logits before a token is picked, for a whole batch at once:
allowed token ids, bad words, logit bias, then the repetition, frequency and presence penalties
(vLLM's order and definitions; repetition as transformers' RepetitionPenaltyLogitsProcessor, over
the prompt and the output). Per-request state lives in `TokenCounts`, rows of device tensors, so a
step's work is a few batched tensor operations whatever the batch holds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from pdserve.engine.request import Request

_INITIAL_ROWS = 8


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list on `device` without waiting for the device's queue (a copy from pageable
    memory would: a step launched ahead must not be waited for)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


class TokenCounts:
    """Per request (a row, kept while it runs): how often each token is in its output, and whether
    it is in its prompt. Only requests with penalties get a row."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.output_counts = torch.zeros(0, vocab_size, dtype=torch.int32, device=device)
        self.in_prompt = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)
        self._rows: dict[Request, int] = {}
        # output tokens counted: those the host holds, plus one a step launched ahead counted on
        # the device (`count_ahead`) before the host appends it
        self._counted: dict[Request, int] = {}
        self._free: list[int] = []

    def rows(self, requests: list[Request]) -> torch.Tensor:
        """Each request's row (made on first sight), its output counted up to now."""
        self._release_finished()
        for request in requests:
            if request not in self._rows:
                self._add(request)
        pending = [(r, t) for r in requests for t in r.output_token_ids[self._counted[r] :]]
        if pending:
            rows = to_device([self._rows[r] for r, _ in pending], torch.long, self.device)
            tokens = to_device([t for _, t in pending], torch.long, self.device)
            self.output_counts.index_put_((rows, tokens), torch.ones_like(tokens, dtype=torch.int32), accumulate=True)
            for request in requests:
                self._counted[request] = max(self._counted[request], len(request.output_token_ids))
        return to_device([self._rows[r] for r in requests], torch.long, self.device)

    def count_ahead(self, requests: list[Request], tokens: torch.Tensor) -> None:
        """Count each request's token in flight (`tokens`, on the device, one per request), which
        the host appends later: it is not counted again then. A token counted ahead is always
        appended, unless its request finishes first (stop, EOS, abort), and then its row goes."""
        rows = self.rows(requests)  # the tokens the host holds first
        self.output_counts.index_put_((rows, tokens), torch.ones_like(tokens, dtype=torch.int32), accumulate=True)
        for request in requests:
            self._counted[request] = len(request.output_token_ids) + 1

    def _add(self, request: Request) -> None:
        if not self._free:
            self._grow()
        row = self._free.pop()
        self._rows[request], self._counted[request] = row, 0
        self.output_counts[row].zero_()
        self.in_prompt[row].zero_()
        self.in_prompt[row, to_device(request.prompt_token_ids, torch.long, self.device)] = True

    def _grow(self) -> None:
        old = self.output_counts.shape[0]
        new = max(_INITIAL_ROWS, 2 * old)
        self.output_counts = torch.cat(
            [self.output_counts, torch.zeros(new - old, self.vocab_size, dtype=torch.int32, device=self.device)]
        )
        self.in_prompt = torch.cat(
            [self.in_prompt, torch.zeros(new - old, self.vocab_size, dtype=torch.bool, device=self.device)]
        )
        self._free += list(range(new - 1, old - 1, -1))

    def _release_finished(self) -> None:
        for request in [r for r in self._rows if r.is_finished]:
            self._free.append(self._rows.pop(request))
            del self._counted[request]


def needs_processing(request: Request) -> bool:
    p = request.params
    return bool(p.logit_bias or p.bad_words_token_ids or p.allowed_token_ids) or has_penalties(request)


def has_penalties(request: Request) -> bool:
    p = request.params
    return p.presence_penalty != 0 or p.frequency_penalty != 0 or p.repetition_penalty != 1


def process(logits: torch.Tensor, requests: list[Request], counts: TokenCounts) -> torch.Tensor:
    """A processed copy of float32 `logits` `[num_requests, vocab]` (rows in `requests`' order)."""
    if not any(needs_processing(r) for r in requests):
        return logits
    logits = logits.clone()
    _keep_only_allowed(logits, requests)
    _mask(logits, requests, _bad_word_ids)
    _add_logit_bias(logits, requests)
    # a finished request's row (a stale row of a step launched ahead) is dropped: no counts for it
    penalized = [i for i, r in enumerate(requests) if has_penalties(r) and not r.is_finished]
    if penalized:
        _apply_penalties(logits, penalized, [requests[i] for i in penalized], counts)
    return logits


def _keep_only_allowed(logits: torch.Tensor, requests: list[Request]) -> None:
    indices = [i for i, r in enumerate(requests) if r.params.allowed_token_ids]
    if not indices:
        return
    device = logits.device
    rows = [k for k, i in enumerate(indices) for _ in requests[i].params.allowed_token_ids]
    cols = [t for i in indices for t in requests[i].params.allowed_token_ids]
    keep = torch.zeros(len(indices), logits.shape[-1], dtype=torch.bool, device=device)
    keep[to_device(rows, torch.long, device), to_device(cols, torch.long, device)] = True
    index = to_device(indices, torch.long, device)
    logits[index] = logits[index].masked_fill(~keep, float("-inf"))


def _mask(logits: torch.Tensor, requests: list[Request], banned_of: Callable[[Request, int], Any]) -> None:
    rows, cols = [], []
    for i, request in enumerate(requests):
        banned = banned_of(request, logits.shape[-1])
        rows += [i] * len(banned)
        cols += banned
    if rows:
        logits[to_device(rows, torch.long, logits.device), to_device(cols, torch.long, logits.device)] = float("-inf")


def _bad_word_ids(request: Request, vocab_size: int) -> list[int]:
    """The last token of each bad word whose other tokens end the output so far."""
    output = request.output_token_ids
    banned = []
    for word in request.params.bad_words_token_ids:
        *prefix, last = word
        if not prefix or (len(output) >= len(prefix) and output[len(output) - len(prefix) :] == prefix):
            banned.append(last)
    return banned


def _add_logit_bias(logits: torch.Tensor, requests: list[Request]) -> None:
    rows, cols, values = [], [], []
    for i, request in enumerate(requests):
        for token_id, bias in request.params.logit_bias:
            rows.append(i)
            cols.append(token_id)
            values.append(bias)
    if rows:
        device = logits.device
        index = (to_device(rows, torch.long, device), to_device(cols, torch.long, device))
        logits.index_put_(index, to_device(values, logits.dtype, device), accumulate=True)


def _apply_penalties(logits: torch.Tensor, indices: list[int], requests: list[Request], counts: TokenCounts) -> None:
    device = logits.device
    rows = counts.rows(requests)
    index = to_device(indices, torch.long, device)
    output_counts = counts.output_counts[rows].to(logits.dtype)  # [n, vocab]
    seen = counts.in_prompt[rows] | (output_counts > 0)
    selected = logits[index]
    repetition = to_device([r.params.repetition_penalty for r in requests], logits.dtype, device)[:, None]
    penalized = torch.where(selected > 0, selected / repetition, selected * repetition)
    selected = torch.where(seen, penalized, selected)
    frequency = to_device([r.params.frequency_penalty for r in requests], logits.dtype, device)[:, None]
    presence = to_device([r.params.presence_penalty for r in requests], logits.dtype, device)[:, None]
    selected = selected - frequency * output_counts - presence * (output_counts > 0).to(logits.dtype)
    logits[index] = selected
