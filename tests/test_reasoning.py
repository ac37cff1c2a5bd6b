"""`--reasoning-parser`: a reasoning model's thinking comes back apart from its answer, on chat
(`reasoning`, `reasoning_content`; streamed as delta pieces) and on /v1/responses (a `reasoning`
item), through the real HTTP server and the official openai client. The replies are scripted token
by token (a model with random weights writes no `<think>`), with the demo tokenizer splitting each
tag over several tokens; the splitter itself against every way of cutting a reply into pieces."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from pdserve.engine import SamplingParams
from pdserve.engine.outputs import RequestDelta, TokenLogprobs
from pdserve.engine.sampling_params import Thinking
from pdserve.engine.tokenizer import Tokenizer
from pdserve.proto.deadlines import Deadlines
from pdserve.router.app import create_app
from pdserve.router.config import GatewayConfig
from pdserve.router.reasoning import ReasoningSplitter, split, splitter_for, thinking_for
from pdserve.router.tools import ToolOptions
from tests.test_router_http import ScriptedBackend, serve
from tests.test_serve_e2e import Server, serving

THINKING, ANSWER = "I think so.\nYes.", "The answer."
REPLY = f"<think>{THINKING}</think>{ANSWER}"
MESSAGES = [{"role": "user", "content": "Is it?"}]


@pytest.mark.parametrize(
    ("parser", "prompt", "reply", "expected"),
    [
        ("deepseek_r1", "", REPLY, (THINKING, ANSWER)),
        ("deepseek_r1", "", f"{THINKING}</think>{ANSWER}", (THINKING, ANSWER)),  # <think> opened by the template
        ("deepseek_r1", "", f"\n<think>{THINKING}", (THINKING, "")),  # cut while thinking
        ("deepseek_r1", "", "", ("", "")),
        ("qwen3", "", REPLY, (THINKING, ANSWER)),
        ("qwen3", "", ANSWER, (None, ANSWER)),  # no thinking: all answer
        ("qwen3", "", f"{THINKING}</think>{ANSWER}", (None, f"{THINKING}</think>{ANSWER}")),
        ("qwen3", "<|im_start|>assistant\n<think>\n", f"{THINKING}</think>{ANSWER}", (THINKING, ANSWER)),
        ("qwen3", "", "<thin", (None, "<thin")),  # half a tag at the end is text
    ],
)
def test_the_split_of_a_whole_reply_and_of_its_stream_in_every_cut_agree(
    parser: str, prompt: str, reply: str, expected: tuple[str | None, str]
) -> None:
    assert split(splitter_for(parser, prompt, False), reply) == expected
    for cut in range(len(reply) + 1):  # two pieces, and one character at a time
        for pieces in ([reply[:cut], reply[cut:]], list(reply) + [""]):
            splitter = splitter_for(parser, prompt, False)
            assert splitter is not None
            outs = [splitter.feed(piece, is_last=i == len(pieces) - 1) for i, piece in enumerate(pieces)]
            assert ("".join(r for r, _ in outs), "".join(a for _, a in outs)) == (expected[0] or "", expected[1])
            assert splitter.has_reasoning == (expected[0] is not None)


def test_no_parser_a_grammar_from_the_first_token_or_a_closed_thinking_leaves_the_reply_whole() -> None:
    assert splitter_for(None, "", False) is None and splitter_for("deepseek_r1", "", True) is None
    closed = "<|im_start|>assistant\n<think>\n\n</think>\n\n"  # Qwen3's template with enable_thinking false
    assert splitter_for("qwen3", closed, False) is None and splitter_for("deepseek_r1", closed, False) is None
    assert split(None, REPLY) == (None, REPLY)
    assert isinstance(splitter_for("qwen3", "", False), ReasoningSplitter)
    with pytest.raises(ValueError, match="reasoning-parser"):
        ToolOptions(reasoning_parser="o1")


class ReplayBackend(ScriptedBackend):
    """Yields its script's deltas as they are (logprobs included)."""

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> AsyncIterator[RequestDelta]:
        for step in self.script:
            yield dataclasses.replace(step, request_id=request_id, num_prompt_tokens=len(prompt_token_ids))


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(demo_model_dir)


@pytest.fixture(scope="module", params=["deepseek_r1", "qwen3"])
def scripted(request: pytest.FixtureRequest, tokenizer: Tokenizer) -> Iterator[tuple[openai.OpenAI, ScriptedBackend, str]]:
    backend = ReplayBackend(tokenizer)
    config = GatewayConfig(Deadlines(first_token_s=10, request_s=10), tool_options=ToolOptions(reasoning_parser=request.param))
    with serve(create_app(backend, config=config)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0), backend, request.param


def script(backend: ScriptedBackend, tokenizer: Tokenizer, text: str) -> list[int]:
    """The reply, a token a delta (each tag spans several tokens), token n with logprob -(n + 1)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    backend.script = [
        RequestDelta("", [i], [TokenLogprobs(i, -(n + 1.0), 1, ())], finish_reason="stop" if n == len(ids) - 1 else None)
        for n, i in enumerate(ids)
    ]
    return ids


def test_chat_returns_the_thinking_apart_whole_and_streamed(scripted: tuple, tokenizer: Tokenizer) -> None:
    client, backend, parser = scripted
    script(backend, tokenizer, REPLY)
    message = client.chat.completions.create(model="scripted", messages=MESSAGES).choices[0].message
    assert (message.content, message.reasoning, message.reasoning_content) == (ANSWER, THINKING, THINKING)

    chunks = [c for c in client.chat.completions.create(model="scripted", messages=MESSAGES, stream=True) if c.choices]
    deltas = [c.choices[0].delta for c in chunks]
    thinking = [getattr(d, "reasoning", None) for d in deltas]
    assert "".join(t or "" for t in thinking) == THINKING and sum(t is not None for t in thinking) > 3
    assert all(getattr(d, "reasoning_content", None) == t for d, t in zip(deltas, thinking, strict=True))
    assert "".join(d.content or "" for d in deltas) == ANSWER
    last_thought = max(i for i, t in enumerate(thinking) if t)
    assert not any(d.content for d in deltas[:last_thought])  # the answer comes after the thinking
    assert chunks[-1].choices[0].finish_reason == "stop"

    # every token's logprob, once and in order, the thinking's on the reasoning chunks
    ids = script(backend, tokenizer, REPLY)
    chunks = [
        c for c in client.chat.completions.create(model="scripted", messages=MESSAGES, stream=True, logprobs=True) if c.choices
    ]
    values = [lp.logprob for c in chunks for lp in (c.choices[0].logprobs.content if c.choices[0].logprobs else [])]
    assert values == [-(n + 1.0) for n in range(len(ids))]
    assert any(getattr(c.choices[0].delta, "reasoning", None) and c.choices[0].logprobs for c in chunks)

    # return_token_ids: every token once and in order, each chunk's ids those of its logprobs (a
    # tag's held back with the text after it)
    extra = {"return_token_ids": True, "return_tokens_as_token_ids": True}
    chunks = [
        c
        for c in client.chat.completions.create(model="scripted", messages=MESSAGES, stream=True, logprobs=True, extra_body=extra)
        if c.choices
    ]
    token_ids = [c.choices[0].model_extra.get("token_ids") for c in chunks]
    assert [t for ids_ in token_ids for t in ids_ or []] == ids
    for chunk, chunk_ids in zip(chunks, token_ids, strict=True):
        entries = chunk.choices[0].logprobs.content if chunk.choices[0].logprobs else []
        assert [int(e.token.removeprefix("token_id:")) for e in entries] == (chunk_ids or [])

    # cut while thinking: the last chunk is the thinking's, with the finish reason
    script(backend, tokenizer, f"<think>{THINKING}")
    chunks = [c for c in client.chat.completions.create(model="scripted", messages=MESSAGES, stream=True) if c.choices]
    assert getattr(chunks[-1].choices[0].delta, "reasoning", None) and chunks[-1].choices[0].finish_reason == "stop"
    assert not any(c.choices[0].delta.content for c in chunks)

    script(backend, tokenizer, ANSWER)  # no tags: deepseek_r1 takes it as thinking cut short, qwen3 as an answer
    plain = client.chat.completions.create(model="scripted", messages=MESSAGES).choices[0].message
    if parser == "qwen3":
        assert plain.content == ANSWER and getattr(plain, "reasoning", None) is getattr(plain, "reasoning_content", None) is None
    else:
        assert (plain.reasoning, plain.content) == (ANSWER, None)


def test_a_continued_message_goes_on_where_its_thinking_stands(scripted: tuple, tokenizer: Tokenizer) -> None:
    """continue_final_message: a reply continuing an answer is all answer (both parsers), one
    continuing an open thinking goes on thinking until `</think>`."""
    client, backend, _ = scripted
    continued = {"add_generation_prompt": False, "continue_final_message": True}
    for start, reply, expected in (
        ("The answer is", " yes.", (None, " yes.")),
        ("<think>Let me see", f"{THINKING}</think>{ANSWER}", (THINKING, ANSWER)),
    ):
        script(backend, tokenizer, reply)
        messages = [*MESSAGES, {"role": "assistant", "content": start}]
        message = client.chat.completions.create(model="scripted", messages=messages, extra_body=continued).choices[0].message
        assert (getattr(message, "reasoning", None), message.content) == expected


def test_responses_return_a_reasoning_item_whole_and_streamed(scripted: tuple, tokenizer: Tokenizer) -> None:
    client, backend, _ = scripted
    script(backend, tokenizer, REPLY)
    response = client.responses.create(model="scripted", input="Is it?")
    reasoning, message = response.output
    assert (reasoning.type, reasoning.content[0].type, reasoning.content[0].text) == ("reasoning", "reasoning_text", THINKING)
    assert message.type == "message" and response.output_text == ANSWER

    events = list(client.responses.create(model="scripted", input="Is it?", stream=True))
    kinds = [e.type for e in events]
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == THINKING
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == ANSWER
    # the reasoning item is done before the message starts
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    assert [e.item.type for e in events if e.type == "response.output_item.done"] == ["reasoning", "message"]
    assert [i.type for i in events[-1].response.output] == ["reasoning", "message"] and events[-1].type == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))

    # the output sent back as the next turn's input, reasoning item included (left out of the prompt)
    script(backend, tokenizer, ANSWER)
    turns = [
        {"role": "user", "content": "Is it?"},
        *(item.model_dump() for item in response.output),
        {"role": "user", "content": "Sure?"},
    ]
    assert client.responses.create(model="scripted", input=turns).status == "completed"

    # empty thinking: no reasoning item, whole or streamed
    script(backend, tokenizer, f"<think></think>{ANSWER}")
    assert [i.type for i in client.responses.create(model="scripted", input="Is it?").output] == ["message"]
    events = list(client.responses.create(model="scripted", input="Is it?", stream=True))
    assert [i.type for i in events[-1].response.output] == ["message"]


def test_tool_calls_are_read_from_the_answer_alone(tokenizer: Tokenizer) -> None:
    """Hermes calls after the thinking come back as tool calls; a `<tool_call>` the model only
    thinks about stays in the reasoning."""
    backend = ReplayBackend(tokenizer)
    options = ToolOptions(enable_auto_tool_choice=True, tool_call_parser="hermes", reasoning_parser="deepseek_r1")
    call = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    thinking = "Maybe <tool_call> get_time."
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    config = GatewayConfig(Deadlines(first_token_s=10, request_s=10), tool_options=options)
    with serve(create_app(backend, config=config)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        script(backend, tokenizer, f"<think>{thinking}</think>{call}")
        choice = client.chat.completions.create(model="scripted", messages=MESSAGES, tools=tools).choices[0]
        assert choice.message.reasoning == thinking and choice.finish_reason == "tool_calls"
        [tool_call] = choice.message.tool_calls
        assert (tool_call.function.name, tool_call.function.arguments) == ("get_time", '{"zone": "UTC"}')
        chunks = [
            c for c in client.chat.completions.create(model="scripted", messages=MESSAGES, tools=tools, stream=True) if c.choices
        ]
        assert "".join(getattr(c.choices[0].delta, "reasoning", None) or "" for c in chunks) == thinking
        calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
        assert calls[0].function.name == "get_time" and "".join(tc.function.arguments or "" for tc in calls) == '{"zone": "UTC"}'
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        response = client.responses.create(model="scripted", input="Is it?", tools=[{"type": "function", "name": "get_time"}])
        assert [i.type for i in response.output] == ["reasoning", "function_call"] and response.output[1].name == "get_time"


def test_a_grammar_waits_out_the_thinking_where_the_tags_are_tokens(thinking_checkpoint: Path, tokenizer: Tokenizer) -> None:
    tokens = Tokenizer.from_pretrained(thinking_checkpoint)
    start, end = (tokens.backend.token_to_id(tag) for tag in ("<think>", "</think>"))
    opened, closed = "<|im_start|>assistant\n<think>\n", "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert thinking_for("deepseek_r1", "", tokens) == Thinking(start, end, starts_thinking=True)
    assert thinking_for("qwen3", "<|im_start|>assistant\n", tokens) == Thinking(start, end, starts_thinking=False)
    assert thinking_for("qwen3", opened, tokens) == Thinking(start, end, starts_thinking=True)
    assert thinking_for("qwen3", closed, tokens) is None and thinking_for(None, "", tokens) is None
    assert thinking_for("qwen3", "", tokenizer) is None  # the demo vocabulary spells the tags in pieces


SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
JSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
ANSWERS = ({"ok": True}, {"ok": False})


@pytest.fixture(scope="module")
def thinking_server(thinking_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`pdserve serve --reasoning-parser qwen3`, disaggregated: the prefill worker samples the first
    token under the grammar, the decode worker the rest."""
    log_path = tmp_path_factory.mktemp("thinking-serve") / "serve.log"
    with serving(thinking_checkpoint, log_path, "--reasoning-parser", "qwen3") as server:
        yield server


@pytest.mark.slow
def test_structured_output_constrains_the_answer_after_the_thinking(thinking_server: Server, thinking_checkpoint: Path) -> None:
    """As with vLLM's reasoning parsers: a JSON schema constrains the answer, the model thinks
    first, unconstrained, and its thinking comes back apart. The random weights are steered by
    logit_bias: towards `<think>` and more towards `</think>` (an empty thinking), or towards
    `</think>` enough to end a sampled thinking of a few tokens."""
    client = thinking_server.client()
    tokens = Tokenizer.from_pretrained(thinking_checkpoint)
    start, end = (str(tokens.backend.token_to_id(tag)) for tag in ("<think>", "</think>"))
    empty_thinking = {start: 50, end: 100}

    def ask(template: dict | None = None, **body: Any) -> Any:
        """Chat, the JSON without free whitespace (a random model would fill its budget with it)."""
        extra = {"structured_outputs": {"disable_any_whitespace": True}, "chat_template_kwargs": template or {}}
        return client.chat.completions.create(
            model=thinking_server.model, messages=MESSAGES, max_tokens=128, extra_body=extra, **body
        ).choices[0]

    message = ask(response_format=JSON_FORMAT, temperature=0, logit_bias=empty_thinking).message
    assert message.reasoning == "" and json.loads(message.content) in ANSWERS, message

    # the template opens the thinking: it is sampled, then the answer follows the schema
    replies = [ask({"open_thinking": True}, response_format=JSON_FORMAT, seed=seed, logit_bias={end: 6}) for seed in range(8)]
    for reply in replies:
        assert reply.finish_reason == "stop" and reply.message.reasoning is not None, reply
        assert json.loads(reply.message.content) in ANSWERS, reply
    assert any(reply.message.reasoning for reply in replies)

    # a forced tool call's arguments come after the thinking
    tool = {"type": "function", "function": {"name": "answer", "parameters": SCHEMA}}
    forced = {"type": "function", "function": {"name": "answer"}}
    reply = ask(tools=[tool], tool_choice=forced, temperature=0, logit_bias=empty_thinking)
    assert reply.message.reasoning == "" and json.loads(reply.message.tool_calls[0].function.arguments) in ANSWERS

    # a prompt that closed the thinking: the grammar constrains from the first token, `<think>` too
    message = ask({"enable_thinking": False}, response_format=JSON_FORMAT, temperature=0, logit_bias={start: 50}).message
    assert getattr(message, "reasoning", None) is None and json.loads(message.content) in ANSWERS, message

    response = client.responses.create(
        model=thinking_server.model,
        input="Is it?",
        temperature=0,
        max_output_tokens=128,
        extra_body={"logit_bias": empty_thinking, "structured_outputs": {"disable_any_whitespace": True}},
        text={"format": {"type": "json_schema", "name": "answer", "schema": SCHEMA}},
    )
    assert [item.type for item in response.output] == ["message"] and json.loads(response.output_text) in ANSWERS


def test_a_forced_call_with_no_answer_after_the_thinking_is_no_call(thinking_checkpoint: Path) -> None:
    """A reply that ends while it thinks (EOS is allowed there) has no arguments to call with: no
    call, whole or streamed, and not a call whose arguments are empty."""
    tokenizer = Tokenizer.from_pretrained(thinking_checkpoint)  # the tags are tokens: the grammar waits
    backend = ReplayBackend(tokenizer)
    backend.max_model_len = 2048  # room for the tools in the prompt
    config = GatewayConfig(Deadlines(first_token_s=10, request_s=10), tool_options=ToolOptions(reasoning_parser="deepseek_r1"))
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    forced = {"type": "function", "function": {"name": "get_time"}}
    with serve(create_app(backend, config=config)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        script(backend, tokenizer, THINKING)
        choice = client.chat.completions.create(model="scripted", messages=MESSAGES, tools=tools, tool_choice=forced).choices[0]
        assert (choice.message.reasoning, choice.message.tool_calls, choice.finish_reason) == (THINKING, None, "stop")
        chunks = [
            c
            for c in client.chat.completions.create(
                model="scripted", messages=MESSAGES, tools=tools, tool_choice=forced, stream=True
            )
            if c.choices
        ]
        assert not any(c.choices[0].delta.tool_calls for c in chunks) and chunks[-1].choices[0].finish_reason == "stop"
        output = client.responses.create(model="scripted", input="Is it?", tools=[{"type": "function", "name": "get_time"}],
                                         tool_choice={"type": "function", "name": "get_time"}).output  # fmt: skip
        assert [item.type for item in output] == ["reasoning"]
