"""Programmatic dependent launch (PDL, sm_90 and later) for the chain of Triton kernels of a decode
step of up to PDL_MAX_ROWS rows (`pdl_max_rows`), where every kernel of a layer is one of ours (norms, the GEMVs of
kernels/gemv.py, attention, SwiGLU).

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
bench/runs/2026-12-02-h200/pdl.txt), so there the kernels launch plainly. A kernel that launches
plainly inside the chain (an embedding lookup, quantized weights' kernels, the LM head) waits for
everything before it, as any launch does: it costs speed, not correctness."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

# A model whose projections all take kernels/gemv.py launches as dependents up to here (engine/model.py;
# at most GEMV_MAX_ROWS, 16, the rows the GEMV takes: above them it raises). H200, Llama-3-8B decode steps: 4.4% faster at 2 and 4
# rows, unchanged at 8, 1.5% slower at 16 (bench/RESULTS.md). Outside a model's forward pass: one row.
PDL_MAX_ROWS = 8


_max_rows: contextvars.ContextVar[int] = contextvars.ContextVar("pdl_max_rows", default=1)


@contextlib.contextmanager
def pdl_max_rows(rows: int) -> Iterator[None]:
    """Within it, kernels launch with PDL up to `rows` rows instead of one (engine/model.py, around
    a model's forward pass: PDL_MAX_ROWS, or fewer where its projections take other kernels)."""
    token = _max_rows.set(rows)
    try:
        yield
    finally:
        _max_rows.reset(token)


def use_pdl(x: torch.Tensor, rows: int) -> bool:
    """Whether a kernel over `rows` rows of `x` launches with PDL (`launch_pdl=` and its PDL constexpr)."""
    return rows <= _max_rows.get() and x.is_cuda and supports_pdl(x.device)


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
