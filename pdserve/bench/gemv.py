"""Skinny matmuls (decode: few rows) of Llama-3-8B's projections, in the layouts torch can hand to
cuBLAS, as GB/s of weight read against the copy bandwidth; timed from CUDA graphs. `--quantized`:
the quantized-weight kernels instead (kernels/w8_matmul.py, w4_matmul.py, w4_gemv.py, gemv.py), GB/s of the
bytes they must read (weights at their stored size + scales + zero points).

`--sweep`: the decode GEMVs' tile sizes (kernels/gemv.py, kernels/w4_gemv.py) at one row, in a chain
of dependent launches as the decode step runs them, each shape's best against the heuristic's pick
(how their `*_tile_sizes` were chosen).

    python -m pdserve.bench.gemv [--quantized | --prefill | --sweep [--weights w4] [--shapes llama3-8b]]"""

from __future__ import annotations

from collections.abc import Callable

import torch
from triton.testing import do_bench_cudagraph

from pdserve.bench.ceilings import copy_bandwidth_gbs

SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336), "lm_head": (128256, 4096)}


def rotation(weights: list) -> Callable[[], tuple]:
    state = {"i": 0}

    def pick() -> tuple:
        state["i"] = (state["i"] + 1) % len(weights)
        return weights[state["i"]]

    return pick


def layouts(x: torch.Tensor, weights: list[torch.Tensor], transposed: list[torch.Tensor]) -> list[Callable[[], torch.Tensor]]:
    """x times the next weight of the rotation, three ways: linear(x, W), (W @ x.T).T, x @ W_t."""
    pick, pick_transposed = rotation(weights), rotation(transposed)
    return [
        lambda: torch.nn.functional.linear(x, pick()),
        lambda: (pick() @ x.t()).t(),
        lambda: x @ pick_transposed(),
    ]


def quantized_variants(
    x: torch.Tensor, w8: dict, w4: list, group_size: int, bytes_w8: int, bytes_w4: int
) -> list[tuple[Callable[[], torch.Tensor] | None, int]]:
    """x times the next quantized weight of each rotation (fp8, int8, 4-bit, 4-bit by the decode GEMV),
    with the bytes each reads; None for the GEMV past the rows it reads the weight once for."""
    from pdserve import kernels
    from pdserve.kernels.w4_gemv import MAX_ROWS

    fp8, int8, w4_ = rotation(w8[torch.float8_e4m3fn]), rotation(w8[torch.int8]), rotation(w4)
    is_gemv = x.shape[0] <= kernels.ELEMENTWISE_MAX_ROWS
    return [
        (lambda: kernels.w8_matmul(x, *fp8()), bytes_w8),
        (lambda: kernels.w8_matmul(x, *int8()), bytes_w8),
        (lambda: kernels.w4_matmul(x, *w4_(), group_size), bytes_w4),
        ((lambda: kernels.w4_gemv(x, *w4_(), group_size)) if x.shape[0] <= MAX_ROWS else None, bytes_w4),
        ((lambda: kernels.gemv(x, *fp8())) if is_gemv else None, bytes_w8),
        ((lambda: kernels.gemv(x, *int8())) if is_gemv else None, bytes_w8),
    ]


def quantized_table(copy: float, group_size: int = 128) -> None:
    from pdserve.engine.quant_formats import quantize_per_channel

    print(
        "| proj | rows | fp8 (w8_matmul) | int8 (w8_matmul) | 4-bit g128 (w4_matmul) | 4-bit g128 (w4_gemv) | fp8 (gemv) | int8 (gemv) |"
    )
    print("|---|---|---|---|---|---|---|---|")
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
        torch.cuda.synchronize()  # do_bench_cudagraph's own stream does not wait for these writes
        bytes_w8 = n_out * n_in + 4 * n_out
        bytes_w4 = n_out * n_in // 2 + (n_in // group_size) * n_out * 3
        for m in (1, 4, 8, 64):
            x = torch.randn(m, n_in, dtype=torch.bfloat16, device="cuda")
            variants = quantized_variants(x, w8, w4, group_size, bytes_w8, bytes_w4)
            rates = [b / (do_bench_cudagraph(v, rep=100, return_mode="median") * 1e-3) / 1e9 if v else None for v, b in variants]
            cells = [f"{r:.0f} GB/s ({100 * r / copy:.0f}%)" if r is not None else "-" for r in rates]
            print(f"| {name} | {m} | " + " | ".join(cells) + " |")
        del w8, w4
        torch.cuda.empty_cache()


def prefill_table(rows: tuple[int, ...] = (256, 512, 1024, 2048, 4096), group_size: int = 128) -> None:
    """Prefill-sized matmuls of quantized weights (Llama-3-8B's projections): the weight-only kernels
    (w8_matmul, w4_matmul) against widening the weight to bf16 first (kernels/dequantize.py) and the
    bf16 GEMM, as TFLOP/s and as a share of the bf16 GEMM of the same shape with a bf16 weight."""
    print("| proj | rows | bf16 GEMM TFLOP/s | int8 w8_matmul | int8 widened + GEMM | 4-bit w4_matmul | 4-bit widened + GEMM |")
    print("|---|---|---|---|---|---|---|")
    for name, (n_out, n_in) in SHAPES.items():
        if name != "lm_head":
            _prefill_rows(name, n_out, n_in, rows, group_size)
            torch.cuda.empty_cache()


def _prefill_rows(name: str, n_out: int, n_in: int, rows: tuple[int, ...], group_size: int) -> None:
    from triton.testing import do_bench

    from pdserve import kernels
    from pdserve.engine.quant_formats import quantize_per_channel
    from pdserve.kernels.dequantize import w4_dequantize, w8_dequantize

    w_bf16 = torch.randn(n_out, n_in, device="cuda").bfloat16()
    q8, s8 = quantize_per_channel(w_bf16.float(), torch.int8)
    w4 = (
        torch.randint(-(2**31), 2**31 - 1, (n_in // 8, n_out), dtype=torch.int32, device="cuda"),
        (torch.rand(n_in // group_size, n_out, device="cuda") * 0.004 + 0.001).half(),
        torch.randint(0, 16, (n_in // group_size, n_out), dtype=torch.uint8, device="cuda"),
    )
    for m in rows:
        x = torch.randn(m, n_in, dtype=torch.bfloat16, device="cuda")
        variants = [
            lambda x=x: torch.nn.functional.linear(x, w_bf16),
            lambda x=x: kernels.w8_matmul(x, q8, s8),
            lambda x=x: torch.nn.functional.linear(x, w8_dequantize(q8, s8, x.dtype)),
            lambda x=x: kernels.w4_matmul(x, *w4, group_size),
            lambda x=x: x @ w4_dequantize(*w4, group_size, x.dtype),
        ]
        rates = [2 * m * n_out * n_in / (do_bench(v, rep=50, return_mode="median") * 1e-3) / 1e12 for v in variants]
        cells = [f"{r:.0f} ({100 * r / rates[0]:.0f}%)" for r in rates[1:]]
        print(f"| {name} | {m} | {rates[0]:.0f} | " + " | ".join(cells) + " |", flush=True)


# --sweep: Llama-3-8B's projections and those of two Qwen2.5 sizes (narrow and wide ones of other lengths)
SWEEP_SHAPES = {
    **{f"llama3-8b {name}": shape for name, shape in SHAPES.items() if name != "lm_head"},
    "qwen2.5-0.5b qkv": (1152, 896),
    "qwen2.5-0.5b o_proj": (896, 896),
    "qwen2.5-0.5b gate_up": (9728, 896),
    "qwen2.5-0.5b down": (896, 4864),
    "qwen2.5-0.5b lm_head": (151936, 896),
    "qwen2.5-7b qkv": (4608, 3584),
    "qwen2.5-7b gate_up": (37888, 3584),
    "qwen2.5-7b down": (3584, 18944),
}


def sweep_table(copy: float, kinds: list[str], shape_prefix: str = "", top: int = 3, group_size: int = 128) -> None:
    """% of copy bandwidth at one row, as a decode step runs the GEMVs: a chain of launches of one
    shape over distinct weights (more than L2 holds), each a dependent of the one before (PDL on
    sm_90+), timed as one CUDA graph; the heuristic's tiles, then the best `top` of a grid. `kinds`:
    of bf16, fp8, int8, w4; `shape_prefix`: only the shapes whose name starts with it."""
    from pdserve import kernels
    from pdserve.engine.quant_formats import quantize_per_channel
    from pdserve.engine.quant_layers import W8_DTYPES
    from pdserve.kernels.gemv import gemv_8bit_tile_sizes, gemv_tile_sizes, takes_8bit_kernel
    from pdserve.kernels.w4_gemv import gemv_tile_sizes as w4_tile_sizes

    for name, (n, k) in SWEEP_SHAPES.items():
        if not name.startswith(shape_prefix):
            continue
        for kind in kinds:
            nbytes = n * k // 2 + (k // group_size) * n * 3 if kind == "w4" else n * k * (2 if kind == "bf16" else 1)
            chain = max(16, (400 << 20) // nbytes + 1)
            if kind == "w4":
                weights: list[tuple] = [
                    (
                        torch.randint(-(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32, device="cuda"),
                        (torch.rand(k // group_size, n, device="cuda") * 0.004 + 0.001).half(),
                        torch.randint(0, 16, (k // group_size, n), dtype=torch.uint8, device="cuda"),
                    )
                    for _ in range(chain)
                ]
                heuristic: tuple = w4_tile_sizes(n, k, torch.device("cuda"), group_size)
                grid: list[tuple] = [
                    (bn, 16, bg, 4, 4, splits)
                    for bn, bg in ((16, 2), (16, 4), (16, 8), (32, 2), (32, 4), (32, 8), (64, 1), (64, 2), (64, 4))
                    for splits in (1, 2, 4)
                ]
                # more loads in flight a program (one-row o_proj: 11.7% achieved occupancy, RESULTS.md):
                # deeper pipelines and 8 warps at the heuristic's tiles
                grid += [
                    (bn, 16, bg, warps, stages, 1)
                    for bn, bg in ((16, 2), (16, 4), (32, 8))
                    for warps, stages in ((4, 6), (4, 8), (8, 4), (8, 6))
                ]
            else:
                size = 2 if kind == "bf16" else 1
                weights = []
                for _ in range(chain):
                    w = torch.randn(n, k, device="cuda")
                    weights.append((w.bfloat16(), None) if kind == "bf16" else quantize_per_channel(w, W8_DTYPES[kind]))
                    del w
                grid = [
                    (bn, b // size, nw, stages)
                    for bn in (2, 4, 8, 16)
                    for b in (512, 1024, 2048, 4096)
                    for nw in (4, 8)
                    for stages in (1, 3)
                    if 4096 <= bn * b <= 16384
                ]
                if size == 1 and takes_8bit_kernel(weights[0][0].dtype, torch.bfloat16, n, k):
                    heuristic = gemv_8bit_tile_sizes(n, k, torch.device("cuda", 0))
                    # its registers allow smaller tiles: fewer rows, 2 warps (runs/2026-12-04-h200-17)
                    grid += [
                        (bn, b, nw, 1)
                        for bn, b, nw in ((1, 2048, 4), (2, 512, 2), (2, 1024, 2), (2, 1024, 4), (4, 1024, 2), (2, 2048, 8))
                    ]
                else:
                    heuristic = gemv_tile_sizes(n, k, size)
            xs = [torch.randn(1, k, dtype=torch.bfloat16, device="cuda") for _ in range(chain)]
            torch.cuda.synchronize()  # do_bench_cudagraph's own stream does not wait for these writes

            def run(tiles: tuple, kind: str = kind, weights: list = weights, xs: list = xs) -> None:
                for w, x in zip(weights, xs):
                    if kind == "w4":
                        kernels.w4_gemv(x, *w, group_size, tile_sizes=tiles)
                    else:
                        kernels.gemv(x, *w, tiles=tiles)

            rates = []
            grid = [tiles for tiles in grid if kind == "w4" or -(-n // tiles[0]) <= 65535]  # a grid's y limit
            for tiles in [heuristic, *grid]:
                ms = do_bench_cudagraph(lambda tiles=tiles: run(tiles), rep=25, return_mode="median")
                rates.append((100 * chain * nbytes / (ms * 1e-3) / 1e9 / copy, tiles))
            best = ", ".join(f"{tuple(tiles)}: {rate:.0f}%" for rate, tiles in sorted(rates[1:], reverse=True)[:top])
            print(f"| {name} | {kind} | {tuple(rates[0][1])}: {rates[0][0]:.0f}% | {best} |", flush=True)
            del weights, xs
            torch.cuda.empty_cache()


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantized", action="store_true", help="the quantized-weight kernels")
    parser.add_argument("--sweep", action="store_true", help="the decode GEMVs' tile sizes")
    parser.add_argument(
        "--prefill", action="store_true", help="prefill-sized quantized matmuls: weight-only kernels vs widen + GEMM"
    )
    parser.add_argument("--weights", nargs="+", choices=("bf16", "fp8", "int8", "w4"), default=["bf16", "fp8", "int8", "w4"])
    parser.add_argument("--shapes", default="", help="--sweep: only the shapes whose name starts with this (e.g. llama3-8b)")
    parser.add_argument("--top", type=int, default=3, help="--sweep: how many of the grid's best tiles to print")
    args = parser.parse_args()
    copy = copy_bandwidth_gbs()
    if args.sweep:
        print(f"copy {copy:.0f} GB/s")
        print("| proj | weights | heuristic | best of the grid |")
        print("|---|---|---|---|")
        sweep_table(copy, args.weights, args.shapes, args.top)
        return
    if args.prefill:
        prefill_table()
        return
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
        torch.cuda.synchronize()  # do_bench_cudagraph's own stream does not wait for these writes
        for m in (1, 8, 64):
            x = torch.randn(m, n_in, dtype=torch.bfloat16, device="cuda")
            variants = layouts(x, weights, transposed)
            rates = [n_out * n_in * 2 / (do_bench_cudagraph(v, rep=100, return_mode="median") * 1e-3) / 1e9 for v in variants]
            print(f"| {name} | {m} | " + " | ".join(f"{r:.0f} GB/s ({100 * r / copy:.0f}%)" for r in rates) + " |")
        del weights, transposed, variants  # `variants` holds the weights too
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
