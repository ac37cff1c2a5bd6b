"""Decode step time against the memory-bandwidth roofline, (weight bytes + KV bytes) / copy
bandwidth, both measured in this run; pdserve's engine step or HF transformers' eager decode step.
The KV bytes are those of the cache's dtype: `--kv-cache-dtypes auto fp8` gives a table for each,
each next to its own floor (an fp8 cache reads half the KV bytes).

    python -m pdserve.bench.decode --model llama3-8b --batch-sizes 1 8 64 256 --context 1024 [--engine hf]
    python -m pdserve.bench.decode --model llama3-8b --batch-sizes 1 64 256 --context 4096 --kv-cache-dtypes auto fp8

pdserve: one full engine step (`LLMEngine.step`: scheduling, inputs, CUDA-graph replay, greedy
sampling, tokens appended and checked) on a batch of requests that each hold `context` tokens of
(random) KV, the next step launched before the last one's tokens are read back (async
scheduling); "sync step" is `ModelRunner.execute` alone, waiting for its tokens, as before.
HF: `model(...)` on one new token per sequence with a DynamicCache of `context` tokens (what
`generate` runs per token), plus argmax; the cache is cropped back after each step so the context stays fixed."""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from pdserve.bench.ceilings import copy_bandwidth_gbs, describe_gpu, median_ms
from pdserve.bench.shapes import SHAPES, decode_weight_bytes, write_shape
from pdserve.engine.config import EngineConfig, ModelConfig
from pdserve.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pdserve.engine.core import EngineCore
    from pdserve.engine.request import Request


@dataclass
class DecodeRow:
    model: str
    engine: str
    batch_size: int
    context: int
    step_ms: float
    floor_ms: float
    forward_ms: float | None = None  # graph replay alone (pdserve)
    kv_cache_dtype: str = "auto"
    sync_step_ms: float | None = None  # pdserve: one step that waits for its tokens

    @property
    def roofline_fraction(self) -> float:
        return self.floor_ms / self.step_ms


def floor_ms(
    config: ModelConfig,
    batch_size: int,
    context: int,
    copy_gbs: float,
    quantization: str | None = None,
    kv_element_bytes: int = 2,
) -> float:
    kv_bytes = batch_size * (context + 1) * config.kv_bytes_per_token * kv_element_bytes
    return (decode_weight_bytes(config, quantization=quantization) + kv_bytes) / (copy_gbs * 1e9) * 1e3


def time_steps(step: Callable[[], object], num_steps: int, repeats: int = 5) -> float:
    """Median over `repeats` of the mean wall time of `num_steps` synchronous steps, in ms."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(num_steps):
            step()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) / num_steps * 1e3)
    return statistics.median(samples)


def load_decode_core(name: str, max_batch: int, context: int, num_steps: int, **engine_args: object) -> EngineCore:
    """An engine on the GPU in `name`'s shape with random weights (`--load-format dummy`), its KV
    cache holding `max_batch` sequences of `context` tokens and the tokens `num_steps` of
    benchmark steps add, filled with random values: attention reads real-looking values, never
    zeros (fp8 has no normal_). `engine_args`: other `EngineConfig` fields."""
    from pdserve.engine.core import EngineCore

    max_len = context + 64 + 8 * num_steps  # the engine steps add tokens
    config = EngineConfig(
        model=str(write_shape(name)),
        dtype="bfloat16",
        device="cuda",
        max_model_len=max_len,
        max_num_seqs=max_batch,
        num_kv_blocks=max_batch * -(-max_len // 16) + 8,
        enable_prefix_caching=False,
        load_format="dummy",
        **engine_args,
    )
    core = EngineCore.load(config)
    for layer in core.runner.kv_cache:
        layer.copy_(torch.randn(layer.shape, dtype=torch.bfloat16, device=layer.device))
    return core


def decoding_request(
    core: EngineCore, request_id: str, params: SamplingParams, context: int, rng: random.Random, **fields: object
) -> Request:
    """A request holding `context` tokens of KV (random prompt ids below 1,000) and one output
    token, ready to decode (`Scheduler.add_running`). `fields`: other `Request` fields."""
    from pdserve.engine.request import Request

    prompt = [rng.randrange(1000) for _ in range(context)]
    request = Request(request_id, prompt, params, output_token_ids=[rng.randrange(1000)], **fields)
    allocation = core.block_manager.allocate(prompt, context + 1)
    assert allocation is not None, "the benchmark's KV cache holds every sequence"
    request.block_table, request.num_computed_tokens = allocation.block_table, context
    return request


def bench_pdserve(
    name: str,
    batch_sizes: list[int],
    context: int,
    num_steps: int,
    copy_gbs: float,
    quantization: str | None = None,
    kv_cache_dtype: str = "auto",
) -> list[DecodeRow]:
    """`quantization`: the weights quantized (random, `--load-format dummy`) as `--quantization` would."""
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.request import ScheduledRequest

    core = load_decode_core(name, max(batch_sizes), context, num_steps, quantization=quantization, kv_cache_dtype=kv_cache_dtype)
    kv_element_bytes = core.runner.kv_cache.element_size()
    rng = random.Random(0)
    greedy = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
    rows = []
    for bs in batch_sizes:
        requests = [decoding_request(core, f"r{i}", greedy, context, rng) for i in range(bs)]
        batch = [ScheduledRequest(r, 1) for r in requests]
        sync_step_ms = time_steps(lambda batch=batch: core.runner.execute(batch), num_steps)
        engine = LLMEngine(core)
        for r in requests:
            engine.scheduler.add_running(r)
        step_ms = time_steps(engine.step, num_steps)
        engine.pipeline.run_ahead = False
        engine.step()  # reads back the step in flight, launches none
        forward_ms = None
        if core.runner.graphs is not None:
            core.runner.graphs.run(requests)
            bucket = next(b for b in core.runner.graphs.buckets if b >= bs)
            forward_ms = median_ms(core.runner.graphs.graphs[bucket].replay)
        floor = floor_ms(core.model_config, bs, context, copy_gbs, quantization, kv_element_bytes)
        label = f"pdserve-{quantization}" if quantization else "pdserve"
        rows.append(DecodeRow(name, label, bs, context, step_ms, floor, forward_ms, kv_cache_dtype, sync_step_ms))
        for r in requests:
            core.block_manager.free(r.block_table)
    return rows


def bench_hf(name: str, batch_sizes: list[int], context: int, num_steps: int, copy_gbs: float) -> list[DecodeRow]:
    import transformers

    model_dir = write_shape(name)
    hf_config = transformers.AutoConfig.from_pretrained(model_dir)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16).eval()
    config = ModelConfig.from_pretrained(model_dir)
    rows = []
    for bs in batch_sizes:
        cache = transformers.DynamicCache()
        shape = (bs, config.num_kv_heads, context, config.head_dim)
        for layer in range(config.num_layers):
            cache.update(
                torch.randn(shape, dtype=torch.bfloat16, device="cuda"),
                torch.randn(shape, dtype=torch.bfloat16, device="cuda"),
                layer,
            )
        ids = torch.randint(0, 1000, (bs, 1), device="cuda")

        @torch.inference_mode()
        def step(ids: torch.Tensor = ids, cache: transformers.DynamicCache = cache) -> list[int]:
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
            cache.crop(-1)  # back to `context` tokens (negative: tokens to drop, in every transformers version)
            return logits[:, -1].argmax(-1).tolist()

        step_ms = time_steps(step, num_steps)
        rows.append(DecodeRow(name, "hf-eager", bs, context, step_ms, floor_ms(config, bs, context, copy_gbs)))
        del step, cache  # `step` holds the cache too: both go before empty_cache
        torch.cuda.empty_cache()
    return rows


def print_table(rows: list[DecodeRow], copy_gbs: float) -> None:
    print(f"\ncopy bandwidth (read+write): {copy_gbs:.0f} GB/s   GPU: {describe_gpu()}")
    print("| model | engine | KV | batch | context | step ms | sync step ms | forward ms | floor ms | % of roofline |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fwd = f"{r.forward_ms:.3f}" if r.forward_ms is not None else "-"
        sync = f"{r.sync_step_ms:.3f}" if r.sync_step_ms is not None else "-"
        kv = "fp8" if r.kv_cache_dtype == "fp8" else "bf16"
        print(
            f"| {r.model} | {r.engine} | {kv} | {r.batch_size} | {r.context} | {r.step_ms:.3f} | {sync} | {fwd} | "
            f"{r.floor_ms:.3f} | {100 * r.roofline_fraction:.1f}% |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--engine", choices=["pdserve", "hf"], default="pdserve")
    parser.add_argument(
        "--quantization", choices=["fp8", "int8", "awq", "gptq"], default=None, help="pdserve's weights, random, quantized"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--kv-cache-dtypes",
        nargs="+",
        choices=["auto", "fp8"],
        default=["auto"],
        help="pdserve: one table per KV cache dtype, each with its own floor",
    )
    parser.add_argument("--json", default=None, help="append the rows as JSON lines to this file")
    args = parser.parse_args()
    copy_gbs = copy_bandwidth_gbs()
    if args.engine == "hf":
        rows = bench_hf(args.model, args.batch_sizes, args.context, args.steps, copy_gbs)
    else:
        rows = []
        for kv_cache_dtype in args.kv_cache_dtypes:
            rows += bench_pdserve(
                args.model, args.batch_sizes, args.context, args.steps, copy_gbs, args.quantization, kv_cache_dtype
            )
            gc.collect()  # the engine of the last dtype, its graphs and cache, before the next one loads
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps({**asdict(r), "copy_gbs": copy_gbs, "gpu": describe_gpu()}) + "\n")
    print_table(rows, copy_gbs)


if __name__ == "__main__":
    main()
