"""Copies whole KV blocks from one paged cache into another (or into / out of a staging buffer):
block `src_block_ids[i]` of every layer, K and V, lands in block `dst_block_ids[i]`. Block ids are
scattered on both sides; the destination may be another process's cache opened through CUDA IPC,
on this GPU or a peer."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.kv_quant import KV_DTYPES, as_bytes

_TILE = 16384  # elements per loop iteration of one program: a whole Llama block (32 KiB in bf16) in flight


@triton.jit
def _copy_kv_blocks_kernel(
    src_ptr,
    dst_ptr,
    src_ids_ptr,
    dst_ids_ptr,
    src_stride_layer,
    src_stride_kv,
    src_stride_block,
    dst_stride_layer,
    dst_stride_kv,
    dst_stride_block,
    BLOCK_NUMEL: tl.constexpr,
    TILE: tl.constexpr,
):
    position = tl.program_id(0)  # which pair of blocks
    layer_kv = tl.program_id(1)  # layer * 2 + (0: K, 1: V)
    layer = (layer_kv // 2).to(tl.int64)
    kv = (layer_kv % 2).to(tl.int64)
    src_block = tl.load(src_ids_ptr + position).to(tl.int64)
    dst_block = tl.load(dst_ids_ptr + position).to(tl.int64)
    src = src_ptr + layer * src_stride_layer + kv * src_stride_kv + src_block * src_stride_block
    dst = dst_ptr + layer * dst_stride_layer + kv * dst_stride_kv + dst_block * dst_stride_block
    for start in tl.range(0, BLOCK_NUMEL, TILE):
        offsets = start + tl.arange(0, TILE)
        mask = offsets < BLOCK_NUMEL
        tl.store(dst + offsets, tl.load(src + offsets, mask=mask), mask=mask)


def copy_kv_blocks(
    src: torch.Tensor,  # [num_layers, 2, num_src_blocks, block_size, num_kv_heads, head_dim]
    src_block_ids: torch.Tensor,  # int64 [n] on src's device
    dst: torch.Tensor,  # [num_layers, 2, num_dst_blocks, block_size, num_kv_heads, head_dim]
    dst_block_ids: torch.Tensor,  # int64 [n]
) -> None:
    """Enqueued on the current stream; no host synchronisation. fp8 blocks move as bytes."""
    check_copy_inputs(src, src_block_ids, dst, dst_block_ids)
    src, dst = as_bytes(src), as_bytes(dst)
    num_layers, num_blocks = src.shape[0], src_block_ids.shape[0]
    if num_blocks == 0 or num_layers == 0:
        return
    block_numel = src[0, 0, 0].numel()
    _copy_kv_blocks_kernel[(num_blocks, num_layers * 2)](
        src,
        dst,
        src_block_ids,
        dst_block_ids,
        src.stride(0),
        src.stride(1),
        src.stride(2),
        dst.stride(0),
        dst.stride(1),
        dst.stride(2),
        BLOCK_NUMEL=block_numel,
        TILE=min(_TILE, triton.next_power_of_2(block_numel)),
        num_warps=8,
    )


def check_copy_inputs(src: torch.Tensor, src_block_ids: torch.Tensor, dst: torch.Tensor, dst_block_ids: torch.Tensor) -> None:
    """Raises ValueError unless the blocks of `src` can be copied into those of `dst`."""
    if src.dim() != 6 or dst.dim() != 6 or src.shape[1] != 2:
        raise ValueError(
            f"src and dst must be [layers, 2, blocks, block_size, kv_heads, head_dim], got {tuple(src.shape)} / {tuple(dst.shape)}"
        )
    if src.shape[:2] != dst.shape[:2] or src.shape[3:] != dst.shape[3:]:
        raise ValueError(f"src {tuple(src.shape)} and dst {tuple(dst.shape)} differ outside the block dim")
    if src.dtype not in KV_DTYPES or dst.dtype != src.dtype:
        raise ValueError(f"src and dst must share one of {KV_DTYPES}, got {src.dtype} / {dst.dtype}")
    if src_block_ids.dtype != torch.int64 or dst_block_ids.dtype != torch.int64 or src_block_ids.dim() != 1:
        raise ValueError("block ids must be 1-d int64 tensors")
    if src_block_ids.shape != dst_block_ids.shape:
        raise ValueError(f"{src_block_ids.shape[0]} source blocks but {dst_block_ids.shape[0]} destination blocks")
    for name, tensor in {"src": src, "dst": dst}.items():
        block = tensor[0, 0, 0] if tensor.shape[2] else None
        if block is not None and not block.is_contiguous():
            raise ValueError(f"each block of {name} must be contiguous, got strides {tensor.stride()}")
    if src_block_ids.device != src.device or dst_block_ids.device != src.device:
        raise ValueError(f"block ids must be on {src.device}, the device that runs the copy")


def copy_kv_blocks_ref(src: torch.Tensor, src_block_ids: torch.Tensor, dst: torch.Tensor, dst_block_ids: torch.Tensor) -> None:
    as_bytes(dst)[:, :, dst_block_ids] = as_bytes(src)[:, :, src_block_ids].to(dst.device)
