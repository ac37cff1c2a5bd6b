"""`--reasoning-parser deepseek_r1|qwen3`: a reasoning model's thinking, written between `<think>`
and `</think>`, comes back apart from its answer, as vLLM returns it: chat's `message.reasoning`
(and its older name `reasoning_content`), `delta.reasoning` when streamed, a `reasoning` output item
on /v1/responses; tool calls are read from the answer alone.

- deepseek_r1: a reply starts in its thinking (DeepSeek-R1's template opens `<think>` in the prompt;
  a `<think>` the model writes itself is dropped), which ends at `</think>` or with the reply.
- qwen3: a reply thinks if it opens with `<think>`, or if its prompt ends in an open `<think>`
  (Qwen3's thinking-only models); otherwise it is all answer. With `enable_thinking: false` Qwen3's
  template closes the thinking in the prompt, so the reply is all answer.

A request with structured output is all answer: its grammar constrains the reply from the first
token (pdserve does not hold it back until the thinking ends, as vLLM does), which leaves no
thinking to split off. The split is made on the text as it streams; the whole reply is split by the
same rules, so a stream and the whole agree."""

from __future__ import annotations

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


def splitter_for(parser: str | None, prompt: str, has_structured_output: bool) -> ReasoningSplitter | None:
    """The splitter for a reply to `prompt` (the rendered chat), or None: no thinking to split off."""
    if parser is None or has_structured_output:
        return None
    if parser == "deepseek_r1":
        return ReasoningSplitter(starts_thinking=True)
    return ReasoningSplitter(starts_thinking=prompt.rstrip().endswith(START))


def split(splitter: ReasoningSplitter | None, text: str) -> tuple[str | None, str]:
    """A whole reply's (reasoning, answer): reasoning None when the reply did not think."""
    if splitter is None:
        return None, text
    reasoning, answer = splitter.feed(text, is_last=True)
    return (reasoning if splitter.has_reasoning else None), answer
