"""`AsyncEngine`: the colocated engine on a background `EngineLoop`, for asyncio servers:
`generate()` streams each request's token deltas; leaving the stream early aborts the request."""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from engine.engine_loop import EngineLoop
from engine.llm_engine import LLMEngine
from engine.outputs import RequestDelta
from engine.request import Request
from engine.sampling_params import SamplingParams


def delta_of(request: Request) -> RequestDelta:
    """The delta for the token a step just appended to `request`."""
    logprobs = request.output_logprobs[-1:] if request.params.logprobs is not None else []
    return RequestDelta(
        request_id=request.request_id,
        token_ids=request.output_token_ids[-1:],
        logprobs=list(logprobs),
        finish_reason=request.finish_reason,
        stop_reason=request.stop_reason,
        num_prompt_tokens=request.num_prompt_tokens,
        num_cached_tokens=request.num_cached_tokens,
        num_output_tokens=len(request.output_token_ids),
    )


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.loop = EngineLoop(self._step, self._fail_all, name="colocated-engine")
        self.loop.start()

    def shutdown(self) -> None:
        self.loop.stop()

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> AsyncIterator[RequestDelta]:
        """Raises `InvalidRequestError` for bad input before anything is queued."""
        return self._generate(request_id, prompt_token_ids, params)

    async def _generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> AsyncIterator[RequestDelta]:
        await self.engine.core.compile_grammar(params)
        events = self.loop.stream(
            request_id,
            add=lambda: self.engine.add_request(request_id, prompt_token_ids, params),
            abort=lambda: self.engine.abort_request(request_id),
        )
        async with aclosing(events):
            async for delta in events:
                yield delta

    def _step(self) -> bool:
        if not self.engine.has_unfinished_requests():
            return False
        for request in self.engine.step():
            delta = delta_of(request)
            self.loop.publish(request.request_id, delta, is_last=delta.finish_reason is not None)
        return True

    def _fail_all(self, exc: BaseException) -> None:
        """A failed step: every request ends with an error and its blocks are freed."""
        for request_id in self.loop.stream_ids:
            self.engine.abort_request(request_id)
            error = RequestDelta(request_id, [], finish_reason="error", error=f"{type(exc).__name__}: {exc}")
            self.loop.publish(request_id, error, is_last=True)

    def stats(self) -> dict[str, float]:
        scheduler, blocks = self.engine.scheduler, self.engine.core.block_manager
        return {
            "num_running": len(scheduler.running),
            "num_waiting": len(scheduler.waiting),
            "kv_cache_usage": blocks.usage,
            "num_preemptions": scheduler.num_preemptions,
        }
