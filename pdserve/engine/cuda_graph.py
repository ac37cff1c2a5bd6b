"""CUDA graphs for the decode step: the forward pass, the logits and their greedy argmax for every
batch-size bucket are captured once over static buffers sharing one memory pool; a step fills
the buffers (two host-to-device copies) and replays."""

from __future__ import annotations

import torch

from pdserve.engine.attention import AttentionMetadata
from pdserve.engine.request import Request


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
        # Two static buffers, each filled by one copy per step:
        #   int64 [3, n]: input ids, positions, slots; int32 [n + n * max_blocks]: context lengths, block tables.
        self.longs = torch.zeros(3, n, dtype=torch.long, device=device)
        self.ints = torch.zeros(n + n * max_blocks_per_seq, dtype=torch.int32, device=device)
        self.input_ids, self.positions, self.slot_mapping = self.longs[0], self.longs[1], self.longs[2]
        self.context_lens = self.ints[:n]
        self.block_tables = self.ints[n:].view(n, max_blocks_per_seq)
        self.host_longs = torch.zeros_like(self.longs, device="cpu").pin_memory()
        self.host_ints = torch.zeros_like(self.ints, device="cpu").pin_memory()
        self._ids, self._positions, self._slots = self.host_longs.numpy()
        ints = self.host_ints.numpy()
        self._context_lens, self._block_tables = ints[:n], ints[n:].reshape(n, max_blocks_per_seq)
        self._rows: list[tuple[list[int] | None, int]] = [(None, 0)] * n  # block table held by each host row
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.greedy_ids: dict[int, torch.Tensor] = {}
        self._capture_all()

    def _forward(self, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        meta = AttentionMetadata(self.slot_mapping[:bs], self.block_tables[:bs], self.context_lens[:bs], None, 1)
        hidden = self.model(self.input_ids[:bs], self.positions[:bs], self.kv_cache, meta)
        logits = self.model.compute_logits(hidden)
        return logits, logits.argmax(dim=-1)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = None
        self.slot_mapping.fill_(-1)
        for bs in reversed(self.buckets):
            self._forward(bs)  # compiles the Triton kernels for these shapes outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[bs], self.greedy_ids[bs] = self._forward(bs)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def can_run(self, num_requests: int) -> bool:
        return num_requests <= self.buckets[-1]

    def run(self, requests: list[Request]) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 logits `[n, vocab]` and their argmax `[n]`: views valid until the next replay.
        Every request decodes one token: the last of its known tokens, at num_computed_tokens."""
        n = len(requests)
        bs = next(b for b in self.buckets if b >= n)
        block = self.block_size
        positions = [r.num_computed_tokens for r in requests]
        tables = [r.block_table for r in requests]
        self._ids[:n] = [(r.output_token_ids or r.prompt_token_ids)[-1] for r in requests]
        self._positions[:n] = positions
        self._slots[:n] = [t[p // block] * block + p % block for t, p in zip(tables, positions)]
        self._slots[n:bs] = -1
        self._context_lens[:n] = self._positions[:n] + 1
        self._context_lens[n:bs] = 0
        rows = self._rows
        for i, table in enumerate(tables):
            # Tables only grow while a request runs (a new list after preemption): a row still
            # holding this very list at this length needs no rewrite.
            if rows[i][0] is not table or rows[i][1] != len(table):
                self._block_tables[i, : len(table)] = table
                rows[i] = (table, len(table))
        self.longs.copy_(self.host_longs, non_blocking=True)
        num_ints = len(self._context_lens) + bs * self._block_tables.shape[1]  # lengths + the bucket's rows
        self.ints[:num_ints].copy_(self.host_ints[:num_ints], non_blocking=True)
        self.graphs[bs].replay()
        return self.logits[bs][:n], self.greedy_ids[bs][:n]
