"""Generated token ids -> text deltas, for streaming and offline generation, with stop strings.

Never emits half a multi-byte character, and holds back text that could still begin a stop string.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import cast

from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.tokenizer import Tokenizer

# Not tokenizers.decoders.DecodeStream: it raises "Invalid prefix" and emits text that a later byte
# changes when byte-fallback tokens form invalid UTF-8 (random weights do that all the time).


class IncrementalDetokenizer:
    """One request's output text. Invariant: deltas + flush() == tokenizer.decode(all ids), cut at the
    earliest stop string (the one that ends first; of those, the longest), less the stop token that
    ended it (vLLM's: EOS or one of stop_token_ids is in the output's ids, not its text).

    Stop strings, as vLLM's, count only once the output has more than `min_tokens` ids: one must end
    in text decoded after that.

    `stop_token_ids`: the ids that end the request once it has `min_tokens` (EOS unless ignore_eos,
    and the request's stop_token_ids). Such an id's text waits for the next step or the finish: more
    tokens, and it was not the end; a "stop" finish, and it was (its text is dropped). The finish may
    come in a later message than the token (a decode worker's stream); the token is almost always
    the last one, so nothing waits in practice. With include_stop_str_in_output nothing is held."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
        stop_token_ids: Collection[int] = (),
        min_tokens: int = 0,
    ) -> None:
        if isinstance(stop, str) or any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {stop!r}")
        self._tokenizer = tokenizer
        self._stop = tuple(stop)
        self._include_stop = include_stop_str_in_output
        self._skip_special_tokens = skip_special_tokens
        self._stop_token_ids = frozenset(() if include_stop_str_in_output else stop_token_ids)
        self._min_tokens = min_tokens
        self._num_generated = 0  # ids given to step
        self._stop_token: int | None = None  # the last id given, when it may be the one that ends the request
        self._token_ids: list[int] = []
        # Prefix/read offsets: ids[:read] are decoded into _decoded; ids[prefix:read] give the context
        # that the next window is decoded with (so leading-space and byte merging come out right).
        self._prefix_offset = 0
        self._read_offset = 0
        self._decoded = ""  # text released by the decoder: emitted, then held back
        self._num_emitted = 0  # chars of _decoded already returned
        self._is_stopped = False
        self._stop_reason: str | None = None

    @classmethod
    def for_request(cls, tokenizer: Tokenizer, params: SamplingParams) -> IncrementalDetokenizer:
        """The detokenizer of a request sampled with `params`: its stop strings, and the ids that end
        it (the tokenizer's EOS ids, the engine's, unless ignore_eos; its stop_token_ids)."""
        eos = () if params.ignore_eos else tokenizer.eos_token_ids
        return cls(
            tokenizer,
            cast(tuple[str, ...], params.stop),  # a tuple once SamplingParams is built
            params.include_stop_str_in_output,
            params.skip_special_tokens,
            stop_token_ids={*eos, *(params.stop_token_ids or ())},
            min_tokens=params.min_tokens,
        )

    @property
    def text(self) -> str:
        """All text returned so far (the deltas concatenated)."""
        return self._decoded[: self._num_emitted]

    @property
    def is_stopped(self) -> bool:
        return self._is_stopped

    @property
    def stop_reason(self) -> str | None:
        """The stop string that ended the output, once one has."""
        return self._stop_reason

    def step(self, token_ids: Sequence[int]) -> tuple[str, bool]:
        """Feed newly generated ids; return (text safe to emit now, whether a stop string was hit)."""
        if self._is_stopped:
            return "", True
        if not token_ids:
            return "", False
        num_within = self._min_tokens - self._num_generated
        if 0 < num_within < len(token_ids):  # the first num_within ids' text can end no stop string
            text, _ = self.step(token_ids[:num_within])
            more, is_stopped = self.step(token_ids[num_within:])
            return text + more, is_stopped
        ids = list(token_ids)
        if self._stop_token is not None:  # more tokens came: it did not end the request
            ids.insert(0, self._stop_token)
            self._stop_token = None
        self._num_generated += len(token_ids)
        if ids[-1] in self._stop_token_ids and self._num_generated >= self._min_tokens:
            self._stop_token = ids.pop()
        self._token_ids.extend(ids)
        return self._advance(self._decode_new_text(), is_final=False), self._is_stopped

    def flush(self, finish_reason: str | None = None) -> str:
        """The request ended for another reason than a stop string (`finish_reason`: "stop" for EOS,
        a stop token or a complete grammar; "length", "abort"): return everything held back, but
        for the text of the stop token that ended it."""
        if self._is_stopped:
            return ""
        if self._stop_token is not None and finish_reason != "stop":
            self._token_ids.append(self._stop_token)
        self._stop_token = None
        full = self._decode(0, len(self._token_ids))
        if full.startswith(self._decoded):
            tail = full[len(self._decoded) :]
        else:  # text already sent cannot be taken back: finish the window instead
            tail = self._decode(self._prefix_offset, len(self._token_ids))
            tail = tail[len(self._decode(self._prefix_offset, self._read_offset)) :]
        return self._advance(tail, is_final=True)

    def _decode_new_text(self) -> str:
        """Text of the ids after the read offset, once it is final: no trailing half character and
        no unfinished byte-fallback run. Advances the offsets when it returns text."""
        end = len(self._token_ids)
        byte_ids = self._tokenizer.byte_token_ids
        while end > self._read_offset and self._token_ids[end - 1] in byte_ids:
            end -= 1
        if end == self._read_offset:
            return ""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, end)
        is_final = not new_text.endswith("\ufffd") and new_text.startswith(prefix_text)
        if len(new_text) <= len(prefix_text) or not is_final:
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, end
        return new_text[len(prefix_text) :]

    def _decode(self, start: int, end: int) -> str:
        ids = self._token_ids[start:end]
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _advance(self, new_text: str, is_final: bool) -> str:
        num_searched = len(self._decoded)
        self._decoded += new_text
        is_past_min_tokens = self._num_generated > self._min_tokens  # vLLM's: stop strings count only then
        stop_end = self._find_stop(num_searched) if new_text and is_past_min_tokens else None
        if stop_end is not None:
            self._is_stopped = True
            self._decoded = self._decoded[:stop_end]
            return self._emit(stop_end)
        return self._emit(len(self._decoded) - (0 if is_final else self._num_held_back()))

    def _emit(self, end: int) -> str:
        delta = self._decoded[self._num_emitted : end]
        self._num_emitted = end
        return delta

    def _find_stop(self, num_searched: int) -> int | None:
        """End of the output if a stop string now occurs (only ones ending in the new text can)."""
        best: tuple[int, int, str] | None = None  # (end of the stop string, -its length, it)
        for s in self._stop:
            start = self._decoded.find(s, max(0, num_searched - len(s) + 1))
            if start >= 0 and (best is None or (start + len(s), -len(s)) < best[:2]):
                best = (start + len(s), -len(s), s)
        if best is None:
            return None
        end, neg_len, self._stop_reason = best
        assert end + neg_len >= self._num_emitted, "emitted text overlaps a stop string"
        return end if self._include_stop else end + neg_len

    def _num_held_back(self) -> int:
        """Length of the longest unemitted suffix that is a proper prefix of some stop string."""
        num_held = 0
        num_unemitted = len(self._decoded) - self._num_emitted
        for s in self._stop:
            for k in range(min(len(s) - 1, num_unemitted), num_held, -1):
                if self._decoded.endswith(s[:k]):
                    num_held = k
                    break
        return num_held
