"""Rotary position embedding (NeoX "rotate_half" style) applied in place to q and k, alone or
fused with storing the rotated k and v into the paged cache (one program per token)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.kv_quant import FP8_DTYPE, quantize_kv
from pdserve.kernels.kv_store import check_kv_store_inputs, store_kv_cache_ref


@triton.jit
def _rotate(
    x_ptr, stride_head, cos, sin, NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr
):
    """Rotates the heads of one token in place; returns both rotated halves [HEADS_PAD, HALF_PAD]."""
    offs_h = tl.arange(0, HEADS_PAD)
    offs_r = tl.arange(0, HALF_PAD)
    mask = (offs_h < NUM_HEADS)[:, None] & (offs_r < HALF)[None, :]
    first_ptrs = x_ptr + offs_h[:, None] * stride_head + offs_r[None, :]
    x1 = tl.load(first_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    out1 = (x1 * cos[None, :] - x2 * sin[None, :]).to(x_ptr.dtype.element_ty)
    out2 = (x2 * cos[None, :] + x1 * sin[None, :]).to(x_ptr.dtype.element_ty)
    tl.store(first_ptrs, out1, mask=mask)
    tl.store(first_ptrs + HALF, out2, mask=mask)
    return out1, out2


@triton.jit
def _rotary_kernel(
    positions_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    cos_sin_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    k_inv_scale,
    v_inv_scale,
    stride_q_token,
    stride_q_head,
    stride_k_token,
    stride_k_head,
    stride_v_token,
    stride_v_head,
    stride_cos_sin,
    stride_cache_block,
    stride_cache_token,
    stride_cache_head,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    Q_HEADS_PAD: tl.constexpr,
    KV_HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    IS_STORING_KV: tl.constexpr,
    IS_FP8: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token)
    offs_r = tl.arange(0, HALF_PAD)
    cos = tl.load(cos_sin_ptr + position * stride_cos_sin + offs_r, mask=offs_r < HALF, other=0.0)
    sin = tl.load(cos_sin_ptr + position * stride_cos_sin + HALF + offs_r, mask=offs_r < HALF, other=0.0)
    _rotate(q_ptr + token * stride_q_token, stride_q_head, cos, sin, NUM_HEADS, Q_HEADS_PAD, HALF, HALF_PAD)
    k_row = k_ptr + token * stride_k_token
    k1, k2 = _rotate(k_row, stride_k_head, cos, sin, NUM_KV_HEADS, KV_HEADS_PAD, HALF, HALF_PAD)
    if IS_STORING_KV:
        slot = tl.load(slot_mapping_ptr + token)
        if slot >= 0:
            offs_h = tl.arange(0, KV_HEADS_PAD)
            mask = (offs_h < NUM_KV_HEADS)[:, None] & (offs_r < HALF)[None, :]
            slot_offset = (slot // BLOCK_SIZE) * stride_cache_block + (slot % BLOCK_SIZE) * stride_cache_token
            cache_offsets = slot_offset + offs_h[:, None] * stride_cache_head + offs_r[None, :]
            tl.store(k_cache_ptr + cache_offsets, quantize_kv(k1, k_inv_scale, k_cache_ptr, IS_FP8), mask=mask)
            tl.store(k_cache_ptr + cache_offsets + HALF, quantize_kv(k2, k_inv_scale, k_cache_ptr, IS_FP8), mask=mask)
            v_ptrs = v_ptr + token * stride_v_token + offs_h[:, None] * stride_v_head + offs_r[None, :]
            v1 = quantize_kv(tl.load(v_ptrs, mask=mask), v_inv_scale, v_cache_ptr, IS_FP8)
            v2 = quantize_kv(tl.load(v_ptrs + HALF, mask=mask), v_inv_scale, v_cache_ptr, IS_FP8)
            tl.store(v_cache_ptr + cache_offsets, v1, mask=mask)
            tl.store(v_cache_ptr + cache_offsets + HALF, v2, mask=mask)


def rotary_embedding(
    positions: torch.Tensor,  # int64 [num_tokens]
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], rotated in place
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], rotated in place
    cos_sin_cache: torch.Tensor,  # float32 [max_positions, head_dim]: cos | sin
) -> None:
    _check_rotary_inputs(positions, q, k, cos_sin_cache)
    _launch(positions, q, k, k, cos_sin_cache, k, k, positions, 1.0, 1.0, is_storing_kv=False)


def rotary_store_kv(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # int64 [num_tokens]; negative = padding, not stored
    k_scale: float = 1.0,  # fp8 caches: stored = x * (1 / scale) (kv_quant)
    v_scale: float = 1.0,
) -> None:
    _check_rotary_inputs(positions, q, k, cos_sin_cache)
    check_kv_store_inputs(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    _launch(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping, k_scale, v_scale, is_storing_kv=True)


def _launch(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float,
    v_scale: float,
    is_storing_kv: bool,
) -> None:
    """Without is_storing_kv, v/k_cache/v_cache/slot_mapping are placeholders the kernel never reads."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if num_tokens == 0:
        return
    cache_strides = k_cache.stride()[:3] if is_storing_kv else (0, 0, 0)
    _rotary_kernel[(num_tokens,)](
        positions,
        q,
        k,
        v,
        cos_sin_cache,
        k_cache,
        v_cache,
        slot_mapping,
        1.0 / k_scale,
        1.0 / v_scale,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        cos_sin_cache.stride(0),
        *cache_strides,
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        Q_HEADS_PAD=triton.next_power_of_2(num_heads),
        KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HALF=head_dim // 2,
        HALF_PAD=triton.next_power_of_2(head_dim // 2),
        BLOCK_SIZE=k_cache.shape[1] if is_storing_kv else 1,
        IS_STORING_KV=is_storing_kv,
        IS_FP8=is_storing_kv and k_cache.dtype == FP8_DTYPE,
    )


def _check_rotary_inputs(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"q and k must be [num_tokens, heads, head_dim] alike, got {tuple(q.shape)}, {tuple(k.shape)}")
    head_dim = q.shape[2]
    if head_dim % 2 != 0:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16) or k.dtype != q.dtype:
        raise ValueError(f"q and k must share a float32/bfloat16/float16 dtype, got {q.dtype}, {k.dtype}")
    if positions.dtype != torch.int64 or positions.shape != (q.shape[0],):
        raise ValueError(f"positions must be int64 [{q.shape[0]}], got {positions.dtype} {tuple(positions.shape)}")
    if cos_sin_cache.dtype != torch.float32 or cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_dim:
        raise ValueError(
            f"cos_sin_cache must be float32 [max_positions, {head_dim}], got {cos_sin_cache.dtype} {tuple(cos_sin_cache.shape)}"
        )
    for name, tensor in {"positions": positions, "q": q, "k": k, "cos_sin_cache": cos_sin_cache}.items():
        if tensor.device != q.device:
            raise ValueError(f"{name} is on {tensor.device}, q on {q.device}")
        if tensor.numel() > 0 and tensor.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim, got strides {tensor.stride()}")


def rotary_embedding_ref(
    positions: torch.Tensor,  # int64 [num_tokens]
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos_sin_cache: torch.Tensor,  # float32 [max_positions, head_dim]: cos | sin
) -> None:
    half = q.shape[-1] // 2
    cos_sin = cos_sin_cache[positions][:, None, :]  # [num_tokens, 1, head_dim]
    cos, sin = cos_sin[..., :half], cos_sin[..., half:]
    for x in (q, k):
        compute_dtype = torch.promote_types(x.dtype, torch.float32)
        x1, x2 = x[..., :half].to(compute_dtype), x[..., half:].to(compute_dtype)
        x.copy_(torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1))


def rotary_store_kv_ref(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # int64 [num_tokens]
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    rotary_embedding_ref(positions, q, k, cos_sin_cache)
    store_kv_cache_ref(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
