"""`PrefixIndex`: the gateway's estimate of which prompt prefixes each prefill worker holds in its
prefix cache, so that a prompt goes where its prefix is already computed (SGLang's cache-aware
router, NVIDIA Dynamo's KV-aware routing). It records the full blocks of every prompt this gateway
sent to a worker, as a chain of keyed hashes over the same blocks the worker's `BlockManager`
caches (the same block size, the same salt starting the chain, so one tenant's prefixes never
steer another's requests), and keeps the most recent up to the worker's number of KV blocks: an
estimate, since the worker evicts on its own. A wrong guess costs a prefill of the prefix, never a
wrong answer. The hashes are keyed with the cluster secret: what gateways share through Redis
tells nothing about the prompts to whoever can read it.

It also records, under `pair_key(decode, prefill)`, the prompts each decode worker was sent KV for
by each prefill worker: a decode worker keeps received KV in a chain of its sender's
(`engine.request.Request.kv_source`), so a prompt whose prefix it holds from that sender is shipped
only its rest. A decode worker's records from all its senders share one bound, its KV blocks, as
they share its cache."""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pdserve.router.workers import WorkerHandle

HASH_BYTES = 8
PAIR = "<-"  # joins a decode worker's key to its sender's in a pair key


def index_key(worker: WorkerHandle) -> str:
    """A worker process's name in the index: its id and address (a worker restarted under the same
    id at another address starts with an empty cache)."""
    return f"{worker.record.worker_id}@{worker.record.address}"


def pair_key(decode: WorkerHandle, prefill: WorkerHandle) -> str:
    """The index's name for the KV a decode worker received from one prefill worker."""
    return f"{index_key(decode)}{PAIR}{index_key(prefill)}"


def holder_of(key: str) -> str:
    """The index key of the worker whose cache a key (a worker's or a pair's) describes."""
    return key.partition(PAIR)[0]


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
        # a worker's cache, oldest first: (sender, block hash) ("" for a prefill worker's own blocks)
        self._blocks: dict[str, OrderedDict[tuple[str, int], None]] = {}
        self._workers: frozenset[str] = frozenset()

    def num_cached(self, key: str, hashes: Sequence[int]) -> int:
        """How many leading blocks of `hashes` the worker (or the decode worker of a pair, from its
        sender) is thought to hold."""
        holder, _, sender = key.partition(PAIR)
        return self.num_cached_from(holder, [sender], hashes)

    def num_cached_from(self, holder: str, senders: Iterable[str], hashes: Sequence[int]) -> int:
        """The most leading blocks of `hashes` the worker holds from any one of `senders`."""
        blocks = self._blocks.get(holder)
        if not blocks or not hashes:
            return 0
        best = 0
        for sender in senders:
            if (sender, hashes[0]) in blocks and best < len(hashes):
                best = max(best, _num_held(blocks, sender, hashes))
        return best

    def record(self, key: str, hashes: Sequence[int], capacity: int) -> None:
        """The worker (a pair's decode worker, from that sender) was sent a prompt with these
        blocks: they are its most recent, its first block the most recent of all (a worker frees a
        prompt's blocks last to first, so its own cache keeps a prefix longest), and it keeps at
        most `capacity` (its KV blocks: a decode worker's, whichever senders they came from)."""
        holder, _, sender = key.partition(PAIR)
        blocks = self._blocks.setdefault(holder, OrderedDict())
        for h in reversed(hashes):
            blocks[sender, h] = None
            blocks.move_to_end((sender, h))
        while len(blocks) > capacity:
            blocks.popitem(last=False)

    def retain(self, workers: Iterable[str]) -> None:
        """Forgets the workers not in `workers` (gone from the pool: their caches went with them).
        (What a decode worker holds from a gone sender stays in its cache until evicted, as there.)"""
        keep = frozenset(workers)
        if keep != self._workers:
            self._workers = keep
            for holder in [h for h in self._blocks if h not in keep]:
                del self._blocks[holder]


def _num_held(blocks: OrderedDict[tuple[str, int], None], sender: str, hashes: Sequence[int]) -> int:
    """The leading blocks of `hashes` held from `sender`, its first among them. A chain's blocks are
    held from its first on (`record` keeps heads longer than tails), so the first one missing is
    found by bisection."""
    held, missing = 1, len(hashes) + 1  # hashes[:held] are held, hashes[:missing] are not all held
    while missing - held > 1:
        middle = (held + missing) // 2
        if (sender, hashes[middle - 1]) in blocks:
            held = middle
        else:
            missing = middle
    return held


class PromptBlocks:
    """A prompt's full blocks as chained keyed hashes (`prefix_hashes`), computed once per block size."""

    def __init__(self, token_ids: Sequence[int], salt: str | None, key: bytes) -> None:
        self.token_ids = token_ids
        self._salt = salt
        self._key = key
        self._hashes: dict[int, list[int]] = {}  # block size -> the hashes of the prompt's full blocks
        self._findable: dict[int, list[int]] = {}  # block size -> those of all tokens but the last

    def full(self, worker: WorkerHandle) -> list[int]:
        """Every full block of the prompt, in the worker's block size; none for a worker that does
        not cache prefixes (or has not reported yet)."""
        status = worker.status
        if status is None or not status.is_prefix_caching or status.block_size < 1:
            return []
        size = status.block_size
        if size not in self._hashes:
            self._hashes[size] = prefix_hashes(self.token_ids, size, self._salt, self._key)
        return self._hashes[size]

    def findable(self, worker: WorkerHandle) -> list[int]:
        """The blocks the worker could find cached: those of all tokens but the last (always computed)."""
        hashes, status = self.full(worker), worker.status
        if not hashes or status is None:
            return []
        size = status.block_size
        if size not in self._findable:
            self._findable[size] = hashes[: (len(self.token_ids) - 1) // size]
        return self._findable[size]
