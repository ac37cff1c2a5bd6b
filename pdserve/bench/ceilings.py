"""The ceilings every benchmark is measured against, taken in the same run: HBM bandwidth (a large
device-to-device copy, bytes read + written) and the bf16 (and FP8) matmul rate (8192^3)."""

from __future__ import annotations

import torch
from triton.testing import do_bench


def median_ms(fn: object, warmup_ms: int = 25, rep_ms: int = 200) -> float:
    return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def copy_bandwidth_gbs(num_bytes: int = 1 << 30) -> float:
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * num_bytes / (ms * 1e-3) / 1e9


def matmul_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    ms = median_ms(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def fp8_matmul_tflops(n: int = 8192) -> float | None:
    """FP8 (e4m3) tensor-core matmul rate, per-tensor scales, bf16 out; None below sm89."""
    if torch.cuda.get_device_capability() < (8, 9):
        return None
    a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn).t()  # column-major, as _scaled_mm wants
    one = torch.ones((), device="cuda")
    ms = median_ms(lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
    return 2 * n**3 / (ms * 1e-3) / 1e12


def describe_gpu() -> str:
    props = torch.cuda.get_device_properties(0)
    return f"{props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}"
