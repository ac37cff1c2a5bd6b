"""`LLMEngine`: the colocated engine (one scheduler + one model runner in this process). It is the
reference the disaggregated path must match and the baseline it is benchmarked against."""

from __future__ import annotations

from pdserve.engine.config import EngineConfig
from pdserve.engine.core import EngineCore
from pdserve.engine.iteration_stats import IterationTokens
from pdserve.engine.request import Request
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.step_pipeline import StepPipeline


class LLMEngine:
    def __init__(self, core: EngineCore) -> None:
        self.core = core
        config = core.config
        self.scheduler = Scheduler(
            core.block_manager, config.max_num_seqs, config.max_num_batched_tokens, core.max_model_len, config.scheduling_policy
        )
        self.pipeline = StepPipeline(self.scheduler, core.runner, config.async_scheduling)
        self.iteration_tokens = IterationTokens()

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLMEngine:
        return cls(EngineCore.load(config))

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Request:
        request = self.core.new_request(request_id, prompt_token_ids, params)
        self.scheduler.add(request)
        return request

    def abort_request(self, request_id: str) -> Request | None:
        """Every sequence of the request."""
        return self.scheduler.abort(request_id)

    def stop_sequence(self, request: Request) -> None:
        """One sequence ends early (a stop string); the request's others go on."""
        self.scheduler.drop(request)

    def has_unfinished_requests(self) -> bool:
        return self.pipeline.has_work

    def step(self) -> list[Request]:
        """One forward pass; returns the requests that got a token (some may have finished)."""
        result = self.pipeline.step()
        if result is None:
            if self.has_unfinished_requests():
                raise RuntimeError("no request could be scheduled: the KV cache is too small for the waiting requests")
            return []
        if result.num_tokens:
            self.iteration_tokens.observe(result.num_tokens)
        updated = result.updated
        if self.scheduler.pending_copies:  # forked sequences' partial blocks, after the prompt's KV is written
            self.core.runner.copy_blocks(self.scheduler.pending_copies)
            self.scheduler.pending_copies = []
        return updated
