"""The prefill scheduler: prompts are admitted FCFS (or by priority, `engine.waiting_queue`) with their whole block table (prefix-cache hits
included) and computed in chunks under a token budget. A request whose prompt is done leaves the
schedule holding its blocks; the worker releases them once the decode worker has acknowledged
the KV. Pure CPU logic: requests and free blocks in, a batch plan out."""

from __future__ import annotations

import time

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.request import Request, RequestPhase, ScheduledRequest
from pdserve.engine.sampler import SamplerOutput, add_prompt_logprobs
from pdserve.engine.waiting_queue import WaitingQueue


class PrefillScheduler:
    def __init__(self, block_manager: BlockManager, max_num_batched_tokens: int, max_num_seqs: int, policy: str = "fcfs") -> None:
        self.block_manager = block_manager
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting = WaitingQueue(policy)
        self.running: list[Request] = []  # admitted, prompt not fully computed
        # waiting request id -> the prompt tokens it will compute: all but the prefix cached when it came
        self._waiting_new_tokens: dict[str, int] = {}

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, request: Request) -> None:
        cached = 0
        if request.params.prompt_logprobs is None:
            cached = self.block_manager.match_prefix(request.prompt_token_ids[:-1], request.cache_salt)
        self._waiting_new_tokens[request.request_id] = request.num_prompt_tokens - cached
        self.waiting.add(request)

    @property
    def num_queued_tokens(self) -> int:
        """Prompt tokens still to compute: the running prompts' rest, and the waiting ones less the
        prefix the cache held when they came (read from any thread: one pass over each)."""
        running = list(self.running)
        return sum(self._waiting_new_tokens.values()) + sum(r.num_prompt_tokens - r.num_computed_tokens for r in running)

    def abort(self, request_id: str) -> Request | None:
        """Drops a waiting or computing request (freeing its blocks); None if it is not here."""
        for queue in (self.waiting, self.running):
            for request in queue:
                if request.request_id == request_id:
                    queue.remove(request)
                    self._waiting_new_tokens.pop(request_id, None)
                    self.release(request)
                    request.finish("abort")
                    return request
        return None

    def release(self, request: Request) -> None:
        self.block_manager.free(request.block_table)
        request.block_table = []

    def schedule(self) -> list[ScheduledRequest]:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        for request in self.running:
            if budget == 0:
                return scheduled
            num_tokens = min(request.num_prompt_tokens - request.num_computed_tokens, budget)
            scheduled.append(ScheduledRequest(request, num_tokens))
            budget -= num_tokens
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting.peek()
            allocation = self.block_manager.allocate(
                request.prompt_token_ids, use_cache=request.params.prompt_logprobs is None, salt=request.cache_salt
            )
            if allocation is None:
                break  # in order: wait for blocks to come back from finished transfers
            self.waiting.pop()
            self._waiting_new_tokens.pop(request.request_id, None)
            request.block_table = allocation.block_table
            request.num_computed_tokens = request.num_cached_tokens = allocation.num_cached_tokens
            request.scheduled_time = time.monotonic()
            request.phase = RequestPhase.PREFILLING
            self.running.append(request)
            num_tokens = min(request.num_prompt_tokens - request.num_computed_tokens, budget)
            scheduled.append(ScheduledRequest(request, num_tokens))
            budget -= num_tokens
        return scheduled

    def update(self, scheduled: list[ScheduledRequest], output: SamplerOutput) -> list[Request]:
        """Records a step; returns the requests whose prompt is now done, first token appended."""
        samples = iter(zip(output.token_ids, output.logprobs))
        done: list[Request] = []
        for item in scheduled:
            request, is_sampled = item.request, item.is_sampled
            request.num_computed_tokens += item.num_tokens
            self.block_manager.cache_full_blocks(
                request.block_table, request.prompt_token_ids, request.num_computed_tokens, request.cache_salt
            )
            add_prompt_logprobs(request, output.prompt_logprobs.get(id(request)))
            if not is_sampled:
                continue
            for sequence in request.family if request.has_unforked_siblings else [request]:
                token, logprobs = next(samples)  # with n > 1, each sequence's first token (see ModelRunner)
                sequence.first_token_time = time.monotonic()
                sequence.output_token_ids.append(token)
                if logprobs is not None:
                    sequence.output_logprobs.append(logprobs)
            done.append(request)
        if done:
            self.running = [r for r in self.running if r not in done]
        return done
