"""Where a decode step's time goes: CUDA kernel times inside the captured graph (torch.profiler /
CUPTI), summed by kernel, against the graph's wall time and the memory roofline.

    python -m pdserve.bench.profile_decode --model llama3-8b --batch-size 1 --context 1024"""

from __future__ import annotations

import argparse
import random
from collections import defaultdict
from dataclasses import replace

import torch

from pdserve.bench.ceilings import copy_bandwidth_gbs, median_ms
from pdserve.bench.decode import floor_ms
from pdserve.bench.shapes import SHAPES, write_shape
from pdserve.engine.config import EngineConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--quantization", choices=["fp8", "int8", "awq"], default=None, help="weights quantized (random)")
    parser.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto")
    args = parser.parse_args()
    from pdserve.engine.core import EngineCore
    from pdserve.engine.request import Request
    from pdserve.engine.sampling_params import SamplingParams

    copy_gbs = copy_bandwidth_gbs()
    max_bs = max(args.batch_size)
    config = EngineConfig(
        model=str(write_shape(args.model)),
        dtype="bfloat16",
        device="cuda",
        max_model_len=args.context + 64,
        max_num_seqs=max_bs,
        num_kv_blocks=max_bs * (-(-(args.context + 1) // 16)) + 8,
        enable_prefix_caching=False,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    core = EngineCore.load(replace(config, load_format="dummy"))
    for layer in core.runner.kv_cache:  # real-looking values (fp8 has no normal_)
        layer.copy_(torch.randn(layer.shape, dtype=torch.bfloat16, device="cuda"))
    kv_bytes = core.runner.kv_cache.element_size()
    rng = random.Random(0)
    for bs in args.batch_size:
        requests = []
        for i in range(bs):
            prompt = [rng.randrange(1000) for _ in range(args.context)]
            r = Request(f"r{i}", prompt, SamplingParams(temperature=0.0), output_token_ids=[1])
            r.block_table, r.num_computed_tokens = core.block_manager.allocate(prompt, args.context + 1).block_table, args.context
            requests.append(r)
        graphs = core.runner.graphs
        graphs.run(requests)
        bucket = next(b for b in graphs.buckets if b >= bs)
        replay_ms = median_ms(graphs.graphs[bucket].replay)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                graphs.graphs[bucket].replay()
            torch.cuda.synchronize()
        totals: dict[str, list[float]] = defaultdict(list)
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                totals[event.name[:90]].append(event.device_time_total / 1e3)
        kernel_ms = sum(sum(v) for v in totals.values()) / 10
        print(
            f"\n== batch {bs}, context {args.context}: graph replay {replay_ms:.3f} ms, kernels {kernel_ms:.3f} ms, "
            f"gaps {replay_ms - kernel_ms:.3f} ms, floor {floor_ms(core.model_config, bs, args.context, copy_gbs, args.quantization, kv_bytes):.3f} ms "
            f"(copy {copy_gbs:.0f} GB/s), kernels per step {sum(len(v) for v in totals.values()) / 10:.0f}"
        )
        print("| kernel | calls/step | ms/step | us/call |")
        print("|---|---|---|---|")
        for name, times in sorted(totals.items(), key=lambda kv: -sum(kv[1]))[:14]:
            print(f"| {name} | {len(times) / 10:.0f} | {sum(times) / 10:.3f} | {1e3 * sum(times) / len(times):.1f} |")
        for r in requests:
            core.block_manager.free(r.block_table)


if __name__ == "__main__":
    main()
