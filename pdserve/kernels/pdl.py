"""Programmatic dependent launch (PDL, sm_90 and later) for the chain of Triton kernels of a decode
step at one row, where every kernel of a layer is one of ours (norms, GEMVs, attention, SwiGLU).

A kernel launched with PDL may start while the kernel before it in the stream still runs. Until it
calls `wait_for_previous_kernel` it reads only what no kernel of the step writes (weights, the
step's inputs); the call waits (`griddepcontrol.wait`) until the kernel before it has finished and
its writes are visible, then lets the next kernel start (`griddepcontrol.launch_dependents`). As
every kernel lets the next one start only after its own wait, a kernel starts once the kernel two
before it has finished: nothing its early reads touch is still being written, and everything it
writes, it writes after the wait. The next kernel's early reads (a GEMV's first weight tile) then
overlap this kernel's tail, and its launch overlaps this kernel's run.

Above PDL_MAX_ROWS the bf16 projections are cuBLAS GEMMs, which never let a dependent start early: a
Triton kernel launched with PDL after one of them starts later than without (~0.5 us,
bench/runs/2026-12-02-h200/pdl.txt), so there the kernels launch plainly."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

PDL_MAX_ROWS = 1


def use_pdl(x: torch.Tensor, rows: int) -> bool:
    """Whether a kernel over `rows` rows of `x` launches with PDL (`launch_pdl=` and its PDL constexpr)."""
    return rows <= PDL_MAX_ROWS and x.is_cuda and supports_pdl(x.device)


@functools.cache
def supports_pdl(device: torch.device) -> bool:
    """A CUDA device that launches kernels as dependents (sm_90 and later), outside the interpreter."""
    is_nvidia = torch.version.hip is None  # griddepcontrol is PTX
    return os.environ.get("TRITON_INTERPRET") != "1" and is_nvidia and torch.cuda.get_device_capability(device) >= (9, 0)


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    """Everything a PDL kernel reads after this may have been written by the kernel before it."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
