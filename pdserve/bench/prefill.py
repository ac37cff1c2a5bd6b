"""Prefill throughput in TFLOP/s against the bf16 matmul rate measured in this run; pdserve's
engine step or HF transformers' eager forward (as `generate` runs the prompt).

    python -m pdserve.bench.prefill --model llama3-8b --lengths 512 2048 8192 [--engine hf]

pdserve: one engine step computing a whole fresh prompt (no prefix-cache hit): KV written to the
paged cache, logits of the last token, greedy sample read back. HF: `model(ids, use_cache=True,
logits_to_keep=1)` + argmax. FLOPs: 2 x linear params x tokens + causal attention (bench/shapes)."""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass, replace

import torch

from pdserve.bench.ceilings import describe_gpu, matmul_tflops
from pdserve.bench.decode import time_steps
from pdserve.bench.shapes import SHAPES, prefill_flops, write_shape
from pdserve.engine.config import EngineConfig, ModelConfig


@dataclass
class PrefillRow:
    model: str
    engine: str
    num_tokens: int
    ms: float
    tflops: float
    matmul_tflops: float

    @property
    def fraction(self) -> float:
        return self.tflops / self.matmul_tflops


def bench_pdserve(name: str, lengths: list[int], rate: float, quantization: str | None = None) -> list[PrefillRow]:
    from pdserve.engine.core import EngineCore
    from pdserve.engine.request import Request, ScheduledRequest
    from pdserve.engine.sampling_params import SamplingParams

    longest = max(lengths)
    config = EngineConfig(
        model=str(write_shape(name)),
        dtype="bfloat16",
        device="cuda",
        max_model_len=longest + 64,
        max_num_batched_tokens=longest,
        max_num_seqs=8,
        num_kv_blocks=-(-(longest + 64) // 16) + 8,
        enable_prefix_caching=False,
        enforce_eager=True,
        quantization=quantization,
    )
    core = EngineCore.load(replace(config, load_format="dummy"))
    rng = random.Random(0)
    rows = []
    for n in lengths:
        prompt = [rng.randrange(1000) for _ in range(n)]
        request = Request("p", prompt, SamplingParams(temperature=0.0))
        request.block_table = core.block_manager.allocate(prompt).block_table
        batch = [ScheduledRequest(request, n)]
        ms = time_steps(lambda batch=batch: core.runner.execute(batch), num_steps=3)
        flops = prefill_flops(core.model_config, n)
        engine = f"pdserve-{quantization}" if quantization else "pdserve"
        rows.append(PrefillRow(name, engine, n, ms, flops / (ms * 1e-3) / 1e12, rate))
        core.block_manager.free(request.block_table)
    return rows


def bench_hf(name: str, lengths: list[int], rate: float) -> list[PrefillRow]:
    import transformers

    model_dir = write_shape(name)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.from_pretrained(model_dir), dtype=torch.bfloat16
        ).eval()
    config = ModelConfig.from_pretrained(model_dir)
    rows = []
    for n in lengths:
        ids = torch.randint(0, 1000, (1, n), device="cuda")

        @torch.inference_mode()
        def step(ids: torch.Tensor = ids) -> list[int]:
            logits = model(input_ids=ids, use_cache=True, logits_to_keep=1).logits
            return logits[:, -1].argmax(-1).tolist()

        ms = time_steps(step, num_steps=3)
        rows.append(PrefillRow(name, "hf-eager", n, ms, prefill_flops(config, n) / (ms * 1e-3) / 1e12, rate))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--engine", choices=["pdserve", "hf"], default="pdserve")
    parser.add_argument(
        "--quantization", choices=["fp8", "int8", "awq", "gptq"], default=None, help="pdserve's weights, random, quantized"
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rate = matmul_tflops()
    extra = {"quantization": args.quantization} if args.quantization else {}
    rows = (bench_pdserve if args.engine == "pdserve" else bench_hf)(args.model, args.lengths, rate, **extra)
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps({**asdict(r), "gpu": describe_gpu()}) + "\n")
    print(f"\nbf16 matmul (8192^3): {rate:.0f} TFLOP/s   GPU: {describe_gpu()}")
    print("| model | engine | tokens | ms | TFLOP/s | % of matmul rate |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.model} | {r.engine} | {r.num_tokens} | {r.ms:.2f} | {r.tflops:.0f} | {100 * r.fraction:.1f}% |")


if __name__ == "__main__":
    main()
