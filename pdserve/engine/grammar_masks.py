"""Per-step token masks of the requests that have a grammar. A step starts them (`GrammarMasks.start`)
before its forward pass: llguidance fills the bitmask rows of those requests on its own thread
pool, GIL released, while this thread prepares inputs and runs (on a GPU: launches) the forward.
The sampler then waits for them (`PendingMasks.apply`) and sets every disallowed logit to -inf in
one masked_fill over the batch (rows without a grammar allow every token).

A reply still thinking, in a step launched before the host has its last token, needs no host: its
next token is free unless that token in flight is `</think>`, and then the grammar's first mask
(the matcher has taken nothing while the model thought) holds. That mask is computed once, kept on
the device (`Grammar.first_allowed`), and applied by the device where the token it sampled is
`</think>` (`Closing`), so such steps run ahead, with no llguidance work."""

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
    grammars: list[Grammar]  # each one's: its `</think>`, and its first mask once known (`Grammar.first_allowed`)


class PendingMasks:
    """The masks of one step's sampled requests, being computed: llguidance's rows (`bitmask`,
    None when no row needs one), and the `closing` rows."""

    def __init__(self, bitmask: torch.Tensor | None, done: Future | None, closing: Closing | None = None) -> None:
        self.bitmask = bitmask  # int32 [num_requests, ceil(vocab / 32)]: bit t of a row set = token t allowed
        self._done = done
        self.closing = closing

    def wait(self) -> None:
        if self._done is not None:
            self._done.result()

    def apply(self, logits: torch.Tensor, in_flight: torch.Tensor | None = None) -> torch.Tensor:
        """A copy of float32 `logits` `[num_requests, vocab]` with disallowed tokens at -inf.
        `in_flight`: the step before's sampled ids on the device, which `closing` rows read."""
        self.wait()
        device, closing = logits.device, self.closing
        disallowed = torch.zeros(logits.shape, dtype=torch.bool, device=device) if self.bitmask is None else None
        if self.bitmask is not None:
            words = self.bitmask.to(device, non_blocking=True)
            shifts = torch.arange(BITS, dtype=torch.int32, device=device)
            allowed = ((words.unsqueeze(-1) >> shifts) & 1).flatten(1)[:, : logits.shape[-1]].bool()  # [num_requests, vocab]
            for grammar, row in zip(closing.grammars, closing.rows) if closing is not None else ():
                if grammar.first_allowed is None:  # its first mask, filled this step: kept on the device
                    grammar.first_allowed = allowed[row].clone()
            disallowed = ~allowed
        assert disallowed is not None
        if closing is not None:
            assert in_flight is not None, "closing rows read the tokens in flight"
            rows = to_device(closing.rows, torch.long, device)
            ends, firsts = [], []
            for grammar in closing.grammars:
                assert grammar.thinking is not None and grammar.first_allowed is not None, "a closing row's first mask is known"
                ends.append(grammar.thinking.end_token_id)
                firsts.append(grammar.first_allowed)
            closes = in_flight[to_device(closing.in_flight_rows, torch.long, device)] == to_device(ends, torch.long, device)
            disallowed[rows] = ~torch.stack(firsts) & closes.unsqueeze(-1)
        return logits.masked_fill(disallowed, float("-inf"))


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
        closing = Closing([], [], [])
        for i, r in enumerate(requests):
            grammar = r.grammar
            if grammar is None or r.is_finished:
                continue
            if grammar.constrains:
                grammars.append((grammar, i))
            elif in_flight_rows is not None and in_flight_rows[i] >= 0:  # thinking; free unless that token ends it
                assert grammar.thinking is not None
                closing.rows.append(i)
                closing.in_flight_rows.append(in_flight_rows[i])
                closing.grammars.append(grammar)
                if grammar.first_allowed is None:  # its matcher has taken nothing: its mask now is the first
                    grammars.append((grammar, i))
        if not grammars:
            return None if not closing.rows else PendingMasks(None, None, closing)
        num_words = -(-grammars[0][0].vocab_size // BITS)
        bitmask = torch.full((len(requests), num_words), -1, dtype=torch.int32, pin_memory=self.pin_memory)
        matchers = [(grammar.matcher, i) for grammar, i in grammars]
        openings = [(i, g.thinking.start_token_id) for g, i in grammars if g.phase == OPENING and g.thinking is not None]
        done = self._thread.submit(_fill, self._executor, matchers, bitmask, openings)
        return PendingMasks(bitmask, done, closing if closing.rows else None)

    @staticmethod
    def accept(requests: list[Request], token_ids: list[int]) -> None:
        """Advance each request's grammar with the token it just got."""
        for request, token_id in zip(requests, token_ids):
            if request.grammar is not None:
                request.grammar.accept(token_id)


def _fill(executor: llguidance.LLExecutor, matchers: list, bitmask: torch.Tensor, openings: list[tuple[int, int]]) -> None:
    """The grammars' rows, then `<think>` allowed too in the rows of replies that may open with it."""
    fill_next_token_bitmask_par(executor, matchers, bitmask)
    words = bitmask.numpy().view(numpy.uint32)  # on the host, as llguidance fills it
    for row, token_id in openings:
        word, bit = divmod(token_id, BITS)
        words[row, word] |= numpy.uint32(1 << bit)
