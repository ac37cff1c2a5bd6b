"""Compiles the launches a kernel wrapper makes for a real GPU (sm_90) on a machine without one: the
wrapper runs on CPU tensors with its kernel swapped for a recorder, and each recorded launch goes
through Triton's own binder (the specialization a launch gets), compiler and ptxas. The interpreter
(TRITON_INTERPRET=1, the CPU tests) never type-checks a branch it does not take; the compiler checks
every branch a constexpr leaves in, e.g. an atomic on a placeholder pointer. Run it in a process
without TRITON_INTERPRET: `python -m tests.kernel_compile` prints one JSON line per launch."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch


class Recorder:
    """Stands in for a `@triton.jit` kernel: `kernel[grid](*args, **kwargs)` records the call."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.calls: list[tuple[object, tuple, dict]] = []

    def __getitem__(self, grid: object) -> Callable[..., None]:
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


@contextlib.contextmanager
def recording(module: Any, name: str) -> Iterator[Recorder]:
    recorder = Recorder(getattr(module, name))
    setattr(module, name, recorder)
    try:
        yield recorder
    finally:
        setattr(module, name, recorder.kernel)


def compile_sm90(kernel: Any, args: tuple, kwargs: dict) -> None:
    """Compiles one recorded launch of `kernel` for sm_90 as a launch would: Triton's own binder
    specializes the arguments (an int of 1 a constant, pointers and ints divisible by 16 marked so,
    which decides vector widths and layouts) and splits the launch options off; raises the
    compiler's error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", 90, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=backend.target, options=options.__dict__)


def compile_recorded(recorder: Recorder, case: str) -> list[dict]:
    """Compiles each recorded launch; a wrapper's ASM constexpr (inline PTX on a GPU, its emulation on
    CPU tensors) is compiled as a GPU launch passes it: True."""
    results = []
    for grid, args, kwargs in recorder.calls:
        result = {"case": case, "grid": list(grid) if isinstance(grid, tuple) else str(grid)}
        if "ASM" in kwargs:
            kwargs = {**kwargs, "ASM": True}
        try:
            compile_sm90(recorder.kernel, args, kwargs)
            results.append({**result, "ok": True})
        except Exception:  # noqa: BLE001 - reported to the test, which prints it
            results.append({**result, "ok": False, "error": traceback.format_exc(limit=-3)})
    return results


# ---- the launches checked ---------------------------------------------------------------------------


def rotary_decode_attention_launches() -> Iterator[dict]:
    """The fused decode attention in every form the engine launches: one split and several, with
    and without PDL, early tile or plain, 16-bit and fp8 caches, bf16 and fp16 activations."""
    from pdserve.kernels.paged_decode_attention import DecodeLaunch

    module = importlib.import_module("pdserve.kernels.rotary_decode_attention")  # the package exports its function

    num_seqs, num_heads, num_kv_heads, head_dim, block_size, num_blocks = 2, 8, 2, 64, 16, 8
    forms = [
        (dtype, cache, splits, pdl, early)
        for dtype in (torch.bfloat16, torch.float16)
        for cache in ("16-bit", "fp8")
        for splits in (1, 4)
        for pdl, early in ((True, True), (True, False), (False, False))
        if dtype == torch.bfloat16 or (pdl and early)
    ]
    for dtype, cache, splits, pdl, early in forms:
        cache_dtype = torch.float8_e4m3fn if cache == "fp8" else dtype
        q = torch.zeros(num_seqs, num_heads, head_dim, dtype=dtype)
        k = torch.zeros(num_seqs, num_kv_heads, head_dim, dtype=dtype)
        k_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim).to(cache_dtype)
        launch = DecodeLaunch(num_splits=splits, tile_tokens=32, num_warps=4, num_stages=3)
        use_pdl, module.use_pdl = module.use_pdl, lambda x, rows, pdl=pdl: pdl
        try:
            with recording(module, "_rotary_split_kernel") as recorder:
                module.rotary_decode_attention(
                    torch.zeros(num_seqs, dtype=torch.int64), q, k, k.clone(), torch.zeros(256, head_dim),
                    k_cache, k_cache.clone(), torch.zeros(num_seqs, dtype=torch.int64),
                    torch.zeros(num_seqs, num_blocks, dtype=torch.int32), torch.ones(num_seqs, dtype=torch.int32),
                    head_dim**-0.5, launch=launch, early_tile=early,
                )  # fmt: skip
        finally:
            module.use_pdl = use_pdl
        case = f"rotary_decode_attention {str(dtype)[6:]} {cache} cache, {splits} split(s), pdl={pdl}, early={early}"
        yield from compile_recorded(recorder, case)


def paged_decode_attention_launches() -> Iterator[dict]:
    module = importlib.import_module("pdserve.kernels.paged_decode_attention")
    num_seqs, num_heads, num_kv_heads, head_dim, block_size, num_blocks = 2, 8, 2, 64, 16, 8
    for cache_dtype in (torch.bfloat16, torch.float8_e4m3fn):
        for splits in (1, 4):
            q = torch.zeros(num_seqs, num_heads, head_dim, dtype=torch.bfloat16)
            k_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim).to(cache_dtype)
            launch = module.DecodeLaunch(num_splits=splits, tile_tokens=32, num_warps=4, num_stages=3)
            with recording(module, "_split_kernel") as splits_recorder, recording(module, "_combine_kernel") as combine:
                module.launch_decode(
                    launch, q, k_cache, k_cache.clone(), torch.zeros(num_seqs, num_blocks, dtype=torch.int32),
                    torch.ones(num_seqs, dtype=torch.int32), head_dim**-0.5, None, 1.0, 1.0,
                )  # fmt: skip
            case = f"paged_decode_attention {str(cache_dtype)[6:]} cache, {splits} split(s)"
            yield from compile_recorded(splits_recorder, case)
            yield from compile_recorded(combine, case + ", combine")


def w4_launches() -> Iterator[dict]:
    """The 4-bit GEMV and matmul with one split and several (a placeholder counter with one)."""
    w4_gemv = importlib.import_module("pdserve.kernels.w4_gemv")
    w4_matmul = importlib.import_module("pdserve.kernels.w4_matmul")
    k, n, group_size = 2048, 256, 128
    qweight = torch.zeros(k // 8, n, dtype=torch.int32)
    scales = torch.ones(k // group_size, n, dtype=torch.bfloat16)
    zeros = torch.zeros(k // group_size, n, dtype=torch.uint8)
    n_major = [w4_matmul.n_major(t) for t in (qweight, scales, zeros)]  # the other layout
    for splits, weights, layout in (
        (1, (qweight, scales, zeros), "columns"),
        (2, (qweight, scales, zeros), "columns"),
        (1, n_major, "N-major"),
    ):
        tiles = w4_gemv.gemv_tile_sizes(n, k, torch.device("cpu"), group_size, 1, 1)._replace(splits=splits)
        with recording(w4_gemv, "_w4_gemv_kernel") as recorder:
            w4_gemv.w4_gemv(torch.zeros(1, k, dtype=torch.bfloat16), *weights, group_size, tile_sizes=tiles)
        yield from compile_recorded(recorder, f"w4_gemv, {splits} split(s), {layout}")
        with recording(w4_matmul, "_w4_matmul_kernel") as recorder:
            w4_matmul.w4_matmul(torch.zeros(16, k, dtype=torch.bfloat16), *weights, group_size, splits=splits)
        yield from compile_recorded(recorder, f"w4_matmul, {splits} split(s), {layout}")


def gemv_launches() -> Iterator[dict]:
    """The decode GEMV: 8-bit weights with 16-bit x (inline PTX, both weight and x kinds; whole and
    partial chunk tiles, with a bias), 8-bit weights with fp32 x, bf16 weights at one row and at
    several (tensor cores), the SwiGLU epilogue of both one-row kernels."""
    gemv = importlib.import_module("pdserve.kernels.gemv")
    n = 64
    for w_dtype in (torch.float8_e4m3fn, torch.int8):
        for x_dtype in (torch.bfloat16, torch.float16, torch.float32):
            for k in (4096, 96):
                weight = torch.zeros(n, k).to(w_dtype)
                bias = torch.zeros(n, dtype=x_dtype) if k == 96 else None
                name = "_gemv_kernel" if x_dtype == torch.float32 else "_gemv_8bit_kernel"
                with recording(gemv, name) as recorder:
                    gemv.gemv(torch.zeros(1, k, dtype=x_dtype), weight, torch.ones(n), bias)
                yield from compile_recorded(recorder, f"gemv {str(w_dtype)[6:]} x {str(x_dtype)[6:]}, k {k}")
    weight = torch.zeros(n, 512, dtype=torch.bfloat16)
    for name, rows in (("_gemv_kernel", 1), ("_rows_dot_kernel", 4)):
        with recording(gemv, name) as recorder:
            gemv.gemv(torch.zeros(rows, 512, dtype=torch.bfloat16), weight)
        yield from compile_recorded(recorder, f"gemv bf16, {rows} row(s)")
    for name, w in (("_gemv_kernel", weight), ("_gemv_8bit_kernel", torch.zeros(n, 512).to(torch.float8_e4m3fn))):
        scale = torch.ones(n) if w.element_size() == 1 else None
        with recording(gemv, name) as recorder:
            gemv.gemv(torch.zeros(1, 512, dtype=torch.bfloat16), w, scale, swiglu=True)
        yield from compile_recorded(recorder, f"gemv {str(w.dtype)[6:]}, SwiGLU epilogue")


def dequantize_launches() -> Iterator[dict]:
    """The prefill path's weight widening: fp8 and int8 to bf16, 4 bits in both layouts to bf16 and fp16."""
    dequantize = importlib.import_module("pdserve.kernels.dequantize")
    for w_dtype in (torch.float8_e4m3fn, torch.int8):
        with recording(dequantize, "_w8_dequantize_kernel") as recorder:
            dequantize.w8_dequantize(torch.zeros(48, 320).to(w_dtype), torch.ones(48), torch.bfloat16)
        yield from compile_recorded(recorder, f"w8_dequantize {str(w_dtype)[6:]}")
    k, n, group_size = 256, 48, 128
    weights = (
        torch.zeros(k // 8, n, dtype=torch.int32),
        torch.ones(k // group_size, n).half(),
        torch.zeros(k // group_size, n, dtype=torch.uint8),
    )
    w4_matmul = importlib.import_module("pdserve.kernels.w4_matmul")
    for layout, tensors in (("columns", weights), ("N-major", [w4_matmul.n_major(t) for t in weights])):
        for out_dtype in (torch.bfloat16, torch.float16):
            with recording(dequantize, "_w4_dequantize_kernel") as recorder:
                dequantize.w4_dequantize(*tensors, group_size, out_dtype)
            yield from compile_recorded(recorder, f"w4_dequantize {layout} -> {str(out_dtype)[6:]}")


LAUNCHES = {
    "rotary_decode_attention": rotary_decode_attention_launches,
    "paged_decode_attention": paged_decode_attention_launches,
    "w4": w4_launches,
    "gemv": gemv_launches,
    "dequantize": dequantize_launches,
}


def main(names: list[str]) -> None:
    assert not os.environ.get("TRITON_INTERPRET"), "compile for the GPU: run without TRITON_INTERPRET"
    for name in names or list(LAUNCHES):
        for result in LAUNCHES[name]():
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
