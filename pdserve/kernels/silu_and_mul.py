"""SwiGLU activation: silu(gate) * up for x = [gate | up] along the last dim."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from pdserve.kernels.pdl import use_pdl, wait_for_previous_kernel

_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, d, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(
        out_ptr + row * stride_out + cols, silu_mul(gate, up, x_ptr.dtype.element_ty).to(out_ptr.dtype.element_ty), mask=mask
    )


@triton.jit
def silu_mul(gate, up, DTYPE: tl.constexpr):
    """silu(gate) * up in fp32 from fp32 values of DTYPE, silu rounded to DTYPE before the multiply,
    as torch's `F.silu(gate) * up` does (shared with kernels/gemv.py's fused epilogue)."""
    silu = (gate / (1.0 + tl.exp(-gate))).to(DTYPE).to(tl.float32)
    return silu * up


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2 * d] -> [..., d]."""
    if x.dim() < 1 or x.shape[-1] % 2 != 0:
        raise ValueError(f"x must be [..., 2 * d], got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x must be float32/bfloat16/float16, got {x.dtype}")
    if x.numel() > 0 and x.stride(-1) != 1:
        raise ValueError(f"x must be contiguous in its last dim, got strides {x.stride()}")
    d = x.shape[-1] // 2
    rows = x.reshape(-1, 2 * d)  # a copy only when x's rows cannot be viewed; x is only read
    out = torch.empty((rows.shape[0], d), dtype=x.dtype, device=x.device)
    if out.numel() > 0:
        block = min(_BLOCK, triton.next_power_of_2(d))
        grid = (rows.shape[0], triton.cdiv(d, block))
        pdl = use_pdl(rows, rows.shape[0])
        _silu_and_mul_kernel[grid](rows, out, rows.stride(0), out.stride(0), d, BLOCK=block, PDL=pdl, launch_pdl=pdl)
    return out.view(*x.shape[:-1], d)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]
