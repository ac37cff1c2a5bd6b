"""What the HTTP layer needs from whatever produces tokens. Two implementations: `ColocatedBackend`
(one engine in this process: the baseline) and `DisaggregatedBackend` (prefill and decode workers
over gRPC, in `router/disaggregated.py`)."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from pdserve.engine.iteration_stats import IterationTokens
from pdserve.engine.outputs import RequestDelta
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.tokenizer import Tokenizer
from pdserve.proto.failures import Failure

if TYPE_CHECKING:  # the disaggregated gateway never loads torch
    from pdserve.engine.async_engine import AsyncEngine


class BackendFailure(RuntimeError):
    """A request the backend could not serve, with the kind of failure (`proto/failures.py` gives
    its HTTP status). Raised before the first delta, or in place of a later one."""

    def __init__(self, failure: Failure, message: str) -> None:
        super().__init__(message)
        self.failure = failure


class BackendUnavailableError(BackendFailure):
    """No worker can take the request now (HTTP 503)."""

    def __init__(self, message: str) -> None:
        super().__init__(Failure.UNAVAILABLE, message)


@dataclass(frozen=True)
class BackendStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # 0..1: blocks in use / all blocks (of the decode workers, when disaggregated)
    num_preemptions: int
    num_total_blocks: int = 0  # of the decode workers, when disaggregated
    block_size: int = 0
    iteration_tokens: IterationTokens = field(default_factory=IterationTokens)  # over all engines


class Backend(Protocol):
    model_name: str
    tokenizer: Tokenizer

    @property
    def max_model_len(self) -> int:
        """The longest prompt + completion, in tokens, it serves now."""
        ...

    @property
    def max_logprobs(self) -> int | None:
        """The most logprobs a request may ask for (--max-logprobs); None: not known yet."""
        ...

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary (its logits' width): what a logprobs count of -1 asks for."""
        ...

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncGenerator[RequestDelta, None]:
        """Token deltas of one request; the last carries finish_reason. Raises InvalidRequestError
        (bad input) or BackendFailure (before the first delta, or when the request is lost later);
        closing the iterator early aborts the request and frees its KV."""
        ...

    async def stats(self) -> BackendStats: ...

    async def is_healthy(self) -> bool: ...

    async def close(self) -> None: ...


class ColocatedBackend:
    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name
        self.max_model_len = engine.engine.core.max_model_len
        self.max_logprobs = engine.engine.core.max_logprobs
        self.vocab_size = engine.engine.core.model_config.vocab_size
        self.tokenizer = engine.engine.core.tokenizer

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncGenerator[RequestDelta, None]:
        return self.engine.generate(request_id, prompt_token_ids, params)

    async def stats(self) -> BackendStats:
        s = self.engine.stats()
        core = self.engine.engine.core
        return BackendStats(
            int(s["num_running"]),
            int(s["num_waiting"]),
            s["kv_cache_usage"],
            int(s["num_preemptions"]),
            core.block_manager.num_blocks,
            core.config.block_size,
            self.engine.engine.iteration_tokens,
        )

    async def is_healthy(self) -> bool:
        return self.engine.loop.is_alive

    async def close(self) -> None:
        self.engine.shutdown()
