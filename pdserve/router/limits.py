"""Input limits checked before any work: the request body's size and read time (ASGI middleware,
ahead of JSON parsing), text that is not Unicode (a lone UTF-16 surrogate escape), and the longest
prompt, in characters, that could still fit the context (checked before tokenizing), or the
prompt's last tokens when the request asks to truncate it."""

from __future__ import annotations

import asyncio
import re
from typing import NamedTuple

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pdserve.engine.tokenizer import Tokenizer
from pdserve.proto.failures import Failure
from pdserve.router.errors import APIError

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# A JSON escape: `\uXXXX` (group 1) or any other escaped character, so that `\\u...` is not read as one.
_ESCAPE = re.compile(rb"\\(?:u([0-9a-fA-F]{4})|.)", re.DOTALL)
# Unicode normalizers (NFKC) may shrink text; no real one by more than this factor.
MAX_NORMALIZATION_SHRINK = 4


def max_prompt_chars(tokenizer: Tokenizer, max_model_len: int) -> int:
    """Characters beyond which a prompt has at least `max_model_len` tokens whatever it says: no
    token covers more characters than the longest string in the vocabulary (special tokens included)."""
    longest = max(len(token) for token in tokenizer.backend.get_vocab(with_added_tokens=True))
    return MAX_NORMALIZATION_SHRINK * max_model_len * max(longest, 1)


class LastTokens(NamedTuple):
    token_ids: list[int]  # the tokens kept, with the special tokens the tokenizer adds (BOS)
    text_ids: list[int]  # the text's own tokens among them
    is_cut: bool  # whether tokens of the text were left out


def last_tokens(tokenizer: Tokenizer, text: str, add_special_tokens: bool, keep: int, chars_a_token: int) -> LastTokens:
    """The last `keep` tokens of `text` as the tokenizer truncating on the left gives them (vLLM's
    `truncate_prompt_tokens`): the text's tokens cut to leave room for the special tokens it adds
    (none when there is no room). Only the text's end is tokenized: the characters that surely hold
    `keep` tokens, twice over (`chars_a_token`: `max_prompt_chars` for one token)."""
    backend = tokenizer.backend
    tail = text[-2 * keep * chars_a_token :]
    encoding = backend.encode(tail, add_special_tokens=False)
    num_special = backend.num_special_tokens_to_add(False) if add_special_tokens else 0
    num_text = keep - num_special if num_special < keep else keep
    is_cut = len(tail) < len(text) or len(encoding.ids) > num_text
    encoding.truncate(num_text, direction="left")
    text_ids = encoding.ids
    if num_special < keep and add_special_tokens:
        encoding = backend.post_process(encoding)
    return LastTokens(encoding.ids, text_ids, is_cut)


def has_lone_surrogate(body: bytes) -> bool:
    """Whether a JSON text escapes a UTF-16 surrogate that is not half of a pair (not Unicode:
    nothing downstream can encode it). Raw surrogates are invalid UTF-8 and fail JSON parsing."""
    if rb"\u" not in body:
        return False
    high_end = -1  # end of a high surrogate escape still waiting for its low half
    for match in _ESCAPE.finditer(body):
        code = int(match.group(1), 16) if match.group(1) else None
        is_low = code is not None and 0xDC00 <= code <= 0xDFFF
        if high_end >= 0:
            if match.start() != high_end or not is_low:
                return True
            high_end = -1
        elif code is not None and 0xD800 <= code <= 0xDBFF:
            high_end = match.end()
        elif is_low:
            return True
    return high_end >= 0


class RequestLimits:
    """ASGI middleware: a body over `max_body_bytes` is refused with 413 as soon as that is known
    (from Content-Length, before reading it, or once that many bytes arrived); a body not complete
    within `read_timeout_s` gets 408; a body with a lone surrogate gets 400. The body is read here,
    then replayed to the app; later `receive` calls (disconnects) pass through."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, read_timeout_s: float) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        try:
            body = await self._read_body(scope, receive)
        except APIError as error:
            response = error.response()
            response.headers["connection"] = "close"  # do not read the rest of a refused body
            await response(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise self._too_large(int(declared))
        chunks, num_bytes = [], 0
        try:
            async with asyncio.timeout(self.read_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        break
                    chunks.append(message.get("body", b""))
                    num_bytes += len(chunks[-1])
                    if num_bytes > self.max_body_bytes:
                        raise self._too_large(num_bytes)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            raise APIError.of(Failure.READ_TIMEOUT, f"the request body did not arrive within {self.read_timeout_s:g} s") from None
        body = b"".join(chunks)
        if has_lone_surrogate(body):
            raise APIError.of(
                Failure.INVALID_REQUEST,
                "the request body escapes a lone UTF-16 surrogate (e.g. \\ud800): strings must be valid Unicode",
            )
        return body

    def _too_large(self, num_bytes: int) -> APIError:
        return APIError.of(
            Failure.TOO_LARGE,
            f"the request body has {num_bytes}+ bytes, more than the "
            f"{self.max_body_bytes} this server accepts (--max-request-body-bytes)",
        )


def _replay(body: bytes, receive: Receive) -> Receive:
    is_sent = False

    async def replay() -> Message:
        nonlocal is_sent
        if not is_sent:
            is_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
