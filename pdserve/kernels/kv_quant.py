"""FP8 (e4m3) KV cache: quantize on store, dequantize on the attention kernels' tile loads. The
Triton helpers here are the one place both happen (the store kernels and both attention kernels
call them); the torch twins are what the references use, so kernel and reference share the math.
The tile load converts codes exactly into the compute dtype (e4m3 fits bf16, fp16 and fp32); the
kernels apply the per-tensor scale once per row, folded into the score scale (K) and the output
normalisation (V), instead of once per element: value = code * scale either way.

Scaling is per tensor: one K scale and one V scale per layer (vLLM's `k_scale`/`v_scale`, 1.0
unless a checkpoint calibrated them). Stored value = fp8(clamp(x * (1 / scale), +-448)) in fp32
(a product by the host-computed reciprocal rounds alike in Triton and torch; a division need
not); read value = float(stored) * scale. Why per tensor rather than per head or per token: e4m3
keeps ~3 significant bits at any magnitude in [2^-6, 448], so a scale only matters when K/V leave
that range, which projections of RMS-normed activations rarely do (vLLM and TensorRT-LLM ship
per-tensor scales, mostly 1.0, near-lossless). Per-tensor costs nothing: no extra bytes (a
per-token-per-head fp32 scale adds 4 bytes per head_dim bytes, 3% at head_dim 128, and a second
tensor that every transport, block copy and prefix-cache hit would have to move), a multiply per
row of scores and of output, and launch arguments fixed per layer (CUDA-graph safe)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value; larger magnitudes saturate to it
KV_DTYPES = (torch.float32, torch.bfloat16, torch.float16, FP8_DTYPE)


@triton.jit
def quantize_kv(x, inv_scale, cache_ptr, IS_FP8: tl.constexpr):
    """Rows of K or V in the cache's element type (fp8: x * inv_scale, saturated at +-448)."""
    if IS_FP8:
        # Through fp32: the clamp saturates instead of overflowing to NaN (e4m3fn has no inf).
        x = tl.minimum(tl.maximum(x.to(tl.float32) * inv_scale, -448.0), 448.0)
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def load_kv_tile(cache_ptr, offsets, mask, COMPUTE_DTYPE: tl.constexpr, IS_FP8: tl.constexpr):
    """One tile of K or V from the paged cache in the attention's compute dtype (masked entries
    read 0). fp8: the codes, converted exactly; the caller applies the layer's scale per row."""
    return widen_kv(tl.load(cache_ptr + offsets, mask=mask, other=0.0), COMPUTE_DTYPE, IS_FP8)


@triton.jit
def widen_kv(tile, COMPUTE_DTYPE: tl.constexpr, IS_FP8: tl.constexpr):
    """Cache values as loaded, in the attention's compute dtype (`load_kv_tile`'s conversion, for a
    kernel that holds a tile as stored for a while first)."""
    if IS_FP8:  # one return statement: Triton requires every return of a function to have one type
        tile = tile.to(COMPUTE_DTYPE)
    return tile


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def kv_compute_dtype(q_dtype: torch.dtype, kv_dtype: torch.dtype) -> tl.dtype:
    """The decode attention kernel's dot dtype: q's, except that a 16-bit model over an fp8 cache
    computes in fp16 (e4m3 codes widen to fp16 exactly, two per instruction; to bf16 only through
    fp32). The prefill kernel, compute-bound, keeps q's dtype."""
    if kv_dtype == FP8_DTYPE and q_dtype.itemsize == 2:
        return tl.float16
    return _TL_DTYPES[q_dtype]


def quantize_kv_ref(x: torch.Tensor, scale: float, cache_dtype: torch.dtype) -> torch.Tensor:
    """Torch twin of `quantize_kv`: `x` in `cache_dtype`."""
    if cache_dtype != FP8_DTYPE:
        return x.to(cache_dtype)
    return (x.float() * (1.0 / scale)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize_kv_ref(cache: torch.Tensor, scale: float, compute_dtype: torch.dtype) -> torch.Tensor:
    """Torch twin of `load_kv_tile`: cache values in `compute_dtype`."""
    if cache.dtype != FP8_DTYPE:
        return cache.to(compute_dtype)
    return (cache.float() * scale).to(compute_dtype)


def check_scale(name: str, scale: float) -> None:
    if not (scale > 0.0 and scale < float("inf")):
        raise ValueError(f"{name} must be a positive finite float, got {scale!r}")


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A one-byte-per-element view of an fp8 tensor (copy kernels, gloo and numpy have no fp8);
    other tensors unchanged."""
    return tensor.view(torch.uint8) if tensor.dtype == FP8_DTYPE else tensor
