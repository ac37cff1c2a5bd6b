"""`BlockManager`: the pool of fixed-size KV blocks of one worker. Reference counts, prefix
caching by chained block hashes (hits verified exactly; a cache salt starts a chain of its own),
and LRU reuse of freed cached blocks. Pure CPU bookkeeping; callers own their block tables."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

ROOT_HASH = 0  # the parent hash of a sequence's first block
_ROOT_UID = 0  # the parent uid of a sequence's first block


def block_hash(parent_hash: int, token_ids: tuple[int, ...]) -> int:
    """Hash of every token from the sequence start to this block's end. Python hashes ints and
    tuples of ints without PYTHONHASHSEED, so the value is the same in every process."""
    return hash((parent_hash, token_ids))


def chain_root(salt: str | None) -> tuple[int, int]:
    """(hash, uid) a sequence's first block chains from. A salted sequence gets a root of its own,
    so its blocks are found only by sequences with the same salt (one tenant's prefixes stay its
    own); its uid is negative, so it never equals a real block's uid, and exact hits stay exact."""
    if not salt:
        return ROOT_HASH, _ROOT_UID
    digest = int.from_bytes(hashlib.sha256(salt.encode()).digest()[:8], "little")
    return digest, -1 - digest


@dataclass(frozen=True)
class Allocation:
    block_table: list[int]
    num_cached_tokens: int


@dataclass(frozen=True)
class Fork:
    block_table: list[int]
    copies: list[tuple[int, int]]  # (src_block, dst_block): KV copies the caller must perform


@dataclass(slots=True)
class _Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and its KV computed
    token_ids: tuple[int, ...] = ()
    parent_uid: int = _ROOT_UID
    # Hashes can collide, uids cannot: two blocks share a uid only if their whole token prefixes
    # are equal, so checking (token_ids, parent_uid) block by block makes a prefix hit exact.
    uid: int = _ROOT_UID

    def reset(self) -> None:
        self.hash, self.token_ids, self.parent_uid, self.uid = None, (), _ROOT_UID, _ROOT_UID


class BlockManager:
    """Invariants: a block is in `_free` iff its ref_count is 0; a block with ref_count > 1 is
    full and never written; in a live table the hashed blocks form a prefix."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front: evicted first
        self._cached: dict[int, _Block] = {}  # hash -> the one block registered under it
        self._last_uid = _ROOT_UID
        # A step run ahead (StepPipeline) may still write into the blocks of a sequence that ended
        # meanwhile: their frees wait until that step is done, or a KV receiver writing from another
        # stream (or process) into the reused blocks could race the step's stale write.
        self._fence: int | None = None  # the newest step in flight; frees wait for it
        self._held: list[tuple[int, list[int]]] = []  # (step, blocks) freed while that step ran

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(
        self, token_ids: Sequence[int], num_tokens: int | None = None, use_cache: bool = True, salt: str | None = None
    ) -> Allocation | None:
        """Blocks for a new sequence, reusing cached full blocks (of its salt) of all but its last
        token (unless `use_cache` is False: a request that needs every prompt position computed)."""
        num_tokens = len(token_ids) if num_tokens is None else num_tokens
        assert num_tokens >= len(token_ids)
        hits = self._match(token_ids[: max(len(token_ids) - 1, 0)], salt) if use_cache else []
        num_new = self.num_blocks_for(num_tokens) - len(hits)
        num_free_hits = sum(1 for block in hits if block.ref_count == 0)
        if num_new > self.num_free_blocks - num_free_hits:
            return None
        for block in hits:
            self._take(block)
        table = [block.block_id for block in hits] + self._pop_free(num_new)
        return Allocation(table, len(hits) * self.block_size)

    def append_slots(self, block_table: list[int], num_tokens: int) -> bool:
        """Grow `block_table` in place to cover `num_tokens` slots; False (no change) if out of blocks."""
        num_new = self.num_blocks_for(num_tokens) - len(block_table)
        if num_new > self.num_free_blocks:
            return False
        block_table.extend(self._pop_free(num_new))
        return True

    def cache_full_blocks(
        self, block_table: Sequence[int], token_ids: Sequence[int], num_computed_tokens: int, salt: str | None = None
    ) -> None:
        """Register the full blocks among the first `num_computed_tokens` tokens. Idempotent; only
        blocks hashed since the last call are touched (the hashed blocks are a prefix)."""
        if not self.enable_prefix_caching:
            return
        assert num_computed_tokens <= len(token_ids)
        num_full = num_computed_tokens // self.block_size
        assert num_full <= len(block_table)
        start = num_full
        while start > 0 and self._blocks[block_table[start - 1]].hash is None:
            start -= 1
        parent = self._blocks[block_table[start - 1]] if start else None
        parent_hash, parent_uid = (parent.hash, parent.uid) if parent else chain_root(salt)
        for i in range(start, num_full):
            block = self._blocks[block_table[i]]
            tokens = tuple(token_ids[i * self.block_size : (i + 1) * self.block_size])
            self._register(block, tokens, parent_hash, parent_uid)
            parent_hash, parent_uid = block.hash, block.uid

    def has_unhashed_full_block(self, block_table: Sequence[int], num_tokens: int) -> bool:
        """Whether `cache_full_blocks` of the first `num_tokens` tokens would register a block. O(1)
        (the hashed blocks are a prefix), so a decode step asks before it builds its token list."""
        num_full = num_tokens // self.block_size
        return self.enable_prefix_caching and num_full > 0 and self._blocks[block_table[num_full - 1]].hash is None

    def fork(self, block_table: Sequence[int], num_tokens: int) -> Fork | None:
        """A child of the first `num_tokens` tokens: full blocks shared, a partial last block copied."""
        num_full = num_tokens // self.block_size
        is_partial = num_tokens % self.block_size != 0
        assert len(block_table) >= num_full + is_partial
        if is_partial and not self._free:
            return None
        shared = list(block_table[:num_full])
        for block_id in shared:
            assert self._blocks[block_id].ref_count > 0, f"fork of free block {block_id}"
            self._blocks[block_id].ref_count += 1
        if not is_partial:
            return Fork(shared, [])
        [dst] = self._pop_free(1)
        return Fork(shared + [dst], [(block_table[num_full], dst)])

    def free(self, block_table: Sequence[int]) -> None:
        """Drop one reference per block, tail first so a sequence's tail is evicted first; while a
        step is in flight (`fence`), once that step is done (`release_held`)."""
        if self._fence is not None:
            self._held.append((self._fence, list(block_table)))
            return
        self._drop_references(block_table)

    def fence(self, step: int | None) -> None:
        """`step` (a number that grows) is now the newest step in flight; None: none is."""
        self._fence = step

    def release_held(self, step: int | None) -> None:
        """Step `step` is done: the frees that waited for it (or for an earlier step) happen; None:
        every held free (no step is in flight any more)."""
        done = [blocks for fence, blocks in self._held if step is None or fence <= step]
        self._held = [(fence, blocks) for fence, blocks in self._held if step is not None and fence > step]
        for blocks in done:
            self._drop_references(blocks)

    @property
    def num_held_blocks(self) -> int:
        return sum(len(blocks) for _, blocks in self._held)

    def _drop_references(self, block_table: Sequence[int]) -> None:
        for block_id in reversed(block_table):
            block = self._blocks[block_id]
            assert block.ref_count > 0, f"double free of block {block_id}"
            block.ref_count -= 1
            if block.ref_count == 0:
                if not self._is_registered(block):
                    block.reset()
                self._free[block_id] = None

    def reserve(self, num_tokens: int) -> list[int] | None:
        """Fresh blocks for `num_tokens` slots, no prefix lookup (KV arriving from a peer)."""
        num_new = self.num_blocks_for(num_tokens)
        return self._pop_free(num_new) if num_new <= self.num_free_blocks else None

    def match_prefix(self, token_ids: Sequence[int], salt: str | None = None) -> int:
        """How many leading tokens of `token_ids` are cached in full blocks; takes no reference.
        `match_prefix(t[:-1])` equals `allocate(t).num_cached_tokens`."""
        return len(self._match(token_ids, salt)) * self.block_size

    def cached_blocks(self, token_ids: Sequence[int], salt: str | None = None) -> list[int]:
        """The cached full blocks holding `token_ids`' leading tokens (of its salt), in order;
        takes no reference (`adopt` does)."""
        return [block.block_id for block in self._match(token_ids, salt)]

    def adopt(self, block_table: list[int], cached: Sequence[int]) -> None:
        """Put `cached` (from `cached_blocks`, since unchanged) in place of `block_table`'s leading
        blocks, in place; those, fresh and never written (a reservation's), are freed."""
        assert len(cached) <= len(block_table)
        replaced = block_table[: len(cached)]
        for block_id in cached:
            self._take(self._blocks[block_id])
        block_table[: len(cached)] = cached
        self.free(replaced)

    def reset_prefix_cache(self) -> bool:
        """Forget the hashes of free blocks; False if hashed blocks in use keep theirs."""
        for block in [b for b in self._cached.values() if b.ref_count == 0]:
            del self._cached[block.hash]
            block.reset()
        return not self._cached

    def _match(self, token_ids: Sequence[int], salt: str | None) -> list[_Block]:
        if not self.enable_prefix_caching:
            return []
        hits: list[_Block] = []
        parent_hash, parent_uid = chain_root(salt)
        for start in range(0, len(token_ids) - self.block_size + 1, self.block_size):
            tokens = tuple(token_ids[start : start + self.block_size])
            parent_hash = block_hash(parent_hash, tokens)
            block = self._cached.get(parent_hash)
            if block is None or block.token_ids != tokens or block.parent_uid != parent_uid:
                break
            hits.append(block)
            parent_uid = block.uid
        return hits

    def _register(self, block: _Block, tokens: tuple[int, ...], parent_hash: int, parent_uid: int) -> None:
        block.hash = block_hash(parent_hash, tokens)
        block.token_ids, block.parent_uid = tokens, parent_uid
        existing = self._cached.get(block.hash)
        if existing is not None and existing.token_ids == tokens and existing.parent_uid == parent_uid:
            block.uid = existing.uid  # same prefix cached already: keep that mapping
            return
        self._last_uid += 1
        block.uid = self._last_uid
        if existing is None:
            self._cached[block.hash] = block
        # else: a hash collision; this block stays unregistered, its children stay unreachable

    def _is_registered(self, block: _Block) -> bool:
        return block.hash is not None and self._cached.get(block.hash) is block

    def _take(self, block: _Block) -> None:
        if block.ref_count == 0:
            del self._free[block.block_id]
        block.ref_count += 1

    def _pop_free(self, num_blocks: int) -> list[int]:
        """The `num_blocks` least recently freed blocks; evicts their cache entries."""
        assert num_blocks <= len(self._free)
        block_ids = []
        for _ in range(num_blocks):
            block_id, _ = self._free.popitem(last=False)
            block = self._blocks[block_id]
            if self._is_registered(block):
                del self._cached[block.hash]
            block.reset()
            block.ref_count = 1
            block_ids.append(block_id)
        return block_ids
