"""Triton kernels of the model forward pass, each with its plain-torch reference (`*_ref`)."""

from pdserve.kernels.argmax import argmax, argmax_ref
from pdserve.kernels.dequantize import w4_dequantize, w8_dequantize, w8_dequantize_ref
from pdserve.kernels.fp8_quant import quantize_fp8_rows, quantize_fp8_rows_ref
from pdserve.kernels.gemv import DOT_MIN_ROWS, ELEMENTWISE_MAX_ROWS, GEMV_MAX_ROWS, gemv, gemv_add_rms_norm, gemv_ref
from pdserve.kernels.kv_block_copy import copy_kv_blocks, copy_kv_blocks_ref
from pdserve.kernels.kv_store import store_kv_cache, store_kv_cache_ref
from pdserve.kernels.paged_decode_attention import paged_decode_attention, paged_decode_attention_ref
from pdserve.kernels.paged_prefill_attention import paged_prefill_attention, paged_prefill_attention_ref
from pdserve.kernels.rms_norm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref
from pdserve.kernels.rotary_decode_attention import rotary_decode_attention
from pdserve.kernels.rotary_embedding import (
    rotary_embedding,
    rotary_embedding_ref,
    rotary_store_kv,
    rotary_store_kv_ref,
)
from pdserve.kernels.silu_and_mul import silu_and_mul, silu_and_mul_ref
from pdserve.kernels.w4_gemv import w4_gemv
from pdserve.kernels.w4_matmul import w4_dequantize_ref, w4_matmul, w4_matmul_ref
from pdserve.kernels.w8_matmul import w8_matmul, w8_matmul_ref

__all__ = [
    "argmax",
    "argmax_ref",
    "DOT_MIN_ROWS",
    "ELEMENTWISE_MAX_ROWS",
    "GEMV_MAX_ROWS",
    "copy_kv_blocks",
    "copy_kv_blocks_ref",
    "fused_add_rms_norm",
    "fused_add_rms_norm_ref",
    "gemv",
    "gemv_add_rms_norm",
    "gemv_ref",
    "paged_decode_attention",
    "paged_decode_attention_ref",
    "rotary_decode_attention",
    "paged_prefill_attention",
    "paged_prefill_attention_ref",
    "quantize_fp8_rows",
    "quantize_fp8_rows_ref",
    "rms_norm",
    "rms_norm_ref",
    "rotary_embedding",
    "rotary_embedding_ref",
    "rotary_store_kv",
    "rotary_store_kv_ref",
    "silu_and_mul",
    "silu_and_mul_ref",
    "store_kv_cache",
    "store_kv_cache_ref",
    "w4_dequantize",
    "w4_dequantize_ref",
    "w4_gemv",
    "w4_matmul",
    "w4_matmul_ref",
    "w8_dequantize",
    "w8_dequantize_ref",
    "w8_matmul",
    "w8_matmul_ref",
]
