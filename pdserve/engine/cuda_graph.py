"""CUDA graphs for the decode step: the forward pass, the logits and their greedy argmax for every
batch-size bucket are captured once over static buffers sharing one memory pool; a step fills
the buffers (two host-to-device copies from pinned staging, double-buffered) and replays. A row's
input id may come from the previous replay's argmax on the device, so a step can be launched
before the host has read the previous step's tokens (`StepPipeline`)."""

from __future__ import annotations

import torch

from pdserve.engine.attention import AttentionMetadata
from pdserve.engine.request import Request
from pdserve.kernels.argmax import argmax


def batch_size_buckets(max_batch_size: int) -> list[int]:
    buckets = [b for b in (1, 2, 4, 8) if b < max_batch_size]
    buckets += list(range(16, max_batch_size, 16))
    return buckets + [max_batch_size]


class _Staging:
    """Pinned host copies of the graphs' input buffers. There are two, used in turn: the host fills
    one for the next step while the copy out of the other may still be queued behind a step."""

    def __init__(self, longs: torch.Tensor, ints: torch.Tensor, n: int, max_blocks_per_seq: int) -> None:
        self.longs = torch.zeros_like(longs, device="cpu").pin_memory()
        self.ints = torch.zeros_like(ints, device="cpu").pin_memory()
        self.ids, self.positions, self.slots, self.sources = self.longs.numpy()
        ints_np = self.ints.numpy()
        self.context_lens, self.block_tables = ints_np[:n], ints_np[n:].reshape(n, max_blocks_per_seq)
        self.rows: list[tuple[list[int] | None, int]] = [(None, 0)] * n  # block table held by each row
        self.copied = torch.cuda.Event()  # recorded after the copies out of it

    def table_rows(self, tables: list[list[int]]) -> None:
        for i, table in enumerate(tables):
            # Tables only grow while a request runs (a new list after preemption): a row still
            # holding this very list at this length needs no rewrite.
            if self.rows[i][0] is not table or self.rows[i][1] != len(table):
                self.block_tables[i, : len(table)] = table
                self.rows[i] = (table, len(table))


class DecodeGraphRunner:
    def __init__(
        self, model: torch.nn.Module, kv_cache: torch.Tensor, max_batch_size: int, max_blocks_per_seq: int, block_size: int
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.buckets = batch_size_buckets(max_batch_size)
        device, n = kv_cache.device, max_batch_size
        # Static buffers, filled by two copies per step:
        #   int64 [5, n]: the last replay's argmax (written by the graphs, never copied in), then input
        #     ids, positions, slots, and each row's source: its input id is `tokens[source]`, `tokens`
        #     being the first two rows flattened, so a row takes its id from the host (source n + row)
        #     or from the previous replay's argmax (source = its row there: the step ran ahead);
        #   int32 [n + n * max_blocks]: context lengths, block tables.
        self.longs = torch.zeros(5, n, dtype=torch.long, device=device)
        self.ints = torch.zeros(n + n * max_blocks_per_seq, dtype=torch.int32, device=device)
        self.last_ids, self.positions, self.slot_mapping, self.sources = (
            self.longs[0],
            self.longs[2],
            self.longs[3],
            self.longs[4],
        )
        self.tokens = self.longs[:2].view(-1)
        self.context_lens = self.ints[:n]
        self.block_tables = self.ints[n:].view(n, max_blocks_per_seq)
        self._staging = [_Staging(self.longs[1:], self.ints, n, max_blocks_per_seq) for _ in range(2)]
        self._turn = 0
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self._capture_all()

    def _forward(self, bs: int) -> torch.Tensor:
        meta = AttentionMetadata(self.slot_mapping[:bs], self.block_tables[:bs], self.context_lens[:bs], None, 1)
        input_ids = self.tokens[self.sources[:bs]]
        hidden = self.model(input_ids, self.positions[:bs], self.kv_cache, meta)
        logits = self.model.compute_logits(hidden)
        argmax(logits, out=self.last_ids[:bs])  # many programs a row: torch's takes one block
        return logits

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = None
        n = self.longs.shape[1]
        self.slot_mapping.fill_(-1)
        self.sources.copy_(torch.arange(n, 2 * n))  # host ids (all 0 now)
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

    def run(
        self, requests: list[Request], input_ids: list[int] | None = None, previous_rows: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 logits `[n, vocab]` and their argmax `[n]`: views valid until the next replay.
        Every request decodes one token at num_computed_tokens: `input_ids[i]` (default: its last
        known token) or, where `previous_rows[i] >= 0`, the argmax of that row of the previous
        replay, which the host need not have seen (the step runs ahead of the host)."""
        n = len(requests)
        if input_ids is None:
            input_ids = [r.last_token_id for r in requests]
        bs = next(b for b in self.buckets if b >= n)
        block, width = self.block_size, self.longs.shape[1]
        staging = self._staging[self._turn]
        self._turn ^= 1
        staging.copied.synchronize()  # its copies two steps ago are done (long since, in practice)
        positions = [r.num_computed_tokens for r in requests]
        tables = [r.block_table for r in requests]
        staging.ids[:n] = input_ids
        staging.positions[:n] = positions
        staging.slots[:n] = [t[p // block] * block + p % block for t, p in zip(tables, positions)]
        staging.slots[n:bs] = -1
        staging.sources[:bs] = range(width, width + bs)
        if previous_rows is not None:
            for i, row in enumerate(previous_rows):
                if row >= 0:
                    staging.sources[i] = row
        staging.context_lens[:n] = staging.positions[:n] + 1
        staging.context_lens[n:bs] = 0
        staging.table_rows(tables)
        self.longs[1:].copy_(staging.longs, non_blocking=True)
        num_ints = len(staging.context_lens) + bs * staging.block_tables.shape[1]  # lengths + the bucket's rows
        self.ints[:num_ints].copy_(staging.ints[:num_ints], non_blocking=True)
        staging.copied.record()
        self.graphs[bs].replay()
        return self.logits[bs][:n], self.last_ids[:n]
