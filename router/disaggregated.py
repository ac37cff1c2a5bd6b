"""`DisaggregatedBackend`: one request's life across the workers. The decode worker reserves blocks
for the prompt; the prefill worker computes the prompt, pushes its KV into those blocks and returns
the first token; the decode worker streams the rest. Leaving early cancels both calls, which
aborts the request on both workers and frees its KV."""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

import grpc

from engine.iteration_stats import IterationTokens
from engine.outputs import RequestDelta
from engine.sampling_params import InvalidRequestError, SamplingParams
from engine.tokenizer import Tokenizer
from proto import pdserve_pb2 as pb
from proto.convert import logprobs_from_proto, params_to_proto
from router.backend import BackendStats, BackendUnavailableError
from router.workers import WorkerHandle, WorkerPool

# ABORTED: the decode worker dropped the reservation (its lease ran out under load) — try again later.
UNAVAILABLE_CODES = (
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
)


class BackendError(RuntimeError):
    """A worker failed the request (HTTP 500)."""


@dataclass(frozen=True)
class Deadlines:
    reservation_s: float = 60.0  # waiting for decode blocks
    prefill_s: float = 300.0  # queueing + prefill + KV push
    # Reserved blocks wait this long for their KV: longer than any prefill the gateway still awaits
    # (a failed or cancelled prefill cancels the reservation at once; the lease is the backstop).
    lease_s: float = 330.0
    request_s: float = 600.0  # the whole decode stream


class DisaggregatedBackend:
    def __init__(
        self,
        pool: WorkerPool,
        tokenizer: Tokenizer,
        model_name: str,
        max_model_len: int,
        on_kv_transfer: object | None = None,
        deadlines: Deadlines = Deadlines(),
    ) -> None:
        """`on_kv_transfer(num_bytes, seconds, transport)` is told about every prefill-to-decode hand-off."""
        self.pool = pool
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.on_kv_transfer = on_kv_transfer
        self.deadlines = deadlines

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncGenerator[RequestDelta, None]:
        transfer_id = uuid.uuid4().hex
        try:
            wire_params = params_to_proto(params)
            generate_request = pb.GenerateRequest(
                request_id=request_id, transfer_id=transfer_id, prompt_token_ids=prompt_token_ids,
                params=wire_params, lease_seconds=self.deadlines.lease_s,
            )
        except ValueError as exc:  # a value the int32 wire fields cannot hold
            raise InvalidRequestError(f"a token id or sampling value is out of range: {exc}") from exc
        decode, prefill = self.pool.pick("decode"), self.pool.pick("prefill")
        decode.num_in_flight += 1
        prefill.num_in_flight += 1
        stream = decode.stub.Generate(generate_request, timeout=self.deadlines.request_s)
        finished = False
        try:
            reservation = await self._reservation(stream, decode)
            firsts = await self._prefill(prefill, request_id, transfer_id, prompt_token_ids, wire_params, reservation)
            prefill.num_in_flight -= 1
            prefill = None
            for first in firsts:
                yield first
            async for delta in self._decode_stream(stream, request_id, decode, params.n):
                yield delta
            finished = True
        finally:
            if not finished:
                stream.cancel()
            decode.num_in_flight -= 1
            if prefill is not None:
                prefill.num_in_flight -= 1

    async def _reservation(self, stream: grpc.aio.UnaryStreamCall, decode: WorkerHandle) -> pb.Reservation:
        try:
            message = await _read(stream, self.deadlines.reservation_s)
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc, f"decode worker {decode.record.worker_id}") from exc
        except TimeoutError as exc:
            raise BackendUnavailableError(
                f"decode worker {decode.record.worker_id} had no room for the prompt within {self.deadlines.reservation_s:g} s"
            ) from exc
        if message is None or not message.HasField("reservation"):
            raise BackendError(f"decode worker {decode.record.worker_id} did not reserve blocks")
        return message.reservation

    async def _prefill(
        self, prefill: WorkerHandle, request_id: str, transfer_id: str, prompt_token_ids: list[int],
        wire_params: pb.SamplingParams, reservation: pb.Reservation,
    ) -> list[RequestDelta]:
        """The first token of every sequence (one prefill: the rest share its KV)."""
        request = pb.PrefillRequest(
            request_id=request_id, transfer_id=transfer_id, prompt_token_ids=prompt_token_ids,
            params=wire_params, target=reservation,
        )
        try:
            response = await prefill.stub.Prefill(request, timeout=self.deadlines.prefill_s)
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc, f"prefill worker {prefill.record.worker_id}") from exc
        if self.on_kv_transfer is not None:
            self.on_kv_transfer(response.kv_bytes, response.kv_seconds, response.kv_transport)
        sibling_logprobs = [logprobs_from_proto(lp) for lp in response.sibling_logprobs]
        siblings = [
            RequestDelta(request_id, [token], sibling_logprobs[i:i + 1], index=i + 1)
            for i, token in enumerate(response.sibling_token_ids)
        ]
        logprobs = [logprobs_from_proto(response.first_logprobs)] if response.HasField("first_logprobs") else []
        prompt_logprobs = None
        if wire_params.HasField("prompt_logprobs"):
            prompt_logprobs = [None, *(logprobs_from_proto(lp) for lp in response.prompt_logprobs)]
        return [RequestDelta(
            request_id, [response.first_token_id], logprobs,
            num_prompt_tokens=len(prompt_token_ids), num_cached_tokens=response.num_cached_tokens,
            prompt_logprobs=prompt_logprobs, queue_seconds=response.queue_seconds, prefill_seconds=response.prefill_seconds,
        ), *siblings]

    async def _decode_stream(
        self, stream: grpc.aio.UnaryStreamCall, request_id: str, decode: WorkerHandle, num_sequences: int
    ) -> AsyncIterator[RequestDelta]:
        """The decode worker's deltas, each tagged with its sequence; ends once all n finished."""
        num_finished = 0
        try:
            while (message := await stream.read()) is not grpc.aio.EOF:
                if message.HasField("tokens"):
                    logprobs = [logprobs_from_proto(lp) for lp in message.tokens.logprobs]
                    yield RequestDelta(request_id, list(message.tokens.token_ids), logprobs, index=message.tokens.index)
                elif message.HasField("finished"):
                    f = message.finished
                    stop = f.stop_token_id if f.HasField("stop_token_id") else None
                    yield RequestDelta(request_id, [], finish_reason=f.finish_reason, stop_reason=stop, index=f.index)
                    num_finished += 1
                    if num_finished == num_sequences:
                        return
        except grpc.aio.AioRpcError as exc:
            yield RequestDelta(request_id, [], finish_reason="error", error=f"decode worker {decode.record.worker_id}: {exc.details()}")
            return
        yield RequestDelta(request_id, [], finish_reason="error", error="the decode stream ended without finishing")

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
        await self.pool.close()


async def _read(stream: grpc.aio.UnaryStreamCall, timeout_s: float) -> pb.GenerateResponse | None:
    message = await asyncio.wait_for(stream.read(), timeout_s)
    return None if message is grpc.aio.EOF else message


def _translate(exc: grpc.aio.AioRpcError, who: str) -> Exception:
    """A worker's gRPC status as the gateway's error: 400, 503 or 500."""
    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequestError(exc.details() or "invalid request")
    if exc.code() in UNAVAILABLE_CODES:
        return BackendUnavailableError(f"{who} is unavailable: {exc.details()}")
    return BackendError(f"{who} failed: {exc.code().name}: {exc.details()}")
