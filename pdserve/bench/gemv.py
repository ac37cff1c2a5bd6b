"""Skinny matmuls (decode: few rows) of Llama-3-8B's projections, in the layouts torch can hand to
cuBLAS, as GB/s of weight read against the copy bandwidth; timed from CUDA graphs.

    python -m pdserve.bench.gemv"""
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


def main() -> None:
    copy = copy_bandwidth_gbs()
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
