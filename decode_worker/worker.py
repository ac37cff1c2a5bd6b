"""`DecodeWorker`: reserves KV blocks for incoming prompts (with a lease), admits a request into the
continuous batch once a prefill worker has pushed its KV and first token, and streams the tokens
after the first. Preempted requests are recomputed here. All state is owned by the loop thread."""
from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from engine.async_engine import delta_of
from engine.outputs import RequestDelta
from engine.core import EngineCore
from engine.engine_loop import EngineLoop
from engine.request import Request
from engine.sampling_params import InvalidRequestError, SamplingParams
from engine.sampler import skip_first_draw
from engine.scheduler import Scheduler
from kvtransfer.receiver import KVCommitInfo, KVReceiver


@dataclass(frozen=True)
class Reserved:
    """First event of a stream: the blocks the prompt's KV must be pushed into."""

    block_ids: list[int]


@dataclass(eq=False)
class _Pending:
    request: Request
    transfer_id: str
    lease_s: float


class DecodeWorker:
    def __init__(self, core: EngineCore, worker_id: str) -> None:
        self.core = core
        self.worker_id = worker_id
        config = core.config
        self.scheduler = Scheduler(core.block_manager, config.max_num_seqs, config.max_num_batched_tokens, core.max_model_len)
        self.receiver = KVReceiver(core.runner.kv_cache, core.model_id, worker_id)
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._waiting_for_blocks: deque[_Pending] = deque()
        self._waiting_for_kv: dict[str, _Pending] = {}  # by transfer_id
        self.is_broken = False
        self.loop = EngineLoop(self._step, self._fail_all, name="decode-engine")
        self.loop.start()

    def shutdown(self) -> None:
        self.loop.stop()

    async def generate(
        self, request_id: str, transfer_id: str, prompt_token_ids: list[int], params: SamplingParams, lease_s: float
    ) -> AsyncIterator[Reserved | RequestDelta]:
        """`Reserved`, then deltas of the tokens after the first; the last delta has finish_reason.
        Leaving early aborts the request and frees its blocks."""
        aloop = asyncio.get_running_loop()
        events: asyncio.Queue[Reserved | RequestDelta] = asyncio.Queue()
        pending = None

        def add() -> None:
            nonlocal pending
            if request_id in self._streams:
                raise InvalidRequestError(f"request {request_id} is already running here", "request_id")
            if self._is_transfer_known(transfer_id):
                raise InvalidRequestError(f"transfer {transfer_id} is already pending here", "transfer_id")
            request = self.core.new_request(request_id, prompt_token_ids, params)
            pending = _Pending(request, transfer_id, lease_s)
            self._streams[request_id] = (aloop, events)
            self._waiting_for_blocks.append(pending)

        finished = False
        try:
            # A cancel may land after `add` ran on the loop thread but before we hear back: the
            # `finally` covers that too (the loop takes calls in order).
            await asyncio.wrap_future(self.loop.call(add))
            while not finished:
                event = await events.get()
                finished = isinstance(event, RequestDelta) and event.finish_reason is not None
                yield event
        finally:
            if not finished:
                self.loop.call(lambda: self._abort_own(request_id, events))

    def _is_transfer_known(self, transfer_id: str) -> bool:
        return transfer_id in self._waiting_for_kv or any(p.transfer_id == transfer_id for p in self._waiting_for_blocks)

    async def abort(self, request_id: str) -> bool:
        return await asyncio.wrap_future(self.loop.call(lambda: self._abort(request_id)))

    @property
    def is_healthy(self) -> bool:
        """False once the engine loop died or the device failed (e.g. a sticky CUDA error)."""
        return self.loop.is_alive and not self.is_broken

    # -- loop thread ----------------------------------------------------------------------------
    def _step(self) -> bool:
        self._expire_leases()
        if not self.scheduler.waiting:  # preempted requests get freed blocks before new prompts do
            self._reserve_waiting()
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return False
        output = self.core.runner.execute(scheduled)
        for request in self.scheduler.update(scheduled, output):
            self._publish(delta_of(request))
        return True

    def _reserve_waiting(self) -> None:
        max_num_seqs = self.core.config.max_num_seqs
        while self._waiting_for_blocks and len(self.scheduler.running) + len(self._waiting_for_kv) < max_num_seqs:
            pending = self._waiting_for_blocks[0]
            request = pending.request
            block_ids = self.core.block_manager.reserve(request.num_prompt_tokens)
            if block_ids is None:
                return
            self._waiting_for_blocks.popleft()
            request.block_table = block_ids
            self._waiting_for_kv[pending.transfer_id] = pending
            self.receiver.expect(
                pending.transfer_id, block_ids, time.monotonic() + pending.lease_s,
                on_commit=lambda info, p=pending: self.loop.call(lambda: self._admit(p, info)),
            )
            self._emit(request.request_id, Reserved(list(block_ids)))

    def _admit(self, pending: _Pending, info: KVCommitInfo) -> None:
        if self._waiting_for_kv.pop(pending.transfer_id, None) is None:
            return  # aborted or expired meanwhile; its blocks are already free
        request = pending.request
        request.num_computed_tokens = request.num_prompt_tokens
        request.output_token_ids.append(info.first_token_id)
        skip_first_draw(request, self.core.model_config.vocab_size, self.core.runner.device)
        if info.first_logprobs is not None and request.params.logprobs is not None:
            request.output_logprobs.append(info.first_logprobs)
        self.core.block_manager.cache_full_blocks(request.block_table, request.prompt_token_ids, request.num_prompt_tokens)
        if request.check_stop(self.core.max_model_len):
            self._release(request)
            self._publish(
                RequestDelta(
                    request.request_id, [], finish_reason=request.finish_reason, stop_reason=request.stop_reason,
                    num_output_tokens=len(request.output_token_ids),
                )
            )
        else:
            self.scheduler.add_running(request)

    def _expire_leases(self) -> None:
        for transfer_id in self.receiver.expire(time.monotonic()):
            pending = self._waiting_for_kv.pop(transfer_id, None)
            if pending is None:
                continue
            self._release(pending.request)
            message = f"the KV of transfer {transfer_id} did not arrive within its {pending.lease_s:g} s lease"
            self._publish(RequestDelta(pending.request.request_id, [], finish_reason="error", error=message))

    def _abort_own(self, request_id: str, events: asyncio.Queue) -> None:
        """The stream owning `events` went away: abort its request, and only its (not a later one's)."""
        stream = self._streams.get(request_id)
        if stream is not None and stream[1] is events:
            self._abort(request_id)

    def _abort(self, request_id: str, finish_reason: str = "abort", error: str | None = None) -> bool:
        """Drops the request wherever it is, freeing its blocks, and ends its stream; False if it
        is not here."""
        found = self._drop(request_id)
        self._publish(RequestDelta(request_id, [], finish_reason=finish_reason, error=error))
        return found

    def _drop(self, request_id: str) -> bool:
        for pending in list(self._waiting_for_blocks):
            if pending.request.request_id == request_id:
                self._waiting_for_blocks.remove(pending)
                return True
        for transfer_id, pending in list(self._waiting_for_kv.items()):
            if pending.request.request_id == request_id:
                self.receiver.cancel(transfer_id)  # after this no write lands in its blocks
                del self._waiting_for_kv[transfer_id]
                self._release(pending.request)
                return True
        return self.scheduler.abort(request_id) is not None

    def _release(self, request: Request) -> None:
        self.core.block_manager.free(request.block_table)
        request.block_table = []

    def _emit(self, request_id: str, event: Reserved | RequestDelta) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            aloop, events = stream
            aloop.call_soon_threadsafe(events.put_nowait, event)

    def _publish(self, delta: RequestDelta) -> None:
        self._emit(delta.request_id, delta)
        if delta.finish_reason is not None:
            self._streams.pop(delta.request_id, None)

    def _fail_all(self, exc: BaseException) -> None:
        for request_id in list(self._streams):
            self._abort(request_id, "error", f"decode step failed: {type(exc).__name__}: {exc}")
        self.is_broken = not self.core.is_device_healthy()

    def status(self) -> dict[str, int]:
        blocks = self.core.block_manager
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting) + len(self._waiting_for_blocks) + len(self._waiting_for_kv),
            "num_total_blocks": blocks.num_blocks,
            "num_used_blocks": blocks.num_used_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
            "kv_bytes_received": self.receiver.bytes_received,
        }
