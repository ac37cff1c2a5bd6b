"""Per-method receive limits of a worker's gRPC server: control messages are small, a prompt is
bounded by the context length, a KV chunk by the KV layout. gRPC itself drops anything above the
largest limit before buffering it; a message above its own method's limit is refused with
RESOURCE_EXHAUSTED before it is parsed, and the call runs nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from pdserve.proto import MAX_MESSAGE_BYTES

CONTROL_MESSAGE_BYTES = 64 * 2**10  # status, abort, handshake, begin, commit, abandon: a few hundred bytes each
BYTES_PER_TOKEN = 5  # a token id below 2**31 as a varint
BYTES_PER_LOGPROB = BYTES_PER_TOKEN + 4  # an alternative: its token id and its float logprob (packed fields)


def prompt_message_bytes(max_model_len: int) -> int:
    """A request carrying a whole prompt (plus sampling parameters and stop token ids)."""
    return max_model_len * BYTES_PER_TOKEN + CONTROL_MESSAGE_BYTES


def commit_message_bytes(max_sequences: int, max_logprobs: int) -> int:
    """A KV commit: the first token of each of a request's sequences, each with up to `max_logprobs`
    alternatives (a worker's --max-logprobs, the vocabulary for -1)."""
    return CONTROL_MESSAGE_BYTES + max_sequences * (max_logprobs + 1) * BYTES_PER_LOGPROB


@dataclass(frozen=True)
class MessageLimits:
    per_method: Mapping[str, int] = field(default_factory=dict)  # full method name -> bytes
    default: int = CONTROL_MESSAGE_BYTES

    def __post_init__(self) -> None:
        if self.default <= 0 or any(limit <= 0 for limit in self.per_method.values()):
            raise ValueError(f"message limits must be positive: {dict(self.per_method)}, default {self.default}")

    def of(self, method: str) -> int:
        return self.per_method.get(method, self.default)

    def server_options(self) -> list[tuple[str, int]]:
        """For `grpc.aio.server(options=...)`: nothing above the largest limit is even buffered."""
        largest = max([self.default, *self.per_method.values()])
        return [("grpc.max_receive_message_length", largest), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


class _Oversized:
    """What an oversized message deserializes to: the behaviour refuses it instead of running."""

    def __init__(self, num_bytes: int, limit: int) -> None:
        self.message = f"a {num_bytes}-byte message is over this method's {limit}-byte limit"


class MessageLimitInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, limits: MessageLimits) -> None:
        self.limits = limits

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:
            return None
        limit, deserialize = self.limits.of(details.method), handler.request_deserializer

        def checked(data: bytes) -> object:
            return _Oversized(len(data), limit) if len(data) > limit else deserialize(data)

        return handler._replace(request_deserializer=checked, **_guarded(handler))


def _guarded(handler: grpc.RpcMethodHandler) -> dict[str, object]:
    """The handler's behaviour, refusing `_Oversized` requests before it runs."""
    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary_unary(request: object, context: grpc.aio.ServicerContext) -> object:
            await _refuse_if_oversized(request, context)
            return await inner(request, context)

        return {"unary_unary": unary_unary}
    if handler.unary_stream is not None:
        inner = handler.unary_stream

        async def unary_stream(request: object, context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
            await _refuse_if_oversized(request, context)
            async for response in inner(request, context):
                yield response

        return {"unary_stream": unary_stream}
    if handler.stream_unary is not None:
        inner = handler.stream_unary

        async def stream_unary(requests: AsyncIterator[object], context: grpc.aio.ServicerContext) -> object:
            return await inner(_checked_stream(requests, context), context)

        return {"stream_unary": stream_unary}
    inner = handler.stream_stream

    async def stream_stream(requests: AsyncIterator[object], context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
        async for response in inner(_checked_stream(requests, context), context):
            yield response

    return {"stream_stream": stream_stream}


async def _checked_stream(requests: AsyncIterator[object], context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
    async for request in requests:
        await _refuse_if_oversized(request, context)
        yield request


async def _refuse_if_oversized(request: object, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, _Oversized):
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, request.message)
