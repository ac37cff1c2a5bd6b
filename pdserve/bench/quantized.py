"""Decode and prefill with bf16, W8 (fp8, int8) and W4 (awq, gptq; group 128) weights on one GPU in
one run (random weights in the model's shape), each next to its own floor:

- decode step vs (the bytes it must read: the projections at their quantized size + their scales
  and zero points, the unquantized rest, the batch's KV) / copy bandwidth;
- prefill vs the bf16 matmul rate and, for fp8 weights (FP8 GEMM), the FP8 matmul rate.

    python -m pdserve.bench.quantized --model llama3-8b --schemes bf16 fp8 int8 awq gptq --batch-sizes 1 64 --lengths 2048"""

from __future__ import annotations

import argparse
import gc
import json
from dataclasses import asdict

import torch

from pdserve.bench import decode, prefill
from pdserve.bench.ceilings import (
    copy_bandwidth_gbs,
    describe_gpu,
    fp8_matmul_tflops,
    matmul_tflops,
)
from pdserve.bench.shapes import SHAPES

SCHEMES = ("bf16", "fp8", "int8", "awq", "gptq")


def run(args: argparse.Namespace) -> tuple[list[decode.DecodeRow], list[prefill.PrefillRow]]:
    copy_gbs, bf16_rate = copy_bandwidth_gbs(), matmul_tflops()
    decode_rows, prefill_rows = [], []
    for scheme in args.schemes:
        quantization = None if scheme == "bf16" else scheme
        decode_rows += decode.bench_pdserve(args.model, args.batch_sizes, args.context, args.steps, copy_gbs, quantization)
        _release()
        if args.lengths:
            prefill_rows += prefill.bench_pdserve(args.model, args.lengths, bf16_rate, quantization)
            _release()
    print(f"\ncopy bandwidth (read+write): {copy_gbs:.0f} GB/s   bf16 matmul: {bf16_rate:.0f} TFLOP/s   GPU: {describe_gpu()}")
    print_decode(decode_rows)
    if prefill_rows:
        print_prefill(prefill_rows, fp8_matmul_tflops())
    return decode_rows, prefill_rows


def print_decode(rows: list[decode.DecodeRow]) -> None:
    bf16 = {(r.batch_size, r.context): r.step_ms for r in rows if r.engine == "pdserve"}
    print(f"\n### decode, {rows[0].model}")
    print("| weights | batch | context | step ms | floor ms | % of its roofline | step / bf16 step |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        base = bf16.get((r.batch_size, r.context))
        ratio = f"{r.step_ms / base:.2f}" if base else "-"
        print(
            f"| {_scheme(r.engine)} | {r.batch_size} | {r.context} | {r.step_ms:.3f} | {r.floor_ms:.3f} | {100 * r.roofline_fraction:.1f}% | {ratio} |"
        )


def print_prefill(rows: list[prefill.PrefillRow], fp8_rate: float | None) -> None:
    print(f"\n### prefill, {rows[0].model}   FP8 matmul: {f'{fp8_rate:.0f} TFLOP/s' if fp8_rate else 'none on this GPU'}")
    print("| weights | tokens | ms | TFLOP/s | % of bf16 matmul | % of FP8 matmul |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        of_fp8 = f"{100 * r.tflops / fp8_rate:.1f}%" if fp8_rate and _scheme(r.engine) == "fp8" else "-"
        print(f"| {_scheme(r.engine)} | {r.num_tokens} | {r.ms:.2f} | {r.tflops:.0f} | {100 * r.fraction:.1f}% | {of_fp8} |")


def _scheme(engine: str) -> str:
    return engine.removeprefix("pdserve-") if engine != "pdserve" else "bf16"


def _release() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--schemes", nargs="+", choices=SCHEMES, default=list(SCHEMES))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lengths", type=int, nargs="*", default=[2048], help="prefill lengths (none: decode only)")
    parser.add_argument("--json", default=None, help="append every row as a JSON line to this file")
    args = parser.parse_args()
    decode_rows, prefill_rows = run(args)
    if args.json:
        with open(args.json, "a") as f:
            for row in [*decode_rows, *prefill_rows]:
                f.write(json.dumps({"kind": type(row).__name__, **asdict(row), "gpu": describe_gpu()}) + "\n")


if __name__ == "__main__":
    main()
