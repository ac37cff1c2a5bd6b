"""`DecodeWorker`: reserves KV blocks for incoming prompts (with a lease), admits a request into the
continuous batch once a prefill worker has committed its KV and first token, and streams the
tokens after the first. Preempted requests are recomputed here. All state is owned by the loop
thread; the KV itself arrives through the `KVReceiver`, never blocking a step."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from engine.async_engine import delta_of
from engine.core import EngineCore
from engine.engine_loop import EngineLoop
from engine.outputs import RequestDelta
from engine.request import Request, RequestPhase
from engine.sampler import skip_first_draw
from engine.sampling_params import InvalidRequestError, SamplingParams
from engine.scheduler import Scheduler
from kvtransfer.receiver import Ended, KVCommitInfo, KVReceiver


@dataclass(frozen=True)
class Reserved:
    """First event of a stream: the blocks the prompt's KV must be written into."""

    block_ids: list[int]


@dataclass(eq=False)
class _Incoming:
    """A request not yet decoding: queued for blocks, then handing off (waiting for its KV)."""

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
        self._incoming: dict[str, _Incoming] = {}  # by request_id, in arrival order
        self._by_transfer: dict[str, _Incoming] = {}  # those handing off, by transfer_id
        self.is_broken = False
        self.is_draining = False  # set by its host when it leaves the pool: the gateways stop routing to it
        self.loop = EngineLoop(self._step, self._fail_all, name="decode-engine")
        self.loop.start()

    def shutdown(self) -> None:
        self.loop.stop()

    def generate(
        self, request_id: str, transfer_id: str, prompt_token_ids: list[int], params: SamplingParams, lease_s: float
    ) -> AsyncIterator[Reserved | RequestDelta]:
        """`Reserved`, then deltas of the tokens after the first; the last delta has finish_reason.
        Leaving early aborts the request and frees its blocks."""

        def add() -> None:
            if transfer_id in self._by_transfer or any(i.transfer_id == transfer_id for i in self._incoming.values()):
                raise InvalidRequestError(f"transfer {transfer_id} is already pending here", "transfer_id")
            request = self.core.new_request(request_id, prompt_token_ids, params)
            self._incoming[request_id] = _Incoming(request, transfer_id, lease_s)

        return self.loop.stream(request_id, add, lambda: self._drop(request_id))

    async def abort(self, request_id: str) -> bool:
        return await self.loop.run(lambda: self._abort(request_id))

    @property
    def is_healthy(self) -> bool:
        """False once the engine loop died or the device failed (e.g. a sticky CUDA error)."""
        return self.loop.is_alive and not self.is_broken

    # -- loop thread ----------------------------------------------------------------------------
    def _step(self) -> bool:
        self._poll_receiver()
        if not self.scheduler.waiting:  # preempted requests get freed blocks before new prompts do
            self._reserve_queued()
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return False
        output = self.core.runner.execute(scheduled)
        for request in self.scheduler.update(scheduled, output):
            delta = delta_of(request)
            self.loop.publish(request.request_id, delta, is_last=delta.finish_reason is not None)
        return True

    def _reserve_queued(self) -> None:
        """FCFS: blocks for whole prompts while they last and the batch has room."""
        max_num_seqs = self.core.config.max_num_seqs
        for incoming in list(self._incoming.values()):
            if len(self.scheduler.running) + len(self._by_transfer) >= max_num_seqs:
                return
            request = incoming.request
            if request.phase is not RequestPhase.QUEUED:
                continue
            block_ids = self.core.block_manager.reserve(request.num_prompt_tokens)
            if block_ids is None:
                return
            request.block_table = block_ids
            request.phase = RequestPhase.HANDING_OFF
            self._by_transfer[incoming.transfer_id] = incoming
            self.receiver.expect(
                incoming.transfer_id, block_ids, time.monotonic() + incoming.lease_s,
                on_commit=lambda info, ready, i=incoming: self.loop.call(lambda: self._admit(i, info, ready)),
            )
            self.loop.publish(request.request_id, Reserved(list(block_ids)))

    def _admit(self, incoming: _Incoming, info: KVCommitInfo, ready: torch.cuda.Event | None) -> None:
        if self._by_transfer.get(incoming.transfer_id) is not incoming:
            return  # aborted or expired meanwhile; its blocks are already taken care of
        del self._by_transfer[incoming.transfer_id]
        del self._incoming[incoming.request.request_id]
        if ready is not None:  # steps from now on read this KV: they wait for its writes, on the device
            torch.cuda.current_stream(self.core.runner.device).wait_event(ready)
        request = incoming.request
        request.num_computed_tokens = request.num_prompt_tokens
        request.output_token_ids.append(info.first_token_id)
        skip_first_draw(request, self.core.model_config.vocab_size, self.core.runner.device)
        if info.first_logprobs is not None and request.params.logprobs is not None:
            request.output_logprobs.append(info.first_logprobs)
        self.core.block_manager.cache_full_blocks(request.block_table, request.prompt_token_ids, request.num_prompt_tokens)
        if request.check_stop(self.core.max_model_len):
            self._free(request.block_table)
            request.block_table = []
            finished = RequestDelta(
                request.request_id, [], finish_reason=request.finish_reason, stop_reason=request.stop_reason,
                num_output_tokens=len(request.output_token_ids),
            )
            self.loop.publish(request.request_id, finished, is_last=True)
        else:
            self.scheduler.add_running(request)

    def _poll_receiver(self) -> None:
        ended, released = self.receiver.poll()
        for blocks in released:
            self._free(blocks)
        for item in ended:
            self._end_handoff(item)

    def _end_handoff(self, ended: Ended) -> None:
        incoming = self._by_transfer.pop(ended.transfer_id, None)
        if incoming is None:
            return
        del self._incoming[incoming.request.request_id]
        if ended.is_free:
            self._free(incoming.request.block_table)
        incoming.request.block_table = []
        incoming.request.phase = RequestPhase.DONE
        message = f"the KV of transfer {ended.transfer_id} did not arrive: {ended.reason}"
        if ended.reason == "expired":
            message = f"the KV of transfer {ended.transfer_id} did not arrive within its {incoming.lease_s:g} s lease"
        self.loop.publish(incoming.request.request_id, RequestDelta(incoming.request.request_id, [], finish_reason="error", error=message), is_last=True)

    def _abort(self, request_id: str, finish_reason: str = "abort", error: str | None = None) -> bool:
        """Drops the request wherever it is, freeing its blocks, and ends its stream; False if it
        is not here."""
        found = self._drop(request_id)
        self.loop.publish(request_id, RequestDelta(request_id, [], finish_reason=finish_reason, error=error), is_last=True)
        return found

    def _drop(self, request_id: str) -> bool:
        incoming = self._incoming.pop(request_id, None)
        if incoming is None:
            return self.scheduler.abort(request_id) is not None
        request = incoming.request
        if request.phase is RequestPhase.HANDING_OFF:
            del self._by_transfer[incoming.transfer_id]
            if self.receiver.cancel(incoming.transfer_id):  # else a device writer may still write: held, freed by a poll
                self._free(request.block_table)
            request.block_table = []
        request.phase = RequestPhase.DONE
        return True

    def _free(self, block_ids: list[int]) -> None:
        self.core.block_manager.free(block_ids)

    def _fail_all(self, exc: BaseException) -> None:
        for request_id in self.loop.stream_ids:
            self._abort(request_id, "error", f"decode step failed: {type(exc).__name__}: {exc}")
        self.is_broken = not self.core.is_device_healthy()

    def status(self) -> dict[str, int]:
        blocks = self.core.block_manager
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting) + len(self._incoming),
            "num_total_blocks": blocks.num_blocks,
            "num_used_blocks": blocks.num_used_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
            "kv_bytes_received": self.receiver.bytes_received,
        }
