"""`StepPipeline`: runs a scheduler's steps on the model runner, one decode step ahead of the host
when it can (SGLang's overlap scheduler, vLLM's async scheduling). Step n+1 is launched before
step n's tokens are read back: its input ids come from step n's sampled ids on the device, so the
GPU goes from one graph replay to the next while the host appends, checks stops and streams step n.

A step runs ahead only when it is a plain decode step of requests whose sampling needs nothing
the host holds alone (`runs_ahead`): greedy or random sampling, seeded or not, logprobs (computed
on the device, read back with the tokens), penalties (their counts take the token in flight on
the device), logit bias, allowed tokens, one-token bad words, min_tokens (counting the token in
flight). A step with a grammar or a bad word of several tokens is launched ahead without its
sampling: its forward pass runs while the host reads the step before's tokens and advances the
grammars; then the masks are computed and the step sampled. Anything else (a prefill, a waiting
or preempted request, a sibling still to fork) runs as before, after the step in flight is
processed. A request that stops at step n (EOS, stop token,
abort) still has a row in step n+1; that row is dropped, and the blocks freed meanwhile are held
until step n+1 is done, so no one (a KV receiver on another stream) can write them while that
stale row may still write its slot."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.engine.model_runner import InFlightStep, ModelRunner
from pdserve.engine.request import Request, ScheduledRequest
from pdserve.engine.sampler import runs_ahead
from pdserve.engine.scheduler import Scheduler


@dataclass
class StepResult:
    num_tokens: int  # tokens the step launched now computes (0: it only read back the last one)
    updated: list[Request]  # the requests that got a token (finished ones too)


class StepPipeline:
    def __init__(self, scheduler: Scheduler, runner: ModelRunner, run_ahead: bool) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.run_ahead = run_ahead
        self._in_flight: InFlightStep | None = None

    @property
    def has_work(self) -> bool:
        return self._in_flight is not None or self.scheduler.num_unfinished > 0

    def step(self) -> StepResult | None:
        """One step; None when nothing was scheduled and nothing is in flight."""
        in_flight = self._in_flight
        if in_flight is None:
            batch = self.scheduler.schedule()
            if not batch:
                return None
            num_tokens = sum(item.num_tokens for item in batch)
            # A one-token chunk that is not the last known token (a recompute) is no decode step
            if all(item.is_sampled for item in batch) and self._can_run_ahead(batch):
                self._in_flight = self._launch(batch, None)
                return StepResult(num_tokens, [])
            return StepResult(num_tokens, self.scheduler.update(batch, self.runner.execute(batch)))
        ahead = self.scheduler.schedule_ahead([item.request for item in in_flight.batch])
        launched = self._launch(ahead, in_flight) if ahead and self._can_run_ahead(ahead) else None
        token_ids = in_flight.token_ids()  # waits for the step (the next one is queued behind it)
        self._in_flight = launched
        blocks = self.scheduler.block_manager
        if launched is None:
            blocks.fence(None)
        updated = self.scheduler.update_ahead(in_flight.batch, in_flight.epochs, token_ids, in_flight.token_logprobs())
        blocks.release_held(in_flight.seq)
        if launched is not None and not launched.is_sampled:  # its grammars have the tokens now: the masks can start
            self.runner.sample(launched, caught_up=True)
        return StepResult(len(launched.batch) if launched is not None else 0, updated)

    def reset(self) -> None:
        """After a failed step: the step in flight is waited for (if the device still runs) and
        forgotten, and every held block is freed."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None and (in_flight.done is not None or self.runner.device.type == "cuda"):
            try:
                if in_flight.done is not None:
                    in_flight.done.synchronize()
                else:  # launched, not sampled: its forward pass may still write the cache
                    torch.cuda.synchronize(self.runner.device)
            except RuntimeError:  # a broken device: nothing runs any more
                pass
        self.scheduler.block_manager.fence(None)
        self.scheduler.block_manager.release_held(None)

    def _can_run_ahead(self, batch: list[ScheduledRequest]) -> bool:
        return self.run_ahead and all(
            item.num_tokens == 1 and item.request.is_prefill_done and runs_ahead(item.request) for item in batch
        )

    def _launch(self, batch: list[ScheduledRequest], previous: InFlightStep | None) -> InFlightStep:
        step = self.runner.launch(batch, previous)
        for item in batch:
            item.request.num_computed_tokens += 1  # its KV is being written
        self.scheduler.block_manager.fence(step.seq)
        return step
