"""`PrefillWorker`: computes prompts' KV and first tokens on its `EngineLoop`, pushes each prompt's
KV into the blocks a decode worker reserved, and frees its own blocks only once the decode worker
has acknowledged them (or the hand-off failed)."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from engine.core import EngineCore
from engine.engine_loop import EngineLoop
from engine.outputs import TokenLogprobs
from engine.request import Request
from engine.sampling_params import InvalidRequestError, SamplingParams
from kvtransfer.layout import KVLayout
from kvtransfer.receiver import KVCommitInfo
from kvtransfer.sender import KVSender
from prefill_worker.scheduler import PrefillScheduler


@dataclass(frozen=True)
class KVTarget:
    """Where a prompt's KV goes: the decode worker's reservation."""

    block_ids: list[int]
    address: str
    transport: str
    worker_id: str


@dataclass(frozen=True)
class PrefillResult:
    first_token_id: int
    first_logprobs: TokenLogprobs | None
    num_cached_tokens: int
    kv_bytes: int
    kv_seconds: float


class PrefillWorker:
    def __init__(self, core: EngineCore, worker_id: str, kv_timeout_s: float = 60.0) -> None:
        self.core = core
        self.worker_id = worker_id
        self.kv_timeout_s = kv_timeout_s
        config = core.config
        self.scheduler = PrefillScheduler(core.block_manager, config.max_num_batched_tokens, config.max_num_seqs)
        self.sender = KVSender(core.runner.kv_cache, KVLayout.of(core.runner.kv_cache, core.model_id), worker_id)
        # Owned by the loop thread: requests computing, and prompts done whose KV is in flight.
        self._waiters: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future[Request]]] = {}
        self._handing_off: dict[str, tuple[Request, asyncio.Future[Request]]] = {}
        self.is_broken = False
        self.loop = EngineLoop(self._step, self._fail_all, name="prefill-engine")
        self.loop.start()

    def shutdown(self) -> None:
        self.loop.stop()

    async def prefill(
        self, request_id: str, transfer_id: str, prompt_token_ids: list[int], params: SamplingParams, target: KVTarget
    ) -> PrefillResult:
        """Raises InvalidRequestError, KVLayoutMismatchError or KVTransferError; cancelling the
        caller aborts the request and frees its blocks."""
        aloop = asyncio.get_running_loop()
        done: asyncio.Future[Request] = aloop.create_future()
        try:
            # A cancel may land after `_add` ran on the loop thread but before we hear back: the
            # `finally` covers that too (`_forget` runs after `_add`: the loop takes calls in order).
            await asyncio.wrap_future(self.loop.call(lambda: self._add(request_id, prompt_token_ids, params, aloop, done)))
            request = await done
            logprobs = request.output_logprobs[0] if request.output_logprobs else None
            commit = KVCommitInfo(request.output_token_ids[0], logprobs, request.num_prompt_tokens)
            sent = await self.sender.send(
                target.transport, target.address, transfer_id, request.block_table, len(target.block_ids),
                commit, timeout=self.kv_timeout_s,
            )
            return PrefillResult(commit.first_token_id, logprobs, request.num_cached_tokens, sent.num_bytes, sent.seconds)
        finally:
            self.loop.call(lambda: self._forget(request_id, done))

    def _add(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
        aloop: asyncio.AbstractEventLoop, done: asyncio.Future[Request],
    ) -> None:
        if request_id in self._waiters or request_id in self._handing_off:
            raise InvalidRequestError(f"request {request_id} is already being prefilled", "request_id")
        request = self.core.new_request(request_id, prompt_token_ids, params)
        self._waiters[request_id] = (aloop, done)
        self.scheduler.add(request)

    def _forget(self, request_id: str, done: asyncio.Future[Request]) -> None:
        """The caller whose future is `done` is finished with its request (KV acknowledged, failed
        or cancelled): free it. Another caller's request under the same id is left alone."""
        if request_id in self._waiters and self._waiters[request_id][1] is done:
            del self._waiters[request_id]
            self.scheduler.abort(request_id)
        elif request_id in self._handing_off and self._handing_off[request_id][1] is done:
            request, _ = self._handing_off.pop(request_id)
            self.scheduler.release(request)

    def _step(self) -> bool:
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return False
        output = self.core.runner.execute(scheduled)
        for request in self.scheduler.update(scheduled, output):
            aloop, done = self._waiters.pop(request.request_id)
            self._handing_off[request.request_id] = (request, done)
            aloop.call_soon_threadsafe(_resolve, done, request, None)
        return True

    def _fail_all(self, exc: BaseException) -> None:
        for request_id, (aloop, done) in list(self._waiters.items()):
            self.scheduler.abort(request_id)
            aloop.call_soon_threadsafe(_resolve, done, None, RuntimeError(f"prefill step failed: {exc}"))
        self._waiters.clear()
        self.is_broken = not self.core.is_device_healthy()

    @property
    def is_healthy(self) -> bool:
        """False once the engine loop died or the device failed (e.g. a sticky CUDA error)."""
        return self.loop.is_alive and not self.is_broken

    def status(self) -> dict[str, int]:
        blocks = self.core.block_manager
        return {
            "num_running": len(self.scheduler.running) + len(self._handing_off),
            "num_waiting": len(self.scheduler.waiting),
            "num_total_blocks": blocks.num_blocks,
            "num_used_blocks": blocks.num_used_blocks,
            "kv_bytes_sent": self.sender.bytes_sent,
        }


def _resolve(future: asyncio.Future[Request], request: Request | None, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(request)
