"""`PrefixIndex`: the gateway's estimate of which prompt prefixes each prefill worker holds in its
prefix cache, so that a prompt goes where its prefix is already computed (SGLang's cache-aware
router, NVIDIA Dynamo's KV-aware routing). It records the chain of full-block hashes of every prompt
this gateway sent to a worker, the same hashes the worker's `BlockManager` keys its cache by (salted
the same way, so one tenant's prefixes never steer another's requests), and keeps the most recent
ones up to the worker's number of KV blocks: an estimate, since the worker evicts on its own. A wrong
guess costs a prefill of the prefix, never a wrong answer."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from pdserve.engine.block_manager import block_hash, chain_root


def prefix_hashes(token_ids: Sequence[int], block_size: int, salt: str | None) -> list[int]:
    """The chained hashes of the full blocks a worker could find cached for this prompt: those of
    every token but the last, which is always computed (`BlockManager.allocate`)."""
    parent, _ = chain_root(salt)
    hashes = []
    for start in range(0, len(token_ids) - block_size, block_size):
        parent = block_hash(parent, tuple(token_ids[start : start + block_size]))
        hashes.append(parent)
    return hashes


class PrefixIndex:
    def __init__(self) -> None:
        self._blocks: dict[str, OrderedDict[int, None]] = {}  # worker id -> block hashes, oldest first

    def num_cached(self, worker_id: str, hashes: Sequence[int]) -> int:
        """How many leading blocks of `hashes` the worker is thought to hold."""
        blocks = self._blocks.get(worker_id)
        if not blocks:
            return 0
        for num, h in enumerate(hashes):
            if h not in blocks:
                return num
        return len(hashes)

    def record(self, worker_id: str, hashes: Sequence[int], capacity: int) -> None:
        """The worker was sent a prompt with these blocks: they are its most recent, and it keeps
        at most `capacity` (its KV blocks)."""
        blocks = self._blocks.setdefault(worker_id, OrderedDict())
        for h in hashes:
            blocks[h] = None
            blocks.move_to_end(h)
        while len(blocks) > capacity:
            blocks.popitem(last=False)

    def retain(self, worker_ids: Iterable[str]) -> None:
        """Forgets the workers not in `worker_ids` (gone from the pool: their caches went with them)."""
        keep = set(worker_ids)
        for worker_id in [w for w in self._blocks if w not in keep]:
            del self._blocks[worker_id]
