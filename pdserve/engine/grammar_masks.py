"""Per-step token masks of the requests that have a grammar. A step starts them (`GrammarMasks.start`)
before its forward pass: llguidance fills the bitmask rows of those requests on its own thread
pool, GIL released, while this thread prepares inputs and runs (on a GPU: launches) the forward.
The sampler then waits for them (`PendingMasks.apply`) and sets every disallowed logit to -inf in
one masked_fill over the batch (rows without a grammar allow every token).

A reply still thinking, in a step launched before the host has its last token, needs no host: its
next token is free unless that token in flight is `</think>`, and then the grammar's first mask
(the matcher has taken nothing while the model thought) holds. Both are known at the launch; the
device picks one per row by the token it sampled (`closing` rows), so such steps run ahead."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import llguidance
import numpy
import torch
from llguidance.torch import fill_next_token_bitmask_par

from pdserve.engine.logits_processors import to_device
from pdserve.engine.request import Request
from pdserve.engine.structured_output import OPENING, Grammar

BITS = 32  # tokens per int32 word of a bitmask


@dataclass
class Closing:
    """Rows of replies thinking whose token in flight the host has not seen: the grammar's first
    mask where that token is `</think>`, every token otherwise."""

    rows: list[int]  # in the step
    in_flight_rows: list[int]  # each one's row in the step before's sampled ids
    end_token_ids: list[int]  # each one's `</think>`


class PendingMasks:
    """The masks of one step's sampled requests, being computed."""

    def __init__(self, bitmask: torch.Tensor, done: Future, closing: Closing | None = None) -> None:
        self.bitmask = bitmask  # int32 [num_requests, ceil(vocab / 32)]: bit t of a row set = token t allowed
        self._done = done
        self.closing = closing

    def wait(self) -> None:
        self._done.result()

    def apply(self, logits: torch.Tensor, in_flight: torch.Tensor | None = None) -> torch.Tensor:
        """A copy of float32 `logits` `[num_requests, vocab]` with disallowed tokens at -inf.
        `in_flight`: the step before's sampled ids on the device, which `closing` rows read."""
        self.wait()
        device = logits.device
        words = self.bitmask.to(device, non_blocking=True)
        closing = self.closing
        if closing is not None:
            assert in_flight is not None, "closing rows read the tokens in flight"
            rows = to_device(closing.rows, torch.long, device)
            closes = in_flight[to_device(closing.in_flight_rows, torch.long, device)] == to_device(
                closing.end_token_ids, torch.long, device
            )
            words[rows] = torch.where(closes.unsqueeze(-1), words[rows], -1)
        shifts = torch.arange(BITS, dtype=torch.int32, device=device)
        allowed = ((words.unsqueeze(-1) >> shifts) & 1).flatten(1)[:, : logits.shape[-1]].bool()  # [num_requests, vocab]
        return logits.masked_fill(~allowed, float("-inf"))


class GrammarMasks:
    def __init__(self, pin_memory: bool) -> None:
        self.pin_memory = pin_memory
        self._executor = llguidance.LLExecutor()  # its threads compute the rows in parallel
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")  # waits on them off this thread

    def start(self, requests: list[Request], in_flight_rows: list[int] | None = None) -> PendingMasks | None:
        """Start computing the next token's mask of every request in `requests` that has a grammar
        and has not finished (a finished request's row, in a step launched ahead, allows all).
        `in_flight_rows[i] >= 0`: request i has a token in flight the host has not seen (see
        `Closing`); its grammar has taken every token before it."""
        grammars: list[tuple[Grammar, int]] = []
        firsts: list[tuple[Grammar, int]] = []  # the closing rows: their grammar's first mask
        closing = Closing([], [], [])
        for i, r in enumerate(requests):
            grammar = r.grammar
            if grammar is None or r.is_finished:
                continue
            if grammar.constrains:
                grammars.append((grammar, i))
            elif in_flight_rows is not None and in_flight_rows[i] >= 0:  # thinking; free unless that token ends it
                assert grammar.thinking is not None
                firsts.append((grammar, i))
                closing.rows.append(i)
                closing.in_flight_rows.append(in_flight_rows[i])
                closing.end_token_ids.append(grammar.thinking.end_token_id)
        if not grammars and not firsts:
            return None
        num_words = -(-(grammars or firsts)[0][0].vocab_size // BITS)
        bitmask = torch.full((len(requests), num_words), -1, dtype=torch.int32, pin_memory=self.pin_memory)
        for grammar, i in firsts:  # computed once per request
            if grammar.first_mask is not None:
                bitmask[i] = grammar.first_mask
            else:
                grammars.append((grammar, i))
        matchers = [(grammar.matcher, i) for grammar, i in grammars]
        openings = [(i, g.thinking.start_token_id) for g, i in grammars if g.phase == OPENING and g.thinking is not None]
        keep = [(g, i) for g, i in firsts if g.first_mask is None]
        done = self._thread.submit(_fill, self._executor, matchers, bitmask, openings, keep)
        return PendingMasks(bitmask, done, closing if closing.rows else None)

    @staticmethod
    def accept(requests: list[Request], token_ids: list[int]) -> None:
        """Advance each request's grammar with the token it just got."""
        for request, token_id in zip(requests, token_ids):
            if request.grammar is not None:
                request.grammar.accept(token_id)


def _fill(
    executor: llguidance.LLExecutor,
    matchers: list,
    bitmask: torch.Tensor,
    openings: list[tuple[int, int]],
    keep: list[tuple[Grammar, int]],
) -> None:
    """The grammars' rows, then `<think>` allowed too in the rows of replies that may open with it;
    the first masks of the grammars in `keep` kept by them."""
    if matchers:
        fill_next_token_bitmask_par(executor, matchers, bitmask)
    for grammar, row in keep:
        grammar.first_mask = bitmask[row].clone()
    words = bitmask.numpy().view(numpy.uint32)  # on the host, as llguidance fills it
    for row, token_id in openings:
        word, bit = divmod(token_id, BITS)
        words[row, word] |= numpy.uint32(1 << bit)
