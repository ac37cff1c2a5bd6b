"""What the content fingerprint (`engine/fingerprint.py`) costs on an 8B checkpoint: writes Llama-3-8B's
tensors (bf16, random, four shards like the Hub's) and times the fingerprint with the files out of
the page cache (dropped with posix_fadvise) and in it, next to one plain read of every byte, which
loading the weights does anyway.

    python -m pdserve.bench.fingerprint --dir /tmp/pdserve-llama3-8b [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pdserve.bench.shapes import SHAPES
from pdserve.engine.fingerprint import READ_BYTES, model_fingerprint
from pdserve.engine.loader import safetensors_files

NUM_SHARDS = 4
WRITE_BYTES = 64 * 2**20


def llama3_8b_tensors() -> list[tuple[str, tuple[int, ...]]]:
    config = SHAPES["llama3-8b"]
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    tensors = [("model.embed_tokens.weight", (v, h))]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        tensors += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    return tensors + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def write_checkpoint(directory: Path, seed: int = 0) -> int:
    """config.json, NUM_SHARDS safetensors files of random bf16 bytes and their index; the bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(SHAPES["llama3-8b"], indent=2))
    tensors = llama3_8b_tensors()
    total = sum(2 * int(np.prod(shape)) for _, shape in tensors)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[] for _ in range(NUM_SHARDS)]
    written = 0
    for name, shape in tensors:  # fill shards in order, each up to a quarter of the bytes
        shards[min(NUM_SHARDS - 1, written * NUM_SHARDS // total)].append((name, shape))
        written += 2 * int(np.prod(shape))
    rng = np.random.default_rng(seed)
    weight_map = {}
    for index, shard in enumerate(shards):
        file_name = f"model-{index + 1:05d}-of-{NUM_SHARDS:05d}.safetensors"
        _write_shard(directory / file_name, shard, rng)
        weight_map |= {name: file_name for name, _ in shard}
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return total


def _write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], rng: np.random.Generator) -> None:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        size = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as file:
        file.write(len(encoded).to_bytes(8, "little") + encoded)
        for start in range(0, offset, WRITE_BYTES):
            file.write(rng.bytes(min(WRITE_BYTES, offset - start)))


def drop_page_cache(directory: Path) -> None:
    for path in directory.iterdir():
        with open(path, "rb") as file:
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def read_all(directory: Path) -> int:
    buffer, total = bytearray(READ_BYTES), 0
    for path in safetensors_files(directory):
        with open(path, "rb", buffering=0) as file:
            while num_read := file.readinto(buffer):
                total += num_read
    return total


def timed(fn: Callable[..., Any], *args: object) -> tuple[float, float, Any]:
    """Wall seconds, CPU seconds of this process (all threads), the result."""
    start, start_cpu = time.perf_counter(), time.process_time()
    result = fn(*args)
    return time.perf_counter() - start, time.process_time() - start_cpu, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/pdserve-llama3-8b"))
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint (else it is deleted)")
    args = parser.parse_args()
    if not (args.dir / "model.safetensors.index.json").is_file():
        seconds, _, num_bytes = timed(write_checkpoint, args.dir)
        print(f"wrote {num_bytes / 1e9:.2f} GB of Llama-3-8B-shaped bf16 weights to {args.dir} in {seconds:.1f} s")
    num_bytes = sum(path.stat().st_size for path in safetensors_files(args.dir))
    print(
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {num_bytes / 1e9:.2f} GB in {len(safetensors_files(args.dir))} files"
    )
    for cache in ("cold", "warm"):
        if cache == "cold":
            drop_page_cache(args.dir)
        read_s, read_cpu_s, _ = timed(read_all, args.dir)
        if cache == "cold":
            drop_page_cache(args.dir)
        fingerprint_s, fingerprint_cpu_s, fingerprint = timed(model_fingerprint, args.dir)
        print(
            f"{cache} page cache: reading every byte {read_s:.2f} s ({num_bytes / read_s / 1e9:.2f} GB/s, {read_cpu_s:.1f} CPU s); "
            f"fingerprint {fingerprint_s:.2f} s ({num_bytes / fingerprint_s / 1e9:.2f} GB/s, {fingerprint_cpu_s:.1f} CPU s) = {fingerprint}"
        )
    if not args.keep:
        shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
