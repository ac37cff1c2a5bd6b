"""Paged attention for one layer: rotary + KV store + attention over the block table, on the
Triton kernels (CUDA: one launch for a decode step) or their torch references (CPU). The metadata
is built by the model runner."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pdserve import kernels


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # int64 [num_tokens]; -1 = padding
    block_tables: torch.Tensor  # int32 [num_seqs, max_num_blocks]
    context_lens: torch.Tensor  # int32 [num_seqs], tokens in the cache after this step
    cu_seqlens_q: torch.Tensor | None  # int32 [num_seqs + 1]; None when every request decodes one token
    max_seqlen_q: int

    @property
    def is_decode(self) -> bool:
        return self.cu_seqlens_q is None


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        # Per-tensor fp8 KV scales (value = stored * scale); unused by 16/32-bit caches. Fixed
        # before the first step: CUDA graphs capture them and the KV hand-off layout carries them.
        self.k_scale = 1.0
        self.v_scale = 1.0

    def forward(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        cos_sin_cache: torch.Tensor,
    ) -> torch.Tensor:
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        on_gpu = q.is_cuda
        kv_scales = (self.k_scale, self.v_scale)
        if meta.is_decode and on_gpu:  # rotary, KV store and attention in one launch
            return kernels.rotary_decode_attention(
                positions, q, k, v, cos_sin_cache, k_cache, v_cache, meta.slot_mapping,
                meta.block_tables, meta.context_lens, self.scale, None, *kv_scales,
            )  # fmt: skip
        store = kernels.rotary_store_kv if on_gpu else kernels.rotary_store_kv_ref
        store(positions, q, k, v, cos_sin_cache, k_cache, v_cache, meta.slot_mapping, *kv_scales)
        if meta.is_decode:
            return kernels.paged_decode_attention_ref(
                q, k_cache, v_cache, meta.block_tables, meta.context_lens, self.scale, None, *kv_scales
            )
        prefill = kernels.paged_prefill_attention if on_gpu else kernels.paged_prefill_attention_ref
        return prefill(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.cu_seqlens_q,
            meta.context_lens,
            meta.max_seqlen_q,
            self.scale,
            None,
            *kv_scales,
        )
