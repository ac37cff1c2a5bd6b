"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, Qwen3) over a paged KV cache, with
fused q/k/v and gate/up projections, and the mapping from HF checkpoint names to its parameters."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pdserve.engine.attention import Attention, AttentionMetadata
from pdserve.engine.config import ConfigError, ModelConfig
from pdserve.engine.layers import Linear, MergedLinear, RMSNorm, add_norm_project, blas_for_rows
from pdserve.engine.quant_config import QuantConfig
from pdserve.engine.quant_layers import W8_GEMV_MAX_ROWS, QuantizedLinear, quantized_linear
from pdserve.engine.rotary import build_cos_sin_cache
from pdserve.kernels.pdl import PDL_MAX_ROWS, pdl_max_rows

# HF projection name -> (our fused module, shard within it)
FUSED_SHARDS = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"),
    "up_proj": ("gate_up_proj", "up"),
}
LINEAR_LAYERS = (Linear, QuantizedLinear)
# Checkpoint tensors the weights do not take, skipped by name: old checkpoints' rotary tables (we
# recompute them) and the fp8 KV cache scales (read by engine/kv_scales.py, not as weights).
IGNORABLE_SUFFIXES = (".rotary_emb.inv_freq", ".self_attn.k_scale", ".self_attn.v_scale")


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, decode_gemv: bool = False) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(
            config.hidden_size, {"q": q_size, "k": kv_size, "v": kv_size}, config.attention_bias, decode_gemv=decode_gemv
        )
        self.o_proj = Linear(q_size, config.hidden_size, config.o_proj_bias, transposed=not decode_gemv, decode_gemv=decode_gemv)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim)

    def forward(
        self,
        positions: torch.Tensor,
        qkv: torch.Tensor,  # qkv_proj's output [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        cos_sin_cache: torch.Tensor,
    ) -> torch.Tensor:
        num_tokens = qkv.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q.contiguous())
            k = self.k_norm(k.contiguous())
        out = self.attn(positions, q, k, v, kv_cache, meta, cos_sin_cache)
        return self.o_proj(out.view(num_tokens, q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, decode_gemv: bool = False) -> None:
        super().__init__()
        size = config.intermediate_size
        shards = {"gate": size, "up": size}
        self.gate_up_proj = MergedLinear(config.hidden_size, shards, False, transposed=not decode_gemv, decode_gemv=decode_gemv)
        self.down_proj = Linear(size, config.hidden_size, transposed=not decode_gemv, decode_gemv=decode_gemv)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, decode_gemv: bool = False) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, decode_gemv)
        self.mlp = LlamaMLP(config, decode_gemv)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        cos_sin_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        qkv, residual = add_norm_project(self.input_layernorm, self.self_attn.qkv_proj, hidden, residual)
        hidden = self.self_attn(positions, qkv, kv_cache, meta, cos_sin_cache)
        gated, residual = add_norm_project(self.post_attention_layernorm, self.mlp.gate_up_proj, hidden, residual, swiglu=True)
        return self.mlp.down_proj(gated), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, decode_gemv: bool = False) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, decode_gemv) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """`forward` returns final hidden states `[num_tokens, hidden]`; `compute_logits` the fp32
    logits of the rows asked for. `decode_gemv`: a decode step's few rows run the projections on our
    GEMV, in a chain of dependent launches (engine/layers.py `Linear`), which stores o_proj, gate_up and
    down [out, in]; without it (no sm_90 GPU) they are stored [in, out], cuBLAS's faster layout."""

    def __init__(self, config: ModelConfig, decode_gemv: bool = False) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, decode_gemv)
        # A tied head shares the embedding's [vocab, hidden] tensor, so only an untied one is transposed.
        tied = config.tie_word_embeddings
        self.lm_head = Linear(config.hidden_size, config.vocab_size, transposed=not tied, decode_gemv=decode_gemv and tied)
        self.cos_sin_cache = torch.empty(0)
        self.pdl_max_rows = PDL_MAX_ROWS  # the rows up to which the step's kernels launch as dependents (`quantize` lowers it)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_rotary(self, max_positions: int, device: torch.device) -> None:
        cache = build_cos_sin_cache(self.config.head_dim, max_positions, self.config.rope)
        self.cos_sin_cache = cache.to(device)

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        kv_cache: torch.Tensor,  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        on_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """`on_layer(i)` runs once layer i's work is issued (its KV is in the cache once that work
        is done): a KV hand-off can start on the first layers while the last ones compute."""
        with blas_for_rows(input_ids.shape[0], input_ids.device), pdl_max_rows(self.pdl_max_rows):
            hidden = self.model.embed_tokens(input_ids)
            residual = None
            for i, layer in enumerate(self.model.layers):
                hidden, residual = layer(positions, hidden, residual, kv_cache[i], meta, self.cos_sin_cache)
                if on_layer is not None:
                    on_layer(i)
            hidden, _ = self.model.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        with blas_for_rows(hidden.shape[0], hidden.device), pdl_max_rows(self.pdl_max_rows):
            return self.lm_head(hidden).float()

    # -- quantization and checkpoint loading ---------------------------------------------------
    def quantize(self, quant: QuantConfig, dtype: torch.dtype) -> None:
        """Swap the decoder's linear layers (never the LM head) for `quant`'s quantized layers,
        but those its config leaves unquantized. Runs on the meta device, before weights exist."""
        replaced = False
        for name, module in list(self.named_modules()):
            if not isinstance(module, Linear) or name == "lm_head":
                continue
            projections = self._hf_projections(name, module)
            ignored = {quant.is_ignored(p) for p in projections}
            if ignored == {True}:
                continue
            if len(ignored) > 1:
                raise ConfigError(
                    f"quantization_config ignores some of {', '.join(projections)} but not all; pdserve runs them as one layer"
                )
            try:
                layer = quantized_linear(
                    quant,
                    module.in_features,
                    module.out_features,
                    module.bias is not None,
                    dtype,
                    getattr(module, "shard_ranges", None),
                )
            except ValueError as exc:
                raise ConfigError(f"{quant.name} cannot quantize {name}: {exc}") from None
            parent, _, child = name.rpartition(".")
            setattr(self.get_submodule(parent), child, layer)
            replaced = True
        if replaced:
            # Dependent launches only while every projection takes kernels/gemv.py: 8-bit weights up
            # to W8_GEMV_MAX_ROWS (2: gate/up then take w8_matmul, the rest the GEMV), 4-bit at one
            # row. H200, Llama-3-8B, chained up to 8 rows: fp8 4.0% faster at 2 rows, 1.2% slower at
            # 8; AWQ 4.2% slower at 2 (bench/RESULTS.md)
            self.pdl_max_rows = 1 if quant.scheme == "w4" else W8_GEMV_MAX_ROWS

    def _hf_projections(self, name: str, module: nn.Module) -> list[str]:
        """The HF modules one of our linear layers loads (q_proj, k_proj, v_proj for qkv_proj)."""
        if not getattr(module, "shard_ranges", None):
            return [name]
        prefix, _, fused = name.rpartition(".")
        return [f"{prefix}.{hf}" for hf, (ours, _) in FUSED_SHARDS.items() if ours == fused]

    def weight_keys(self) -> set[str]:
        """The name of every tensor the checkpoint must provide (HF names)."""
        keys = set()
        for name, module in self.named_modules():
            if isinstance(module, LINEAR_LAYERS):
                if name != "lm_head" or not self.config.tie_word_embeddings:
                    keys |= {f"{p}.{kind}" for p in self._hf_projections(name, module) for kind in module.checkpoint_kinds()}
            else:
                keys |= {f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)}
        return keys

    def load_weight(self, name: str, tensor: torch.Tensor) -> set[str]:
        """Load one HF checkpoint tensor; returns the names of `weight_keys` it filled. A tensor
        with no place in this model, or one of the wrong kind, shape or dtype, is an error naming it."""
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return set()
        if name.endswith(IGNORABLE_SUFFIXES):
            rotary = ".rotary_emb.inv_freq"
            owner = name.removesuffix(rotary) if name.endswith(rotary) else name.rpartition(".")[0]  # its attention layer
            if not isinstance(self._find_module(owner), (LlamaAttention, LlamaModel)):
                raise ConfigError(
                    f"checkpoint tensor {name}: no such layer in a {self.config.architecture} of {self.config.num_layers} layers"
                )
            return set()
        prefix, _, kind = name.rpartition(".")
        parent, _, module_name = prefix.rpartition(".")
        fused, shard = FUSED_SHARDS.get(module_name, (module_name, None))
        module = self._find_module(f"{parent}.{fused}" if parent else fused)
        try:
            if isinstance(module, LINEAR_LAYERS) and shard is None:
                module.load(kind, tensor)
            elif isinstance(module, LINEAR_LAYERS):
                module.load_shard(shard, kind, tensor)
            elif shard is None and module is not None and isinstance(getattr(module, kind, None), nn.Parameter):
                _copy_parameter(getattr(module, kind), tensor)
            else:
                raise ValueError(f"no such weight in a {self.config.architecture} of {self.config.num_layers} layers")
        except ValueError as exc:
            raise ConfigError(f"checkpoint tensor {name}: {exc}") from None
        return {name}

    def _find_module(self, name: str) -> nn.Module | None:
        try:
            return self.get_submodule(name)
        except AttributeError:
            return None


def _copy_parameter(param: nn.Parameter, tensor: torch.Tensor) -> None:
    if param.shape != tensor.shape:
        raise ValueError(f"shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
    if not tensor.is_floating_point() or tensor.element_size() == 1:
        raise ValueError(f"{tensor.dtype} is a quantized type; this weight is never quantized")
    param.data.copy_(tensor)
