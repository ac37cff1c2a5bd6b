"""Real architectures' shapes for random-weight benchmarks (vLLM's `--load-format dummy`): an HF
`config.json` plus the demo tokenizer files, so the engine loads them like any checkpoint."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from engine.config import ModelConfig

SHAPES = {
    "llama3-8b": {  # meta-llama/Llama-3.1-8B
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "hidden_act": "silu",
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
    },
    "qwen2.5-0.5b": {  # Qwen/Qwen2.5-0.5B-Instruct
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
        "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
        "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True, "hidden_act": "silu",
        "use_sliding_window": False, "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16",
    },
}


def write_shape(name: str, root: Path | None = None) -> Path:
    """A checkpoint directory with `name`'s config and no weights; tokenizer from the demo model."""
    from engine.demo_model import write_demo_model

    target = Path(root or tempfile.mkdtemp(prefix=f"pdserve-{name}-"))
    scratch = Path(tempfile.mkdtemp())
    write_demo_model(scratch)
    for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (scratch / file).exists():
            shutil.copy(scratch / file, target / file)
    shutil.rmtree(scratch)
    (target / "config.json").write_text(json.dumps(SHAPES[name], indent=2))
    return target


def decode_weight_bytes(config: ModelConfig, dtype_bytes: int = 2) -> int:
    """Bytes one decode step must read from the weights: everything but the embedding table (only
    the batch's rows are read from it) — the LM head is read whole, also when tied."""
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
