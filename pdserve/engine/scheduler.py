"""The colocated continuous-batching scheduler: each step, running requests first (decodes and
unfinished chunked prefills), then waiting ones while the token budget and the KV blocks last.
When blocks run out, the latest-arrived running request is preempted and later recomputed. Under
the priority policy (`waiting_queue`), waiting and running requests are served by (priority,
arrival), and the running request with the largest goes first.
Pure CPU logic: requests and free blocks in, a batch plan out."""

from __future__ import annotations

import time

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.outputs import TokenLogprobs
from pdserve.engine.request import Request, RequestPhase, ScheduledRequest
from pdserve.engine.sampler import SamplerOutput, add_prompt_logprobs
from pdserve.engine.waiting_queue import WaitingQueue, serving_key


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        policy: str = "fcfs",
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting = WaitingQueue(policy)
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.pending_copies: list[tuple[int, int]] = []  # KV block copies of forks, done before the next step

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, request: Request) -> None:
        self.waiting.add(request)

    def add_running(self, request: Request) -> None:
        """A request whose prompt KV is already in `request.block_table` (computed elsewhere)."""
        request.phase = RequestPhase.DECODING
        self.running.append(request)

    def abort(self, request_id: str) -> Request | None:
        """Aborts every sequence of the request `request_id` (the id of its first); its first, or
        None if none was here."""
        found = None
        for queue in (self.running, self.waiting):
            for request in [r for r in queue if r.root_id == request_id]:
                queue.remove(request)
                self._release(request)
                request.finish("abort")
                found = found or (request.parent or request)
        if found is not None:
            for request in found.family:
                if not request.is_finished:  # siblings not forked yet hold nothing
                    request.finish("abort")
        return found

    def drop(self, request: Request) -> None:
        """Take one sequence out wherever it is, freeing its blocks (it is finished by the caller)."""
        for queue in (self.running, self.waiting):
            if request in queue:
                queue.remove(request)
                self._release(request)

    def schedule(self) -> list[ScheduledRequest]:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted = False
        if self.waiting.by_priority:  # served in this order; preempted from the back
            self.running.sort(key=serving_key)
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_tokens = min(request.num_tokens - request.num_computed_tokens, budget)
            if self._grow(request, request.num_computed_tokens + num_tokens):
                scheduled.append(ScheduledRequest(request, num_tokens))
                budget -= num_tokens
                i += 1
            else:
                preempted = True  # `request` itself was preempted; the loop ends
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            item = self._admit(self.waiting.peek(), budget)
            if item is None:
                break
            self.waiting.pop()
            scheduled.append(item)
            budget -= item.num_tokens
        return scheduled

    def schedule_ahead(self, in_flight: list[Request]) -> list[ScheduledRequest] | None:
        """The next step while `in_flight`'s tokens are still being computed: every running request
        decodes one token (an in-flight one the token in flight, at num_computed_tokens). Requests
        whose token in flight is their last by length are left out. None when the next step needs
        the host's results first: a request waits (or is prefilling), or blocks would run out."""
        if self.waiting:
            return None
        flying = {id(r) for r in in_flight}
        batch = []
        for request in self.running:
            if id(request) in flying:
                if request.ends_by_length(len(request.output_token_ids) + 1, self.max_model_len):
                    continue
            elif request.num_computed_tokens + 1 != request.num_tokens:
                return None
            batch.append(ScheduledRequest(request, 1))
        for item in batch:
            if not self.block_manager.append_slots(item.request.block_table, item.request.num_computed_tokens + 1):
                return None  # needs a preemption: done by `schedule` once the host has the tokens
        return batch

    def _grow(self, request: Request, num_tokens: int) -> bool:
        """Blocks for `num_tokens` slots, preempting from the back of `running` until they fit."""
        while not self.block_manager.append_slots(request.block_table, num_tokens):
            victim = self.running.pop()
            self._preempt(victim)
            if victim is request:
                return False
        return True

    def _admit(self, request: Request, budget: int) -> ScheduledRequest | None:
        allocation = self.block_manager.allocate(
            request.all_token_ids, use_cache=request.params.prompt_logprobs is None, salt=request.cache_salt
        )
        if allocation is None:
            return None
        request.block_table = allocation.block_table
        request.num_computed_tokens = allocation.num_cached_tokens
        request.scheduled_time = request.scheduled_time or time.monotonic()
        if request.num_preemptions == 0:
            request.num_cached_tokens = allocation.num_cached_tokens
        request.phase = RequestPhase.PREFILLING
        self.running.append(request)
        return ScheduledRequest(request, min(request.num_tokens - request.num_computed_tokens, budget))

    def _preempt(self, request: Request) -> None:
        self._release(request)
        request.phase = RequestPhase.QUEUED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.put_back(request)

    def _release(self, request: Request) -> None:
        self.block_manager.free(request.block_table)
        request.block_table = []
        request.num_computed_tokens = 0

    def update(self, scheduled: list[ScheduledRequest], output: SamplerOutput) -> list[Request]:
        """Record a step's results; returns the requests that got a new token (finished ones too)."""
        samples = iter(zip(output.token_ids, output.logprobs))
        updated: list[Request] = []
        block_size = self.block_manager.block_size
        for item in scheduled:
            request, is_sampled = item.request, item.is_sampled
            before = request.num_computed_tokens
            request.num_computed_tokens += item.num_tokens
            if request.num_computed_tokens // block_size > before // block_size:
                self.block_manager.cache_full_blocks(
                    request.block_table, request.all_token_ids, request.num_computed_tokens, request.cache_salt
                )
            add_prompt_logprobs(request, output.prompt_logprobs.get(id(request)))
            if not is_sampled:
                continue
            siblings = request.siblings if request.has_unforked_siblings else []
            for sequence in [request, *siblings]:
                self._append(sequence, *next(samples))
            for sibling in siblings:
                self._fork(request, sibling)
            updated += [request, *siblings]
        self.running = [r for r in self.running if not r.is_finished]
        return updated

    def update_ahead(
        self,
        batch: list[ScheduledRequest],
        epochs: list[int],
        token_ids: list[int],
        logprobs: list[TokenLogprobs | None],
    ) -> list[Request]:
        """Record a launched-ahead step's tokens and logprobs (its requests' num_computed_tokens
        advanced at launch), each grammar advanced with its token before the stop checks (as
        `ModelRunner.execute` does for a synchronous step). Rows of requests that ended, or were
        recomputed, since the launch are dropped."""
        updated = []
        for item, epoch, token, token_logprobs in zip(batch, epochs, token_ids, logprobs):
            request = item.request
            if request.is_finished or request.num_preemptions != epoch:
                continue
            if request.grammar is not None:
                request.grammar.accept(token)
            self._append(request, token, token_logprobs)
            updated.append(request)
            num_known = min(request.num_computed_tokens, request.num_tokens)  # computed, and token ids known
            if request.block_table and self.block_manager.has_unhashed_full_block(request.block_table, num_known):
                self.block_manager.cache_full_blocks(request.block_table, request.all_token_ids, num_known, request.cache_salt)
        self.running = [r for r in self.running if not r.is_finished]
        return updated

    def _append(self, request: Request, token: int, logprobs: TokenLogprobs | None) -> None:
        request.output_token_ids.append(token)
        if logprobs is not None:
            request.output_logprobs.append(logprobs)
        request.first_token_time = request.first_token_time or time.monotonic()
        request.phase = RequestPhase.DECODING
        if request.check_stop(self.max_model_len) and request.block_table:
            self.block_manager.free(request.block_table)
            request.block_table = []

    def _fork(self, parent: Request, sibling: Request) -> None:
        """The sibling takes a share of the parent's prompt blocks (its partial last block copied,
        see `pending_copies`); with no block free for that copy, it recomputes the prompt later."""
        if sibling.is_finished:
            return
        fork = self.block_manager.fork(parent.block_table, parent.num_prompt_tokens) if parent.block_table else None
        if fork is None:
            sibling.phase = RequestPhase.QUEUED
            self.waiting.put_back(sibling)
            return
        sibling.block_table = fork.block_table
        sibling.num_computed_tokens = parent.num_prompt_tokens
        sibling.num_cached_tokens = parent.num_cached_tokens
        sibling.scheduled_time = parent.scheduled_time
        self.pending_copies += fork.copies
        self.running.append(sibling)
