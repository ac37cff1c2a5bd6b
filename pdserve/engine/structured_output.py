"""Structured output: a request's `StructuredOutput` compiled into a grammar matcher (once per spec,
cached), and `Grammar`, the per-request matcher advanced with every token the request gets.

The grammar library is llguidance, not xgrammar: it depends on nothing (one Rust wheel; xgrammar
requires transformers, torch and apache-tvm-ffi, and the gateway must stay torch-free), it builds
its tokenizer straight from the HF `tokenizers` tokenizer.json we already load, its JSON Schema
coverage is the widest of the two ($ref/$defs, anyOf/oneOf, patterns, formats, numeric and length
bounds, additionalProperties), it takes Lark and GBNF grammars alike, and its Earley parser with
a token-trie lexer computes a mask in tens of microseconds without precomputing per-grammar
tables, releasing the GIL over a thread pool for a whole batch (`engine/grammar_masks.py`).
Torch-free, so the gateway can check a spec before anything is queued."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections import OrderedDict

import llguidance

from pdserve.engine.sampling_params import InvalidRequestError, StructuredOutput, Thinking
from pdserve.engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

MAX_CACHED_GRAMMARS = 256


def grammar_text(spec: StructuredOutput) -> str:
    """The llguidance grammar for `spec` (as vLLM's guidance backend builds it); raises
    InvalidRequestError when the spec is not even well-formed (bad JSON, a choice that is not a
    list of strings)."""
    if spec.kind in ("json", "json_object"):
        schema = spec.spec if spec.kind == "json" else '{"type": "object"}'
        options: dict[str, object] = {"whitespace_flexible": not spec.disable_any_whitespace}
        if spec.whitespace_pattern is not None:
            options["whitespace_pattern"] = spec.whitespace_pattern
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)
        except ValueError as error:
            raise InvalidRequestError(f"the JSON schema is not valid JSON: {error}", "structured_outputs") from None
    if spec.kind == "choice":
        choices = _choices(spec.spec)
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.spec)
    try:
        return llguidance.grammar_from("grammar", spec.spec)  # Lark, or GBNF converted to Lark
    except ValueError as error:
        raise InvalidRequestError(f"invalid grammar: {error}", "structured_outputs") from None


def check(spec: StructuredOutput, param: str = "structured_outputs") -> None:
    """Raises InvalidRequestError naming `param` when the spec does not compile (no tokenizer needed)."""
    try:
        error = llguidance.LLMatcher.validate_grammar(grammar_text(spec))
    except InvalidRequestError as invalid:
        raise InvalidRequestError(str(invalid), param) from None
    if error:
        raise InvalidRequestError(f"invalid {_NAMES[spec.kind]}: {error.strip()}", param)


_NAMES = {"json": "JSON schema", "json_object": "JSON schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}


def _choices(text: str) -> list[str]:
    try:
        choices = json.loads(text)
    except json.JSONDecodeError:
        choices = None
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise InvalidRequestError("choice must be a non-empty list of strings", "structured_outputs")
    return choices


class Grammar:
    """One request's matcher: which tokens may come next, advanced with every token it gets. Under
    `thinking` it first waits out the model's thinking: no token is constrained until the thinking
    ends (or, when the reply may open without it, until a first token other than `<think>`)."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, thinking: Thinking | None = None) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size  # of its masks: at least the model's
        self.thinking = thinking
        if thinking is None:
            self.phase = ANSWER
        else:
            self.phase = THINKING if thinking.starts_thinking else OPENING

    @property
    def constrains(self) -> bool:
        """Whether the next token is constrained (by the matcher; at the OPENING, `<think>` also allowed)."""
        return self.phase != THINKING

    def accept(self, token_id: int) -> None:
        thinking = self.thinking
        if thinking is not None and self.phase == THINKING:
            if token_id == thinking.end_token_id:
                self.phase = ANSWER
            return
        if thinking is not None and self.phase == OPENING:
            if token_id == thinking.start_token_id:
                self.phase = THINKING
                return
            self.phase = ANSWER  # the reply opened with its answer: this token is the grammar's
        if not self.matcher.consume_token(token_id):
            logger.warning("a token the grammar does not allow was accepted: %s", self.matcher.get_error()[:500])

    @property
    def is_terminated(self) -> bool:
        """No token but EOS can follow (the grammar is complete), or the matcher failed."""
        return self.phase == ANSWER and self.matcher.is_stopped()


THINKING, OPENING, ANSWER = "thinking", "opening", "answer"


class GrammarCompiler:
    """Compiles specs for one tokenizer and vocabulary. A spec is compiled once and cached; each
    request gets a copy of the compiled matcher. Thread-safe: workers compile off the engine thread."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = max(vocab_size, tokenizer.vocab_size)  # masks are cut to the logits' width
        self._eos_token_ids = sorted(eos_token_ids)
        self._ll_tokenizer: llguidance.LLTokenizer | None = None  # built on first use (~1 s for 150K tokens)
        self._cache: OrderedDict[StructuredOutput, llguidance.LLMatcher | str] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: StructuredOutput) -> Grammar:
        """A fresh matcher for `spec`; raises InvalidRequestError when it does not compile."""
        thinking = spec.thinking
        if thinking is not None:
            if not all(0 <= t < self._vocab_size for t in (thinking.start_token_id, thinking.end_token_id)):
                raise InvalidRequestError("the thinking's start and end tokens must be in the vocabulary", "structured_outputs")
            spec = dataclasses.replace(spec, thinking=None)  # one compiled grammar, with or without it
        with self._lock:
            compiled = self._cache.get(spec)
            if compiled is not None:
                self._cache.move_to_end(spec)
        if compiled is None:
            compiled = self._compile(spec)  # outside the lock: llguidance releases the GIL meanwhile
            with self._lock:
                self._cache[spec] = compiled
                if len(self._cache) > MAX_CACHED_GRAMMARS:
                    self._cache.popitem(last=False)
        if isinstance(compiled, str):
            raise InvalidRequestError(compiled, "structured_outputs")
        return Grammar(compiled.deep_copy(), self._vocab_size, thinking)

    def _compile(self, spec: StructuredOutput) -> llguidance.LLMatcher | str:
        """The compiled matcher, or the error message (errors are cached too)."""
        try:
            grammar = grammar_text(spec)
        except InvalidRequestError as error:
            return str(error)
        matcher = llguidance.LLMatcher(self._tokenizer_for_grammars(), grammar, log_level=0)
        if matcher.is_error():
            return f"invalid {_NAMES[spec.kind]}: {matcher.get_error().strip()}"
        return matcher

    def _tokenizer_for_grammars(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance.LLTokenizer(
                    self._tokenizer.backend.to_str(), n_vocab=self._vocab_size, eos_token=self._eos_token_ids
                )
            return self._ll_tokenizer
