"""`PrefixIndex`: the gateway's estimate of which prompt prefixes each prefill worker holds in its
prefix cache, so that a prompt goes where its prefix is already computed (SGLang's cache-aware
router, NVIDIA Dynamo's KV-aware routing). It records the full blocks of every prompt this gateway
sent to a worker, as a chain of keyed hashes over the same blocks the worker's `BlockManager`
caches (the same block size, the same salt starting the chain, so one tenant's prefixes never
steer another's requests), and keeps the most recent up to the worker's number of KV blocks: an
estimate, since the worker evicts on its own. A wrong guess costs a prefill of the prefix, never a
wrong answer. The hashes are keyed with the cluster secret: what gateways share through Redis
tells nothing about the prompts to whoever can read it."""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pdserve.router.workers import WorkerHandle

HASH_BYTES = 8


def index_key(worker: WorkerHandle) -> str:
    """A worker process's name in the index: its id and address (a worker restarted under the same
    id at another address starts with an empty cache)."""
    return f"{worker.record.worker_id}@{worker.record.address}"


def prefix_hashes(token_ids: Sequence[int], block_size: int, salt: str | None, key: bytes) -> list[int]:
    """The chained hashes of the prompt's full blocks: block i's covers every token up to its end,
    and the salt. (A worker finds cached at most the full blocks of all tokens but the last.)"""
    digest = hashlib.blake2b((salt or "").encode(), key=key, digest_size=HASH_BYTES).digest()
    hashes = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        tokens = struct.pack(f"<{block_size}q", *token_ids[start : start + block_size])
        digest = hashlib.blake2b(digest + tokens, key=key, digest_size=HASH_BYTES).digest()
        hashes.append(int.from_bytes(digest, "little"))
    return hashes


class PrefixIndex:
    def __init__(self) -> None:
        self._blocks: dict[str, OrderedDict[int, None]] = {}  # worker key -> block hashes, oldest first

    def num_cached(self, worker: str, hashes: Sequence[int]) -> int:
        """How many leading blocks of `hashes` the worker is thought to hold."""
        blocks = self._blocks.get(worker)
        if not blocks:
            return 0
        for num, h in enumerate(hashes):
            if h not in blocks:
                return num
        return len(hashes)

    def record(self, worker: str, hashes: Sequence[int], capacity: int) -> None:
        """The worker was sent a prompt with these blocks: they are its most recent, its first block
        the most recent of all (a worker frees a prompt's blocks last to first, so its own cache
        keeps a prefix longest), and it keeps at most `capacity` (its KV blocks)."""
        blocks = self._blocks.setdefault(worker, OrderedDict())
        for h in reversed(hashes):
            blocks[h] = None
            blocks.move_to_end(h)
        while len(blocks) > capacity:
            blocks.popitem(last=False)

    def retain(self, workers: Iterable[str]) -> None:
        """Forgets the workers not in `workers` (gone from the pool: their caches went with them)."""
        keep = set(workers)
        for worker in [w for w in self._blocks if w not in keep]:
            del self._blocks[worker]
