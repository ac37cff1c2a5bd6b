"""`DecodeWorker`: reserves KV blocks for incoming prompts (with a lease), admits a request into the
continuous batch once a prefill worker has committed its KV and first token, and streams the
tokens after the first. Preempted requests are recomputed here. All state is owned by the loop
thread; the KV itself arrives through the `KVReceiver`, never blocking a step. What arrives is
vetted: a commit must fit its request, and each caller gets its share of the reservations.

Prefix caching: received KV and the blocks computed on top of it are cached under a chain of
their sender's (`Request.kv_source`). When a sender begins a transfer whose prompt starts with
blocks it sent before, the reservation keeps those and the sender ships only the rest; KV cannot
be checked against its tokens, so one sender's KV never serves a prompt another sender hands off."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass

import torch

from pdserve.decode_worker.admission import DecodeLimits, ReservedShares, check_commit, first_tokens
from pdserve.engine.async_engine import publish_deltas
from pdserve.engine.core import EngineCore
from pdserve.engine.engine_loop import EngineLoop
from pdserve.engine.iteration_stats import IterationTokens
from pdserve.engine.outputs import RequestDelta, TokenLogprobs
from pdserve.engine.request import Request, RequestPhase, scoped_salt
from pdserve.engine.sampler import skip_first_draw
from pdserve.engine.sampling_params import InvalidRequestError, SamplingParams
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.step_pipeline import StepPipeline
from pdserve.engine.waiting_queue import serving_key
from pdserve.kvtransfer.receiver import Ended, KVCommitInfo, KVReceiver


@dataclass(frozen=True)
class Reserved:
    """First event of a stream: the blocks reserved for the prompt's KV (its sender's Begin may
    keep cached blocks in place of the first ones: `KVReceiver.keep_present`)."""

    block_ids: list[int]


@dataclass(eq=False)
class _Incoming:
    """A request not yet decoding: queued for blocks, then handing off (waiting for its KV)."""

    request: Request
    transfer_id: str
    lease_s: float
    caller: str  # who asked for it (the gateway that signed the call)
    sender_id: str | None = None  # the prefill worker that began the transfer


class DecodeWorker:
    def __init__(self, core: EngineCore, worker_id: str, limits: DecodeLimits | None = None) -> None:
        self.core = core
        self.worker_id = worker_id
        self.limits = limits or DecodeLimits()
        config = core.config
        self.scheduler = Scheduler(
            core.block_manager, config.max_num_seqs, config.max_num_batched_tokens, core.max_model_len, config.scheduling_policy
        )
        self.pipeline = StepPipeline(self.scheduler, core.runner, config.async_scheduling)
        self.receiver = KVReceiver(core.runner.kv_cache, core.model_id, worker_id, core.runner.kv_scales)
        self._incoming: dict[str, _Incoming] = {}  # by request_id, in arrival order
        self._by_transfer: dict[str, _Incoming] = {}  # those handing off, by transfer_id
        self.is_broken = False
        self.iteration_tokens = IterationTokens()
        self.is_draining = False  # set by its host when it leaves the pool: the gateways stop routing to it
        self.loop = EngineLoop(self._step, self._fail_all, name="decode-engine")
        self.loop.start()

    def shutdown(self) -> None:
        self.loop.stop()

    def generate(
        self,
        request_id: str,
        transfer_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        lease_s: float,
        caller: str = "",
    ) -> AsyncIterator[Reserved | RequestDelta]:
        """`Reserved`, then deltas of the tokens after the first; the last delta has finish_reason.
        Leaving early aborts the request and frees its blocks. Raises InvalidRequestError, or
        DecodeQueueFullError when `caller` (or everyone) has too many requests waiting here."""
        self.limits.check_lease(lease_s)

        def add() -> None:
            is_taken = transfer_id in self._by_transfer or any(i.transfer_id == transfer_id for i in self._incoming.values())
            if is_taken or self.receiver.is_held(transfer_id):  # held: its cancelled writer may still write
                raise InvalidRequestError(f"transfer {transfer_id} is already pending here", "transfer_id")
            request = self.core.new_request(request_id, prompt_token_ids, params)
            self.limits.check_pending([i.caller for i in self._incoming.values()], caller)
            self._incoming[request_id] = _Incoming(request, transfer_id, lease_s, caller)

        return self._stream(request_id, params, add)

    async def _stream(
        self, request_id: str, params: SamplingParams, add: Callable[[], None]
    ) -> AsyncIterator[Reserved | RequestDelta]:
        await self.core.compile_grammar(params)  # off the engine thread
        events: AsyncGenerator[Reserved | RequestDelta, None] = self.loop.stream(request_id, add, lambda: self._drop(request_id))
        async with aclosing(events):
            async for event in events:
                yield event

    async def on_begin(self, transfer_id: str, sender_id: str, may_keep: bool = True) -> None:
        """`sender_id` took the reservation of `transfer_id` (KVTransferServicer, before it learns
        the blocks): the request's KV comes from it, and the prompt's first blocks it sent before,
        if still cached and `may_keep`, are kept (only the rest is sent). The loop thread is waited
        for only when a quick look (a hint, read off the loop thread) finds the first block cached."""
        incoming = self._by_transfer.get(transfer_id)
        if incoming is None:
            return
        request, blocks = incoming.request, self.core.block_manager
        salt = scoped_salt(request.params.cache_salt, sender_id)
        keep = (
            may_keep
            and request.num_prompt_tokens > blocks.block_size
            and blocks.match_prefix(request.prompt_token_ids[: blocks.block_size], salt) > 0
        )
        begun = self.loop.call(lambda: self._begun(incoming, sender_id, keep))  # before the commit's `_admit`: calls run in order
        if keep:  # the sender learns its blocks once the kept ones are in place
            await asyncio.wrap_future(begun)

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
        result = self.pipeline.step()
        if result is None:
            return False
        if result.num_tokens:
            self.iteration_tokens.observe(result.num_tokens)
        publish_deltas(self.loop, result.updated)
        self._copy_forked_blocks()
        return True

    def _reserve_queued(self) -> None:
        """FCFS (or by priority) among the callers within their share: blocks for whole prompts
        while they last and the batch has room."""
        max_num_seqs, blocks = self.core.config.max_num_seqs, self.core.block_manager
        shares = ReservedShares(
            self.limits,
            max_num_seqs,
            blocks.num_blocks,
            [(i.caller, len(i.request.block_table)) for i in self._by_transfer.values()],
        )
        queued = list(self._incoming.values())
        if self.scheduler.waiting.by_priority:
            queued.sort(key=lambda incoming: serving_key(incoming.request))
        for incoming in queued:
            if len(self.scheduler.running) + len(self._by_transfer) >= max_num_seqs:
                return
            request = incoming.request
            num_blocks = blocks.num_blocks_for(request.num_prompt_tokens)
            if request.phase is not RequestPhase.QUEUED or not shares.allows(incoming.caller, num_blocks):
                continue
            block_ids = blocks.reserve(request.num_prompt_tokens)
            if block_ids is None:
                return
            shares.add(incoming.caller, num_blocks)
            self._expect(incoming, block_ids)

    def _expect(self, incoming: _Incoming, block_ids: list[int]) -> None:
        request = incoming.request
        request.block_table = block_ids
        for sequence in request.family:  # a chain no one else can name, until its sender is known (`_begun`)
            sequence.kv_source = f"unbegun {secrets.token_hex(16)}"
        request.phase = RequestPhase.HANDING_OFF
        self._by_transfer[incoming.transfer_id] = incoming
        self.receiver.expect(
            incoming.transfer_id,
            block_ids,
            time.monotonic() + incoming.lease_s,
            on_commit=lambda info, ready, i=incoming: self.loop.call(lambda: self._admit(i, info, ready)),
            check_commit=lambda info: check_commit(
                info,
                request.num_prompt_tokens,
                len(request.family),
                request.params.logprobs or 0,
                self.core.model_config.vocab_size,
            ),
        )
        self.loop.publish(request.request_id, Reserved(list(block_ids)))

    def _begun(self, incoming: _Incoming, sender_id: str, keep_cached: bool) -> None:
        """Loop thread: the request's KV source is `sender_id`; with `keep_cached`, the prompt's
        cached blocks of its chain replace the reservation's first ones."""
        if self._by_transfer.get(incoming.transfer_id) is not incoming or incoming.sender_id is not None:
            return  # ended meanwhile, or begun before (a sender may begin again)
        incoming.sender_id = sender_id
        request, blocks = incoming.request, self.core.block_manager
        for sequence in request.family:
            sequence.kv_source = sender_id
        if not keep_cached:
            return
        cached = blocks.cached_blocks(request.prompt_token_ids[:-1], request.cache_salt)  # one block is sent, at least
        if not cached:
            return
        try:  # before the blocks change
            self.receiver.keep_present(incoming.transfer_id, sender_id, cached)
        except (KeyError, ValueError):  # ended, or its sender was told every block meanwhile: keep none
            return
        blocks.adopt(request.block_table, cached)

    def _admit(self, incoming: _Incoming, info: KVCommitInfo, ready: torch.cuda.Event | None) -> None:
        if self._by_transfer.get(incoming.transfer_id) is not incoming:
            return  # aborted or expired meanwhile; its blocks are already taken care of
        del self._by_transfer[incoming.transfer_id]
        del self._incoming[incoming.request.request_id]
        if ready is not None:  # steps from now on read this KV: they wait for its writes, on the device
            torch.cuda.current_stream(self.core.runner.device).wait_event(ready)
        request = incoming.request
        request.num_computed_tokens = request.num_prompt_tokens
        if incoming.sender_id is not None:  # cached under its sender's chain, for that sender's next prompts
            self.core.block_manager.cache_full_blocks(
                request.block_table, request.prompt_token_ids, request.num_prompt_tokens, request.cache_salt
            )
        firsts = first_tokens(info)  # one per sequence: check_commit saw to it
        for sibling in request.siblings:  # n > 1: each takes a share of the prompt's blocks
            self._fork(request, sibling)
        for sequence, (token, logprobs) in zip(request.family, firsts):
            self._start(sequence, token, logprobs)
        self._copy_forked_blocks()

    def _fork(self, parent: Request, sibling: Request) -> None:
        fork = self.core.block_manager.fork(parent.block_table, parent.num_prompt_tokens)
        if fork is None:  # no block for its partial copy: it recomputes the prompt when blocks free up
            sibling.phase = RequestPhase.QUEUED
            return
        sibling.block_table = fork.block_table
        sibling.num_computed_tokens = parent.num_prompt_tokens
        self.scheduler.pending_copies += fork.copies

    def _start(self, request: Request, token: int, logprobs: TokenLogprobs | None) -> None:
        """A sequence's first token (sampled by the prefill worker): stream it ends it, or decode on."""
        request.output_token_ids.append(token)
        if request.grammar is not None:  # the prefill worker sampled it under the same grammar
            request.grammar.accept(token)
        skip_first_draw(request, self.core.model_config.vocab_size, self.core.runner.device)
        if logprobs is not None and request.params.logprobs is not None:
            request.output_logprobs.append(logprobs)
        if request.check_stop(self.core.max_model_len):
            if request.block_table:
                self._free(request.block_table)
            request.block_table = []
            root = request.parent or request
            finished = RequestDelta(
                root.request_id,
                [],
                finish_reason=request.finish_reason,
                stop_reason=request.stop_reason,
                num_output_tokens=len(request.output_token_ids),
                index=request.index,
            )
            self.loop.publish(root.request_id, finished, is_last=all(s.is_finished for s in root.family))
        elif request.block_table:
            self.scheduler.add_running(request)
        else:
            self.scheduler.add(request)  # recomputed from its prompt and first token

    def _copy_forked_blocks(self) -> None:
        if self.scheduler.pending_copies:
            self.core.runner.copy_blocks(self.scheduler.pending_copies)
            self.scheduler.pending_copies = []

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
        self.loop.publish(
            incoming.request.request_id,
            RequestDelta(incoming.request.request_id, [], finish_reason="error", error=message),
            is_last=True,
        )

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
        self.pipeline.reset()
        for request_id in self.loop.stream_ids:
            self._abort(request_id, "error", f"decode step failed: {type(exc).__name__}: {exc}")
        self.is_broken = not self.core.is_device_healthy()

    def status(self) -> dict[str, int | list[int]]:
        blocks = self.core.block_manager
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting) + len(self._incoming),
            "num_total_blocks": blocks.num_blocks,
            "num_used_blocks": blocks.num_used_blocks,
            "iteration_token_counts": list(self.iteration_tokens.counts),
            "iteration_tokens": self.iteration_tokens.total,
            "num_iterations": self.iteration_tokens.num_steps,
            "num_preemptions": self.scheduler.num_preemptions,
            "kv_bytes_received": self.receiver.bytes_received,
        }
