"""`PrefillWorker`: computes prompts' KV and first tokens on its `EngineLoop` and hands each prompt's
KV to the decode worker that reserved blocks for it. The hand-off starts as the prompt's last
forward pass is issued (layer group by layer group), so it hides behind the prefill; the prompt's
blocks are freed only once the decode worker has acknowledged them, or the hand-off is given up."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from pdserve.engine.core import EngineCore
from pdserve.engine.engine_loop import EngineLoop
from pdserve.engine.iteration_stats import IterationTokens
from pdserve.engine.outputs import TokenLogprobs
from pdserve.engine.request import Request, RequestPhase
from pdserve.engine.sampling_params import InvalidRequestError, SamplingParams
from pdserve.kvtransfer import AUTO, Endpoint, KVCommitInfo, KVLayout, KVPeer, KVSender, LayerProgress, OutgoingTransfer, offers
from pdserve.kvtransfer.layer_progress import LayerHook
from pdserve.kvtransfer.sender import Reservation
from pdserve.prefill_worker.scheduler import PrefillScheduler
from pdserve.proto.cluster_secret import ClusterSecret

RPC_TIMEOUT_S = 10.0  # each control call to a decode worker


@dataclass(frozen=True)
class KVTarget:
    """Where a prompt's KV goes: the decode worker that reserved blocks for it."""

    address: str  # its KVTransfer service
    worker_id: str


@dataclass(frozen=True)
class PromptStarted:
    """The step that completes the prompt is being issued: its KV can start moving."""

    block_table: list[int]


@dataclass(frozen=True)
class PrefillResult:
    first_token_id: int
    first_logprobs: TokenLogprobs | None
    num_cached_tokens: int
    kv_bytes: int
    kv_seconds: float  # hand-off time not hidden behind the prefill (first token -> ack)
    kv_transport: str
    prompt_logprobs: list[TokenLogprobs]  # of prompt tokens 1.. when asked for
    queue_seconds: float  # arrival here -> first scheduled
    prefill_seconds: float  # first scheduled -> first token
    sibling_token_ids: tuple[int, ...] = ()  # n > 1: the first tokens of sequences 1..n-1
    sibling_logprobs: tuple[TokenLogprobs, ...] = ()
    kv_present_blocks: int = 0  # the prompt's first blocks the decode worker already held: not sent


class PrefillWorker:
    def __init__(
        self,
        core: EngineCore,
        worker_id: str,
        kv_transport: str = AUTO,
        address: str = "127.0.0.1",
        layers_per_group: int = 4,
        *,
        secret: ClusterSecret,
    ) -> None:
        """`secret`: signs its calls to decode workers, which must prove they hold it too."""
        self.core = core
        self.worker_id = worker_id
        config, kv_cache = core.config, core.runner.kv_cache
        self.scheduler = PrefillScheduler(
            core.block_manager, config.max_num_batched_tokens, config.max_num_seqs, config.scheduling_policy
        )
        self.sender = KVSender(
            kv_cache,
            KVLayout.of(kv_cache, core.model_id, core.runner.kv_scales),
            worker_id,
            Endpoint.here(core.runner.device, address),
            offers(kv_transport, core.runner.device),
            layers_per_group,
            secret=secret,
        )
        self._requests: dict[str, Request] = {}  # loop thread: every request here, in any phase
        self._progress: dict[str, LayerProgress] = {}
        self.is_broken = False
        self.iteration_tokens = IterationTokens()
        self.is_draining = False  # set by its host when it leaves the pool: the gateways stop routing to it
        self.loop = EngineLoop(self._step, self._fail_all, name="prefill-engine")
        self.loop.start()

    def shutdown(self) -> None:
        self.loop.stop()

    async def prefill(
        self, request_id: str, transfer_id: str, prompt_token_ids: list[int], params: SamplingParams, target: KVTarget
    ) -> PrefillResult:
        """Raises InvalidRequestError, KVLayoutMismatchError, NoCommonTransportError or
        KVTransferError (UnprovenPeerError: the target is not one of ours); cancelling the caller aborts the request and frees its blocks."""
        await self.core.compile_grammar(params)  # off the event loop; `validate` then finds it cached
        self.core.validate(prompt_token_ids, params)
        peer = await self.sender.connect(target.address, RPC_TIMEOUT_S)
        num_blocks = -(-len(prompt_token_ids) // self.core.config.block_size)
        # Taking the reservation overlaps the prompt's queueing and compute: no round trip on the way.
        begin = asyncio.ensure_future(self.sender.begin(peer, transfer_id, num_blocks, RPC_TIMEOUT_S))
        begin.add_done_callback(_cancel_on_failure(asyncio.current_task()))  # no reservation: stop computing
        progress = LayerProgress(self.sender.bounds)
        push: asyncio.Task | None = None
        try:
            events: AsyncGenerator[Any, None] = self.loop.stream(
                request_id, lambda: self._add(request_id, prompt_token_ids, params, progress), _no_op
            )
            async with aclosing(events):
                async for event in events:
                    if isinstance(event, PromptStarted):
                        push = asyncio.create_task(self._push(peer, begin, event, progress))
                    else:
                        request = event
            if push is None:
                raise RuntimeError(f"request {request_id}: its prompt finished without starting a hand-off")
            first_token_at = time.monotonic()
            num_bytes = await push
            logprobs = request.output_logprobs[0] if request.output_logprobs else None
            siblings = request.siblings
            commit = KVCommitInfo(
                request.output_token_ids[0],
                logprobs,
                request.num_prompt_tokens,
                tuple(s.output_token_ids[0] for s in siblings),
                tuple(s.output_logprobs[0] for s in siblings if s.output_logprobs),
            )
            await self.sender.commit(peer, transfer_id, commit, RPC_TIMEOUT_S)
        except BaseException as error:
            begin.cancel()
            await asyncio.shield(asyncio.ensure_future(self._give_up(request_id, peer, transfer_id, push, error)))
            failure = _failure(begin)
            if isinstance(error, asyncio.CancelledError) and failure is not None:
                raise failure from None
            raise
        self.loop.call(lambda: self._release(request_id))
        return PrefillResult(
            commit.first_token_id,
            logprobs,
            request.num_cached_tokens,
            num_bytes,
            time.monotonic() - first_token_at,
            peer.transport,
            request.prompt_logprobs[1:],
            request.scheduled_time - request.arrival_time,
            request.first_token_time - request.scheduled_time,
            commit.sibling_token_ids,
            commit.sibling_logprobs,
            begin.result().num_present_blocks,
        )

    async def _push(self, peer: KVPeer, begin: asyncio.Future, started: PromptStarted, progress: LayerProgress) -> int:
        reservation: Reservation = await begin
        src_block_ids = started.block_table[reservation.num_present_blocks :]  # the decode worker holds the first ones
        transfer = OutgoingTransfer(reservation.transfer_id, src_block_ids, reservation.block_ids, progress, reservation.deadline)
        return await self.sender.push(peer, transfer)

    async def _give_up(
        self, request_id: str, peer: KVPeer, transfer_id: str, push: asyncio.Task | None, error: BaseException
    ) -> None:
        """Stop the hand-off (issued device copies finish first), tell the decode worker, free the blocks."""
        if push is not None:
            push.cancel()
            await asyncio.gather(push, return_exceptions=True)
        await self.sender.abandon(peer, transfer_id, f"{type(error).__name__}: {error}")
        await self.loop.run(lambda: self._release(request_id))

    # -- loop thread ----------------------------------------------------------------------------
    def _add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, progress: LayerProgress) -> None:
        if request_id in self._requests:
            raise InvalidRequestError(f"request {request_id} is already being prefilled", "request_id")
        request = self.core.new_request(request_id, prompt_token_ids, params)
        self._requests[request_id] = request
        self._progress[request_id] = progress
        self.scheduler.add(request)

    def _release(self, request_id: str) -> None:
        """The caller is done with its request (KV acknowledged, failed or cancelled): free it."""
        request = self._requests.pop(request_id, None)
        self._progress.pop(request_id, None)
        if request is None:
            return
        if request.phase is RequestPhase.HANDING_OFF:
            self.scheduler.release(request)
        else:
            self.scheduler.abort(request_id)
        request.phase = RequestPhase.DONE

    def _step(self) -> bool:
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return False
        completing = [item.request for item in scheduled if item.is_sampled]
        for request in completing:
            self.loop.publish(request.request_id, PromptStarted(list(request.block_table)))
        hook = LayerHook([self._progress[r.request_id] for r in completing], self.core.runner.device.type == "cuda")
        try:
            output = self.core.runner.execute(scheduled, hook if completing else None)
        except BaseException as error:
            hook.fail(error)
            raise
        self.iteration_tokens.observe(sum(item.num_tokens for item in scheduled))
        for request in self.scheduler.update(scheduled, output):
            request.phase = RequestPhase.HANDING_OFF
            self.loop.publish(request.request_id, request, is_last=True)
        return True

    def _fail_all(self, exc: BaseException) -> None:
        """A failed step: every request not yet handed off fails (the callers free them)."""
        for request in list(self._requests.values()):
            if request.phase in (RequestPhase.QUEUED, RequestPhase.PREFILLING):
                self.scheduler.abort(request.request_id)  # not computed again; `_release` finds it done
                self.loop.publish(request.request_id, RuntimeError(f"prefill step failed: {exc}"))
        self.is_broken = not self.core.is_device_healthy()

    @property
    def is_healthy(self) -> bool:
        """False once the engine loop died or the device failed (e.g. a sticky CUDA error)."""
        return self.loop.is_alive and not self.is_broken

    def status(self) -> dict[str, int | list[int]]:
        blocks = self.core.block_manager
        return {
            "num_running": len(self.scheduler.running)
            + sum(r.phase is RequestPhase.HANDING_OFF for r in list(self._requests.values())),
            "num_waiting": len(self.scheduler.waiting),
            "num_total_blocks": blocks.num_blocks,
            "num_used_blocks": blocks.num_used_blocks,
            "iteration_token_counts": list(self.iteration_tokens.counts),
            "iteration_tokens": self.iteration_tokens.total,
            "num_iterations": self.iteration_tokens.num_steps,
            "kv_bytes_sent": self.sender.bytes_sent,
            "num_queued_prompt_tokens": self.scheduler.num_queued_tokens,
        }


def _failure(future: asyncio.Future) -> BaseException | None:
    return None if not future.done() or future.cancelled() else future.exception()


def _cancel_on_failure(task: asyncio.Task) -> Callable[[asyncio.Task], None]:
    def callback(future: asyncio.Future) -> None:
        if _failure(future) is not None:
            task.cancel()

    return callback


def _no_op() -> None:
    """Leaving the stream early frees nothing by itself: `_give_up` does, once the hand-off stopped."""
