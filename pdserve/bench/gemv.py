"""Skinny matmuls (decode: few rows) of Llama-3-8B's projections, in the layouts torch can hand to
cuBLAS, as GB/s of weight read against the copy bandwidth; timed from CUDA graphs. `--quantized`:
the quantized-weight kernels instead (kernels/w8_matmul.py, kernels/w4_matmul.py), GB/s of the
bytes they must read (weights at their stored size + scales + zero points).

    python -m pdserve.bench.gemv [--quantized]"""

from __future__ import annotations

from collections.abc import Callable

import torch
from triton.testing import do_bench_cudagraph

from pdserve.bench.ceilings import copy_bandwidth_gbs

SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336), "lm_head": (128256, 4096)}


def layouts(x: torch.Tensor, weights: list[torch.Tensor], transposed: list[torch.Tensor]) -> list[Callable[[], torch.Tensor]]:
    """x times the next weight of the rotation, three ways: linear(x, W), (W @ x.T).T, x @ W_t."""
    state = {"i": 0}

    def pick(ws: list[torch.Tensor]) -> torch.Tensor:
        state["i"] = (state["i"] + 1) % len(ws)
        return ws[state["i"]]

    return [
        lambda: torch.nn.functional.linear(x, pick(weights)),
        lambda: (pick(weights) @ x.t()).t(),
        lambda: x @ pick(transposed),
    ]


def quantized_variants(
    x: torch.Tensor, w8: dict, w4: list, group_size: int, bytes_w8: int, bytes_w4: int
) -> list[tuple[Callable[[], torch.Tensor], int]]:
    """x times the next quantized weight of each rotation (fp8, int8, 4-bit), with the bytes each reads."""
    from pdserve import kernels

    state = {"i": 0}

    def pick(ws: list) -> tuple:
        state["i"] = (state["i"] + 1) % len(ws)
        return ws[state["i"]]

    return [
        (lambda: kernels.w8_matmul(x, *pick(w8[torch.float8_e4m3fn])), bytes_w8),
        (lambda: kernels.w8_matmul(x, *pick(w8[torch.int8])), bytes_w8),
        (lambda: kernels.w4_matmul(x, *pick(w4), group_size), bytes_w4),
    ]


def quantized_table(copy: float, group_size: int = 128) -> None:
    from pdserve.engine.quant_formats import quantize_per_channel

    print("| proj | rows | fp8 (w8_matmul) | int8 (w8_matmul) | 4-bit g128 (w4_matmul) |")
    print("|---|---|---|---|---|")
    for name, (n_out, n_in) in SHAPES.items():
        sets = max(2, (200 << 20) // (n_out * n_in // 2) + 1)  # rotate over > L2 of weights
        w8 = {
            dtype: [quantize_per_channel(torch.randn(n_out, n_in, device="cuda"), dtype) for _ in range(min(sets, 4))]
            for dtype in (torch.float8_e4m3fn, torch.int8)
        }
        w4 = [
            (
                torch.randint(-(2**31), 2**31 - 1, (n_in // 8, n_out), dtype=torch.int32, device="cuda"),
                torch.rand(n_in // group_size, n_out, device="cuda").half(),
                torch.randint(0, 16, (n_in // group_size, n_out), dtype=torch.uint8, device="cuda"),
            )
            for _ in range(sets)
        ]
        bytes_w8 = n_out * n_in + 4 * n_out
        bytes_w4 = n_out * n_in // 2 + (n_in // group_size) * n_out * 3
        for m in (1, 8, 64):
            x = torch.randn(m, n_in, dtype=torch.bfloat16, device="cuda")
            variants = quantized_variants(x, w8, w4, group_size, bytes_w8, bytes_w4)
            rates = [b / (do_bench_cudagraph(v, rep=100, return_mode="median") * 1e-3) / 1e9 for v, b in variants]
            print(f"| {name} | {m} | " + " | ".join(f"{r:.0f} GB/s ({100 * r / copy:.0f}%)" for r in rates) + " |")
        del w8, w4
        torch.cuda.empty_cache()


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantized", action="store_true", help="the quantized-weight kernels")
    args = parser.parse_args()
    copy = copy_bandwidth_gbs()
    if args.quantized:
        print(f"copy {copy:.0f} GB/s")
        quantized_table(copy)
        return
    print(f"copy {copy:.0f} GB/s")
    print("| proj | rows | linear(x, W) | (W @ x.T).T | x @ W_t (stored [in, out]) |")
    print("|---|---|---|---|---|")
    for name, (n_out, n_in) in SHAPES.items():
        sets = max(2, (200 << 20) // (n_out * n_in * 2) + 1)  # rotate over > L2 of weights
        weights = [torch.randn(n_out, n_in, dtype=torch.bfloat16, device="cuda") for _ in range(sets)]
        transposed = [w.t().contiguous() for w in weights]
        for m in (1, 8, 64):
            x = torch.randn(m, n_in, dtype=torch.bfloat16, device="cuda")
            variants = layouts(x, weights, transposed)
            rates = [n_out * n_in * 2 / (do_bench_cudagraph(v, rep=100, return_mode="median") * 1e-3) / 1e9 for v in variants]
            print(f"| {name} | {m} | " + " | ".join(f"{r:.0f} GB/s ({100 * r / copy:.0f}%)" for r in rates) + " |")
        del weights, transposed, variants  # `variants` holds the weights too
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
