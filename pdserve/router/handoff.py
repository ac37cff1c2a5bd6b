"""`Handoff`: one attempt at a request's first token across a decode and a prefill worker: the
decode worker's reservation (the first message of its Generate stream), then the Prefill that
pushes the KV into it. The prefill worker is picked once the reservation is made, so prompts still
waiting for decode room count in no prefill worker's queue. Every wait is bounded by the attempt's
prefill deadline and ends early when one of the two workers is marked unhealthy. `close()` leaves
nothing behind on either worker."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import grpc

from pdserve.engine.outputs import RequestDelta
from pdserve.engine.sampling_params import InvalidRequestError
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto.convert import logprobs_from_proto
from pdserve.proto.deadlines import Deadlines
from pdserve.proto.failures import Failure, failure_of, param_of
from pdserve.router.backend import BackendFailure
from pdserve.router.health_watch import HealthWatch, WorkerLostError
from pdserve.router.workers import WorkerHandle

NO_RETRY = frozenset({Failure.INVALID_REQUEST, Failure.INCOMPATIBLE})  # another attempt would fail the same way


class HandoffFailure(Exception):
    """An attempt that failed before its first token. A worker's refusal of the client's input
    carries the worker's message and the field it names, for the client (`invalid_request`)."""

    def __init__(self, failure: Failure, message: str, invalid_request: InvalidRequestError | None = None) -> None:
        super().__init__(message)
        self.failure = failure
        self.invalid_request = invalid_request

    @property
    def is_retryable(self) -> bool:
        return self.failure not in NO_RETRY

    def as_error(self) -> InvalidRequestError | BackendFailure:
        """What the gateway raises for it: the client's 400 names the field, not the worker."""
        if self.invalid_request is not None:
            return self.invalid_request
        return BackendFailure(self.failure, str(self))


PickPrefill = Callable[[], tuple[WorkerHandle, int]]


class Handoff:
    def __init__(
        self,
        request: pb.GenerateRequest,
        decode: WorkerHandle,
        pick_prefill: PickPrefill,
        deadlines: Deadlines,
        watch: HealthWatch,
        attempt: int = 0,
    ) -> None:
        """`request`: the Generate request without its transfer id; each attempt makes up its own.
        `pick_prefill()`, called once the decode worker has reserved room: the prefill worker and the
        prompt tokens it is expected to compute (its load until the prefill ends). A retry (`attempt`
        1, ...) has an id of its own on the workers: the one before may still be ending there."""
        self.request_id = request.request_id
        self.request = pb.GenerateRequest()
        self.request.CopyFrom(request)
        self.request.transfer_id = uuid.uuid4().hex
        if attempt:
            self.request.request_id = f"{request.request_id}-retry{attempt}"
        self.request.lease_seconds = deadlines.kv_lease_s
        self.decode = decode
        self.prefill: WorkerHandle | None = None
        self.pick_prefill = pick_prefill
        self.deadlines = deadlines
        self.watch = watch
        self.stream: grpc.aio.UnaryStreamCall | None = None
        self.kv_transfer: tuple[int, float, str, int] = (0, 0.0, "", 0)  # bytes, exposed seconds, transport, kept blocks
        self._prefill_call: grpc.aio.UnaryUnaryCall | None = None
        self._is_prefill_counted, self._is_decode_counted = False, True
        self.num_prefill_tokens = 0
        decode.num_in_flight += 1

    async def first_tokens(self) -> list[RequestDelta]:
        """The first token of every sequence (their KV committed on the decode worker: one prefill,
        the n - 1 siblings share it), or HandoffFailure."""
        deadline = asyncio.get_running_loop().time() + self.deadlines.prefill_s
        try:
            self.stream = self.decode.stub.Generate(self.request, timeout=self.deadlines.request_s)
        except grpc.aio.UsageError:  # its channel closed between the pick and the call
            raise self.left_pool(self.decode) from None
        reservation = await self._reserve(deadline)
        prefill, self.num_prefill_tokens = self.pick_prefill()
        self.prefill = prefill
        prefill.num_in_flight += 1
        prefill.num_prefill_tokens += self.num_prefill_tokens
        self._is_prefill_counted = True
        response = await self._prefill(prefill, reservation, deadline)
        self._uncount_prefill()
        self.kv_transfer = (response.kv_bytes, response.kv_seconds, response.kv_transport, response.kv_present_blocks)
        request_id = self.request_id
        logprobs = [logprobs_from_proto(response.first_logprobs)] if response.HasField("first_logprobs") else []
        prompt_logprobs = None
        if self.request.params.HasField("prompt_logprobs"):
            prompt_logprobs = [None, *(logprobs_from_proto(lp) for lp in response.prompt_logprobs)]
        first = RequestDelta(
            request_id,
            [response.first_token_id],
            logprobs,
            num_prompt_tokens=len(self.request.prompt_token_ids),
            num_cached_tokens=response.num_cached_tokens,
            prompt_logprobs=prompt_logprobs,
            queue_seconds=response.queue_seconds,
            prefill_seconds=response.prefill_seconds,
        )
        sibling_logprobs = [logprobs_from_proto(lp) for lp in response.sibling_logprobs]
        siblings = [
            RequestDelta(request_id, [token], sibling_logprobs[i : i + 1], index=i + 1)
            for i, token in enumerate(response.sibling_token_ids)
        ]
        return [first, *siblings]

    async def _reserve(self, deadline: float) -> pb.Reservation:
        try:
            async with self.watch.bounded([self.decode], deadline):
                message = await self.stream.read()
        except WorkerLostError as exc:
            raise HandoffFailure(Failure.UNAVAILABLE, str(exc)) from None
        except TimeoutError:
            raise HandoffFailure(
                Failure.TIMEOUT,
                f"decode worker {_name(self.decode)} had no room for the prompt within {self.deadlines.prefill_s:g} s",
            ) from None
        except grpc.aio.AioRpcError as exc:
            raise self.failure(exc, self.decode) from None
        except asyncio.CancelledError:
            if is_cancelling():
                raise
            raise self.left_pool(self.decode) from None
        if message is grpc.aio.EOF or not message.HasField("reservation"):
            raise HandoffFailure(Failure.INTERNAL, f"decode worker {_name(self.decode)} did not reserve blocks")
        return message.reservation

    async def _prefill(self, prefill: WorkerHandle, reservation: pb.Reservation, deadline: float) -> pb.PrefillResponse:
        request = pb.PrefillRequest(
            request_id=self.request.request_id,
            transfer_id=self.request.transfer_id,
            prompt_token_ids=self.request.prompt_token_ids,
            params=self.request.params,
            target=reservation,
        )
        timeout = max(0.0, deadline - asyncio.get_running_loop().time())
        try:
            self._prefill_call = prefill.stub.Prefill(request, timeout=timeout)  # the deadline travels to the worker
        except grpc.aio.UsageError:
            raise self.left_pool(prefill) from None
        try:
            async with self.watch.bounded([prefill, self.decode], deadline):
                return await self._prefill_call
        except WorkerLostError as exc:
            raise HandoffFailure(Failure.UNAVAILABLE, str(exc)) from None
        except TimeoutError:
            raise HandoffFailure(
                Failure.TIMEOUT, f"prefill worker {_name(prefill)} gave no first token within {self.deadlines.prefill_s:g} s"
            ) from None
        except grpc.aio.AioRpcError as exc:
            raise self.failure(exc, prefill) from None
        except asyncio.CancelledError:
            if is_cancelling():
                raise
            raise self.left_pool(prefill) from None

    def failure(self, exc: grpc.aio.AioRpcError, worker: WorkerHandle) -> HandoffFailure:
        """A worker's gRPC status as a failure kind (`proto/failures.py`)."""
        failure = failure_of(exc.code())
        message = f"{worker.record.role} worker {_name(worker)}: {exc.code().name}: {exc.details()}"
        invalid = (
            InvalidRequestError(exc.details() or "invalid request", param_of(exc)) if failure is Failure.INVALID_REQUEST else None
        )
        return HandoffFailure(failure, message, invalid)

    def left_pool(self, worker: WorkerHandle) -> HandoffFailure:
        """gRPC cancelled a call of ours itself: the pool closed the channel to `worker`."""
        return HandoffFailure(Failure.UNAVAILABLE, f"{worker.record.role} worker {_name(worker)} left the pool")

    def delta_of(self, message: pb.GenerateResponse, request_id: str) -> RequestDelta | None:
        """A Generate message after the reservation as a delta (None for anything else)."""
        if message.HasField("tokens"):
            logprobs = [logprobs_from_proto(lp) for lp in message.tokens.logprobs]
            return RequestDelta(request_id, list(message.tokens.token_ids), logprobs, index=message.tokens.index)
        if message.HasField("finished"):
            f = message.finished
            stop = f.stop_token_id if f.HasField("stop_token_id") else None
            return RequestDelta(request_id, [], finish_reason=f.finish_reason, stop_reason=stop, index=f.index)
        return None

    def close(self) -> None:
        """Cancels what is still open: the Prefill (its worker aborts the prompt and abandons the
        transfer) and the Generate stream (the decode worker drops the reservation or the request,
        freeing its blocks). Idempotent; cancelling a finished call does nothing."""
        if self._prefill_call is not None:
            self._prefill_call.cancel()
        if self.stream is not None:
            self.stream.cancel()
        self._uncount_prefill()
        if self._is_decode_counted:
            self._is_decode_counted = False
            self.decode.num_in_flight -= 1

    def _uncount_prefill(self) -> None:
        if self._is_prefill_counted and self.prefill is not None:
            self._is_prefill_counted = False
            self.prefill.num_in_flight -= 1
            self.prefill.num_prefill_tokens -= self.num_prefill_tokens


def is_cancelling() -> bool:
    """In an `except CancelledError`: whether this task is being cancelled. If not, the error came
    from gRPC, which raises CancelledError for calls cancelled locally, e.g. by closing their channel."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def _name(worker: WorkerHandle) -> str:
    return f"{worker.record.worker_id} at {worker.record.address}"
