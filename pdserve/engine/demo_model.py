"""A tiny random-weight Llama checkpoint in Hugging Face layout, for tests and demos.

`write_demo_model(dir)` writes config, weights, a byte-level BPE tokenizer and a ChatML template.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
NUM_TRAINED_TOKENS = 800  # byte alphabet (256) + merges; the 4 special tokens come after

HIDDEN_SIZE = 128
INTERMEDIATE_SIZE = 384
NUM_LAYERS = 4
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = 32
INIT_STD = 0.02

# Llama-3's pre-tokenizer split: contractions, words, 1-3 digit groups, punctuation, whitespace runs.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TRAINING_TEXT = """\
The little engine ran along the valley every morning, carrying bread, letters and news to the towns
beyond the river. People waited at each station; children waved, and the old station master checked his
watch twice before he would let the train go. "We are never late," he said, "because we always start early."

A language model reads a prompt, one token at a time, and then writes an answer. The first phase is called
prefill: the whole prompt is processed together, which keeps the processor busy with large matrix products.
The second phase is called decode: each new token depends on all the tokens before it, so the model must
run once per token, and most of the time is spent reading the cache of keys and values from memory.
Serving systems split these two phases between different machines, so that each can be tuned for its own work.
The key value cache is stored in fixed size blocks; a block table maps every request to its blocks.

What is the weather like today? It is sunny and warm, with a light wind from the west. Tomorrow there may
be rain in the afternoon, so take an umbrella if you are going for a walk in the park or along the beach.
In the winter the days are short and cold; in the summer they are long, bright and full of sound.

Numbers matter too: 1, 2, 3, 10, 42, 100, 256, 1024, 2048 and 4096 appear in many programs. A function
returns a value; a class holds data and methods; a test checks that the output is what we expected.
def add(a, b):
    return a + b

for i in range(10):
    print(i, add(i, 1))

She asked, "Could you help me with my homework?" He answered, "Of course, let's start with the questions
about history and then move on to science." They worked together for an hour, writing notes, drawing
diagrams and reading aloud. When they finished, they felt proud of what they had learned.

Good food is simple: fresh vegetables, warm bread, a little cheese, olive oil and a glass of water.
The café on the corner serves coffee, tea and cakes; its owner is a naïve but kind man who likes music.
Système, über, señor and façade are words borrowed from other languages.

Questions and answers: Who wrote the letter? Where did they go? Why is the sky blue? How many days are
in a week? Seven. When does the shop open? At nine o'clock. Which road leads to the city? The north road.
I'm sure you'll find it, and if you don't, we'd be happy to show you the way. They've already left.
"""


def write_demo_model(directory: str | Path, seed: int = 0) -> Path:
    """Write the demo checkpoint into `directory` (created if needed) and return its path."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_demo_tokenizer()
    num_tokens = tokenizer.get_vocab_size(with_added_tokens=True)
    vocab_size = -(-num_tokens // 64) * 64
    bos_id, eos_id, im_end_id = (tokenizer.token_to_id(t) for t in (BOS_TOKEN, EOS_TOKEN, IM_END_TOKEN))
    tokenizer.save(str(path / "tokenizer.json"))
    _write_json(path / "config.json", _model_config(vocab_size, bos_id, eos_id))
    generation_config = {"bos_token_id": bos_id, "eos_token_id": [eos_id, im_end_id]}
    _write_json(path / "generation_config.json", generation_config)
    _write_json(path / "tokenizer_config.json", _tokenizer_config(tokenizer))
    _write_json(path / "special_tokens_map.json", {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN})
    save_file(_random_weights(vocab_size, seed), str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def build_demo_tokenizer() -> Tokenizer:
    """A Llama-3-style byte-level BPE tokenizer trained on TRAINING_TEXT (deterministic)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=NUM_TRAINED_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([TRAINING_TEXT], trainer=trainer)
    specials = [BOS_TOKEN, EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0",
        pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return tokenizer


def _model_config(vocab_size: int, bos_id: int, eos_id: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN_SIZE,
        "intermediate_size": INTERMEDIATE_SIZE,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": NUM_KV_HEADS,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "vocab_size": vocab_size,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": INIT_STD,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
        "dtype": "float32",
    }


def _tokenizer_config(tokenizer: Tokenizer) -> dict:
    added = {
        str(token_id): {
            "content": token.content,
            "lstrip": token.lstrip,
            "normalized": token.normalized,
            "rstrip": token.rstrip,
            "single_word": token.single_word,
            "special": token.special,
        }
        for token_id, token in sorted(tokenizer.get_added_tokens_decoder().items())
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "added_tokens_decoder": added,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    }


def _random_weights(vocab_size: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * INIT_STD

    q_size, kv_size = NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM
    weights = {"model.embed_tokens.weight": normal(vocab_size, HIDDEN_SIZE)}
    for i in range(NUM_LAYERS):
        prefix = f"model.layers.{i}."
        weights[prefix + "self_attn.q_proj.weight"] = normal(q_size, HIDDEN_SIZE)
        weights[prefix + "self_attn.k_proj.weight"] = normal(kv_size, HIDDEN_SIZE)
        weights[prefix + "self_attn.v_proj.weight"] = normal(kv_size, HIDDEN_SIZE)
        weights[prefix + "self_attn.o_proj.weight"] = normal(HIDDEN_SIZE, q_size)
        weights[prefix + "mlp.gate_proj.weight"] = normal(INTERMEDIATE_SIZE, HIDDEN_SIZE)
        weights[prefix + "mlp.up_proj.weight"] = normal(INTERMEDIATE_SIZE, HIDDEN_SIZE)
        weights[prefix + "mlp.down_proj.weight"] = normal(HIDDEN_SIZE, INTERMEDIATE_SIZE)
        weights[prefix + "input_layernorm.weight"] = torch.ones(HIDDEN_SIZE)
        weights[prefix + "post_attention_layernorm.weight"] = torch.ones(HIDDEN_SIZE)
    weights["model.norm.weight"] = torch.ones(HIDDEN_SIZE)
    weights["lm_head.weight"] = normal(vocab_size, HIDDEN_SIZE)
    return weights


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def default_demo_model_dir() -> Path:
    """The embedded default model: written once under `$PDSERVE_CACHE` (default
    ~/.cache/pdserve) and reused; written to a temporary directory first, then renamed."""
    root = Path(os.environ.get("PDSERVE_CACHE", Path.home() / ".cache" / "pdserve"))
    target = root / "demo-model"
    if (target / "model.safetensors").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="demo-model-", dir=root))
    write_demo_model(scratch)
    try:
        scratch.rename(target)
    except OSError:  # another process got there first
        shutil.rmtree(scratch, ignore_errors=True)
    return target
