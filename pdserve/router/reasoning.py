"""`--reasoning-parser deepseek_r1|qwen3`: a reasoning model's thinking, written between `<think>`
and `</think>`, comes back apart from its answer, as vLLM returns it: chat's `message.reasoning`
(and its older name `reasoning_content`), `delta.reasoning` when streamed, a `reasoning` output item
on /v1/responses; tool calls are read from the answer alone.

- deepseek_r1: a reply starts in its thinking (DeepSeek-R1's template opens `<think>` in the prompt;
  a `<think>` the model writes itself is dropped), which ends at `</think>` or with the reply.
- qwen3: a reply thinks if it opens with `<think>`, or if its prompt ends in an open `<think>`
  (Qwen3's thinking-only models); otherwise it is all answer. With `enable_thinking: false` Qwen3's
  template closes the thinking in the prompt, so the reply is all answer.

A prompt that closes the thinking itself (ends in `</think>`) gets a reply that is all answer.

Structured output (a JSON schema, a regex, a forced tool call) constrains the answer, not the
thinking, as in vLLM: the grammar waits, unconstrained, until the model writes `</think>` (with
qwen3, while the reply may still open with `<think>`, that token is allowed beside the grammar's).
This needs both tags to be tokens of the vocabulary, as they are in the Qwen3 and DeepSeek-R1
tokenizers; where they are not, the grammar constrains the reply from its first token, which leaves
no thinking to split off. The split is made on the text as it streams; the whole reply is split by
the same rules, so a stream and the whole agree."""

from __future__ import annotations

from pdserve.engine.sampling_params import Thinking
from pdserve.engine.tokenizer import Tokenizer

START, END = "<think>", "</think>"
PARSERS = ("deepseek_r1", "qwen3")


class ReasoningSplitter:
    """One reply's text in, (reasoning, answer) pieces out; a tag split across pieces is held back
    until it is complete."""

    def __init__(self, starts_thinking: bool) -> None:
        """`starts_thinking`: the reply is thinking from its first token even without `<think>`."""
        self._starts_thinking = starts_thinking
        self._state = "start"  # then "reasoning" or "answer"
        self._buffer = ""
        self.has_reasoning = False

    def feed(self, text: str, is_last: bool = False) -> tuple[str, str]:
        self._buffer += text
        reasoning = answer = ""
        while True:
            if self._state == "start":
                head = self._buffer.lstrip()
                if not is_last and len(head) < len(START) and START.startswith(head):
                    return reasoning, answer  # maybe the start of `<think>`
                if head.startswith(START):
                    self._buffer, self._state = head[len(START) :], "reasoning"
                else:
                    self._state = "reasoning" if self._starts_thinking else "answer"
                self.has_reasoning = self._state == "reasoning"
            elif self._state == "reasoning":
                end = self._buffer.find(END)
                if end >= 0:
                    reasoning += self._buffer[:end]
                    self._buffer, self._state = self._buffer[end + len(END) :], "answer"
                    continue
                keep = 0 if is_last else _partial_tag(self._buffer, END)
                reasoning += self._buffer[: len(self._buffer) - keep]
                self._buffer = self._buffer[len(self._buffer) - keep :]
                return reasoning, answer
            else:
                answer, self._buffer = answer + self._buffer, ""
                return reasoning, answer


def _partial_tag(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag` (a tag still arriving)."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0


def starts_thinking(parser: str | None, prompt: str) -> bool | None:
    """How a reply to `prompt` (the rendered chat) starts, the one rule the splitter and the grammar
    follow: thinking (True), thinking only if it opens with `<think>` (False: qwen3), or all answer
    (None: no parser, or the prompt closed the thinking)."""
    if parser is None or prompt.rstrip().endswith(END):
        return None
    return parser == "deepseek_r1" or prompt.rstrip().endswith(START)


def splitter_for(parser: str | None, prompt: str, has_structured_output: bool) -> ReasoningSplitter | None:
    """The splitter for a reply to `prompt`, or None: no thinking to split off.
    `has_structured_output`: a grammar constrains the reply from its first token."""
    start = starts_thinking(parser, prompt)
    return None if start is None or has_structured_output else ReasoningSplitter(start)


def thinking_for(parser: str | None, prompt: str, tokenizer: Tokenizer) -> Thinking | None:
    """What a grammar on the reply to `prompt` waits out, or None: no thinking, or tags that are
    not tokens of the vocabulary."""
    start = starts_thinking(parser, prompt)
    start_id, end_id = (tokenizer.backend.token_to_id(tag) for tag in (START, END))
    if start is None or start_id is None or end_id is None:
        return None
    return Thinking(start_id, end_id, starts_thinking=start)


def reasoning_context(prompt: str, continued: str | None) -> str:
    """What the rules above read of the prompt: the prompt itself, or, when the reply continues a
    message (`continue_final_message`), where that message's thinking stands: open (it continues the
    thinking) or not (it continues the answer)."""
    if continued is None:
        return prompt
    return START if continued.rfind(START) > continued.rfind(END) else END


def split(splitter: ReasoningSplitter | None, text: str) -> tuple[str | None, str]:
    """A whole reply's (reasoning, answer): reasoning None when the reply did not think."""
    if splitter is None:
        return None, text
    reasoning, answer = splitter.feed(text, is_last=True)
    return (reasoning if splitter.has_reasoning else None), answer
