"""The demo checkpoint loads in transformers, and its tokenizer behaves the same through ours and theirs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from pdserve.engine.demo_model import write_demo_model
from pdserve.engine.tokenizer import Tokenizer

TEXTS = [
    "Hello world, the train is never late!",
    "",
    "naïve café über façade — ½ × π ≈ 3.14",
    "emoji 🚂🚃🚃 and 👩‍👩‍👧 family",
    "中文分词测试，日本語のテキスト、한국어",
    "  leading, \t tabs\n\n\nnewlines   and    runs   ",
    "<|im_start|>user\nspecial tokens in text<|im_end|><|end_of_text|>",
    "def add(a, b):\n    return a + b\n",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there! 👋"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 中文?"},
    ],
    [{"role": "user", "content": [{"type": "text", "text": "part one, "}, {"type": "text", "text": "part two"}]}],
]


@pytest.fixture(scope="module")
def hf_tokenizer(demo_model_dir: Path) -> transformers.PreTrainedTokenizerBase:
    return transformers.AutoTokenizer.from_pretrained(demo_model_dir)


def test_transformers_loads_model_with_all_weights(demo_model_dir: Path) -> None:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(demo_model_dir, output_loading_info=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    config = model.config
    shape = (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads, config.head_dim)
    assert shape == (128, 4, 2, 32)
    weights = load_file(demo_model_dir / "model.safetensors")
    assert torch.equal(model.lm_head.weight, weights["lm_head.weight"])
    ids = torch.tensor([Tokenizer.from_pretrained(demo_model_dir).encode(TEXTS[0])])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], config.vocab_size)
    assert torch.isfinite(logits).all()


def test_vocab_covers_tokenizer_and_is_padded_to_64(demo_model_dir: Path) -> None:
    ours = Tokenizer.from_pretrained(demo_model_dir)
    vocab_size = json.loads((demo_model_dir / "config.json").read_text())["vocab_size"]
    assert 700 <= ours.vocab_size <= 900
    assert vocab_size % 64 == 0 and 0 <= vocab_size - ours.vocab_size < 64


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(demo_model_dir: Path, hf_tokenizer, text: str) -> None:
    ours = Tokenizer.from_pretrained(demo_model_dir)
    for add_special_tokens in (True, False):
        ids = ours.encode(text, add_special_tokens=add_special_tokens)
        assert ids == hf_tokenizer(text, add_special_tokens=add_special_tokens).input_ids
        for skip in (True, False):
            expected = hf_tokenizer.decode(ids, skip_special_tokens=skip)
            assert ours.decode(ids, skip_special_tokens=skip) == expected
    assert ours.encode(text)[0] == ours.bos_token_id  # the post-processor prepends BOS


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_matches_transformers(demo_model_dir: Path, hf_tokenizer, messages: list[dict]) -> None:
    ours = Tokenizer.from_pretrained(demo_model_dir)
    for add_generation_prompt in (True, False):
        expected = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    assert ours.apply_chat_template(messages).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("start", ["The answer is", "The answer is ", "  spaced  ", "", [{"type": "text", "text": "Parts: "}]])
def test_continuing_the_final_message_matches_transformers(demo_model_dir: Path, hf_tokenizer, start: object) -> None:
    """The prompt ends inside the assistant's last message (its start given), trailing whitespace
    kept or not as transformers decides."""
    ours = Tokenizer.from_pretrained(demo_model_dir)
    messages = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": start}]
    expected = hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False, continue_final_message=True
    )
    rendered = ours.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    assert rendered == expected and not rendered.endswith("<|im_end|>\n")
    with pytest.raises(ValueError, match="add_generation_prompt"):
        ours.apply_chat_template(messages, add_generation_prompt=True, continue_final_message=True)


def test_special_ids_match_transformers(demo_model_dir: Path, hf_tokenizer) -> None:
    ours = Tokenizer.from_pretrained(demo_model_dir)
    generation_config = transformers.GenerationConfig.from_pretrained(demo_model_dir)
    assert ours.vocab_size == len(hf_tokenizer)
    assert ours.bos_token_id == hf_tokenizer.bos_token_id
    assert list(ours.all_special_ids) == hf_tokenizer.all_special_ids
    assert ours.eos_token_ids == {hf_tokenizer.eos_token_id, *generation_config.eos_token_id}
    assert hf_tokenizer.convert_tokens_to_ids("<|im_end|>") in ours.eos_token_ids


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    first = write_demo_model(tmp_path / "a", seed=3)
    second = write_demo_model(str(tmp_path / "b"), seed=3)
    other_seed = write_demo_model(tmp_path / "c", seed=4)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "model.safetensors").read_bytes() != (other_seed / "model.safetensors").read_bytes()
    assert (first / "tokenizer.json").read_bytes() == (other_seed / "tokenizer.json").read_bytes()
