"""Checkpoint quantization formats to the engine's layouts: per-channel 8-bit quantization of plain
weights (online), and the 4-bit AWQ / GPTQ packings unpacked and repacked into the layout of
`kernels/w4_matmul.py` (nibble k % 8 of row k // 8)."""

from __future__ import annotations

import torch

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
INT8_MAX = 127
# AutoAWQ packs output columns 8 at a time in the order [0, 2, 4, 6, 1, 3, 5, 7]: nibble i holds
# column AWQ_PACK_ORDER[i], so column c sits in nibble AWQ_PACK_ORDER.index(c).
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
SEQUENTIAL_ORDER = tuple(range(8))


def quantize_per_channel(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] (float) -> (q [N, K] in fp8 e4m3 or int8, scale fp32 [N]), symmetric, the
    largest |w| of each row mapped to the format's largest value."""
    w = weight.float()
    limit = FP8_MAX if dtype == torch.float8_e4m3fn else INT8_MAX
    scale = (w.abs().amax(dim=1) / limit).clamp_min(1e-12)
    scaled = w / scale[:, None]
    if dtype == torch.int8:
        scaled = scaled.round()
    return scaled.clamp(-limit, limit).to(dtype), scale


def unpack_columns(packed: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """int32 [R, C / 8] with 8 nibbles a word along the columns -> int32 [R, C] values in [0, 16)."""
    nibble_of_column = torch.tensor([order.index(c) for c in range(8)], dtype=torch.int32, device=packed.device)
    values = (packed[:, :, None] >> (4 * nibble_of_column)) & 0xF
    return values.reshape(packed.shape[0], -1)


def pack_rows(values: torch.Tensor) -> torch.Tensor:
    """int [K, N] values in [0, 16) -> int32 [K / 8, N]: row k in nibble k % 8 of row k // 8."""
    k, n = values.shape
    grouped = values.to(torch.int32).reshape(k // 8, 8, n)
    packed = torch.zeros((k // 8, n), dtype=torch.int32, device=values.device)
    for i in range(8):
        packed |= grouped[:, i] << (4 * i)
    return packed


def awq_qweight_to_rows(qweight: torch.Tensor) -> torch.Tensor:
    """AWQ qweight int32 [K, N / 8] -> our int32 [K / 8, N]."""
    return pack_rows(unpack_columns(qweight, AWQ_PACK_ORDER))


def unpack_zeros(qzeros: torch.Tensor, checkpoint_format: str) -> torch.Tensor:
    """qzeros int32 [K / group, N / 8] -> uint8 [K / group, N]. Classic GPTQ stores zero - 1 (and
    reads back stored + 1, so a stored 15 is a zero point of 16); gptq_v2 and AWQ store the zero."""
    order = AWQ_PACK_ORDER if checkpoint_format == "awq" else SEQUENTIAL_ORDER
    zeros = unpack_columns(qzeros, order)
    if checkpoint_format == "gptq":
        zeros = zeros + 1
    return zeros.to(torch.uint8)
