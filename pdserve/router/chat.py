"""POST /v1/chat/completions: the chat template renders the messages (and tools), then one
generation, whole or streamed (a first chunk with the assistant role, then the content deltas);
a reply with tool calls comes back in `message.tool_calls` / `delta.tool_calls`."""

from __future__ import annotations

import dataclasses
import functools
import time
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

from fastapi.responses import JSONResponse, Response

from pdserve.engine.sampling_params import ALL_LOGPROBS
from pdserve.engine.tokenizer import Tokenizer
from pdserve.router.auth import cache_salt_of
from pdserve.router.errors import APIError
from pdserve.router.protocol import ChatCompletionRequest, ChatMessage
from pdserve.router.reasoning import ReasoningSplitter, reasoning_context, split, splitter_for, thinking_for
from pdserve.router.serving import (
    Generation,
    Serving,
    TextDelta,
    collect_all,
    json_logprob,
    merge_deltas,
    start_stream,
    token_text,
    vllm_prompt_logprobs,
)
from pdserve.router.tool_parsers import PARSERS, NamedStream, ParsedReply, RequiredStream, ToolCall, parse_required
from pdserve.router.tools import ToolMode, ToolOptions, forced_call_schema, tool_mode

RESERVED_TEMPLATE_KWARGS = ("messages", "add_generation_prompt", "tools", "continue_final_message", "chat_template")
Reader = tuple[Callable[[str], ParsedReply], Callable[[], Any]]  # the whole reply's parser, a stream's


def render_chat(
    tokenizer: Tokenizer,
    messages: list[ChatMessage],
    add_generation_prompt: bool,
    kwargs: dict[str, Any] | None,
    tools: list[dict[str, Any]] | None = None,
    continue_final_message: bool = False,
) -> str:
    """The prompt text of a conversation (with `continue_final_message`, ending inside its last
    message, which the reply continues); template failures are the client's (HTTP 400)."""
    kwargs = kwargs or {}
    reserved = [k for k in RESERVED_TEMPLATE_KWARGS if k in kwargs]
    if reserved:
        raise APIError(400, f"chat_template_kwargs may not set {', '.join(reserved)}", "chat_template_kwargs")
    if continue_final_message and add_generation_prompt:
        message = "cannot set both continue_final_message and add_generation_prompt to true (set add_generation_prompt false)"
        raise APIError(400, message, "continue_final_message")
    try:
        return tokenizer.apply_chat_template(
            [m.for_template() for m in messages],
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            continue_final_message=continue_final_message,
            **kwargs,
        )
    except (ValueError, TypeError) as error:
        raise APIError(400, f"cannot apply the chat template: {error}", "messages") from error


async def create_chat_completion(
    serving: Serving, request: ChatCompletionRequest, tool_options: ToolOptions = ToolOptions(), tenant: str | None = None
) -> Response:
    """`tenant`: the caller's API-key identity, which isolates its prefix cache."""
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    prepared = await prepare_chat(serving, request, tool_options, tenant, request_id)
    generations = prepared.generations
    chat = _ChatCompletion(request_id, serving.reply_model(request.model), serving.backend.tokenizer, prepared, request)
    if request.stream:
        deltas = generations[0].deltas() if len(generations) == 1 else merge_deltas([g.deltas() for g in generations])
        return await start_stream(deltas, chat.chunks, lambda: chat.final_chunks(request))
    return JSONResponse(chat.response(await collect_all(generations)))


class PreparedChat(NamedTuple):
    generations: list[Generation]  # not started: n of them, one prompt's KV
    reader: Reader | None  # how tool calls are read from a reply (None: it is all content)
    new_splitter: Callable[[], ReasoningSplitter | None]  # a reply's thinking apart from its answer (None: no thinking)


async def prepare_chat(
    serving: Serving, request: ChatCompletionRequest, tool_options: ToolOptions, tenant: str | None, request_id: str
) -> PreparedChat:
    """A chat request checked, rendered and tokenized, ready to run. Raises APIError (400, 404)
    before anything runs."""
    serving.check_model(request.model)
    request.check_supported()
    request.return_tokens_as_token_ids = serving.as_token_ids(request.return_tokens_as_token_ids)
    mode = tool_mode(request.tools, request.tool_choice, tool_options)
    tokenizer = serving.backend.tokenizer
    prompt = await serving.in_thread(
        render_chat,
        tokenizer,
        request.messages,
        request.add_generation_prompt,
        request.chat_template_kwargs,
        request.tools,
        request.continue_final_message,
    )
    prompt_token_ids = await serving.encode(prompt, request.add_special_tokens, "messages", request.truncate_prompt_tokens)
    max_tokens = serving.max_tokens(len(prompt_token_ids), request.requested_max_tokens, "messages")
    if mode is not None and mode.kind == "auto" and tool_options.tool_call_parser == "hermes":
        request.skip_special_tokens = False  # its tags may be special tokens (vLLM does the same)
    forced = None if mode is None else forced_call_schema(mode, request.tools)
    params = request.sampling_params(
        max_tokens, request.num_logprobs, tokenizer, forced, cache_salt_of(tenant, request.cache_salt), serving.sampling_defaults
    )
    serving.check_logprobs(params, "top_logprobs")
    grammar = params.structured_output
    continued = request.messages[-1].for_template().get("content") if request.continue_final_message else None
    context = reasoning_context(prompt, continued if isinstance(continued, str) else None)
    thinking = None if grammar is None else thinking_for(tool_options.reasoning_parser, context, tokenizer)
    if grammar is not None and thinking is not None:  # the grammar constrains the answer after the thinking
        params = dataclasses.replace(params, structured_output=dataclasses.replace(grammar, thinking=thinking))
    return PreparedChat(
        serving.generations(request_id, prompt_token_ids, params),
        _reply_reader(mode, tool_options),
        functools.partial(splitter_for, tool_options.reasoning_parser, context, grammar is not None and thinking is None),
    )


def _reply_reader(mode: ToolMode | None, options: ToolOptions) -> Reader | None:
    """How tool calls are read from the reply; None: it is all content."""
    if mode is None or mode.kind == "none":
        return None
    if mode.kind == "auto":
        return PARSERS[options.tool_call_parser]
    if mode.kind == "required":
        return parse_required, RequiredStream
    function = mode.function
    return functools.partial(_named_call, function), (lambda: NamedStream(function))


def _named_call(function: str, answer: str) -> ParsedReply:
    """A forced call's arguments are the whole answer; none when the reply ended before any (in its
    thinking, under a reasoning parser), as its stream says."""
    return ParsedReply(None, [ToolCall(function, answer)] if answer else [])


def _finish_reason(delta: TextDelta, has_tool_calls: bool) -> str | None:
    """A reply that ends (not cut short) with tool calls it chose finishes with "tool_calls"; a
    call forced by a named tool_choice does not (OpenAI's and vLLM's: "stop")."""
    return "tool_calls" if has_tool_calls and delta.finish_reason == "stop" else delta.finish_reason


class _ChatCompletion:
    """The response's JSON, whole or chunk by chunk; a choice per sequence (n)."""

    def __init__(
        self, request_id: str, model: str, tokenizer: Tokenizer, prepared: PreparedChat, request: ChatCompletionRequest
    ) -> None:
        generations, reader = prepared.generations, prepared.reader
        self._request = request
        # vLLM's: the reply's role is the last message's when it continues it (no generation prompt)
        self._role = "assistant" if request.add_generation_prompt else request.messages[-1].role
        last = request.messages[-1]
        # vLLM's echo: the last message's text before each reply's, when the reply has its role
        self._echo: str = (last.for_template().get("content") or "") if request.echo and last.role == self._role else ""
        self._as_token_ids = bool(request.return_tokens_as_token_ids)  # resolved by prepare_chat
        self._reader = reader
        self._is_call_chosen = not isinstance(request.tool_choice, dict)  # a named tool_choice forces it
        self._new_splitter = prepared.new_splitter
        self._splitters = [prepared.new_splitter() for _ in generations]  # thinking apart from the answer, per choice
        self._streams = [None if reader is None else reader[1]() for _ in generations]  # a tool-call parser per choice
        self._held = [TextDelta("", index=i) for i in range(len(generations))]  # tokens of text not in a chunk yet
        self.request_id = request_id
        self.model = model
        self.created = int(time.time())
        self._tokenizer = tokenizer
        self._generations = generations
        self._is_role_sent = [False] * len(generations)

    def _envelope(self, obj: str, choices: list[dict]) -> dict:
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def _logprobs(self, delta: TextDelta) -> dict | None:
        num_top = self._generations[0].params.logprobs
        if num_top is None:
            return None
        shown = None if num_top == ALL_LOGPROBS else num_top  # -1: all the worker sent, the whole vocabulary
        return {
            "content": [
                {**self._entry(lp.token_id, lp.logprob), "top_logprobs": [self._entry(i, v) for i, v in lp.top[:shown]]}
                for lp in delta.logprobs
            ]
        }

    def _entry(self, token_id: int, logprob: float) -> dict:
        token = token_text(self._tokenizer, token_id, self._as_token_ids)
        return {"token": token, "logprob": json_logprob(logprob), "bytes": list(token.encode("utf-8"))}

    @property
    def _usage(self) -> dict:
        """The prompt once, every sequence's tokens."""
        usage = dict(self._generations[0].usage)
        num_output = sum(g.num_output_tokens for g in self._generations)
        usage["completion_tokens"], usage["total_tokens"] = num_output, usage["prompt_tokens"] + num_output
        return usage

    def response(self, wholes: list[TextDelta]) -> dict:
        choices = [self._choice(index, whole) for index, whole in enumerate(wholes)]
        body = {**self._envelope("chat.completion", choices), "usage": self._usage}
        first = self._generations[0]
        if self._request.return_token_ids:
            body["prompt_token_ids"] = first.prompt_token_ids
            for choice, whole in zip(choices, wholes, strict=True):
                choice["token_ids"] = whole.token_ids
        if first.params.prompt_logprobs is not None:
            body["prompt_logprobs"] = vllm_prompt_logprobs(self._tokenizer, first.prompt_logprobs)
        return body

    def _choice(self, index: int, whole: TextDelta) -> dict:
        reasoning, answer = split(self._new_splitter(), whole.text)
        message: dict[str, Any] = {"role": self._role, "content": answer if answer or reasoning is None else None}
        parsed = None if self._reader is None else self._reader[0](answer)
        if parsed is not None and parsed.tool_calls:
            message = {"role": self._role, "content": parsed.content, "tool_calls": [c.to_json() for c in parsed.tool_calls]}
        if reasoning is not None:  # vLLM's name, and the one it had before
            message["reasoning"] = message["reasoning_content"] = reasoning
        if self._echo:
            message["content"] = self._echo + (message["content"] or "")
        return {
            "index": index,
            "message": message,
            "logprobs": self._logprobs(whole),
            "finish_reason": _finish_reason(whole, self._is_call_chosen and bool(parsed and parsed.tool_calls)),
            "stop_reason": whole.stop_reason,
        }

    def chunks(self, delta: TextDelta) -> list[dict]:
        """The chunks of one delta. Its tokens' logprobs (and, with `return_token_ids`, their ids) go
        with the chunk that carries their text; those of text held back (a tag still arriving) wait
        for the chunk that carries it."""
        chunks = []
        index = delta.index
        if not self._is_role_sent[index]:  # vLLM's first chunk of a choice: the role, once there is output
            self._is_role_sent[index] = True
            chunks.append(self._chunk({"role": self._role, "content": ""}, TextDelta("", index=index), None))
            if self._request.return_token_ids:  # each choice's first chunk, as vLLM sends it
                chunks[-1]["prompt_token_ids"] = self._generations[0].prompt_token_ids
            if self._echo:
                chunks.append(self._chunk({"content": self._echo}, TextDelta("", index=index), None))
        text, splitter = delta.text, self._splitters[index]
        if splitter is not None:
            reasoning, text = splitter.feed(delta.text, is_last=delta.finish_reason is not None)
            if not reasoning and not text and delta.finish_reason is None:  # a tag still arriving
                self._hold(delta)
                return self._with_usage(chunks)
            if reasoning:  # the tokens held back, and this delta's unless its answer text takes them
                held = self._release(index)
                is_all = not text  # the delta's end, the reply's if it ends here, go with its thinking
                thought = TextDelta(
                    "",
                    held.token_ids + (delta.token_ids if is_all else []),
                    held.logprobs + (delta.logprobs if is_all else []),
                    finish_reason=delta.finish_reason if is_all else None,
                    stop_reason=delta.stop_reason if is_all else None,
                    index=index,
                )
                chunks.append(self._chunk({"reasoning": reasoning, "reasoning_content": reasoning}, thought, thought))
                if is_all:
                    return self._with_usage(chunks)
            delta = TextDelta(text, delta.token_ids, delta.logprobs, delta.finish_reason, delta.stop_reason, index)
        stream = self._streams[index]
        self._hold(delta)
        if stream is None:
            chunks.append(self._chunk({"content": delta.text}, delta, self._release(index)))
        else:
            message = stream.feed(delta.text, is_last=delta.finish_reason is not None)
            if message or delta.finish_reason is not None:  # text held back (a tag still arriving): no chunk yet
                chunks.append(self._chunk(message, delta, self._release(index)))
        return self._with_usage(chunks)

    def _hold(self, delta: TextDelta) -> None:
        held = self._held[delta.index]
        held.token_ids += delta.token_ids
        held.logprobs += delta.logprobs

    def _release(self, index: int) -> TextDelta:
        held, self._held[index] = self._held[index], TextDelta("", index=index)
        return held

    def _with_usage(self, chunks: list[dict]) -> list[dict]:
        """With continuous_usage_stats, vLLM's: each chunk the prompt and its choice's tokens so far
        (none in the role chunk)."""
        if self._request.include_usage_in_every_chunk:
            for chunk in chunks:
                [choice] = chunk["choices"]
                usage = dict(self._generations[choice["index"]].usage)
                if "role" in choice["delta"]:
                    usage["completion_tokens"], usage["total_tokens"] = 0, usage["prompt_tokens"]
                chunk["usage"] = usage
        return chunks

    def _chunk(self, message: dict, delta: TextDelta, tokens: TextDelta | None) -> dict:
        """A chunk of `delta`'s choice (its finish), carrying `tokens`' logprobs and ids (None: no tokens)."""
        stream = self._streams[delta.index]
        has_tool_calls = self._is_call_chosen and stream is not None and stream.has_tool_calls
        choice = {
            "index": delta.index,
            "delta": message,
            "logprobs": None if tokens is None else self._logprobs(tokens),
            "finish_reason": _finish_reason(delta, has_tool_calls),
            "stop_reason": delta.stop_reason,
        }
        if self._request.return_token_ids and tokens is not None:
            choice["token_ids"] = tokens.token_ids
        return self._envelope("chat.completion.chunk", [choice])

    def final_chunks(self, request: ChatCompletionRequest) -> list[dict]:
        if not request.include_usage_in_stream:
            return []
        return [{**self._envelope("chat.completion.chunk", []), "usage": self._usage}]
