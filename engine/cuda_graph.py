"""CUDA graphs for the decode step: the forward pass and the logits of every batch-size bucket are
captured once over static buffers sharing one memory pool; a step fills the buffers and replays."""
from __future__ import annotations

import torch

from engine.attention import AttentionMetadata
from engine.request import Request


def batch_size_buckets(max_batch_size: int) -> list[int]:
    buckets = [b for b in (1, 2, 4, 8) if b < max_batch_size]
    buckets += list(range(16, max_batch_size, 16))
    return buckets + [max_batch_size]


class DecodeGraphRunner:
    def __init__(
        self, model: torch.nn.Module, kv_cache: torch.Tensor, max_batch_size: int, max_blocks_per_seq: int, block_size: int
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.buckets = batch_size_buckets(max_batch_size)
        device, n = kv_cache.device, max_batch_size
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.context_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        # Pinned host mirrors, written through numpy views, copied asynchronously before replay.
        self.host = {
            name: torch.zeros_like(t, device="cpu").pin_memory()
            for name, t in self._static_inputs().items()
        }
        self.host_np = {name: t.numpy() for name, t in self.host.items()}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self._capture_all()

    def _static_inputs(self) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids,
            "positions": self.positions,
            "slot_mapping": self.slot_mapping,
            "context_lens": self.context_lens,
            "block_tables": self.block_tables,
        }

    def _forward(self, bs: int) -> torch.Tensor:
        meta = AttentionMetadata(self.slot_mapping[:bs], self.block_tables[:bs], self.context_lens[:bs], None, 1)
        hidden = self.model(self.input_ids[:bs], self.positions[:bs], self.kv_cache, meta)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = None
        for bs in reversed(self.buckets):
            self._forward(bs)  # compiles the Triton kernels for these shapes outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[bs] = self._forward(bs)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def can_run(self, num_requests: int) -> bool:
        return num_requests <= self.buckets[-1]

    def run(self, requests: list[Request]) -> torch.Tensor:
        """fp32 logits `[len(requests), vocab]`: a view valid until the next replay."""
        n = len(requests)
        bs = next(b for b in self.buckets if b >= n)
        h, block = self.host_np, self.block_size
        for i, r in enumerate(requests):
            pos = r.num_computed_tokens
            num_prompt = r.num_prompt_tokens
            h["input_ids"][i] = r.prompt_token_ids[pos] if pos < num_prompt else r.output_token_ids[pos - num_prompt]
            h["positions"][i] = pos
            h["slot_mapping"][i] = r.block_table[pos // block] * block + pos % block
            h["context_lens"][i] = pos + 1
            h["block_tables"][i, : len(r.block_table)] = r.block_table
        h["slot_mapping"][n:bs] = -1
        h["context_lens"][n:bs] = 0
        for name, dst in self._static_inputs().items():
            dst[:bs].copy_(self.host[name][:bs], non_blocking=True)
        self.graphs[bs].replay()
        return self.logits[bs][:n]
