"""Structured output in the engine: grammars compiled once per spec, masks applied in the batched
sampler, the grammar advanced with every token, and a complete grammar ending its request with
"stop". The checkpoints have random weights: only the constraints make their output meaningful."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from pdserve.engine import LLM, SamplingParams
from pdserve.engine.grammar_masks import GrammarMasks
from pdserve.engine.request import Request
from pdserve.engine.sampling_params import InvalidRequestError, StructuredOutput, Thinking
from pdserve.engine.structured_output import GrammarCompiler
from pdserve.engine.tokenizer import Tokenizer

MAX_MODEL_LEN = 512
NUM_SAMPLES = 16


@pytest.fixture(scope="module")
def llm(tool_checkpoint: Path) -> LLM:
    return LLM(str(tool_checkpoint), device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN)


def sample(llm: LLM, spec: StructuredOutput, num: int = NUM_SAMPLES, max_tokens: int = 64, **params: object) -> list:
    """`num` seeded samples at temperature 1 under `spec`."""
    settings = [
        SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens, structured_output=spec, **params) for seed in range(num)
    ]
    return [out.outputs[0] for out in llm.generate(["Hello"] * num, settings)]


def test_choice_returns_one_of_the_choices_and_stops_there(llm: LLM) -> None:
    choices = ["yes", "no", "maybe later", "n/a"]
    outputs = sample(llm, StructuredOutput("choice", json.dumps(choices)))
    assert {o.text for o in outputs} <= set(choices)
    assert {o.finish_reason for o in outputs} == {"stop"}
    eos = llm.get_tokenizer().eos_token_ids
    assert not any(set(o.token_ids) & eos for o in outputs)  # the complete grammar ends it, no EOS step


def test_each_of_n_sequences_follows_the_grammar_on_its_own(llm: LLM) -> None:
    """n > 1 forks one prompt into several sequences: each needs its own grammar state."""
    choices = ["yes", "no", "maybe later", "n/a"]
    params = SamplingParams(
        n=8, temperature=1.0, seed=3, max_tokens=32, structured_output=StructuredOutput("choice", json.dumps(choices))
    )
    outputs = llm.generate(["Hello"], params)[0].outputs
    assert len(outputs) == 8
    assert {o.text for o in outputs} <= set(choices)
    assert len({o.text for o in outputs}) > 1  # really sampled apart, each constrained


def test_regex_output_matches_the_regex_fully(llm: LLM) -> None:
    pattern = r"[A-Z][a-z]{2,6}-[0-9]{2,4}(\.[a-z]{1,3})?"
    outputs = sample(llm, StructuredOutput("regex", pattern))
    assert all(re.fullmatch(pattern, o.text) for o in outputs), [o.text for o in outputs]
    assert {o.finish_reason for o in outputs} == {"stop"}  # EOS once accepting, or the regex is complete


def test_lark_and_gbnf_grammars(llm: LLM) -> None:
    lark = 'start: "(" NUM ("+" NUM)* ")"\nNUM: /[1-9][0-9]?/'
    for o in sample(llm, StructuredOutput("grammar", lark), num=8):
        assert re.fullmatch(r"\((?:[1-9][0-9]?)(?:\+[1-9][0-9]?)*\)", o.text) or o.finish_reason == "length", o.text
    gbnf = 'root ::= "light is " ("on" | "off")'
    assert {o.text for o in sample(llm, StructuredOutput("grammar", gbnf), num=8)} <= {"light is on", "light is off"}


def test_json_object_is_a_json_object_when_it_completes(llm: LLM) -> None:
    outputs = sample(llm, StructuredOutput("json_object", disable_any_whitespace=True), max_tokens=128)
    complete = [o for o in outputs if o.finish_reason == "stop"]
    assert complete, "no sample completed its object within 128 tokens"
    assert all(isinstance(json.loads(o.text), dict) for o in complete)
    assert all(o.text.startswith("{") for o in outputs)


def test_a_batch_mixing_grammar_and_free_requests_leaves_the_free_ones_unchanged(llm: LLM) -> None:
    free = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = llm.generate(["The key value cache"], free)[0].outputs[0].token_ids
    constrained = SamplingParams(temperature=1.0, seed=1, max_tokens=12, structured_output=StructuredOutput("regex", "[0-9]+"))
    outputs = llm.generate(["Hello", "The key value cache", "Why"], [constrained, free, constrained])
    assert outputs[1].outputs[0].token_ids == alone
    assert all(re.fullmatch("[0-9]+", outputs[i].outputs[0].text) for i in (0, 2))


def test_greedy_constrained_output_is_the_argmax_of_the_masked_logits(llm: LLM) -> None:
    """Greedy under a grammar picks the best token the grammar allows: rank 1 of the distribution
    its logprobs report (the masked one, as vLLM reports it)."""
    spec = StructuredOutput("regex", "[a-z]{3,8}")
    out = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=10, structured_output=spec, logprobs=3))[0].outputs[
        0
    ]
    assert re.fullmatch("[a-z]{3,8}", out.text)
    ranks = [entries[token].rank for token, entries in zip(out.token_ids, out.logprobs)]
    assert ranks == [1] * len(ranks)


@pytest.mark.parametrize(
    "spec, message",
    [
        (StructuredOutput("regex", "[a-"), "invalid regex"),
        (StructuredOutput("json", '{"type": "foo"}'), "Invalid type"),
        (StructuredOutput("json", "{not json"), "not valid JSON"),
        (StructuredOutput("choice", "[]"), "non-empty list"),
        (StructuredOutput("grammar", "start: undefined_rule"), "invalid grammar"),
    ],
)
def test_a_spec_that_does_not_compile_is_refused_before_anything_runs(llm: LLM, spec: StructuredOutput, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message) as error:
        llm.generate(["Hello"], SamplingParams(max_tokens=4, structured_output=spec))
    assert error.value.param == "structured_outputs"
    assert not llm.engine.has_unfinished_requests()


def test_an_unknown_kind_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match="unknown structured output kind"):
        StructuredOutput("xml", "<a/>")


def test_a_spec_compiles_once_and_each_request_gets_its_own_matcher(
    demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer = Tokenizer.from_pretrained(demo_model_dir)
    compiler = GrammarCompiler(tokenizer, 832, tokenizer.eos_token_ids)
    calls = []
    compile_once = compiler._compile
    monkeypatch.setattr(compiler, "_compile", lambda spec: calls.append(spec) or compile_once(spec))
    spec = StructuredOutput("choice", json.dumps(["abc", "abd"]))
    first, second = compiler.compile(spec), compiler.compile(StructuredOutput("choice", json.dumps(["abc", "abd"])))
    assert len(calls) == 1
    for token in tokenizer.encode("abc", add_special_tokens=False):
        first.accept(token)
    assert first.is_terminated and not second.is_terminated


def test_eos_is_allowed_exactly_when_the_grammar_may_end(demo_model_dir: Path) -> None:
    from pdserve.engine.grammar_masks import GrammarMasks
    from pdserve.engine.request import Request

    tokenizer = Tokenizer.from_pretrained(demo_model_dir)
    compiler = GrammarCompiler(tokenizer, 832, tokenizer.eos_token_ids)
    spec = StructuredOutput("regex", "[a-z]{2,}")
    request = Request("r", [1], SamplingParams(structured_output=spec), grammar=compiler.compile(spec))
    masks = GrammarMasks(pin_memory=False)

    def allowed() -> set[int]:
        logits = masks.start([request]).apply(torch.zeros(1, 832))
        return set(logits[0].isfinite().nonzero().flatten().tolist())

    eos = set(tokenizer.eos_token_ids)
    assert not allowed() & eos
    request.grammar.accept(tokenizer.encode("a", add_special_tokens=False)[0])
    assert not allowed() & eos  # one letter: not yet
    request.grammar.accept(tokenizer.encode("b", add_special_tokens=False)[0])
    assert allowed() & eos == eos  # two letters: EOS may end it
    assert all(tokenizer.decode([t]).isalpha() for t in allowed() - eos)


def thinking_grammar(checkpoint: Path, spec: StructuredOutput, starts_thinking: bool) -> tuple[Tokenizer, Request]:
    tokenizer = Tokenizer.from_pretrained(checkpoint)
    start, end = (tokenizer.backend.token_to_id(tag) for tag in ("<think>", "</think>"))
    spec = dataclasses.replace(spec, thinking=Thinking(start, end, starts_thinking))
    grammar = GrammarCompiler(tokenizer, 832, tokenizer.eos_token_ids).compile(spec)
    return tokenizer, Request("r", [1], SamplingParams(structured_output=spec), grammar=grammar)


def allowed_tokens(requests: list[Request]) -> list[set[int]]:
    """Each request's allowed next tokens, as one step's masks leave them."""
    logits = torch.zeros(len(requests), 832)
    pending = GrammarMasks(pin_memory=False).start(requests)
    logits = logits if pending is None else pending.apply(logits)
    return [set(row.isfinite().nonzero().flatten().tolist()) for row in logits]


@pytest.mark.parametrize("starts_thinking", [True, False])
def test_a_grammar_waits_out_the_thinking_then_constrains_the_answer(thinking_checkpoint: Path, starts_thinking: bool) -> None:
    """Under a reasoning parser the grammar constrains the answer after `</think>`: nothing is
    constrained while the model thinks; a reply that may open with `<think>` has it allowed beside
    the grammar's tokens."""
    tokenizer, request = thinking_grammar(thinking_checkpoint, StructuredOutput("regex", "[0-9]+"), starts_thinking)
    assert request.grammar is not None and request.grammar.thinking is not None
    start, end = request.grammar.thinking.start_token_id, request.grammar.thinking.end_token_id
    digits = {t for t in range(tokenizer.vocab_size) if tokenizer.decode([t]).isdigit()}
    everything = set(range(832))
    if not starts_thinking:
        assert allowed_tokens([request])[0] == digits | {start}  # the answer, or the thinking opening
        request.grammar.accept(start)
    for token in [*tokenizer.encode("I think: <b> x!", add_special_tokens=False), start]:
        assert allowed_tokens([request])[0] == everything
        request.grammar.accept(token)
        assert not request.grammar.is_terminated
    request.grammar.accept(end)
    assert allowed_tokens([request])[0] == digits  # the answer: the grammar's tokens alone


def test_a_reply_that_opens_with_its_answer_is_constrained_from_its_first_token(thinking_checkpoint: Path) -> None:
    tokenizer, request = thinking_grammar(thinking_checkpoint, StructuredOutput("regex", "[0-9]{2}"), starts_thinking=False)
    request.grammar.accept(tokenizer.encode("4", add_special_tokens=False)[0])
    one_digit = {t for t in range(tokenizer.vocab_size) if len(tokenizer.decode([t])) == 1 and tokenizer.decode([t]).isdigit()}
    assert allowed_tokens([request])[0] == one_digit  # `<think>` no longer
    request.grammar.accept(tokenizer.encode("2", add_special_tokens=False)[0])
    assert request.grammar.is_terminated


def test_the_opening_token_is_allowed_in_its_own_row_at_any_bit_of_its_word(demo_model_dir: Path) -> None:
    """A batch of a plain grammar, one thinking and two opening rows (one with its token at bit 31
    of an int32 word, where the bit is the sign): each row gets its own tokens."""
    tokenizer = Tokenizer.from_pretrained(demo_model_dir)
    compiler = GrammarCompiler(tokenizer, 832, tokenizer.eos_token_ids)
    spec = StructuredOutput("regex", "[0-9]+")
    requests = [
        Request(str(i), [1], SamplingParams(structured_output=spec), grammar=compiler.compile(s))
        for i, s in enumerate(
            [
                spec,
                dataclasses.replace(spec, thinking=Thinking(800, 801, starts_thinking=True)),
                dataclasses.replace(spec, thinking=Thinking(805, 806, starts_thinking=False)),
                dataclasses.replace(spec, thinking=Thinking(831, 830, starts_thinking=False)),
            ]
        )
    ]
    digits = {t for t in range(tokenizer.vocab_size) if tokenizer.decode([t]).isdigit()}
    assert allowed_tokens(requests) == [digits, set(range(832)), digits | {805}, digits | {831}]
    with pytest.raises(InvalidRequestError, match="thinking"):
        compiler.compile(dataclasses.replace(spec, thinking=Thinking(832, 801, starts_thinking=True)))


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]),
]


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_thinks_then_answers_under_the_grammar(thinking_checkpoint: Path, device: str) -> None:
    """Biased towards `<think>` (where the grammar allows it) and more towards `</think>`, greedy
    decoding opens the thinking, closes it, then answers as the grammar says: the first token is
    sampled from the grammar's tokens plus `<think>`, the thinking from all of them."""
    engine = LLM(str(thinking_checkpoint), device=device, dtype="float32", max_model_len=MAX_MODEL_LEN)
    tokenizer = engine.get_tokenizer()
    start, end = (tokenizer.backend.token_to_id(tag) for tag in ("<think>", "</think>"))
    spec = StructuredOutput("regex", "[0-9]{3}", thinking=Thinking(start, end, starts_thinking=False))
    params = SamplingParams(temperature=0.0, max_tokens=16, structured_output=spec, logit_bias={start: 50.0, end: 100.0})
    out = engine.generate(["Hello"], params)[0].outputs[0]
    assert out.token_ids[:2] == [start, end] and re.fullmatch("[0-9]{3}", tokenizer.decode(out.token_ids[2:])), out.text
    assert out.finish_reason == "stop"


@pytest.mark.parametrize("device", DEVICES)
def test_a_batch_of_thinking_and_plain_grammars_each_answers_its_own(thinking_checkpoint: Path, device: str) -> None:
    """Sampled together in one batch: replies that open with their thinking, replies that may open
    with it, replies without a thinking and free ones. Each grammar's answer matches it once its
    thinking (if any) is closed; the free rows are not masked."""
    engine = LLM(str(thinking_checkpoint), device=device, dtype="float32", max_model_len=MAX_MODEL_LEN)
    tokenizer = engine.get_tokenizer()
    start, end = (tokenizer.backend.token_to_id(tag) for tag in ("<think>", "</think>"))
    bias = {start: 4.0, end: 6.0}  # thinking opened and closed often enough in 48 tokens
    kinds = [
        Thinking(start, end, starts_thinking=True),
        Thinking(start, end, starts_thinking=False),
        None,  # a grammar from the first token
        "free",
    ]
    params = []
    for seed in range(16):
        kind = kinds[seed % 4]
        spec = None if kind == "free" else StructuredOutput("regex", "[0-9]{2,4}", thinking=kind)
        params.append(SamplingParams(temperature=1.0, seed=seed, max_tokens=48, structured_output=spec, logit_bias=bias))
    outs = [o.outputs[0] for o in engine.generate(["Hello"] * 16, params)]
    digits = re.compile("[0-9]*")
    assert not all(digits.fullmatch(out.text) for out in outs[3::4])  # the free rows are not masked
    for seed, out in enumerate(outs):
        kind = kinds[seed % 4]
        ids = out.token_ids
        if kind == "free":
            continue
        if isinstance(kind, Thinking) and end in ids:
            answer = ids[ids.index(end) + 1 :]
        elif isinstance(kind, Thinking) and (kind.starts_thinking or ids[:1] == [start]):
            assert out.finish_reason == "length"  # still thinking: unconstrained, no end by the grammar
            continue
        else:
            answer = ids
        text = tokenizer.decode(answer)  # the EOS that may end it skipped
        if out.finish_reason == "stop":
            assert re.fullmatch("[0-9]{2,4}", text), (seed, out.token_ids, text)
        else:
            assert re.fullmatch("[0-9]{0,4}", text), (seed, out.token_ids, text)
    assert not engine.engine.has_unfinished_requests()
    assert engine.engine.core.block_manager.num_held_blocks == 0
