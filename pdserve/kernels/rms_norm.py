"""RMSNorm over the last dim (HF semantics), alone or fused with the residual add; one program
per row."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.pdl import use_pdl, wait_for_previous_kernel

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    stride_x,
    stride_residual,
    stride_out,
    hidden,
    eps,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    weight = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # no kernel writes it
    wait_for_previous_kernel(PDL)
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x_ptr.dtype.element_ty)  # the add rounds to x's dtype
        tl.store(residual_ptr + row * stride_residual + offs, x, mask=mask)
    x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 0) / hidden + eps)
    # HF rounds the normalised row to x's dtype before the weight multiply.
    normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, (weight * normed).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., hidden] -> [..., hidden] in x.dtype promoted with weight.dtype (as HF)."""
    _check_inputs(x, weight)
    rows = x.reshape(-1, x.shape[-1])  # a copy only when x's rows cannot be viewed; x is only read
    out = torch.empty(rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    _launch(rows, None, weight, out, eps)
    return out.view(x.shape)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual <- x + residual (in place), then returns (rms_norm(residual), residual); the normed
    result is written into x when its dtype is x's."""
    _check_inputs(x, weight)
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(
            f"residual must match x ({x.dtype} {tuple(x.shape)} on {x.device}), "
            f"got {residual.dtype} {tuple(residual.shape)} on {residual.device}"
        )
    try:
        rows, residual_rows = x.view(-1, x.shape[-1]), residual.view(-1, x.shape[-1])
    except RuntimeError as error:
        raise ValueError(f"x and residual must be viewable as [num_rows, hidden] to update in place: {error}") from None
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    out = rows if out_dtype == x.dtype else torch.empty(rows.shape, dtype=out_dtype, device=x.device)
    _launch(rows, residual_rows, weight, out, eps)
    return out.view(x.shape), residual


def _launch(rows: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, out: torch.Tensor, eps: float) -> None:
    num_rows, hidden = rows.shape
    if num_rows == 0:
        return
    block = triton.next_power_of_2(hidden)
    num_warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    pdl = use_pdl(rows, num_rows)
    _rms_norm_kernel[(num_rows,)](
        rows,
        rows if residual is None else residual,
        weight,
        out,
        rows.stride(0),
        0 if residual is None else residual.stride(0),
        out.stride(0),
        hidden,
        eps,
        BLOCK=block,
        HAS_RESIDUAL=residual is not None,
        PDL=pdl,
        num_warps=num_warps,
        launch_pdl=pdl,
    )


def _check_inputs(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() < 1 or weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must be [hidden] for x [..., hidden], got {tuple(weight.shape)} and {tuple(x.shape)}")
    if x.dtype not in _DTYPES or weight.dtype not in _DTYPES:
        raise ValueError(f"x and weight must be one of {_DTYPES}, got {x.dtype}, {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device}, x on {x.device}")
    if x.numel() > 0 and (x.stride(-1) != 1 or weight.stride(-1) != 1):
        raise ValueError(f"x and weight must be contiguous in the last dim, got {x.stride()}, {weight.stride()}")


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x_float = x.to(torch.promote_types(x.dtype, torch.float32))
    normed = x_float * torch.rsqrt(x_float.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Writes x + residual into residual and, when the dtypes allow, the normed result into x."""
    residual.copy_((x + residual).to(x.dtype))
    normed = rms_norm_ref(residual, weight, eps)
    if normed.dtype == x.dtype:
        normed = x.copy_(normed)
    return normed, residual
