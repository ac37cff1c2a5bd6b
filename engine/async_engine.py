"""`AsyncEngine`: the colocated engine on a background `EngineLoop`, for asyncio servers:
`generate()` streams each request's token deltas; leaving the stream early aborts the request."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

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
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestDelta]]] = {}
        self.loop = EngineLoop(self._step, self._fail_all, name="colocated-engine")
        self.loop.start()

    def shutdown(self) -> None:
        self.loop.stop()

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestDelta]:
        """Raises `InvalidRequestError` for bad input before anything is queued."""
        aloop = asyncio.get_running_loop()
        deltas: asyncio.Queue[RequestDelta] = asyncio.Queue()

        def add() -> None:
            self.engine.add_request(request_id, prompt_token_ids, params)
            self._streams[request_id] = (aloop, deltas)

        await asyncio.wrap_future(self.loop.call(add))
        finished = False
        try:
            while not finished:
                delta = await deltas.get()
                finished = delta.finish_reason is not None
                yield delta
        finally:
            if not finished:
                self.loop.call(lambda: self._abort(request_id))

    def _abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self.engine.abort_request(request_id)

    def _step(self) -> bool:
        if not self.engine.has_unfinished_requests():
            return False
        for request in self.engine.step():
            self._publish(delta_of(request))
        return True

    def _publish(self, delta: RequestDelta) -> None:
        stream = self._streams.get(delta.request_id)
        if stream is None:
            return
        if delta.finish_reason is not None:
            del self._streams[delta.request_id]
        aloop, deltas = stream
        aloop.call_soon_threadsafe(deltas.put_nowait, delta)

    def _fail_all(self, exc: BaseException) -> None:
        """A failed step: every request ends with an error and its blocks are freed."""
        for request_id in list(self._streams):
            self.engine.abort_request(request_id)
            self._publish(RequestDelta(request_id, [], finish_reason="error", error=f"{type(exc).__name__}: {exc}"))

    def stats(self) -> dict[str, float]:
        scheduler, blocks = self.engine.scheduler, self.engine.core.block_manager
        return {
            "num_running": len(scheduler.running),
            "num_waiting": len(scheduler.waiting),
            "kv_cache_usage": blocks.usage,
            "num_preemptions": scheduler.num_preemptions,
        }
