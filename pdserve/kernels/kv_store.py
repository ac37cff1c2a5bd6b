"""Writes new K/V rows into the paged cache at their slots (quantized when the cache is fp8, see
`kv_quant`); negative slots are padding."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.kv_quant import FP8_DTYPE, check_scale, quantize_kv, quantize_kv_ref

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    k_inv_scale,
    v_inv_scale,
    stride_k_token,
    stride_k_head,
    stride_v_token,
    stride_v_head,
    stride_cache_block,
    stride_cache_token,
    stride_cache_head,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    IS_FP8: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token)
    if slot < 0:
        return
    offs_h = tl.arange(0, HEADS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask = (offs_h < NUM_KV_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
    token = token.to(tl.int64)
    k = tl.load(k_ptr + token * stride_k_token + offs_h[:, None] * stride_k_head + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + token * stride_v_token + offs_h[:, None] * stride_v_head + offs_d[None, :], mask=mask)
    slot_offset = (slot // BLOCK_SIZE) * stride_cache_block + (slot % BLOCK_SIZE) * stride_cache_token
    cache_offsets = slot_offset + offs_h[:, None] * stride_cache_head + offs_d[None, :]
    tl.store(k_cache_ptr + cache_offsets, quantize_kv(k, k_inv_scale, k_cache_ptr, IS_FP8), mask=mask)
    tl.store(v_cache_ptr + cache_offsets, quantize_kv(v, v_inv_scale, v_cache_ptr, IS_FP8), mask=mask)


def store_kv_cache(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # int64 [num_tokens]; negative = padding, not stored
    k_scale: float = 1.0,  # fp8 caches: stored = x * (1 / scale) (kv_quant)
    v_scale: float = 1.0,
) -> None:
    check_kv_store_inputs(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        1.0 / k_scale,
        1.0 / v_scale,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=k_cache.shape[1],
        IS_FP8=k_cache.dtype == FP8_DTYPE,
    )


def check_kv_store_inputs(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Raises ValueError unless k/v rows can be stored into the cache at `slot_mapping`."""
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"k and v must be [num_tokens, num_kv_heads, head_dim], got {tuple(k.shape)}/{tuple(v.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(
            f"k_cache/v_cache must be [num_blocks, block_size, {k.shape[1]}, {k.shape[2]}], "
            f"got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    cache_dtypes = (k.dtype, FP8_DTYPE)
    if k.dtype not in _DTYPES or v.dtype != k.dtype or k_cache.dtype not in cache_dtypes or v_cache.dtype != k_cache.dtype:
        dtypes = "/".join(str(t.dtype) for t in (k, v, k_cache, v_cache))
        raise ValueError(f"k/v/k_cache/v_cache must share one of {_DTYPES} (or k_cache/v_cache {FP8_DTYPE}), got {dtypes}")
    check_scale("k_scale", k_scale)
    check_scale("v_scale", v_scale)
    if slot_mapping.dtype != torch.int64 or slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping must be int64 [{k.shape[0]}], got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    if k_cache.stride() != v_cache.stride():
        raise ValueError(f"k_cache and v_cache strides differ: {k_cache.stride()} vs {v_cache.stride()}")
    for name, tensor in {"k": k, "v": v, "k_cache": k_cache, "v_cache": v_cache, "slot_mapping": slot_mapping}.items():
        if tensor.device != k.device:
            raise ValueError(f"{name} is on {tensor.device}, k on {k.device}")
        if tensor.numel() > 0 and tensor.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim, got strides {tensor.stride()}")


def store_kv_cache_ref(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # int64 [num_tokens]
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    is_stored = slot_mapping >= 0
    slots = slot_mapping[is_stored]
    block_size = k_cache.shape[1]
    k_cache[slots // block_size, slots % block_size] = quantize_kv_ref(k[is_stored], k_scale, k_cache.dtype)
    v_cache[slots // block_size, slots % block_size] = quantize_kv_ref(v[is_stored], v_scale, v_cache.dtype)
