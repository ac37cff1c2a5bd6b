"""`AsyncEngine`: the colocated engine on a background `EngineLoop`, for asyncio servers:
`generate()` streams each request's token deltas; leaving the stream early aborts the request."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing

from pdserve.engine.engine_loop import EngineLoop
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.outputs import RequestDelta
from pdserve.engine.request import Request
from pdserve.engine.sampling_params import SamplingParams


def delta_of(request: Request) -> RequestDelta:
    """The delta for the token a step just appended to `request` (the first carries prompt logprobs)."""
    is_first = len(request.output_token_ids) == 1
    logprobs = request.output_logprobs[-1:] if request.params.logprobs is not None else []
    return RequestDelta(
        request_id=request.root_id,
        index=request.index,
        token_ids=request.output_token_ids[-1:],
        logprobs=list(logprobs),
        finish_reason=request.finish_reason,
        stop_reason=request.stop_reason,
        num_prompt_tokens=request.num_prompt_tokens,
        num_cached_tokens=request.num_cached_tokens,
        num_output_tokens=len(request.output_token_ids),
        prompt_logprobs=list(request.prompt_logprobs) if is_first and request.params.prompt_logprobs is not None else None,
        queue_seconds=_seconds(request.arrival_time, request.scheduled_time) if is_first else None,
        prefill_seconds=_seconds(request.scheduled_time, request.first_token_time) if is_first else None,
    )


def publish_deltas(loop: EngineLoop, requests: list[Request]) -> None:
    """Loop thread: the tokens a step just gave `requests` to their streams. A request's stream ends
    with the last of its sequences' deltas once all n of them have finished."""
    last_of = {(r.parent or r).request_id: r for r in requests}
    for request in requests:
        root = request.parent or request
        is_last = last_of[root.request_id] is request and all(s.is_finished for s in root.family)
        loop.publish(root.request_id, delta_of(request), is_last=is_last)


def _seconds(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else end - start


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.loop = EngineLoop(self._step, self._fail_all, name="colocated-engine")
        self.loop.start()

    def shutdown(self) -> None:
        self.loop.stop()

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncGenerator[RequestDelta, None]:
        """Raises `InvalidRequestError` for bad input before anything is queued."""
        return self._generate(request_id, prompt_token_ids, params)

    async def _generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncGenerator[RequestDelta, None]:
        await self.engine.core.compile_grammar(params)
        events: AsyncGenerator[RequestDelta, None] = self.loop.stream(
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
        publish_deltas(self.loop, self.engine.step())
        return True

    def _fail_all(self, exc: BaseException) -> None:
        """A failed step: every request ends with an error and its blocks are freed."""
        self.engine.pipeline.reset()
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
