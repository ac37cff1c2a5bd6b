"""Per-step token masks of the requests that have a grammar. A step starts them (`GrammarMasks.start`)
before its forward pass: llguidance fills the bitmask rows of those requests on its own thread
pool, GIL released, while this thread prepares inputs and runs (on a GPU: launches) the forward.
The sampler then waits for them (`PendingMasks.apply`) and sets every disallowed logit to -inf in
one masked_fill over the batch (rows without a grammar allow every token)."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import numpy
import torch
from llguidance.torch import fill_next_token_bitmask_par

from pdserve.engine.request import Request
from pdserve.engine.structured_output import OPENING

BITS = 32  # tokens per int32 word of a bitmask


class PendingMasks:
    """The masks of one step's sampled requests, being computed."""

    def __init__(self, bitmask: torch.Tensor, done: Future) -> None:
        self.bitmask = bitmask  # int32 [num_requests, ceil(vocab / 32)]: bit t of a row set = token t allowed
        self._done = done

    def wait(self) -> None:
        self._done.result()

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """A copy of float32 `logits` `[num_requests, vocab]` with disallowed tokens at -inf."""
        self.wait()
        device = logits.device
        words = self.bitmask.to(device, non_blocking=True)
        shifts = torch.arange(BITS, dtype=torch.int32, device=device)
        allowed = ((words.unsqueeze(-1) >> shifts) & 1).flatten(1)[:, : logits.shape[-1]].bool()  # [num_requests, vocab]
        return logits.masked_fill(~allowed, float("-inf"))


class GrammarMasks:
    def __init__(self, pin_memory: bool) -> None:
        self.pin_memory = pin_memory
        self._executor = llguidance.LLExecutor()  # its threads compute the rows in parallel
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")  # waits on them off this thread

    def start(self, requests: list[Request]) -> PendingMasks | None:
        """Start computing the next token's mask of every request in `requests` that has a grammar
        and has not finished (a finished request's row, in a step launched ahead, allows all)."""
        grammars = [  # none while the model thinks
            (r.grammar, i) for i, r in enumerate(requests) if r.grammar is not None and r.grammar.constrains and not r.is_finished
        ]
        if not grammars:
            return None
        num_words = -(-grammars[0][0].vocab_size // BITS)
        bitmask = torch.full((len(requests), num_words), -1, dtype=torch.int32, pin_memory=self.pin_memory)
        matchers = [(grammar.matcher, i) for grammar, i in grammars]
        openings = [(i, g.thinking.start_token_id) for g, i in grammars if g.phase == OPENING and g.thinking is not None]
        done = self._thread.submit(_fill, self._executor, matchers, bitmask, openings)
        return PendingMasks(bitmask, done)

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
