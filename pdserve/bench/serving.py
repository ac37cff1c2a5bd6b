"""The serving table: `pdserve serve` disaggregated (per KV transport) against `--colocated` and the
offline `LLM.generate`, on the same GPU in one run, driven by `pdserve bench`'s load generator.
Random weights in a real architecture's shape (`--load-format dummy`).

    python -m pdserve.bench.serving --model llama3-8b --modes offline,colocated,cuda_ipc,grpc \\
        --num-prompts 256 --input-len 1024 --output-len 128 --max-concurrency 64 --ttft-lens 2048,8192
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from pdserve.bench.serve import BenchConfig, benchmark
from pdserve.bench.shapes import write_shape

SERVER_START_TIMEOUT_S = 900.0
TTFT_PROMPTS = 6  # concurrency 1: one prompt at a time, the median of these


def server_args(mode: str, model_dir: Path, port: int, args: argparse.Namespace) -> list[str]:
    args = [
        sys.executable,
        "-m",
        "pdserve.deploy.cli",
        "serve",
        "--model",
        str(model_dir),
        "--served-model-name",
        "bench",
        "--load-format",
        "dummy",
        "--dtype",
        args.dtype,
        "--device",
        args.device,
        "--port",
        str(port),
        "--max-model-len",
        str(args.max_model_len),
        "--log-level",
        "warning",
    ]
    return args + (["--colocated"] if mode == "colocated" else ["--kv-transport", mode])


async def run_load(url: str, args: argparse.Namespace) -> dict:
    """The main workload, then time-to-first-token at concurrency 1 for each long prompt length."""
    load = BenchConfig(
        url=url,
        model="bench",
        endpoint="completions",
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        max_concurrency=args.max_concurrency,
        request_rate=float("inf"),
        burstiness=1.0,
        slo_ttft_ms=None,
        slo_tpot_ms=None,
        seed=0,
    )
    await benchmark(BenchConfig(**{**load.__dict__, "num_prompts": args.max_concurrency, "output_len": 8}))  # warm-up
    async with httpx.AsyncClient(base_url=url) as client:
        before = (await client.get("/metrics")).text
        report, errors = await benchmark(load)
        after = (await client.get("/metrics")).text
    result = {key: report[key] for key in report if not isinstance(report[key], list)} | {"errors": errors}
    result["handoff_load_ms"] = exposed_handoff_ms(after, before)
    async with httpx.AsyncClient(base_url=url) as client:
        for length in args.ttft_lens:
            # Prompts of their own seed: none shares a prefix with another (no prefix-cache hits).
            single = BenchConfig(
                **{
                    **load.__dict__,
                    "num_prompts": TTFT_PROMPTS,
                    "input_len": length,
                    "output_len": 4,
                    "max_concurrency": 1,
                    "seed": 1000 + length,
                }
            )
            before = (await client.get("/metrics")).text
            ttft, _ = await benchmark(single)
            result[f"ttft_{length}_p50_ms"] = ttft["median_ttft_ms"]
            result[f"handoff_{length}_ms"] = exposed_handoff_ms((await client.get("/metrics")).text, before)
        result["metrics"] = (await client.get("/metrics")).text
    return result


def serve_and_measure(mode: str, model_dir: Path, args: argparse.Namespace, log_dir: Path) -> dict:
    port = 8100 + len(os.listdir(log_dir))
    log_path = log_dir / f"serve-{mode}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(server_args(mode, model_dir, port, args), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{mode}: the server exited:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - started > SERVER_START_TIMEOUT_S:
                raise TimeoutError(f"{mode}: not ready after {SERVER_START_TIMEOUT_S:g} s")
            time.sleep(1)
        print(f"{mode}: ready after {time.monotonic() - started:.0f} s", flush=True)
        return asyncio.run(run_load(url, args))
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


def offline(model_dir: Path, args: argparse.Namespace) -> dict:
    """`LLM.generate` of the whole workload at once, in a process of its own (its GPU memory goes with it)."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(_offline, model_dir, args).result()


def _offline(model_dir: Path, args: argparse.Namespace) -> dict:
    import torch

    from pdserve.engine import LLM, SamplingParams

    llm = LLM(model=str(model_dir), device=args.device, dtype=args.dtype, load_format="dummy", max_model_len=args.max_model_len)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1000, 100000, (args.input_len,), generator=generator).tolist() for _ in range(args.num_prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[: args.max_concurrency], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    num_output = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {
        "duration": seconds,
        "completed": len(outputs),
        "total_output_tokens": num_output,
        "output_throughput": num_output / seconds,
    }


def exposed_handoff_ms(metrics: str, before: str = "") -> float | None:
    """Mean KV hand-off time not hidden behind the prefill, from the gateway's histogram (of the
    requests between the `before` scrape and this one)."""

    def totals(text: str) -> tuple[float, float]:
        values = {"_sum": 0.0, "_count": 0.0}
        for line in text.splitlines():
            for part in values:
                if line.startswith(f"pdserve:kv_transfer_seconds{part}"):
                    values[part] = float(line.rsplit(" ", 1)[1])
        return values["_sum"], values["_count"]

    (total, count), (total_before, count_before) = totals(metrics), totals(before)
    return (total - total_before) / (count - count_before) * 1e3 if count > count_before else None


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_table(results: dict[str, dict], ttft_lens: list[int]) -> None:
    base = results.get("colocated", {}).get("output_throughput")
    ttft_columns = "".join(f" TTFT@{n} p50 ms (hand-off) |" for n in ttft_lens)
    print(
        f"| mode | output tok/s | vs colocated | TTFT p50 / p99 ms | ITL p50 / p99 ms | failed |{ttft_columns} hand-off ms under load |"
    )
    print("|---" * (7 + len(ttft_lens)) + "|")
    for mode, r in results.items():
        ratio = f"{r['output_throughput'] / base:.1%}" if base else "-"
        if mode == "offline":
            print(f"| offline | {r['output_throughput']:.0f} | {ratio} | - | - | 0 |" + " - |" * (len(ttft_lens) + 1))
            continue
        ttfts = "".join(f" {r[f'ttft_{n}_p50_ms']:.1f} ({_ms(r.get(f'handoff_{n}_ms'))}) |" for n in ttft_lens)
        print(
            f"| {mode} | {r['output_throughput']:.0f} | {ratio} | {r['median_ttft_ms']:.0f} / {r['p99_ttft_ms']:.0f} | "
            f"{r['median_itl_ms']:.1f} / {r['p99_itl_ms']:.1f} | {r['failed']} |{ttfts} {_ms(r.get('handoff_load_ms'))} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--modes", default="offline,colocated,cuda_ipc,grpc")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-concurrency", type=int, default=64)
    parser.add_argument("--ttft-lens", default="2048,8192")
    parser.add_argument("--max-model-len", type=int, default=10240)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", default="bench-serving", help="folder for the JSON results and server logs")
    args = parser.parse_args()
    args.ttft_lens = [int(n) for n in args.ttft_lens.split(",") if n]
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    model_dir = write_shape(args.model)
    results: dict[str, dict] = {}
    for mode in args.modes.split(","):
        started = time.monotonic()
        results[mode] = offline(model_dir, args) if mode == "offline" else serve_and_measure(mode, model_dir, args, out / "logs")
        print(f"{mode}: done in {time.monotonic() - started:.0f} s", flush=True)
        (out / f"serving-{mode}.json").write_text(json.dumps(results[mode], indent=2))
    print_table(results, args.ttft_lens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
