"""The two ceilings every benchmark is measured against, taken in the same run: HBM bandwidth
(a large device-to-device copy, bytes read + written) and the bf16 matmul rate (8192^3)."""
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


def describe_gpu() -> str:
    props = torch.cuda.get_device_properties(0)
    return f"{props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}"
