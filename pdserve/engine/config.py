"""Configuration, built once at the entry point and never mutated: the model's shape (read from an
HF `config.json`) and the engine's knobs (`EngineConfig`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pdserve.engine.quant_config import QuantConfig

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
ARCHITECTURE_OF_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
QUANTIZATION_CHOICES = ("fp8", "int8", "awq", "gptq", "compressed-tensors")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# "auto": the model's dtype; "fp8": float8_e4m3fn with per-layer K/V scales (kernels/kv_quant.py)
KV_CACHE_DTYPES = {"fp8": torch.float8_e4m3fn}
SCHEDULING_POLICIES = ("fcfs", "priority")  # engine/waiting_queue.py
DEFAULT_MAX_LOGPROBS = 20  # vLLM's --max-logprobs (and OpenAI's top_logprobs limit)


class ConfigError(ValueError):
    """A checkpoint or an engine setting pdserve cannot serve."""


# generation_config.json's settings that become requests' defaults (vLLM's `--generation-config auto`)
GENERATION_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens")


def generation_defaults(directory: str | Path) -> dict[str, float]:
    """The sampling settings a checkpoint's generation_config.json recommends, as vLLM reads them:
    the defaults of requests that leave them out, as SamplingParams takes them (`max_new_tokens` as
    `max_tokens`, whole numbers; `top_k` 0, all tokens, as -1); {} without the file. Raises
    ConfigError for a file that is not a JSON object."""
    path = Path(directory) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: not a JSON object")
    defaults = {
        key: config[key]
        for key in GENERATION_DEFAULT_KEYS
        if isinstance(config.get(key), (int, float)) and not isinstance(config.get(key), bool)
    }
    if "max_new_tokens" in defaults:
        defaults["max_tokens"] = int(defaults.pop("max_new_tokens"))
    if "top_k" in defaults:
        defaults["top_k"] = int(defaults["top_k"]) or -1
    return defaults


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf(cls, hf: dict) -> RopeConfig:
        # transformers >= 5 writes `rope_parameters`; older checkpoints `rope_theta` + `rope_scaling`.
        params = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling") or {}
        params = {**scaling, **params}
        theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        return cls(
            theta=theta,
            rope_type=rope_type,
            factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
        )


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder, as the engine needs it."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases
    o_proj_bias: bool = False
    qk_norm: bool = False
    checkpoint_dtype: str = "float32"
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None
    quantization: QuantConfig | None = None  # the checkpoint's quantization_config

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads {self.num_kv_heads}"
            )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json in {model_dir}")
        return cls.from_hf(json.loads(path.read_text()))

    @classmethod
    def from_hf(cls, hf: dict) -> ModelConfig:
        from pdserve.engine.quant_config import parse_quantization_config  # it needs ConfigError from here

        model_type = hf.get("model_type", "?")  # a config without `architectures`: its model_type's, as transformers reads it
        architectures = hf.get("architectures") or [ARCHITECTURE_OF_MODEL_TYPE.get(model_type, model_type)]
        architecture = architectures[0]
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(f"architecture {architecture!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias", False):
            raise ConfigError(
                f"{architecture} with hidden_act={hf.get('hidden_act')!r}, mlp_bias={hf.get('mlp_bias')} is not supported"
            )
        num_heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        is_qwen2 = architecture == "Qwen2ForCausalLM"
        use_window = hf.get("use_sliding_window", architecture == "MistralForCausalLM")
        return cls(
            architecture=architecture,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rope=RopeConfig.from_hf(hf),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; its config has no attention_bias key.
            attention_bias=True if is_qwen2 else bool(hf.get("attention_bias") or False),
            o_proj_bias=False if is_qwen2 else bool(hf.get("attention_bias") or False),  # transformers' Llama, Qwen3
            qk_norm=architecture == "Qwen3ForCausalLM",
            checkpoint_dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "float32"),
            eos_token_ids=eos_ids,
            sliding_window=hf.get("sliding_window") if use_window else None,
            quantization=parse_quantization_config(hf.get("quantization_config")),
        )

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token occupies across all layers, per element byte."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    @property
    def longest_context(self) -> int:
        """Longest context served with exact (full) attention: a sliding window is never exceeded."""
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings


@dataclass(frozen=True)
class EngineConfig:
    """Knobs of one engine (one worker). `model` is a local directory once resolved."""

    model: str
    tokenizer: str | None = None  # a directory or Hub id holding the tokenizer (vLLM's --tokenizer); None: the model's
    revision: str | None = None  # of a Hub id `model` (a branch, tag or commit); None: the default branch
    tokenizer_revision: str | None = None  # likewise of a Hub id `tokenizer`
    download_dir: str | None = None  # the Hub cache Hub ids are fetched into and read from; None: HF's
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"  # "auto" | "fp8" (half the bytes per block: twice the blocks)
    device: str = "auto"
    block_size: int = 16
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    num_kv_blocks: int | None = None
    kv_cache_memory_gib: float | None = None
    gpu_memory_utilization: float = 0.85
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    # Launch a decode step before the last one's tokens are back (engine/step_pipeline.py)
    async_scheduling: bool = True
    scheduling_policy: str = "fcfs"  # "fcfs" | "priority": requests' `priority`, lower first (engine/waiting_queue.py)
    load_format: str = "auto"  # "dummy": the checkpoint's shapes with random weights (vLLM's name)
    quantization: str | None = None  # fp8|int8: quantize at load; awq|gptq|...: the checkpoint's (engine/quant_config.py)
    seed: int = 0
    max_logprobs: int = DEFAULT_MAX_LOGPROBS  # a request's logprobs / prompt_logprobs at most (vLLM's); -1: the vocabulary

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", *DTYPES):
            raise ConfigError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.kv_cache_dtype not in ("auto", *KV_CACHE_DTYPES):
            raise ConfigError(f"kv_cache_dtype must be one of auto, {', '.join(KV_CACHE_DTYPES)}; got {self.kv_cache_dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu or cuda; got {self.device!r}")
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise ConfigError(f"block_size must be a power of two up to 128; got {self.block_size}")
        if self.max_logprobs < -1:
            raise ConfigError(f"max_logprobs must be >= 0, or -1 for the whole vocabulary; got {self.max_logprobs}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ConfigError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"max_model_len must be >= 1; got {self.max_model_len}")
        if self.kv_cache_memory_gib is not None and not self.kv_cache_memory_gib > 0:
            raise ConfigError(f"kv_cache_memory_gib must be > 0; got {self.kv_cache_memory_gib}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ConfigError(f"num_kv_blocks must be >= 1; got {self.num_kv_blocks}")
        if self.load_format not in ("auto", "dummy"):
            raise ConfigError(f"load_format must be auto or dummy; got {self.load_format!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATION_CHOICES:
            raise ConfigError(f"quantization must be one of {', '.join(QUANTIZATION_CHOICES)}; got {self.quantization!r}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ConfigError(
                f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}; got {self.scheduling_policy!r}"
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1]; got {self.gpu_memory_utilization}")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("device='cuda' was asked for but no CUDA GPU is visible")
        return torch.device(self.device)

    def torch_dtype(self, model: ModelConfig, device: torch.device) -> torch.dtype:
        """`auto`: the checkpoint's half dtype on a GPU (bf16 for fp32 checkpoints), float32 on the CPU."""
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        if device.type == "cpu":
            return torch.float32
        return DTYPES.get(model.checkpoint_dtype, torch.bfloat16) if model.checkpoint_dtype != "float32" else torch.bfloat16

    def torch_kv_cache_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The KV cache's element type: the model's dtype, or fp8 (e4m3)."""
        return KV_CACHE_DTYPES.get(self.kv_cache_dtype, model_dtype)

    def quantization_for(self, model: ModelConfig) -> QuantConfig | None:
        """What the engine runs for `model` (engine/quant_config.py `resolve_quantization`)."""
        from pdserve.engine.quant_config import resolve_quantization

        return resolve_quantization(model.quantization, self.quantization, is_dummy=self.load_format == "dummy")

    def model_len(self, model: ModelConfig) -> int:
        limit = model.longest_context
        if self.max_model_len is None:
            return limit
        if self.max_model_len > limit:
            raise ConfigError(f"max_model_len {self.max_model_len} exceeds the model's context length {limit}")
        return self.max_model_len
