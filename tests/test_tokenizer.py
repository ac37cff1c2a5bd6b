"""Tokenizer and IncrementalDetokenizer against transformers on Llama-3-, Qwen2- and Llama-2-style files."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFBackend

from pdserve.engine.demo_model import TRAINING_TEXT, write_demo_model
from pdserve.engine.detokenizer import IncrementalDetokenizer
from pdserve.engine.tokenizer import Tokenizer

QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_TEMPLATE = """{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}
{{- '\\n\\n# Tools\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}
{{- '\\n</tools><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'system' and loop.first %}{%- continue %}{%- endif %}
{{- '<|im_start|>' + message.role + '\\n' }}
{%- if message.content is string %}{{- message.content }}
{%- else %}{%- for part in message.content %}{%- if part.type == 'text' %}{{- part.text }}{%- endif %}{%- endfor %}
{%- endif %}
{%- if message.reasoning_content %}{{- '<think>' + message.reasoning_content + '</think>' }}{%- endif %}
{%- for call in message.tool_calls or [] %}{{- '\\n<tool_call>\\n' + call.function | tojson + '\\n</tool_call>' }}{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""
LLAMA2_TEMPLATE = """{% if messages[0]['role'] == 'system' %}
{% set system = messages[0]['content'] %}{% set messages = messages[1:] %}
{% else %}{% set system = false %}{% endif %}
{% for message in messages %}
{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
{% endif %}
{% if message['role'] == 'user' %}
{{ bos_token + '[INST] ' }}{% if loop.first and system %}{{ '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}{% endif %}
{{ message['content'] | trim + ' [/INST]' }}
{% else %}
{% generation %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endgeneration %}
{% endif %}
{% endfor %}
"""
LLAMA2_TOOL_TEMPLATE = "Year {{ strftime_now('%Y') }}. Tools: {{ tools | tojson }}\n" + LLAMA2_TEMPLATE

TOOLS = [
    {
        "type": "function",
        "function": {"name": "météo", "description": "天气 lookup", "parameters": {"type": "object", "properties": {}}},
    }
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hello! 👋 Wie geht's?"}],
    [
        {"role": "system", "content": "  Be brief.  "},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4", "reasoning_content": None},
        {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "中文?"}]},
    ],
]
TEXTS = [
    "Hello world. The quick brown fox!",
    "",
    " leading space and trailing   ",
    "emoji 🚂 family 👩‍👩‍👧 CJK 中文分词 e\u0301 (combining accent)",
    "tabs\tand\n\nnewlines\r\n  runs",
    "<|im_start|>system<|im_end|><|endoftext|><think>x</think><s></s>",
]
STYLES = ["demo", "qwen2", "llama2_fast", "llama2_llama"]


def _train(pre_tokenizer: pre_tokenizers.PreTokenizer, **kwargs: object) -> HFBackend:
    backend = HFBackend(models.BPE(**kwargs.pop("model_kwargs", {})))
    backend.pre_tokenizer = pre_tokenizer
    backend.train_from_iterator([TRAINING_TEXT], trainer=trainers.BpeTrainer(show_progress=False, **kwargs))
    return backend


def write_qwen2_style(directory: Path) -> Path:
    """Qwen2.5 layout: NFC + regex split + byte-level, no BOS anywhere, template in chat_template.jinja."""
    directory.mkdir(parents=True)
    backend = _train(
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        ),
        vocab_size=600,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.normalizer = normalizers.NFC()
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    backend.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    backend.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "add_bos_token": False,
        "add_prefix_space": False,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "errors": "replace",
        "split_special_tokens": False,
        "model_max_length": 32768,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "chat_template.jinja").write_text(QWEN2_TEMPLATE)
    eos_ids = [backend.token_to_id("<|im_end|>"), backend.token_to_id("<|endoftext|>")]
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_ids}))
    return directory


def write_llama2_style(directory: Path, tokenizer_class: str) -> Path:
    """SentencePiece-era Llama: byte-fallback BPE with Metaspace, NO post-processor, add_bos_token=True."""
    directory.mkdir(parents=True)
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    backend = _train(
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False),
        vocab_size=700,
        special_tokens=specials,
        model_kwargs={"byte_fallback": True, "unk_token": "<unk>", "fuse_unk": True},
    )
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    backend.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": tokenizer_class,
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "bos_token": {
            "__type": "AddedToken",
            "content": "<s>",
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        },
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "chat_template": [
            {"name": "default", "template": LLAMA2_TEMPLATE},
            {"name": "tool_use", "template": LLAMA2_TOOL_TEMPLATE},
        ],
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "bos_token_id": 1}))
    return directory


@pytest.fixture(scope="module")
def style_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "demo": write_demo_model(root / "demo"),
        "qwen2": write_qwen2_style(root / "qwen2"),
        "llama2_fast": write_llama2_style(root / "llama2_fast", "PreTrainedTokenizerFast"),
        "llama2_llama": write_llama2_style(root / "llama2_llama", "LlamaTokenizerFast"),
    }


@cache
def load_both(directory: Path) -> tuple[Tokenizer, transformers.PreTrainedTokenizerBase]:
    return Tokenizer.from_pretrained(directory), transformers.AutoTokenizer.from_pretrained(directory)


# ---- Tokenizer vs transformers -------------------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
def test_encode_decode_match_transformers(style_dirs: dict[str, Path], style: str) -> None:
    ours, hf = load_both(style_dirs[style])
    for text in TEXTS:
        for add_special_tokens in (True, False):
            ids = ours.encode(text, add_special_tokens=add_special_tokens)
            assert ids == hf(text, add_special_tokens=add_special_tokens).input_ids, (text, add_special_tokens)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("style", STYLES)
def test_special_ids_match_transformers(style_dirs: dict[str, Path], style: str) -> None:
    ours, hf = load_both(style_dirs[style])
    assert ours.vocab_size == len(hf)
    assert ours.bos_token_id == hf.bos_token_id
    assert list(ours.all_special_ids) == hf.all_special_ids
    eos = transformers.GenerationConfig.from_pretrained(style_dirs[style]).eos_token_id
    assert ours.eos_token_ids == {hf.eos_token_id, *(eos if isinstance(eos, list) else [eos])}


@pytest.mark.parametrize("style", ["llama2_fast", "llama2_llama"])
def test_add_bos_token_without_post_processor_adds_nothing_like_transformers(style_dirs: dict[str, Path], style: str) -> None:
    # transformers 5 drops tokenizer_config's add_bos_token/add_eos_token whenever tokenizer.json exists:
    # the file's post-processor alone decides, and this one has none.
    ours, hf = load_both(style_dirs[style])
    assert ours.bos_token_id == 1
    assert ours.encode("Hello world") == hf("Hello world").input_ids
    assert ours.encode("Hello world")[0] != ours.bos_token_id


@pytest.mark.parametrize("style", STYLES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.lists(st.one_of(st.text(max_size=6), st.sampled_from(["<|im_end|>", "<s>", " ", "\n", "é"]))))
def test_encode_random_text_matches_transformers(style_dirs: dict[str, Path], style: str, pieces: list[str]) -> None:
    ours, hf = load_both(style_dirs[style])
    text = "".join(pieces)
    assert ours.encode(text) == hf(text).input_ids
    assert ours.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("style", STYLES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_decode_random_ids_matches_transformers(style_dirs: dict[str, Path], style: str, data: st.DataObject) -> None:
    ours, hf = load_both(style_dirs[style])
    ids = data.draw(st.lists(st.integers(0, ours.vocab_size - 1), max_size=20))
    skip = data.draw(st.booleans())
    assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("style", ["qwen2", "llama2_fast"])
@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("tools", [None, TOOLS])
def test_chat_template_matches_transformers(
    style_dirs: dict[str, Path], style: str, messages: list[dict], tools: list | None
) -> None:
    ours, hf = load_both(style_dirs[style])
    for add_generation_prompt in (True, False):
        expected = hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours.apply_chat_template(messages, add_generation_prompt, tools=tools) == expected


def test_chat_template_tool_call_with_none_content_matches_transformers(style_dirs: dict[str, Path]) -> None:
    ours, hf = load_both(style_dirs["qwen2"])
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "reasoning": "need a tool",
            "tool_calls": [{"type": "function", "function": {"name": "météo", "arguments": {"city": "Zürich"}}}],
        },
    ]
    rendered = ours.apply_chat_template(messages, tools=TOOLS)
    assert rendered == hf.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert '"Zürich"' in rendered and "<think>need a tool</think>" in rendered


def test_template_exception_is_a_value_error(style_dirs: dict[str, Path]) -> None:
    ours, _ = load_both(style_dirs["llama2_fast"])
    with pytest.raises(ValueError, match="roles must alternate"):
        ours.apply_chat_template([{"role": "assistant", "content": "hi"}])
    with pytest.raises(ValueError, match="empty"):
        ours.apply_chat_template([])


def test_missing_tokenizer_json_names_the_directory(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=f"no tokenizer.json in {tmp_path}"):
        Tokenizer.from_pretrained(tmp_path)


def test_missing_chat_template_is_a_clear_error(style_dirs: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((style_dirs["demo"] / "tokenizer.json").read_bytes())
    tokenizer = Tokenizer.from_pretrained(tmp_path)
    assert tokenizer.eos_token_ids == frozenset() and tokenizer.bos_token_id is None
    with pytest.raises(ValueError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_bad_generation_config_is_a_clear_error(style_dirs: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((style_dirs["demo"] / "tokenizer.json").read_bytes())
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": "</s>"}')
    with pytest.raises(ValueError, match="generation_config.json: eos_token_id must be"):
        Tokenizer.from_pretrained(tmp_path)


# ---- IncrementalDetokenizer ----------------------------------------------------------------------


def detokenize(
    tokenizer: Tokenizer, ids: list[int], cuts: list[int], **kwargs: object
) -> tuple[list[str], list[bool], str, IncrementalDetokenizer]:
    """Feed ids split at `cuts`; return the step deltas, step stop flags, flush() text, detokenizer."""
    detokenizer = IncrementalDetokenizer(tokenizer, **kwargs)
    bounds = [0, *sorted(set(cuts)), len(ids)]
    deltas, flags = [], []
    for start, end in zip(bounds, bounds[1:]):
        delta, is_stopped = detokenizer.step(ids[start:end])
        deltas.append(delta)
        flags.append(is_stopped)
    return deltas, flags, detokenizer.flush(), detokenizer


def stop_reference(text: str, stops: list[str], include: bool) -> str | None:
    """The stop string that ends first (the longest of those) cuts the text; None if none occurs."""
    hits = [(text.find(s) + len(s), -len(s)) for s in stops if s in text]
    if not hits:
        return None
    end, neg_len = min(hits)
    return text[:end] if include else text[: end + neg_len]


@st.composite
def id_streams(draw: st.DrawFn, vocab_size: int) -> tuple[list[int], list[int], bool]:
    ids = draw(st.lists(st.integers(0, vocab_size - 1), max_size=40))
    cuts = draw(st.lists(st.integers(0, len(ids)), max_size=len(ids)))
    return ids, cuts, draw(st.booleans())


@pytest.mark.parametrize("style", ["demo", "qwen2", "llama2_fast"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_deltas_and_flush_equal_full_decode(style_dirs: dict[str, Path], style: str, data: st.DataObject) -> None:
    tokenizer, _ = load_both(style_dirs[style])
    ids, cuts, skip = data.draw(id_streams(tokenizer.vocab_size))
    deltas, flags, tail, detokenizer = detokenize(tokenizer, ids, cuts, skip_special_tokens=skip)
    full = tokenizer.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) + tail == full
    assert detokenizer.text == full and not any(flags)
    if "\ufffd" not in full:
        assert not any("\ufffd" in delta for delta in deltas)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_streamed_text_is_always_a_prefix_of_the_final_text(style_dirs: dict[str, Path], data: st.DataObject) -> None:
    tokenizer, _ = load_both(style_dirs["demo"])
    ids = data.draw(st.lists(st.integers(0, tokenizer.vocab_size - 1), max_size=30))
    full = tokenizer.decode(ids)
    detokenizer = IncrementalDetokenizer(tokenizer)
    for token_id in ids:
        detokenizer.step([token_id])
        assert full.startswith(detokenizer.text)


@pytest.mark.parametrize("include", [False, True])
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_stop_string_truncates_at_first_occurrence(style_dirs: dict[str, Path], include: bool, data: st.DataObject) -> None:
    tokenizer, _ = load_both(style_dirs["demo"])
    ids, cuts, skip = data.draw(id_streams(tokenizer.vocab_size))
    full = tokenizer.decode(ids, skip_special_tokens=skip)
    stops = []
    for _ in range(data.draw(st.integers(1, 3))):
        if full and data.draw(st.booleans()):
            start = data.draw(st.integers(0, len(full) - 1))
            stops.append(full[start : start + data.draw(st.integers(1, 6))])
        else:
            stops.append(data.draw(st.text(min_size=1, max_size=4)))
    deltas, flags, tail, detokenizer = detokenize(
        tokenizer, ids, cuts, stop=stops, include_stop_str_in_output=include, skip_special_tokens=skip
    )
    expected = stop_reference(full, stops, include)
    if expected is None:
        assert "".join(deltas) + tail == full and not any(flags)
        return
    assert "".join(deltas) + tail == expected == detokenizer.text
    if "\ufffd" not in full:  # every char completes within the ids, so a step (not flush) sees the stop
        assert any(flags) and tail == ""
    if any(flags):  # once stopped, it stays stopped and quiet
        first = flags.index(True)
        assert all(flags[first:]) and not any(deltas[first + 1 :])
        assert detokenizer.step(ids[:1]) == ("", True)


def test_stop_prefix_is_held_back_until_resolved(style_dirs: dict[str, Path]) -> None:
    tokenizer, _ = load_both(style_dirs["demo"])
    detokenizer = IncrementalDetokenizer(tokenizer, stop=["STOP!"])
    pieces = ["Go ", "ST", "O", "P", ".", " ST", "OP!", "more"]
    ids = [tokenizer.encode(piece, add_special_tokens=False) for piece in pieces]
    assert detokenizer.step(ids[0]) == ("Go ", False)
    assert detokenizer.step(ids[1]) == ("", False)  # "ST" may begin "STOP!"
    assert detokenizer.step(ids[2]) == ("", False)
    assert detokenizer.step(ids[3]) == ("", False)
    assert detokenizer.step(ids[4]) == ("STOP.", False)  # "STOP." can no longer become "STOP!"
    assert detokenizer.step(ids[5]) == (" ", False)
    assert detokenizer.step(ids[6]) == ("", True)
    assert detokenizer.step(ids[7]) == ("", True)
    assert detokenizer.text == "Go STOP. " and detokenizer.flush() == ""


def test_a_stop_token_s_text_waits_for_the_finish(style_dirs: dict[str, Path]) -> None:
    """A token that may end the request (EOS, stop_token_ids) shows its text only once more tokens
    come (it did not end it: min_tokens, or a later message) or the finish is not "stop"."""
    tokenizer, _ = load_both(style_dirs["demo"])
    go, stop, on = (tokenizer.encode(piece, add_special_tokens=False) for piece in ("Go", " now", " on"))
    [stop_id] = stop[-1:]

    def run(min_tokens: int, steps: list[list[int]], finish: str, include: bool = False) -> str:
        detokenizer = IncrementalDetokenizer(tokenizer, (), include, stop_token_ids={stop_id}, min_tokens=min_tokens)
        return "".join(detokenizer.step(ids)[0] for ids in steps) + detokenizer.flush(finish)

    assert run(0, [go, stop], "stop") == run(0, [go + stop, []], "stop") == "Go" + tokenizer.decode(stop[:-1])
    assert run(0, [go, stop], "stop", include=True) == run(0, [go, stop], "length") == "Go now"
    assert run(0, [go, stop, on], "length") == "Go now on"  # it was not the end
    assert run(len(go) + len(stop) + 1, [go, stop], "stop") == "Go now"  # before min_tokens it ends nothing


def test_config_json_s_eos_ends_generation_too(demo_model_dir: Path, tmp_path: Path) -> None:
    """The engine stops on config.json's eos_token_id as well: the tokenizer's set is the same, so
    the gateway holds back the same stop tokens."""
    import shutil

    checkpoint = shutil.copytree(demo_model_dir, tmp_path / "model")
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "eos_token_id": 7}))
    assert Tokenizer.from_pretrained(checkpoint).eos_token_ids == Tokenizer.from_pretrained(demo_model_dir).eos_token_ids | {7}


def test_multibyte_character_split_across_tokens(style_dirs: dict[str, Path]) -> None:
    tokenizer, _ = load_both(style_dirs["demo"])
    ids = tokenizer.encode("🚂 中", add_special_tokens=False)
    assert len(ids) > 3  # the demo vocab has no merges for these bytes
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.step([token_id])[0] for token_id in ids]
    assert [d for d in deltas if d] == ["🚂", " ", "中"]  # each character once it is complete


def test_special_tokens_kept_or_skipped(style_dirs: dict[str, Path]) -> None:
    tokenizer, _ = load_both(style_dirs["demo"])
    ids = tokenizer.encode("hi<|im_end|>", add_special_tokens=False)
    for skip, expected in ((True, "hi"), (False, "hi<|im_end|>")):
        deltas, _, tail, _ = detokenize(tokenizer, ids, [], skip_special_tokens=skip)
        assert "".join(deltas) + tail == expected


@pytest.mark.parametrize("stop", [[""], "STOP", [None]])
def test_bad_stop_strings_are_rejected(style_dirs: dict[str, Path], stop: object) -> None:
    tokenizer, _ = load_both(style_dirs["demo"])
    with pytest.raises(ValueError, match="stop must be a list of non-empty strings"):
        IncrementalDetokenizer(tokenizer, stop=stop)


def test_a_tokenizer_from_elsewhere_keeps_the_models_eos_ids(demo_model_dir: Path, tmp_path: Path) -> None:
    """--tokenizer DIR: the tokenizer and its chat template from DIR, the EOS ids of the model's
    generation_config.json and config.json still (the gateway's detokenizer holds back those)."""
    import shutil

    tokenizer_dir, model_dir = tmp_path / "tokenizer", tmp_path / "model"
    tokenizer_dir.mkdir()
    model_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_model_dir / name, tokenizer_dir / name)
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    (model_dir / "config.json").write_text(json.dumps({"eos_token_id": 11}))
    alone = Tokenizer.from_pretrained(tokenizer_dir)
    assert not {7, 9, 11} & alone.eos_token_ids
    assert Tokenizer.from_pretrained(tokenizer_dir, model_dir).eos_token_ids == alone.eos_token_ids | {7, 9, 11}


def test_stop_strings_count_only_past_min_tokens(style_dirs: dict[str, Path]) -> None:
    """As vLLM's detokenizer: a stop string in the text of the first min_tokens ids ends nothing;
    one that ends after it does, even if it begins within it."""
    tokenizer, _ = load_both(style_dirs["demo"])
    pieces = [tokenizer.encode(piece, add_special_tokens=False) for piece in ("ab", "cd", "ab", "xy")]

    def run(min_tokens: int, stop: str, whole: bool = False) -> tuple[str, str | None]:
        """The pieces a step each, or (`whole`) all in one step."""
        detokenizer = IncrementalDetokenizer(tokenizer, [stop], min_tokens=min_tokens)
        text = ""
        for ids in [sum(pieces, [])] if whole else pieces:
            delta, is_stopped = detokenizer.step(ids)
            text += delta
            if is_stopped:
                break
        return text + detokenizer.flush("length"), detokenizer.stop_reason

    first_two = len(pieces[0]) + len(pieces[1])
    for whole in (False, True):
        assert run(0, "ab", whole) == ("", "ab")
        assert run(len(pieces[0]), "ab", whole) == ("abcd", "ab")  # the first "ab" is within min_tokens
        assert run(first_two + len(pieces[2]), "ab", whole) == ("abcdabxy", None)  # so are both
        assert run(len(pieces[0]), "bc", whole) == ("a", "bc")  # it ends past min_tokens' text
        assert run(first_two, "bc", whole) == ("abcdabxy", None)
