"""Real architectures' shapes for random-weight benchmarks (vLLM's `--load-format dummy`): an HF
`config.json` plus the demo tokenizer files, so the engine loads them like any checkpoint."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from pdserve.engine.config import ModelConfig

SHAPES = {
    "llama3-8b": {  # meta-llama/Llama-3.1-8B
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "torch_dtype": "bfloat16",
    },
    "qwen2.5-0.5b": {  # Qwen/Qwen2.5-0.5B-Instruct
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "use_sliding_window": False,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "torch_dtype": "bfloat16",
    },
    "qwen3-0.6b": {  # Qwen/Qwen3-0.6B
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "attention_bias": False,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "torch_dtype": "bfloat16",
    },
}
SHAPES["qwen2.5-1.5b"] = {  # Qwen/Qwen2.5-1.5B-Instruct: Qwen2.5-0.5B's config at its own sizes
    **SHAPES["qwen2.5-0.5b"],
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
}


def write_shape(name: str, root: Path | None = None) -> Path:
    """A checkpoint directory with `name`'s config, no weights, and a tokenizer that covers its
    whole vocabulary (one word a token), so every id a random-weight model samples has text."""
    target = Path(root or tempfile.mkdtemp(prefix=f"pdserve-{name}-"))
    target.mkdir(parents=True, exist_ok=True)
    config = SHAPES[name]
    write_word_tokenizer(target, config["vocab_size"], config["bos_token_id"], config["eos_token_id"])
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def write_word_tokenizer(target: Path, vocab_size: int, bos_id: int, eos_id: int) -> None:
    """tokenizer.json of `vocab_size` words ("w0", "w1", ...; <s> and </s> at their ids), split on
    white space: any id sequence decodes to text that encodes back to it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {f"w{i}": i for i in range(vocab_size)} | {"<s>": bos_id, "</s>": eos_id, "<unk>": 0}
    vocab = {word: i for word, i in vocab.items() if i not in (bos_id, eos_id, 0) or word in ("<s>", "</s>", "<unk>")}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with a space
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos_id)])
    tokenizer.save(str(target / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    (target / "tokenizer_config.json").write_text(json.dumps({**special, "chat_template": template}))


def projection_shapes(config: ModelConfig) -> list[tuple[int, int]]:
    """(out, in) of one layer's fused projections: qkv, o_proj, gate_up, down."""
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    return [(d * (config.num_heads + 2 * config.num_kv_heads), h), (h, config.num_heads * d), (2 * i, h), (h, i)]


def quantized_projection_bytes(n: int, k: int, quantization: str, group_size: int = 128, dtype_bytes: int = 2) -> int:
    """Stored bytes of one [n, k] projection: 8 bits + an fp32 scale per output channel, or 4 bits
    + a scale (model dtype) and a uint8 zero point per group of `group_size` inputs."""
    if quantization in ("fp8", "int8", "compressed-tensors"):
        return n * k + 4 * n
    assert quantization in ("awq", "gptq"), quantization
    return n * k // 2 + (k // group_size) * n * (dtype_bytes + 1)


def decode_weight_bytes(config: ModelConfig, dtype_bytes: int = 2, quantization: str | None = None) -> int:
    """Bytes one decode step must read from the weights: everything but the embedding table (only
    the batch's rows are read from it) — the LM head is read whole, also when tied, and never
    quantized; with `quantization`, the decoder's projections at their stored size."""
    if quantization is not None:
        plain = sum(dtype_bytes * n * k for n, k in projection_shapes(config))
        stored = sum(
            quantized_projection_bytes(n, k, quantization, dtype_bytes=dtype_bytes) for n, k in projection_shapes(config)
        )
        return decode_weight_bytes(config, dtype_bytes) + config.num_layers * (stored - plain)
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    attention = h * d * (config.num_heads + 2 * config.num_kv_heads) + config.num_heads * d * h
    if config.attention_bias:
        attention += d * (config.num_heads + 2 * config.num_kv_heads)
    mlp = 3 * h * i
    norms = 2 * h + (2 * d if config.qk_norm else 0)
    per_layer = attention + mlp + norms
    return dtype_bytes * (config.num_layers * per_layer + h + config.vocab_size * h)


def prefill_flops(config: ModelConfig, num_tokens: int) -> float:
    """Matmul FLOPs of one causal prefill: 2 x params x tokens for the linear layers (the LM head
    only for the last token, as the engine computes it) + QK^T and PV over the causal triangle."""
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    linear = config.num_layers * (h * d * (config.num_heads + 2 * config.num_kv_heads) + config.num_heads * d * h + 3 * h * i)
    attention = config.num_layers * 2 * 2 * config.num_heads * d * num_tokens * (num_tokens + 1) / 2
    return 2 * linear * num_tokens + attention + 2 * h * config.vocab_size
