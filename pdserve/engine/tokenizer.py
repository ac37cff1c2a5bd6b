"""Text <-> token ids and chat templates for a Hugging Face checkpoint, matching transformers 5.

Wraps a `tokenizers.Tokenizer` from tokenizer.json plus the special tokens, chat template and EOS ids
found in tokenizer_config.json, chat_template.jinja, special_tokens_map.json, generation_config.json and config.json.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# transformers' named special tokens, in its order; other "*_token" config keys come after them.
NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class Tokenizer:
    """A fast tokenizer plus the checkpoint's special tokens, chat template(s) and EOS ids."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        special_tokens: dict[str, str],
        extra_special_tokens: Sequence[str] = (),
        chat_template: str | dict[str, str] | None = None,
        generation_eos_token_ids: Sequence[int] = (),
    ) -> None:
        self._backend = backend
        self._backend.no_truncation()
        self._backend.no_padding()
        self._special_tokens = dict(special_tokens)
        _mark_special(backend, [*special_tokens.values(), *extra_special_tokens])
        special_ids = (backend.token_to_id(t) for t in [*special_tokens.values(), *extra_special_tokens])
        self._all_special_ids = tuple(dict.fromkeys(i for i in special_ids if i is not None))
        self._chat_template = chat_template
        eos_id = self._token_id("eos_token")
        tokenizer_eos = [eos_id] if eos_id is not None else []
        self._eos_token_ids = frozenset([*generation_eos_token_ids, *tokenizer_eos])
        self._compiled_templates: dict[str, jinja2.Template] = {}
        self._byte_token_ids = _byte_fallback_ids(backend)

    @classmethod
    def from_pretrained(cls, path: str | Path, model_dir: str | Path | None = None) -> Tokenizer:
        """`model_dir`: the checkpoint whose generation_config.json and config.json name its EOS ids,
        when the tokenizer comes from elsewhere (default: `path`)."""
        directory = Path(path)
        config_dir = directory if model_dir is None else Path(model_dir)
        if not (directory / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {directory}: pdserve needs a checkpoint with a fast tokenizer file")
        try:
            backend = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as error:  # the Rust loader raises a bare Exception
            raise ValueError(f"cannot load {directory / 'tokenizer.json'}: {error}") from error
        config = _read_json(directory / "tokenizer_config.json")
        if "added_tokens_decoder" not in config:  # transformers' legacy path: the map overrides the config
            config.update(_read_json(directory / "special_tokens_map.json"))
        special_tokens, extra_special_tokens = _special_tokens(config)
        return cls(
            backend,
            special_tokens,
            extra_special_tokens,
            _chat_template(directory, config),
            _generation_eos_ids(config_dir / "generation_config.json") + _generation_eos_ids(config_dir / "config.json"),
        )

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (transformers' `len(tokenizer)`)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._token_id("bos_token")

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Ids that end generation: generation_config's and config.json's eos_token_id(s) and the
        tokenizer's eos token (the engine's set: the gateway's detokenizer holds back the same ids)."""
        return self._eos_token_ids

    @property
    def all_special_ids(self) -> tuple[int, ...]:
        return self._all_special_ids

    @property
    def byte_token_ids(self) -> frozenset[int]:
        """Byte-fallback tokens (<0xHH>): a run of them decodes as one unit, so its text is final only
        once the run ends. Empty for byte-level BPE (Llama-3, Qwen)."""
        return self._byte_token_ids

    def set_chat_template(self, template: str) -> None:
        """Render chats with `template` instead of the checkpoint's (`--chat-template`)."""
        compile_chat_template(template)  # a broken one fails here, before it replaces the checkpoint's
        self._chat_template = template

    def info(self) -> dict[str, Any]:
        """The special tokens and chat template, as vLLM's /tokenizer_info reports a tokenizer."""
        template = self._chat_template
        if isinstance(template, dict):
            template = template.get("default")
        return {**self._special_tokens, "chat_template": template}

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Each id's token as the vocabulary spells it (e.g. "Ġthe")."""
        return [self._backend.id_to_token(i) or "" for i in ids]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list | None = None,
        continue_final_message: bool = False,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render messages to a prompt string (encode it with add_special_tokens=False, like transformers).
        `continue_final_message`: the prompt ends inside the last message, which the model goes on
        writing (the reply's start given), as transformers cuts it. `chat_template`: a Jinja template
        to use instead of the checkpoint's."""
        if not messages:
            raise ValueError("cannot apply the chat template to an empty list of messages")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be set")
        if any(not isinstance(m, dict) for m in messages):
            raise ValueError("every chat message must be a dict with 'role' and 'content'")
        if tools is not None and any(not isinstance(t, dict) for t in tools):
            raise ValueError("tools must be JSON-schema dicts")
        template = self._template(is_tool_use=tools is not None, source=chat_template)
        variables = {**self._special_tokens, **kwargs}
        try:
            rendered = template.render(
                messages=[_normalize_message(m) for m in (_marked(messages) if continue_final_message else messages)],
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.TemplateError as error:
            raise ValueError(f"chat template rejected the messages: {error}") from error
        return _cut_at_mark(rendered) if continue_final_message else rendered

    def _token_id(self, name: str) -> int | None:
        token = self._special_tokens.get(name)
        return None if token is None else self._backend.token_to_id(token)

    def _template(self, is_tool_use: bool, source: str | dict[str, str] | None = None) -> jinja2.Template:
        source = self._chat_template if source is None else source
        if source is None:
            raise ValueError("this checkpoint has no chat template (in tokenizer_config.json or chat_template.jinja)")
        if isinstance(source, dict):
            name = "tool_use" if is_tool_use and "tool_use" in source else "default"
            if name not in source:
                raise ValueError(f"checkpoint has chat templates {sorted(source)} but none named 'default'")
            source = source[name]
        if source not in self._compiled_templates:
            self._compiled_templates[source] = _jinja_environment().from_string(source)
        return self._compiled_templates[source]


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; render its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


CONTINUE_MARK = "PDSERVE_CONTINUE_HERE "  # after the final message's text, to find where it ends once rendered


def _marked(messages: list[dict]) -> list[dict]:
    """A copy of `messages` with CONTINUE_MARK after the last message's text (its last text part)."""
    last = dict(messages[-1])
    content = last.get("content")
    if isinstance(content, str):
        last["content"] = content + CONTINUE_MARK
    elif isinstance(content, (list, tuple)):
        parts = [dict(part) if isinstance(part, dict) else part for part in content]
        texts = [part for part in parts if isinstance(part, dict) and isinstance(part.get("text"), str)]
        if not texts:
            raise ValueError("continue_final_message needs text in the final message to continue")
        texts[-1]["text"] += CONTINUE_MARK
        last["content"] = parts
    else:
        raise ValueError("continue_final_message needs text in the final message to continue")
    return [*messages[:-1], last]


def _cut_at_mark(rendered: str) -> str:
    """The rendered chat up to the final message's end: its trailing whitespace kept where the
    template kept the mark's, else trimmed (as transformers cuts it)."""
    at = rendered.rfind(CONTINUE_MARK.strip())
    if at < 0:
        raise ValueError("continue_final_message: the chat template does not render the final message's text")
    return rendered[:at] if rendered.startswith(CONTINUE_MARK, at) else rendered[:at].rstrip()


def compile_chat_template(source: str) -> jinja2.Template:
    """`source` compiled as chat templates are; ValueError naming the line of a syntax error."""
    try:
        return _jinja_environment().from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"the chat template does not compile (line {exc.lineno}): {exc.message}") from None


def _jinja_environment() -> ImmutableSandboxedEnvironment:
    """Configured like transformers' chat-template environment."""

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _normalize_message(message: dict) -> dict:
    """Drop None fields (OpenAI sends content=None) and alias reasoning fields, as transformers does."""
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in REASONING_FIELDS if k in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def _mark_special(backend: tokenizers.Tokenizer, contents: Sequence[str]) -> None:
    """Make the config's special tokens special added tokens, keeping flags of ones already added."""
    existing = {t.content: t for t in backend.get_added_tokens_decoder().values()}
    to_add = []
    for content in dict.fromkeys(contents):
        old = existing.get(content)
        if old is None:
            to_add.append(tokenizers.AddedToken(content, special=True, normalized=False))
        elif not old.special:
            to_add.append(
                tokenizers.AddedToken(
                    content,
                    single_word=old.single_word,
                    lstrip=old.lstrip,
                    rstrip=old.rstrip,
                    normalized=old.normalized,
                    special=True,
                )
            )
    if to_add:
        backend.add_special_tokens(to_add)


def _byte_fallback_ids(backend: tokenizers.Tokenizer) -> frozenset[int]:
    decoder = backend.decoder
    if decoder is None or b'"ByteFallback"' not in decoder.__getstate__():
        return frozenset()
    ids = (backend.token_to_id(f"<0x{byte:02X}>") for byte in range(256))
    return frozenset(i for i in ids if i is not None)


def _special_tokens(config: dict) -> tuple[dict[str, str], list[str]]:
    """Named special tokens (bos_token, eos_token, ..., model-specific *_token) and the extra ones."""
    named = {k: config[k] for k in NAMED_SPECIAL_TOKENS if k in config}
    named.update({k: v for k, v in config.items() if k.endswith("_token") and k not in named})
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    if isinstance(extra, dict):
        named.update(extra)
        extra = []
    contents = {k: _token_content(v) for k, v in named.items()}
    return {k: v for k, v in contents.items() if v is not None}, [c for c in map(_token_content, extra) if c]


def _token_content(value: Any) -> str | None:
    """A token given as "text" or as an AddedToken dict {"content": "text", ...}; else not a token."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(directory: Path, config: dict) -> str | dict[str, str] | None:
    """Template files (chat_template.jinja, additional_chat_templates/) win over tokenizer_config's entry."""
    templates = {}
    if (directory / "chat_template.jinja").is_file():
        templates["default"] = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    for file in sorted((directory / "additional_chat_templates").glob("*.jinja")):
        templates[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
    if list(templates) == ["default"]:
        return templates["default"]
    if templates:
        return templates
    template = config.get("chat_template")
    if isinstance(template, list):
        return {t["name"]: t["template"] for t in template}
    return template


def _generation_eos_ids(path: Path) -> list[int]:
    eos = _read_json(path).get("eos_token_id")
    ids = [] if eos is None else [eos] if isinstance(eos, int) else eos
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise ValueError(f"{path}: eos_token_id must be an int or a list of ints, got {eos!r}")
    return ids


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data
