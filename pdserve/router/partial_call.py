"""One JSON tool-call object of a reply that is still arriving: its name once that string is
complete, and the text of its arguments value so far (an object or array grows as it arrives; a
scalar appears once complete), read by a small scanner that knows strings, escapes and nesting."""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass
class PartialCall:
    name: str | None = None
    arguments: str = ""  # the arguments value's text so far (a scalar only once complete)
    end: int | None = None  # just past the closing brace, once the object is complete


class _Scan:
    """A JSON object's top-level keys and values, read from `start` (a "{") to where the text ends."""

    def __init__(self, text: str, start: int, argument_keys: tuple[str, ...]) -> None:
        self.text, self.argument_keys = text, argument_keys
        self.call = PartialCall()
        self.depth, self.in_string, self.escaped = 0, False, False
        self.is_key_next, self.key, self.string_start = True, None, 0
        self.value_start: int | None = None
        self._run(start)

    def _run(self, start: int) -> None:
        for i in range(start, len(self.text)):
            self._char(i, self.text[i])
            if self.call.end is not None:
                return
        if self._is_reading_arguments() and self.text[self.value_start] in "{[":
            self.call.arguments = self.text[self.value_start :]  # a container streams as it arrives

    def _char(self, i: int, c: str) -> None:
        if self.in_string:
            self._string_char(i, c)
        elif c == '"':
            self.in_string, self.string_start = True, i
            self._value_starts(i)
        elif c in "{[":
            self.depth += 1
            if self.depth == 2:
                self._value_starts(i)
        elif c in "}]":
            self.depth -= 1
            if self.depth == 1:
                self._value_ends(i + 1)
            elif self.depth == 0:
                self._value_ends(i)
                self.call.end = i + 1
        elif self.depth == 1:
            self._top_level_char(i, c)

    def _string_char(self, i: int, c: str) -> None:
        if self.escaped:
            self.escaped = False
        elif c == "\\":
            self.escaped = True
        elif c == '"':
            self.in_string = False
            if self.depth == 1:
                literal = _string(self.text[self.string_start : i + 1])
                if self.is_key_next:
                    self.key = literal
                else:
                    if self.key == "name":
                        self.call.name = literal
                    self._value_ends(i + 1)

    def _top_level_char(self, i: int, c: str) -> None:
        if c == ":":
            self.is_key_next, self.value_start = False, None
        elif c == ",":
            self._value_ends(i)
            self.is_key_next, self.key = True, None
        elif not c.isspace():
            self._value_starts(i)  # a number, true, false or null

    def _value_starts(self, i: int) -> None:
        if self.depth == 1 + (self.text[i] in "{[") and not self.is_key_next and self.value_start is None:
            self.value_start = i

    def _value_ends(self, end: int) -> None:
        if self._is_reading_arguments():
            self.call.arguments = self.text[self.value_start : end].strip()

    def _is_reading_arguments(self) -> bool:
        return self.value_start is not None and self.key in self.argument_keys and not self.call.arguments


def scan_call(text: str, start: int, argument_keys: tuple[str, ...]) -> PartialCall:
    return _Scan(text, start, argument_keys).call


def _string(literal: str) -> str | None:
    try:
        return json.loads(literal)
    except ValueError:  # a bad escape: neither a key nor a name we can use
        return None
