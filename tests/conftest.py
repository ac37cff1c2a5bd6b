"""Shared fixtures: tiny random checkpoints written by transformers itself (the independent
reference), one per supported family, carrying the demo model's tokenizer files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

if not torch.cuda.is_available():  # Triton kernels run on CPU tensors in its interpreter (read at import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

FAMILIES = {
    # Llama with GQA (4 query heads share 2 KV heads) and Llama-3 rope scaling
    "llama": dict(
        cls="LlamaConfig",
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "mistral": dict(cls="MistralConfig", num_attention_heads=4, num_key_value_heads=1, sliding_window=None),
    # Qwen2: q/k/v biases, tied embeddings
    "qwen2": dict(cls="Qwen2Config", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    # Qwen3: per-head q/k RMSNorm, head_dim != hidden / heads
    "qwen3": dict(cls="Qwen3Config", num_attention_heads=4, num_key_value_heads=2, head_dim=32),
}


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pdserve.engine.demo_model import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("demo") / "model")


def write_hf_checkpoint(
    directory: Path,
    family: str,
    tokenizer_dir: Path,
    seed: int = 0,
    num_layers: int = 2,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    **overrides: object,
) -> Path:
    """A transformers-written checkpoint of `family` with random weights and the demo tokenizer;
    `overrides`: config fields that replace the family's (e.g. head_dim)."""
    import json

    import transformers

    spec = dict(FAMILIES[family]) | overrides
    config_cls = getattr(transformers, spec.pop("cls"))
    vocab_size = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        **spec,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger weights than HF's 0.02 init: sharper, less tie-prone logits
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.08)
    model.save_pretrained(directory)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, directory / name)
    return directory


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {family: write_hf_checkpoint(root / family, family, demo_model_dir) for family in FAMILIES}


@pytest.fixture(scope="session")
def tool_checkpoint(tmp_path_factory: pytest.TempPathFactory, checkpoints: dict[str, Path]) -> Path:
    """The llama checkpoint with a Hermes-style chat template that renders tools (tests/
    hermes_template.jinja, like Qwen2.5's), room for prompts that carry tools (2048 positions), and
    the tokenizer's EOS as its only EOS (transformers' LlamaConfig default, id 2, is an ordinary
    character of the demo vocabulary)."""
    import json

    directory = tmp_path_factory.mktemp("tools") / "model"
    shutil.copytree(checkpoints["llama"], directory)
    shutil.copy(Path(__file__).parent / "hermes_template.jinja", directory / "chat_template.jinja")
    for name in ("config.json", "generation_config.json"):
        config = json.loads((directory / name).read_text())
        config.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
        if name == "config.json":
            config["max_position_embeddings"] = 2048
        (directory / name).write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="session")
def thinking_checkpoint(tmp_path_factory: pytest.TempPathFactory, tool_checkpoint: Path) -> Path:
    """`tool_checkpoint` as a reasoning model's tokenizer has it: `<think>` and `</think>` are tokens
    of their own (as in Qwen3's and DeepSeek-R1's), and its chat template opens the thinking in the
    prompt with `open_thinking` (as DeepSeek-R1's does) and closes it with `enable_thinking: false`
    (as Qwen3's does)."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    directory = tmp_path_factory.mktemp("thinking") / "model"
    shutil.copytree(tool_checkpoint, directory)
    tokenizer = HFTokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in ("<think>", "</think>")])
    tokenizer.save(str(directory / "tokenizer.json"))
    template = (directory / "chat_template.jinja").read_text()
    (directory / "chat_template.jinja").write_text(
        template
        + "{%- if add_generation_prompt and open_thinking is defined and open_thinking %}{{- '<think>\\n' }}{%- endif %}"
        + "{%- if add_generation_prompt and enable_thinking is defined and not enable_thinking %}"
        + "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    )
    return directory


HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_hub_cache(tmp_path: Path, demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Hugging Face Hub cache holding the demo checkpoint as the Hub id `org/demo` (its main branch
    at HUB_COMMIT), laid out as huggingface_hub lays one out; the Hub offline, so that only a cache
    can answer."""
    from huggingface_hub import is_offline_mode

    monkeypatch.setitem(is_offline_mode.__globals__, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "hub-cache"
    repo = cache / "models--org--demo"
    shutil.copytree(demo_model_dir, repo / "snapshots" / HUB_COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_COMMIT)
    return cache
