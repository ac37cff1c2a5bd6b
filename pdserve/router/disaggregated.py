"""`DisaggregatedBackend`: one request's life across the workers. The decode worker reserves blocks
for the prompt; the prefill worker computes the prompt, pushes its KV into those blocks and returns
the first token; the decode worker streams the rest. Leaving early cancels both calls, which
aborts the request on both workers and frees its KV.

Until the first token, a failed hand-off (a worker killed, frozen, or past the prefill deadline)
is tried once more with a fresh transfer on other workers. After it, a lost decode worker ends the
request with an error (an error event and `[DONE]` for a stream). It is not resumed elsewhere: the
client already has tokens drawn from that worker's sampler state, which a re-prefill on another
worker cannot continue (a seeded request would silently change its own continuation), and a
resumed request re-pays its whole prefill on a pool that just lost capacity; the client, which
knows what it has, decides whether to retry.

The prefill worker, picked once the decode worker has reserved room for the prompt (prompts waiting
for decode room sit in no prefill worker's queue), is the one that would finish the prompt first by
the gateway's estimate: the fewest prompt tokens to compute, its own (the prompt less the prefix
`PrefixIndex` thinks it holds cached) plus those queued there (this gateway's now, plus the other
gateways' share of the worker's last report); so a repeated prefix returns to the worker that
holds it until that worker's queue outweighs recomputing the prefix elsewhere (ties: the one whose KV
of the prefix the decode worker holds).

The decode worker is the least-loaded (requests this gateway has in flight there, then KV in use),
unless one with at most DECODE_SLACK more in flight (a quarter of the least-loaded one's, at least
one) holds more of the prompt's leading blocks, received earlier from a prefill worker the prefill
pick would now choose: then the one that holds the most. A decode worker keeps the KV it received
in a chain of its sender's, so when that sender is picked the prompt is shipped only its rest and
shares the prefix's blocks in the decode batch (Dynamo's KV-aware routing; SGLang's cache-aware
router with its load-balance threshold). A hand-off that succeeded is recorded as the decode
worker now holding the prompt from its sender."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import grpc

from pdserve.engine.iteration_stats import IterationTokens
from pdserve.engine.outputs import RequestDelta
from pdserve.engine.sampling_params import InvalidRequestError, SamplingParams
from pdserve.engine.tokenizer import Tokenizer
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto.convert import params_to_proto
from pdserve.proto.deadlines import Deadlines
from pdserve.proto.failures import Failure
from pdserve.router.backend import BackendFailure, BackendStats, BackendUnavailableError
from pdserve.router.handoff import Handoff, HandoffFailure, is_cancelling
from pdserve.router.health_watch import HealthWatch, WorkerLostError
from pdserve.router.prefix_index import PrefixIndex, PromptBlocks, holder_of, index_key, pair_key
from pdserve.router.prefix_share import RedisPrefixShare
from pdserve.router.workers import WorkerHandle, WorkerPool

logger = logging.getLogger(__name__)
PREFIX_HASH_PURPOSE = "prefix-index"  # the cluster secret's key for the prefix hashes: the same in every gateway
NUM_ATTEMPTS = 2  # a hand-off that fails before the first token is tried once more
DECODE_SLACK = 0.25  # a decode worker holding the prompt's prefix may have this share more in flight (at least 1)

OnKVTransfer = Callable[[int, float, str, int], None]


class DisaggregatedBackend:
    def __init__(
        self,
        pool: WorkerPool,
        tokenizer: Tokenizer,
        model_name: str,
        max_model_len: int,
        on_kv_transfer: OnKVTransfer | None = None,
        deadlines: Deadlines | None = None,
        prefix_share_url: str | None = None,
        vocab_size: int | None = None,
    ) -> None:
        """`on_kv_transfer(num_bytes, seconds, transport, kept_blocks)` is told about every
        prefill-to-decode hand-off (`kept_blocks`: the prompt's blocks the decode worker already held). `prefix_share_url`: the Redis through which the cluster's gateways share where they
        sent which prefixes (`RedisPrefixShare`); None: this gateway's own routing only.
        `vocab_size`: the model's (its logits' width); None: the tokenizer's."""
        self.pool = pool
        self.tokenizer = tokenizer
        self.model_name = model_name
        self._max_model_len = max_model_len
        self.vocab_size = tokenizer.vocab_size if vocab_size is None else vocab_size
        self.on_kv_transfer = on_kv_transfer
        self.deadlines = deadlines or Deadlines()
        self.watch = HealthWatch(pool)
        self.prefixes = PrefixIndex()
        self.hash_key = pool.secret.key(PREFIX_HASH_PURPOSE)
        self.prefix_share: RedisPrefixShare | None = None
        if prefix_share_url is not None:
            self.prefix_share = RedisPrefixShare(prefix_share_url, pool.secret, self.prefixes, self._num_blocks_of)
            self.prefix_share.start()

    @property
    def max_model_len(self) -> int:
        """The shortest context length of the routable workers as they last reported it (a pool
        whose workers were restarted with another `--max-model-len` is followed); while none
        reports, the last one known (at the start, the one given: the model's, an upper bound)."""
        lengths = [s.max_model_len for s in self._routable_statuses()]
        self._max_model_len = min((n for n in lengths if n > 0), default=self._max_model_len)
        return self._max_model_len

    @property
    def max_logprobs(self) -> int | None:
        """The smallest --max-logprobs of the routable workers (each refuses more than its own);
        None while none has reported one."""
        return min((s.max_logprobs for s in self._routable_statuses() if s.HasField("max_logprobs")), default=None)

    def _routable_statuses(self) -> list[pb.WorkerStatus]:
        """The last reported status of each routable worker that has reported one."""
        return [w.status for w in self.pool.workers.values() if w.is_routable and w.status is not None]

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncGenerator[RequestDelta, None]:
        try:
            request = pb.GenerateRequest(request_id=request_id, prompt_token_ids=prompt_token_ids, params=params_to_proto(params))
        except ValueError as exc:  # a value the int32 wire fields cannot hold
            raise InvalidRequestError(f"a token id or sampling value is out of range: {exc}") from exc
        handoff, firsts = await self._first_tokens(request)
        try:
            for first in firsts:
                yield first
            async for delta in self._decode_stream(handoff, request_id, params.n):
                yield delta
        finally:
            handoff.close()

    async def _first_tokens(self, request: pb.GenerateRequest) -> tuple[Handoff, list[RequestDelta]]:
        """The hand-off that produced the first token of every sequence, and those tokens. A failed attempt is closed
        (its reservation cancelled, its prefill aborted) before the next one, with a fresh transfer,
        starts on other workers where the pool has them."""
        used: set[str] = set()
        uses_cache = not request.params.HasField("prompt_logprobs")
        blocks = PromptBlocks(request.prompt_token_ids, request.params.cache_salt or None, self.hash_key)
        self.prefixes.retain(index_key(w) for w in self.pool.workers.values())
        for attempt in range(NUM_ATTEMPTS):
            if not self.pool.healthy("prefill"):  # picked after the reservation: refuse now, not after it
                raise BackendUnavailableError("no healthy prefill worker is available")
            decode = self._pick_decode(blocks, uses_cache, used)
            pick_prefill = functools.partial(self._pick_prefill, blocks, uses_cache, decode, used)
            handoff = Handoff(request, decode, pick_prefill, self.deadlines, self.watch, attempt)  # picks once decode has room
            try:
                firsts = await handoff.first_tokens()
            except HandoffFailure as failure:
                used |= {decode.record.worker_id} | ({handoff.prefill.record.worker_id} if handoff.prefill else set())
                handoff.close()
                if attempt + 1 == NUM_ATTEMPTS or not failure.is_retryable:
                    raise failure.as_error() from None
                logger.warning("request %s: %s; trying once more", request.request_id, failure)
                continue
            except BaseException:
                handoff.close()
                raise
            if handoff.prefill is not None:  # its KV is committed there: the decode worker holds the prompt from it
                self._record(pair_key(decode, handoff.prefill), blocks.full(decode), decode)
            if self.on_kv_transfer is not None:
                self.on_kv_transfer(*handoff.kv_transfer)
            return handoff, firsts
        raise AssertionError("unreachable")

    def _pick_decode(self, blocks: PromptBlocks, uses_cache: bool, used: set[str]) -> WorkerHandle:
        """The healthy decode worker holding the most of the prompt's leading blocks from the prefill
        workers the prefill pick would now choose, among those with at most DECODE_SLACK more
        requests in flight than the least-loaded (ties, and no holder: the least-loaded); preferring
        those a failed attempt did not use."""
        candidates = self._candidates("decode", used)
        least = min(candidates, key=lambda w: w.load)
        slack = max(1, math.ceil(DECODE_SLACK * least.num_in_flight))
        near = [w for w in candidates if w.num_in_flight <= least.num_in_flight + slack]
        if len(near) == 1:
            return near[0]
        costs = self._prefill_costs(blocks, uses_cache, used)
        cheapest = min(cost for cost, _, _ in costs)
        senders = [index_key(p) for cost, _, p in costs if cost == cheapest]
        held = {id(d): self.prefixes.num_cached_from(index_key(d), senders, blocks.findable(d)) for d in near}
        return min(near, key=lambda w: (-held[id(w)], w.load))

    def _held(self, decode: WorkerHandle, prefill: WorkerHandle, blocks: PromptBlocks) -> int:
        """The prompt's leading blocks the decode worker is thought to hold from this prefill worker
        (and would keep: all but the last token's)."""
        findable = blocks.findable(decode)
        return self.prefixes.num_cached(pair_key(decode, prefill), findable) if findable else 0

    def _candidates(self, role: str, used: set[str]) -> list[WorkerHandle]:
        """The healthy workers of `role` a failed attempt did not use, else the pool's pick."""
        return [w for w in self.pool.healthy(role) if w.record.worker_id not in used] or [self.pool.pick(role)]

    def _prefill_costs(self, blocks: PromptBlocks, uses_cache: bool, used: set[str]) -> list[tuple[int, int, WorkerHandle]]:
        """For each candidate prefill worker: the prompt tokens it has to compute, this prompt's
        included (its queue plus the prompt less the prefix it is thought to hold), this prompt's
        alone, and the worker. `uses_cache`: False for a prompt computed whole (prompt logprobs)."""
        num_tokens = len(blocks.token_ids)

        def new_tokens(worker: WorkerHandle) -> int:
            findable = blocks.findable(worker)
            if not uses_cache or not findable:
                return num_tokens
            return num_tokens - worker.status.block_size * self.prefixes.num_cached(index_key(worker), findable)

        def queued(worker: WorkerHandle) -> int:
            """Its prompt tokens still to compute: this gateway's now, plus the other gateways' as it
            last said (its report less this gateway's share then: not ours again once they are done)."""
            reported = worker.status.num_queued_prompt_tokens if worker.status is not None else 0
            return worker.num_prefill_tokens + max(0, reported - worker.num_prefill_tokens_at_status)

        costs = []
        for worker in self._candidates("prefill", used):
            num_new = new_tokens(worker)
            costs.append((queued(worker) + num_new, num_new, worker))
        return costs

    def _pick_prefill(
        self, blocks: PromptBlocks, uses_cache: bool, decode: WorkerHandle, used: set[str]
    ) -> tuple[WorkerHandle, int]:
        """The healthy prefill worker with the fewest prompt tokens to compute, this prompt's
        included (ties: the one whose KV of the prompt `decode` holds most of, then the
        least-loaded), preferring those a failed attempt did not use; recorded as now holding the
        prompt's blocks. Returns it and the tokens it is expected to compute."""
        _, num_new, best = min(
            self._prefill_costs(blocks, uses_cache, used), key=lambda c: (c[0], -self._held(decode, c[2], blocks), c[2].load)
        )
        self._record(index_key(best), blocks.full(best), best)
        return best, num_new

    def _record(self, key: str, hashes: list[int], holder: WorkerHandle) -> None:
        """`holder` (the worker whose cache `key` describes) was sent a prompt with these blocks."""
        if hashes and holder.status is not None:
            self.prefixes.record(key, hashes, holder.status.num_total_blocks)
            if self.prefix_share is not None:
                self.prefix_share.publish(key, hashes)

    def _num_blocks_of(self, key: str) -> int | None:
        """The KV blocks of the pool's worker whose cache this index key (a worker's or a pair's)
        describes; None if it has none (or left)."""
        worker = next((w for w in self.pool.workers.values() if index_key(w) == holder_of(key)), None)
        return worker.status.num_total_blocks if worker is not None and worker.status is not None else None

    async def _decode_stream(self, handoff: Handoff, request_id: str, num_sequences: int) -> AsyncIterator[RequestDelta]:
        """The tokens after the first, each tagged with its sequence; ends once all n finished. A lost decode worker (killed, or frozen: unhealthy within a
        poll, when the watch cancels the stream) raises BackendFailure; the gateway's stall
        deadline backs this up."""
        decode, lost, num_finished = handoff.decode, [], 0
        forget = self.watch.watch([decode], lambda: (lost.append(decode), handoff.stream.cancel()))
        try:
            while True:
                try:
                    message = await handoff.stream.read()
                except grpc.aio.AioRpcError as exc:
                    raise handoff.failure(exc, decode).as_error() from None
                except asyncio.CancelledError:
                    if is_cancelling():
                        raise
                    if lost:
                        raise BackendFailure(
                            Failure.UNAVAILABLE, f"{WorkerLostError(decode)} in the middle of the generation"
                        ) from None
                    raise handoff.left_pool(decode).as_error() from None
                if message is grpc.aio.EOF:
                    raise BackendFailure(
                        Failure.INTERNAL, f"decode worker {decode.record.worker_id} ended the stream without finishing"
                    )
                delta = handoff.delta_of(message, request_id)
                if delta is not None:
                    yield delta
                    num_finished += delta.finish_reason is not None
                    if num_finished == num_sequences:
                        return
        finally:
            forget()

    async def stats(self) -> BackendStats:
        """Requests across all workers; KV usage is used / total blocks over all decode workers."""
        statuses = [w.status for w in self.pool.workers.values() if w.status is not None and w.is_healthy]
        decodes = [s for s in statuses if s.role == "decode"]
        total = sum(s.num_total_blocks for s in decodes)
        used = sum(s.num_used_blocks for s in decodes)
        iterations = IterationTokens()
        for status in statuses:
            iterations.add(IterationTokens(list(status.iteration_token_counts), status.iteration_tokens, status.num_iterations))
        return BackendStats(
            num_running=sum(s.num_running for s in decodes),
            num_waiting=sum(s.num_waiting for s in statuses),
            kv_cache_usage=used / total if total else 0.0,
            num_preemptions=sum(s.num_preemptions for s in decodes),
            num_total_blocks=total,
            block_size=decodes[0].block_size if decodes else 0,
            iteration_tokens=iterations,
        )

    async def is_healthy(self) -> bool:
        return bool(self.pool.healthy("prefill") and self.pool.healthy("decode"))

    async def close(self) -> None:
        if self.prefix_share is not None:
            await self.prefix_share.close()
        await self.watch.close()
        await self.pool.close()
