"""What both generation endpoints share: model, context-length and prompt-size checks, tokenizing
off the event loop, one request's run on the backend as text deltas (stop strings, admission,
deadlines, drain, metrics), and the SSE response that aborts the request on the workers as soon
as the client goes away."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from pdserve.engine.detokenizer import IncrementalDetokenizer
from pdserve.engine.sampling_params import InvalidRequestError, SamplingParams, check_logprobs
from pdserve.engine.tokenizer import Tokenizer
from pdserve.proto.deadlines import Deadlines
from pdserve.proto.failures import TABLE, Failure
from pdserve.router.admission import Admission, Ticket
from pdserve.router.backend import Backend, BackendFailure
from pdserve.router.drain import Drain
from pdserve.router.errors import APIError, as_api_error
from pdserve.router.limits import LastTokens, last_tokens, max_prompt_chars
from pdserve.router.metrics import Metrics, SequenceGroup

if TYPE_CHECKING:
    from pdserve.engine.outputs import RequestDelta, TokenLogprobs

Chunks = Callable[["TextDelta"], list[dict]]
NUM_TOKENIZER_THREADS = 4


@dataclass
class TextDelta:
    """New output of one request. Every delta but the last has text: tokens whose text is held
    back (half a character, a possible stop string) ride along with the next delta."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    index: int = 0  # the choice it belongs to, when a request has several


class Serving:
    """The backend plus what every request needs from the server: metrics, deadlines, admission,
    the drain, and threads for tokenizing (a long prompt must not stall the event loop)."""

    def __init__(
        self,
        backend: Backend,
        metrics: Metrics,
        deadlines: Deadlines,
        admission: Admission,
        drain: Drain,
        model_aliases: tuple[str, ...] = (),
        sampling_defaults: Mapping[str, float] | None = None,
        return_tokens_as_token_ids: bool = False,
    ) -> None:
        self.backend = backend
        self.return_tokens_as_token_ids = return_tokens_as_token_ids  # GatewayConfig's: a request's default
        self.sampling_defaults: Mapping[str, float] = sampling_defaults or {}  # GatewayConfig's
        self.model_names = tuple(dict.fromkeys([backend.model_name, *model_aliases]))
        self.metrics = metrics
        self.deadlines = deadlines
        self.admission = admission
        self.drain = drain
        self._chars_a_token = max_prompt_chars(backend.tokenizer, 1)
        self._threads = ThreadPoolExecutor(NUM_TOKENIZER_THREADS, thread_name_prefix="pdserve-tokenize")

    @property
    def max_prompt_chars(self) -> int:
        """Characters beyond which a prompt cannot fit the context the workers serve now."""
        return self._chars_a_token * self.backend.max_model_len

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.model_names:
            raise APIError(404, f"The model `{model}` does not exist.", "model")

    def reply_model(self, model: str | None) -> str:
        """The name a reply carries: the one the request gave (vLLM's), else the first served name."""
        return model if model in self.model_names else self.model_names[0]

    def as_token_ids(self, requested: bool | None) -> bool:
        """Whether logprobs name tokens "token_id:N": the request's `return_tokens_as_token_ids`,
        else the server's --return-tokens-as-token-ids."""
        return self.return_tokens_as_token_ids if requested is None else requested

    def check_logprobs(self, params: SamplingParams, logprobs_param: str = "logprobs") -> None:
        """vLLM's 400 for more logprobs than the workers' --max-logprobs allows (they refuse it too;
        here it names the API's own field, `logprobs_param`: chat's `top_logprobs`); -1 asks for the
        model's whole vocabulary."""
        limit = self.backend.max_logprobs
        if limit is None:
            return
        try:
            check_logprobs(params, limit, self.backend.vocab_size)
        except InvalidRequestError as exc:
            raise APIError(400, str(exc), logprobs_param if exc.param == "logprobs" else exc.param) from None

    async def in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` on a tokenizer thread: tokenizing and templating, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._threads, fn, *args)

    async def encode(self, text: str, add_special_tokens: bool, param: str, truncate: int | None = None) -> list[int]:
        """The prompt's token ids; a prompt longer than any that could fit the context is refused
        before it is tokenized, unless `truncate` (vLLM's `truncate_prompt_tokens`) keeps only its
        last tokens (-1: as many as the context holds)."""
        if truncate is not None:
            return (await self.encode_last(text, add_special_tokens, truncate)).token_ids
        if len(text) > self.max_prompt_chars:
            limit = self.backend.max_model_len
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, your prompt has "
                f"{len(text)} characters, more than any prompt of {limit} tokens has. Please reduce the "
                "length of the input.",
                param,
            )
        return await self.in_thread(self.backend.tokenizer.encode, text, add_special_tokens)

    async def encode_last(self, text: str, add_special_tokens: bool, truncate: int) -> LastTokens:
        """The prompt's last tokens, as `truncate_prompt_tokens` asks (only its end is tokenized)."""
        keep = self.truncation(truncate)
        return await self.in_thread(last_tokens, self.backend.tokenizer, text, add_special_tokens, keep, self._chars_a_token)

    def truncation(self, truncate: int) -> int:
        """How many of a prompt's last tokens `truncate_prompt_tokens` keeps (a 400 when out of range)."""
        limit = self.backend.max_model_len
        if truncate == -1:
            return limit
        if not 1 <= truncate <= limit:
            raise APIError(
                400,
                f"truncate_prompt_tokens must be -1 or in [1, {limit}] (the context length), got {truncate}",
                "truncate_prompt_tokens",
            )
        return truncate

    def max_tokens(self, num_prompt_tokens: int, requested: int | None, prompt_param: str) -> int:
        """The completion budget: `requested`, or up to the context limit. Raises vLLM's 400 when
        the prompt plus the completion do not fit."""
        limit = self.backend.max_model_len
        if num_prompt_tokens == 0:
            raise APIError(400, "the prompt is empty", prompt_param)
        if num_prompt_tokens >= limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, your request has "
                f"{num_prompt_tokens} input tokens. Please reduce the length of the input.",
                prompt_param,
            )
        if requested is None:  # the checkpoint's max_new_tokens, when it has one, else all that fits
            return min(limit - num_prompt_tokens, int(self.sampling_defaults.get("max_tokens", limit)))
        if num_prompt_tokens + requested > limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the messages, {requested} "
                f"in the completion). Please reduce the length of the messages or completion.",
                "max_tokens",
            )
        return requested  # a value below 1 is left for SamplingParams to reject

    def generation(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Generation:
        return Generation(self, request_id, prompt_token_ids, params)

    def generations(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> list[Generation]:
        """One per sequence of the request (n of them): one backend request, its prompt computed once."""
        if params.n == 1:
            return [self.generation(request_id, prompt_token_ids, params)]
        shared = SharedStream(
            lambda: self.backend.generate(request_id, prompt_token_ids, params),
            params.n,
            lambda: self.admission.admit(len(prompt_token_ids)),
        )
        group = SequenceGroup(self.metrics, params.n)
        return [Generation(self, request_id, prompt_token_ids, params, shared.view(i), i, group) for i in range(params.n)]


class Generation:
    """One request's run on the backend, turned into text. Stop strings are enforced here: the
    detokenizer finds them and closing the backend stream aborts the request on the workers. So are
    the client-facing deadlines: the first token, the gap between two tokens, the whole request."""

    def __init__(
        self,
        serving: Serving,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        source: AsyncGenerator[RequestDelta, None] | None = None,
        index: int = 0,
        group: SequenceGroup | None = None,
    ) -> None:
        """`source`, `group`: this sequence's deltas and its request's metrics when the request has
        several (`Serving.generations`)."""
        self.request_id = request_id
        self.index = index
        self._source = source
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.num_output_tokens = 0
        self.num_cached_tokens = 0
        self.prompt_logprobs: list[TokenLogprobs | None] | None = None  # when params.prompt_logprobs is set
        self._serving = serving
        now, deadlines = asyncio.get_running_loop().time(), serving.deadlines
        self._request_deadline = now + deadlines.request_s
        self._first_token_deadline = now + deadlines.first_token_s
        self._timeout: asyncio.Timeout | None = None  # the wait for the next delta, while it runs
        self._is_expired = False  # the drain ended it
        self._tracker = serving.metrics.track_request(len(prompt_token_ids), params, group, index)
        self._has_first_delta = False
        self._detokenizer = IncrementalDetokenizer.for_request(serving.backend.tokenizer, params)
        self._held = TextDelta("")  # tokens whose text the detokenizer holds back

    @property
    def usage(self) -> dict:
        num_prompt = len(self.prompt_token_ids)
        usage: dict[str, Any] = {
            "prompt_tokens": num_prompt,
            "completion_tokens": self.num_output_tokens,
            "total_tokens": num_prompt + self.num_output_tokens,
        }
        usage["prompt_tokens_details"] = {"cached_tokens": self.num_cached_tokens}
        return usage

    def expire(self) -> None:
        """The drain's shutdown timeout passed: end the wait for the next delta now."""
        self._is_expired = True
        if self._timeout is not None and not self._timeout.expired():
            self._timeout.reschedule(asyncio.get_running_loop().time())

    async def deltas(self) -> AsyncGenerator[TextDelta, None]:
        """The request's text deltas, the last with its finish_reason. Closing this generator early
        (client gone) aborts the request; so does a deadline (an APIError 504) or the drain (503).
        Over the admission bounds it raises BackendFailure(OVERLOADED) before anything runs."""
        # A request's n sequences queue as one: their shared stream holds the admission ticket.
        ticket = self._serving.admission.admit(len(self.prompt_token_ids)) if self._source is None else None
        self._serving.drain.track(self)
        stream = self._source or self._serving.backend.generate(self.request_id, self.prompt_token_ids, self.params)
        finish_reason: str | None = "abort"  # unless it runs to its end: the client left, the deadline passed
        try:
            while True:
                delta = await self._next(stream)
                if delta.token_ids and ticket is not None:
                    ticket.release()  # no longer queued: it is being answered
                if delta.finish_reason == "error":
                    raise APIError(500, f"generation failed: {delta.error or 'unknown error'}")
                text_delta = self._on_delta(delta)
                if text_delta is None:
                    continue  # its text is held back
                if text_delta.finish_reason is not None:
                    await _close(stream)  # after a stop string: aborts the request on the workers
                    finish_reason = text_delta.finish_reason
                yield text_delta
                if text_delta.finish_reason is not None:
                    return
        except Exception as exc:
            finish_reason = _finish_reason_of(exc, self.num_output_tokens > 0)
            raise
        finally:
            if ticket is not None:
                ticket.release()
            self._serving.drain.untrack(self)
            await _close(stream)
            if finish_reason is not None:
                self._tracker.on_finish(finish_reason)

    async def _next(self, stream: AsyncIterator[RequestDelta]) -> RequestDelta:
        if self._is_expired:
            raise self._expired_error()
        deadline, limit = self._next_deadline()
        try:
            async with asyncio.timeout_at(deadline) as self._timeout:
                return await anext(stream)
        except TimeoutError:
            if self._timeout is None or not self._timeout.expired():
                raise  # not ours
            if self._is_expired:
                raise self._expired_error() from None
            raise APIError.of(Failure.TIMEOUT, limit) from None
        except StopAsyncIteration:
            raise APIError(500, "the backend ended the request without a finish reason") from None
        finally:
            self._timeout = None

    def _next_deadline(self) -> tuple[float, str]:
        """When the wait for the next delta ends, and what the client is told then."""
        deadlines = self._serving.deadlines
        candidates = [(self._request_deadline, f"the request did not finish within {deadlines.request_s:g} s")]
        if self.num_output_tokens == 0:
            candidates.append((self._first_token_deadline, f"no first token within {deadlines.first_token_s:g} s"))
        else:
            stall_at = asyncio.get_running_loop().time() + deadlines.stall_s
            candidates.append((stall_at, f"the generation stalled: no token for {deadlines.stall_s:g} s"))
        return min(candidates)

    def _expired_error(self) -> APIError:
        return APIError.of(
            Failure.UNAVAILABLE,
            "the server is shutting down and ended this request (its shutdown timeout passed before it finished)",
        )

    def _on_delta(self, delta: RequestDelta) -> TextDelta | None:
        """The text delta to send, or None while the detokenizer holds all new text back."""
        if not self._has_first_delta:
            self._has_first_delta = True
            self._tracker.on_first_delta(delta)
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        self.num_output_tokens += len(delta.token_ids)
        self.num_cached_tokens = max(self.num_cached_tokens, delta.num_cached_tokens)  # only the first delta knows
        self._tracker.on_tokens(len(delta.token_ids))
        held = self._held
        held.token_ids += delta.token_ids
        held.logprobs += delta.logprobs
        text, is_stopped = self._detokenizer.step(delta.token_ids)
        held.text += text
        if is_stopped:
            held.finish_reason, held.stop_reason = "stop", self._detokenizer.stop_reason
        elif delta.finish_reason is not None:
            held.text += self._detokenizer.flush(delta.finish_reason)
            held.finish_reason, held.stop_reason = delta.finish_reason, delta.stop_reason
        if not held.text and held.finish_reason is None:
            return None
        self._held = TextDelta("")
        return held


def _finish_reason_of(exc: Exception, is_started: bool) -> str | None:
    """How a failed request counts in the metrics; None: refused before it ran, not counted."""
    if isinstance(exc, InvalidRequestError):
        return None
    if isinstance(exc, BackendFailure) and not is_started and TABLE[exc.failure].is_retry_later:
        return None
    return "abort" if isinstance(exc, APIError) and exc.status_code in (503, 504) else "error"


async def _close(stream: AsyncIterator[RequestDelta]) -> None:
    """Close a backend stream even while this task is being cancelled (that is when it matters)."""
    with anyio.CancelScope(shield=True):
        await stream.aclose()  # type: ignore[attr-defined]


async def collect_all(generations: list[Generation]) -> list[TextDelta]:
    """Every generation's whole output. The first failure is raised and aborts the others (a
    plain gather would let them run on for a client already answered with the error)."""
    tasks = [asyncio.create_task(collect(g.deltas())) for g in generations]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        await _cancel_and_wait(tasks)


async def _cancel_and_wait(tasks: list[asyncio.Task]) -> None:
    """Cancel `tasks` and wait until each has finished its cleanup (closed its backend stream),
    even while the caller itself is being cancelled."""
    for task in tasks:
        task.cancel()
    with anyio.CancelScope(shield=True):
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect(deltas: AsyncGenerator[TextDelta, None]) -> TextDelta:
    """A whole request's output as one delta."""
    whole = TextDelta("")
    async with aclosing(deltas):
        async for delta in deltas:
            whole.text += delta.text
            whole.token_ids += delta.token_ids
            whole.logprobs += delta.logprobs
            whole.finish_reason, whole.stop_reason = delta.finish_reason, delta.stop_reason
    return whole


class SharedStream:
    """One backend stream carrying the deltas of a request's n sequences (by `index`), read as n
    streams. The first read of any view admits the request (`admit`: its ticket, or
    BackendFailure(OVERLOADED), which every view raises and nothing runs) and starts the stream,
    which is closed (the request aborted on the workers) once every view is closed; a view ends
    with its sequence's finish. Every sequence gets the request's prompt logprobs."""

    def __init__(
        self, open_stream: Callable[[], AsyncGenerator[RequestDelta, None]], num_views: int, admit: Callable[[], Ticket]
    ) -> None:
        self._open_stream = open_stream
        self._admit = admit
        self._queues: list[asyncio.Queue[RequestDelta | BaseException]] = [asyncio.Queue() for _ in range(num_views)]
        self._num_open = num_views
        self._pump: asyncio.Task | None = None

    async def view(self, index: int) -> AsyncGenerator[RequestDelta, None]:
        if self._pump is None:
            self._pump = asyncio.create_task(self._run())
        try:
            while True:
                item = await self._queues[index].get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self._num_open -= 1
            if self._num_open == 0:
                await _cancel_and_wait([self._pump])

    async def _run(self) -> None:
        try:
            ticket = self._admit()
        except BackendFailure as exc:
            self._end(exc)
            return
        prompt_logprobs = None  # the request's: the first sequence's; the engine gives the others []
        try:
            async with aclosing(self._open_stream()) as stream:
                async for delta in stream:
                    if delta.token_ids:
                        ticket.release()  # no longer queued: it is being answered
                    if delta.prompt_logprobs:
                        prompt_logprobs = delta.prompt_logprobs
                    elif prompt_logprobs is not None:
                        delta.prompt_logprobs = prompt_logprobs
                    self._queues[delta.index].put_nowait(delta)
            self._end(APIError(500, "the backend ended the request without a finish reason"))
        except Exception as exc:  # noqa: BLE001 - every view raises it
            self._end(exc)
        finally:
            ticket.release()

    def _end(self, ended: BaseException) -> None:
        for queue in self._queues:  # views still waiting: they end with the stream
            queue.put_nowait(ended)


async def merge_deltas(streams: list[AsyncGenerator[TextDelta, None]]) -> AsyncGenerator[TextDelta, None]:
    """The deltas of several generations as they come, each tagged with its position in `streams`
    as `index`. A failure of one ends them all; closing the merge closes (aborts) every one."""
    queue: asyncio.Queue[TextDelta | BaseException | None] = asyncio.Queue()

    async def pump(index: int, stream: AsyncGenerator[TextDelta, None]) -> None:
        async with aclosing(stream):
            try:
                async for delta in stream:
                    delta.index = index
                    await queue.put(delta)
                await queue.put(None)
            except Exception as exc:  # noqa: BLE001 - handed to the consumer
                await queue.put(exc)

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        num_running = len(tasks)
        while num_running:
            item = await queue.get()
            if item is None:
                num_running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        await _cancel_and_wait(tasks)


async def start_stream(deltas: AsyncGenerator[TextDelta, None], chunks: Chunks, final: Callable[[], list[dict]]) -> Response:
    """Wait for the first delta before answering, so that a failure before any output gets its
    HTTP status (400, 503, ...) rather than an error event; then stream the rest as SSE."""
    try:
        first = await anext(deltas)
    except BaseException:
        await deltas.aclose()
        raise
    return EventStreamResponse(_events(first, deltas, chunks, final))


async def _events(
    first: TextDelta, rest: AsyncGenerator[TextDelta, None], chunks: Chunks, final: Callable[[], list[dict]]
) -> AsyncGenerator[str, None]:
    """The SSE body: the chunks of every delta, the final chunks, `[DONE]`. A failure mid-stream
    becomes an error event, as in vLLM (the status line went out with the first chunk)."""
    async with aclosing(rest):
        try:
            for chunk in chunks(first):
                yield sse(chunk)
            async for delta in rest:
                for chunk in chunks(delta):
                    yield sse(chunk)
            for chunk in final():
                yield sse(chunk)
        except Exception as exc:  # noqa: BLE001 - reported to the client in the stream
            yield sse(as_api_error(exc).body())
    yield "data: [DONE]\n\n"


def token_text(tokenizer: Tokenizer, token_id: int, as_token_id: bool = False) -> str:
    """One token's text for logprobs (special tokens included, as vLLM shows them), or
    "token_id:N" when the request asked for `return_tokens_as_token_ids`."""
    if as_token_id:
        return f"token_id:{token_id}"
    return tokenizer.decode([token_id], skip_special_tokens=False)


def vllm_prompt_logprobs(tokenizer: Tokenizer, prompt_logprobs: list[TokenLogprobs | None] | None) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: per prompt token, {token_id: {logprob, rank, decoded_token}}."""

    def entry(token_id: int, logprob: float, rank: int) -> dict:
        return {
            "logprob": json_logprob(logprob),
            "rank": rank,
            "decoded_token": tokenizer.decode([token_id], skip_special_tokens=False),
        }

    out: list[dict | None] = []
    for lp in prompt_logprobs or []:
        if lp is None:
            out.append(None)
            continue
        entries = {str(lp.token_id): entry(lp.token_id, lp.logprob, lp.rank)}
        for rank, (token_id, value) in enumerate(lp.top, start=1):
            entries.setdefault(str(token_id), entry(token_id, value, rank))
        out.append(entries)
    return out


def json_logprob(value: float) -> float:
    """JSON has no -inf or NaN; vLLM clamps to -9999.0."""
    return value if value > -9999.0 else -9999.0


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, allow_nan=False)}\n\n"


class EventStreamResponse(StreamingResponse):
    """SSE whose body generator is closed the moment the response ends. On a client disconnect
    Starlette only cancels its send loop and leaves the generator, and with it the request on the
    workers, to the garbage collector."""

    def __init__(self, events: AsyncGenerator[str, None]) -> None:
        super().__init__(events, media_type="text/event-stream")
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._events.aclose()


async def cancel_on_disconnect(request: Request, handler: Coroutine[Any, Any, Response]) -> Response:
    """Run a handler until it answers or the client hangs up. FastAPI would keep generating for a
    client that left; cancelling the handler closes its backend stream, which aborts the request."""
    handler_task = asyncio.ensure_future(handler)
    disconnect_task = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait((handler_task, disconnect_task), return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect_task.cancel()
        handler_task.cancel()  # no-op once it is done
    if not handler_task.cancelled() and handler_task.done():
        try:
            return handler_task.result()
        except Exception as exc:  # noqa: BLE001 - answered here: Starlette's 500 handler would also drop the connection
            return as_api_error(exc).response()
    await asyncio.gather(handler_task, return_exceptions=True)  # let the abort go out
    return Response(status_code=204)  # nobody is listening


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
