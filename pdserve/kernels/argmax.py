"""Row-wise argmax of logits `[num_rows, vocab]`, the greedy token of a decode step. torch's argmax
reduces a row in one thread block, which reads a 128K-entry row at a small fraction of the memory
bandwidth; here many programs each reduce a chunk of a row, and a second kernel picks each row's
best chunk. Ties go to the lowest index, as torch's."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_CHUNK = 4096  # entries of a row per program: 32 programs a row for a 128K vocabulary


@triton.jit
def _chunk_argmax_kernel(x_ptr, chunk_max_ptr, chunk_arg_ptr, num_cols, stride_row, num_chunks, CHUNK: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    offsets = chunk * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(x_ptr + row.to(tl.int64) * stride_row + offsets, mask=offsets < num_cols, other=float("-inf"))
    best, arg = tl.max(x.to(tl.float32), axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(chunk_max_ptr + row * num_chunks + chunk, best)
    tl.store(chunk_arg_ptr + row * num_chunks + chunk, chunk * CHUNK + arg)


@triton.jit
def _row_argmax_kernel(chunk_max_ptr, chunk_arg_ptr, out_ptr, num_chunks, CHUNKS_PAD: tl.constexpr):
    row = tl.program_id(0)
    offsets = tl.arange(0, CHUNKS_PAD)
    is_chunk = offsets < num_chunks
    best = tl.load(chunk_max_ptr + row * num_chunks + offsets, mask=is_chunk, other=float("-inf"))
    args = tl.load(chunk_arg_ptr + row * num_chunks + offsets, mask=is_chunk, other=0)
    _, chunk = tl.max(best, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(out_ptr + row, tl.sum(tl.where(offsets == chunk, args, 0)).to(out_ptr.dtype.element_ty))


def argmax(logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`logits.argmax(dim=-1)` for a 2-D float tensor, into `out` (int64 [num_rows]) when given.
    Graph-capturable: the launch depends on shapes only. A row of NaN-free logits gives torch's
    answer; NaNs are not ordered (torch takes a NaN as the maximum)."""
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"argmax takes float logits [num_rows, vocab], got {tuple(logits.shape)} {logits.dtype}")
    if logits.stride(1) != 1:
        raise ValueError("argmax needs rows with contiguous entries")
    num_rows, num_cols = logits.shape
    if out is None:
        out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    elif out.shape != (num_rows,) or out.dtype != torch.int64:
        raise ValueError(f"out must be int64 [{num_rows}], got {tuple(out.shape)} {out.dtype}")
    if num_rows == 0:
        return out
    if num_cols == 0:
        raise ValueError("argmax of an empty row")
    num_chunks = triton.cdiv(num_cols, _CHUNK)
    chunk_max = torch.empty(num_rows, num_chunks, dtype=torch.float32, device=logits.device)
    chunk_arg = torch.empty(num_rows, num_chunks, dtype=torch.int32, device=logits.device)
    _chunk_argmax_kernel[(num_rows, num_chunks)](
        logits, chunk_max, chunk_arg, num_cols, logits.stride(0), num_chunks, CHUNK=_CHUNK, num_warps=8
    )
    _row_argmax_kernel[(num_rows,)](
        chunk_max, chunk_arg, out, num_chunks, CHUNKS_PAD=max(16, triton.next_power_of_2(num_chunks)), num_warps=1
    )
    return out


def argmax_ref(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)
