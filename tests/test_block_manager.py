"""BlockManager: refcounts, exact prefix hits, LRU eviction, all checked against an independent model."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test

from pdserve.engine import block_manager
from pdserve.engine.block_manager import Allocation, BlockManager

TOKENS = st.lists(st.integers(0, 2), min_size=1, max_size=10)  # tiny alphabet: prefixes collide
MAX_LIVE_SEQS = 4  # beyond it the machine only frees, grows and caches: blocks churn through the LRU


def _snapshot(bm: BlockManager) -> tuple:
    blocks = [(b.ref_count, b.hash, b.token_ids, b.parent_uid, b.uid) for b in bm._blocks]
    return list(bm._free), {h: b.block_id for h, b in bm._cached.items()}, blocks, bm._last_uid


def _ref_counts(bm: BlockManager) -> list[int]:
    return [b.ref_count for b in bm._blocks]


def _cached_and_computed(bm: BlockManager, tokens: list[int], num_tokens: int | None = None) -> list[int]:
    alloc = bm.allocate(tokens, num_tokens)
    assert alloc is not None
    bm.cache_full_blocks(alloc.block_table, tokens, len(tokens))
    return alloc.block_table


@dataclass
class _Seq:
    table: list[int]
    tokens: list[int]


@dataclass
class _Model:
    """What the pool must look like, derived only from the calls made and their results."""

    free_queue: list[int]  # LRU order, front evicted first
    refs: Counter = field(default_factory=Counter)
    content: dict[int, tuple[int, ...]] = field(default_factory=dict)  # block -> its whole token prefix
    registry: dict[tuple[int, ...], int] = field(default_factory=dict)  # prefix -> block findable for it
    has_duplicate: bool = False
    has_dropped: bool = False

    def take_fresh(self, block_ids: list[int]) -> None:
        assert block_ids == self.free_queue[: len(block_ids)], "fresh blocks must be the least recently freed"
        del self.free_queue[: len(block_ids)]
        for block_id in block_ids:
            self.refs[block_id] += 1
            prefix = self.content.pop(block_id, None)
            if prefix is not None and self.registry.get(prefix) == block_id:
                del self.registry[prefix]
                self.has_dropped = True

    def take_hits(self, block_ids: list[int]) -> None:
        for block_id in block_ids:
            if self.refs[block_id] == 0:
                self.free_queue.remove(block_id)
            self.refs[block_id] += 1

    def release(self, table: list[int]) -> None:
        for block_id in reversed(table):
            assert self.refs[block_id] > 0
            self.refs[block_id] -= 1
            if self.refs[block_id] == 0:
                self.free_queue.append(block_id)

    def cache(self, seq: _Seq, num_computed: int, block_size: int) -> None:
        for i in range(num_computed // block_size):
            block_id = seq.table[i]
            if block_id in self.content:
                continue
            prefix = tuple(seq.tokens[: (i + 1) * block_size])
            self.content[block_id] = prefix
            self.has_duplicate |= prefix in self.registry
            self.registry.setdefault(prefix, block_id)

    def expected_hits(self, tokens: list[int], block_size: int) -> list[int]:
        hits = []
        for k in range(1, (len(tokens) - 1) // block_size + 1):
            block_id = self.registry.get(tuple(tokens[: k * block_size]))
            if block_id is None:
                break
            hits.append(block_id)
        return hits


class BlockManagerMachine(RuleBasedStateMachine):
    is_hash_exact = True  # False when the test patches in a colliding hash

    @initialize(num_blocks=st.integers(8, 32), block_size=st.integers(1, 4))
    def setup(self, num_blocks: int, block_size: int) -> None:
        self.bm = BlockManager(num_blocks, block_size)
        self.model = _Model(free_queue=list(range(num_blocks)))
        self.seqs: dict[int, _Seq] = {}
        self.history: list[list[int]] = []
        self.next_id = 0

    def _add(self, table: list[int], tokens: list[int]) -> None:
        assert len(table) == len(set(table)), "a block appears twice in one table"
        self.seqs[self.next_id] = _Seq(table, tokens)
        self.history.append(tokens)
        self.next_id += 1

    def _pick(self, data: st.DataObject) -> _Seq:
        return self.seqs[data.draw(st.sampled_from(sorted(self.seqs)))]

    @precondition(lambda self: len(self.seqs) < MAX_LIVE_SEQS)
    @rule(data=st.data(), num_extra=st.integers(0, 3))
    def allocate(self, data: st.DataObject, num_extra: int) -> None:
        tokens = _draw_tokens(data, self.history)
        bs, before = self.bm.block_size, _snapshot(self.bm)
        expected = self.model.expected_hits(tokens, bs)
        is_exact = self.is_hash_exact and not (self.model.has_duplicate and self.model.has_dropped)
        alloc = self.bm.allocate(tokens, len(tokens) + num_extra)
        num_needed = self.bm.num_blocks_for(len(tokens) + num_extra)
        if alloc is None:
            assert _snapshot(self.bm) == before, "a failed allocate changed the pool"
            if is_exact:
                num_free_hits = sum(1 for b in expected if self.model.refs[b] == 0)
                assert num_needed - len(expected) > len(self.model.free_queue) - num_free_hits
            return
        hits = self._check_hits(tokens, alloc, expected, is_exact)
        assert len(alloc.block_table) == num_needed
        self.model.take_hits(hits)
        self.model.take_fresh(alloc.block_table[len(hits) :])
        self._add(alloc.block_table, tokens)
        if data.draw(st.booleans()):  # prefill the whole prompt at once
            self.bm.cache_full_blocks(alloc.block_table, tokens, len(tokens))
            self.model.cache(self.seqs[self.next_id - 1], len(tokens), bs)

    def _check_hits(self, tokens: list[int], alloc: Allocation, expected: list[int], is_exact: bool) -> list[int]:
        bs = self.bm.block_size
        assert alloc.num_cached_tokens % bs == 0 and alloc.num_cached_tokens < len(tokens)
        hits = alloc.block_table[: alloc.num_cached_tokens // bs]
        for i, block_id in enumerate(hits):  # exact: each hit holds exactly the request's prefix
            assert self.model.content[block_id] == tuple(tokens[: (i + 1) * bs])
        if self.is_hash_exact:
            assert len(hits) <= len(expected)
        if is_exact:
            assert hits == expected
        return hits

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), new_tokens=TOKENS, num_extra=st.integers(0, 2))
    def append(self, data: st.DataObject, new_tokens: list[int], num_extra: int) -> None:
        seq = self._pick(data)
        tokens = seq.tokens + new_tokens[: data.draw(st.integers(0, 6))]
        old_table = list(seq.table)
        num_new = self.bm.num_blocks_for(len(tokens) + num_extra) - len(seq.table)
        is_ok = self.bm.append_slots(seq.table, len(tokens) + num_extra)
        assert is_ok == (num_new <= len(self.model.free_queue))
        if not is_ok:
            assert seq.table == old_table
            return
        self.model.take_fresh(seq.table[len(old_table) :])
        seq.tokens = tokens

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def cache(self, data: st.DataObject) -> None:
        seq = self._pick(data)
        num_computed = data.draw(st.integers(0, len(seq.tokens)))
        self.bm.cache_full_blocks(seq.table, seq.tokens, num_computed)
        self.model.cache(seq, num_computed, self.bm.block_size)

    @precondition(lambda self: 0 < len(self.seqs) < MAX_LIVE_SEQS)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        seq = self._pick(data)
        num_tokens = data.draw(st.integers(0, len(seq.tokens)))
        num_full, bs = num_tokens // self.bm.block_size, self.bm.block_size
        is_partial, before = num_tokens % bs != 0, _snapshot(self.bm)
        child = self.bm.fork(seq.table, num_tokens)
        if child is None:
            assert is_partial and not self.model.free_queue and _snapshot(self.bm) == before
            return
        assert child.block_table[:num_full] == seq.table[:num_full]
        self.model.take_hits(seq.table[:num_full])
        if is_partial:
            assert child.copies == [(seq.table[num_full], child.block_table[-1])]
            self.model.take_fresh(child.block_table[num_full:])
        else:
            assert child.copies == [] and len(child.block_table) == num_full
        self._add(child.block_table, seq.tokens[:num_tokens])

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        seq_id = data.draw(st.sampled_from(sorted(self.seqs)))
        seq = self.seqs.pop(seq_id)
        self.bm.free(seq.table)
        self.model.release(seq.table)

    @precondition(lambda self: len(self.seqs) < MAX_LIVE_SEQS)
    @rule(tokens=TOKENS)
    def reserve(self, tokens: list[int]) -> None:
        table = self.bm.reserve(len(tokens))
        if table is None:
            assert self.bm.num_blocks_for(len(tokens)) > len(self.model.free_queue)
            return
        self.model.take_fresh(table)
        self._add(table, tokens)

    @precondition(lambda self: len(self.history) % 5 == 4)  # now and then, not every other step
    @rule()
    def reset_prefix_cache(self) -> None:
        is_reset = self.bm.reset_prefix_cache()
        for block_id in [b for b in self.model.content if self.model.refs[b] == 0]:
            prefix = self.model.content.pop(block_id)
            if self.model.registry.get(prefix) == block_id:
                del self.model.registry[prefix]
                self.model.has_dropped = True
        if self.is_hash_exact:
            assert is_reset == (not self.model.registry)

    @invariant()
    def pool_matches_model(self) -> None:
        live = Counter(b for seq in self.seqs.values() for b in seq.table)
        assert _ref_counts(self.bm) == [live[b] for b in range(self.bm.num_blocks)]
        assert list(self.bm._free) == self.model.free_queue  # free iff unreferenced, in LRU order
        assert self.bm.num_used_blocks + self.bm.num_free_blocks == self.bm.num_blocks
        assert self.bm.num_free_blocks == sum(1 for b in range(self.bm.num_blocks) if live[b] == 0)
        assert self.bm.usage == self.bm.num_used_blocks / self.bm.num_blocks
        if self.is_hash_exact:
            assert {b.block_id for b in self.bm._cached.values()} == set(self.model.registry.values())

    @invariant()
    def shared_blocks_are_full(self) -> None:
        live = Counter(b for seq in self.seqs.values() for b in seq.table)
        for seq in self.seqs.values():
            assert len(seq.table) == len(set(seq.table))
            for i, block_id in enumerate(seq.table):
                if live[block_id] > 1:
                    assert (i + 1) * self.bm.block_size <= len(seq.tokens)

    def teardown(self) -> None:
        if not hasattr(self, "bm"):
            return
        for seq in self.seqs.values():
            self.bm.free(seq.table)
        assert self.bm.num_free_blocks == self.bm.num_blocks, "blocks leaked"
        assert _ref_counts(self.bm) == [0] * self.bm.num_blocks


class CollidingHashMachine(BlockManagerMachine):
    is_hash_exact = False


def test_random_operations_keep_pool_consistent() -> None:
    run_state_machine_as_test(BlockManagerMachine, settings=settings(max_examples=150, stateful_step_count=40, deadline=None))


def test_random_operations_with_colliding_hash_never_hit_falsely(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(block_manager, "block_hash", lambda parent, tokens: hash((parent, tokens)) % 4)
    run_state_machine_as_test(CollidingHashMachine, settings=settings(max_examples=100, stateful_step_count=40, deadline=None))


def _draw_tokens(data: st.DataObject, history: list[list[int]]) -> list[int]:
    """Fresh tokens, or a past sequence (whole, as in a chat's next turn, or cut) plus a few new ones."""
    tokens = data.draw(TOKENS)
    kind = data.draw(st.sampled_from(["extend", "cut", "fresh"] if history else ["fresh"]))
    if kind == "fresh":
        return tokens
    past = data.draw(st.sampled_from(history))
    num_kept = len(past) if kind == "extend" else data.draw(st.integers(0, len(past)))
    return past[:num_kept] + tokens[: data.draw(st.integers(1, 3))]


@settings(max_examples=200, deadline=None)
@given(block_size=st.integers(1, 4), num_steps=st.integers(1, 30), data=st.data())
def test_prefix_hit_is_longest_cached_common_prefix(block_size: int, num_steps: int, data: st.DataObject) -> None:
    bm = BlockManager(num_blocks=1024, block_size=block_size)  # never evicts: <= 360 blocks taken
    cached: set[tuple[int, ...]] = set()  # every token prefix registered so far, in whole blocks
    content: dict[int, tuple[int, ...]] = {}
    live: list[tuple[list[int], list[int]]] = []  # (block_table, tokens); computed later, in any order
    for _ in range(num_steps):
        action = data.draw(st.sampled_from(["allocate", "compute", "free"])) if live else "allocate"
        if action == "allocate":
            tokens = _draw_tokens(data, [t for _, t in live])
            prompt, num_expected = tokens[:-1], 0
            while num_expected + block_size <= len(prompt) and tuple(prompt[: num_expected + block_size]) in cached:
                num_expected += block_size
            assert bm.match_prefix(prompt) == num_expected
            alloc = bm.allocate(tokens)
            assert alloc.num_cached_tokens == num_expected
            for i, block_id in enumerate(alloc.block_table[: num_expected // block_size]):
                assert content[block_id] == tuple(tokens[: (i + 1) * block_size])
            live.append((alloc.block_table, tokens))
        elif action == "compute":
            table, tokens = data.draw(st.sampled_from(live))
            num_computed = data.draw(st.integers(0, len(tokens)))
            bm.cache_full_blocks(table, tokens, num_computed)
            for i in range(num_computed // block_size):
                cached.add(tuple(tokens[: (i + 1) * block_size]))
                content.setdefault(table[i], tuple(tokens[: (i + 1) * block_size]))
        else:
            bm.free(live.pop(data.draw(st.integers(0, len(live) - 1)))[0])


def test_constant_hash_gives_no_false_hit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(block_manager, "block_hash", lambda parent, tokens: 0)
    bm = BlockManager(num_blocks=16, block_size=2)
    _cached_and_computed(bm, [1, 2, 1, 2, 9])  # block (1, 2) registered under hash 0
    assert bm.allocate([5, 6, 7]).num_cached_tokens == 0  # same hash, other tokens
    alloc = bm.allocate([1, 2, 1, 2, 3])  # second (1, 2) block: same tokens, other prefix
    assert alloc.num_cached_tokens == 2
    assert len(set(alloc.block_table)) == len(alloc.block_table)


def test_same_block_tokens_after_other_prefix_is_no_hit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(block_manager, "block_hash", lambda parent, tokens: hash(tokens))  # ignores parent
    bm = BlockManager(num_blocks=16, block_size=2)
    _cached_and_computed(bm, [1, 2, 3, 4, 0])
    _cached_and_computed(bm, [5, 6, 3, 4, 0])  # its (3, 4) block collides with the first one's
    assert bm.match_prefix([5, 6, 3, 4]) == 2
    assert bm.allocate([5, 6, 3, 4, 9]).num_cached_tokens == 2
    assert bm.allocate([1, 2, 3, 4, 9]).num_cached_tokens == 4


def test_a_cache_salt_shares_prefixes_only_within_its_salt() -> None:
    bm = BlockManager(num_blocks=32, block_size=2)
    prompt = [1, 2, 3, 4, 5]
    for salt in (None, "tenant-a"):
        alloc = bm.allocate(prompt, salt=salt)
        bm.cache_full_blocks(alloc.block_table, prompt, len(prompt), salt)
    assert bm.match_prefix(prompt[:-1]) == 4 and bm.match_prefix(prompt[:-1], "tenant-a") == 4
    assert bm.match_prefix(prompt[:-1], "tenant-b") == 0  # another tenant learns nothing
    assert bm.allocate(prompt, salt="tenant-b").num_cached_tokens == 0
    assert bm.allocate(prompt, salt="tenant-a").num_cached_tokens == 4


def test_a_salted_chain_gives_no_false_hit_even_when_hashes_collide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(block_manager, "block_hash", lambda parent, tokens: hash(tokens))  # ignores the salt's root
    bm = BlockManager(num_blocks=16, block_size=2)
    alloc = bm.allocate([1, 2, 0], salt="tenant-a")
    bm.cache_full_blocks(alloc.block_table, [1, 2, 0], 3, "tenant-a")
    assert bm.match_prefix([1, 2], "tenant-b") == 0 and bm.match_prefix([1, 2]) == 0
    assert bm.match_prefix([1, 2], "tenant-a") == 2


def test_last_token_is_never_cached() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    _cached_and_computed(bm, [1, 2, 3, 4])
    assert bm.match_prefix([1, 2, 3, 4]) == 4
    assert bm.allocate([1, 2, 3, 4]).num_cached_tokens == 2
    assert bm.allocate([1, 2, 3, 4, 5]).num_cached_tokens == 4


def test_blocks_freed_earlier_are_evicted_first() -> None:
    bm = BlockManager(num_blocks=4, block_size=1)
    first = _cached_and_computed(bm, [1, 2])
    second = _cached_and_computed(bm, [3, 4])
    bm.free(first)  # tail first: the block of token 2, then of token 1
    bm.free(second)
    assert bm.reserve(1) == [first[1]]
    assert bm.match_prefix([1, 2]) == 1 and bm.match_prefix([3, 4]) == 2
    assert bm.reserve(1) == [first[0]]
    assert bm.match_prefix([1, 2]) == 0 and bm.match_prefix([3, 4]) == 2


def test_hit_on_free_cached_block_is_not_evicted_by_next_allocation() -> None:
    bm = BlockManager(num_blocks=2, block_size=2)
    table = _cached_and_computed(bm, [1, 2, 3])
    bm.free(table)
    other = bm.reserve(2)
    assert other == [table[1]]  # the cached block table[0] is now first in line for eviction
    assert bm.allocate([1, 2, 5]) is None  # its hit takes the last free block: none left for the tail
    bm.free(other)
    alloc = bm.allocate([1, 2, 5])
    assert alloc.block_table == [table[0], other[0]] and alloc.num_cached_tokens == 2
    assert bm.num_free_blocks == 0


def test_failed_allocate_changes_nothing() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    table = _cached_and_computed(bm, [1, 2, 3, 4, 5])
    bm.free(table)
    before = _snapshot(bm)
    assert bm.allocate([1, 2, 3, 4, 6], num_tokens=11) is None
    assert _snapshot(bm) == before
    assert bm.append_slots(list(table), 100) is False
    assert bm.reserve(9) is None and _snapshot(bm) == before


def test_append_slots_grows_table_in_place() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    table = bm.allocate([1, 2, 3]).block_table
    assert bm.append_slots(table, 4) and len(table) == 1
    assert bm.append_slots(table, 9) and len(table) == 3 and bm.num_free_blocks == 1
    assert not bm.append_slots(table, 17) and len(table) == 3


def test_fork_shares_full_blocks_and_copies_partial_tail() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    parent = bm.allocate([1, 2, 3, 4, 5, 6]).block_table
    child = bm.fork(parent, 6)
    assert child.block_table[0] == parent[0] and child.block_table[1] not in parent
    assert child.copies == [(parent[1], child.block_table[1])]
    assert _ref_counts(bm)[parent[0]] == 2 and bm.num_used_blocks == 3
    full = bm.fork(parent, 4)
    assert full.block_table == [parent[0]] and full.copies == []
    bm.reserve(1)
    before = _snapshot(bm)
    assert bm.fork(parent, 6) is None and _snapshot(bm) == before
    for table in (parent, child.block_table, full.block_table):
        bm.free(table)
    assert bm.num_used_blocks == 1


def test_concurrent_identical_prompts_register_once() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    first = bm.allocate([1, 2, 3]).block_table
    second = bm.allocate([1, 2, 3]).block_table  # nothing cached yet: its own blocks
    assert set(first).isdisjoint(second)
    bm.cache_full_blocks(first, [1, 2, 3], 3)
    bm.cache_full_blocks(second, [1, 2, 3], 3)
    assert bm.allocate([1, 2, 9]).block_table[0] == first[0]
    assert bm.append_slots(second, 5)
    bm.cache_full_blocks(second, [1, 2, 3, 4, 5], 5)  # (3, 4) registered after the duplicate
    bm.free(second)
    assert bm.match_prefix([1, 2]) == 2  # the first mapping survives the duplicate's free
    assert bm.match_prefix([1, 2, 3, 4]) == 4  # reached through the first block of (1, 2)


def test_reset_prefix_cache_drops_free_blocks_and_reports_used_ones() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    in_use = _cached_and_computed(bm, [1, 2, 3])
    bm.free(_cached_and_computed(bm, [5, 6, 7]))
    assert bm.reset_prefix_cache() is False  # block (1, 2) is in use and keeps its hash
    assert bm.match_prefix([5, 6]) == 0 and bm.match_prefix([1, 2]) == 2
    bm.free(in_use)
    assert bm.reset_prefix_cache() is True
    assert bm.match_prefix([1, 2]) == 0 and bm.num_free_blocks == 8


def test_reset_prefix_cache_when_idle() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    bm.free(_cached_and_computed(bm, [1, 2, 3]))
    assert bm.match_prefix([1, 2]) == 2
    assert bm.reset_prefix_cache() is True
    assert bm.match_prefix([1, 2]) == 0 and bm.num_free_blocks == 8


def test_disabled_prefix_caching_never_hits() -> None:
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    _cached_and_computed(bm, [1, 2, 3])
    assert bm.match_prefix([1, 2, 3]) == 0
    assert bm.allocate([1, 2, 3]).num_cached_tokens == 0
    assert bm.reset_prefix_cache() is True


def test_double_free_asserts() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    table = bm.allocate([1, 2, 3]).block_table
    bm.free(table)
    with pytest.raises(AssertionError, match="double free"):
        bm.free(table)


def test_num_blocks_for_and_usage() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    assert [bm.num_blocks_for(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    bm.allocate([1] * 9)
    assert bm.num_used_blocks == 3 and bm.num_free_blocks == 7 and bm.usage == pytest.approx(0.3)


def test_has_unhashed_full_block_says_when_caching_would_register_one() -> None:
    """A decode step asks this before it builds its token list (O(context)): true exactly when a
    full block among the first tokens is not hashed yet, never without prefix caching."""
    bm = BlockManager(num_blocks=8, block_size=2)
    tokens = [1, 2, 3, 4, 5]
    alloc = bm.allocate(tokens, len(tokens))
    assert alloc is not None
    table = alloc.block_table
    assert not bm.has_unhashed_full_block(table, 1)  # no full block yet
    assert bm.has_unhashed_full_block(table, 2)
    bm.cache_full_blocks(table, tokens, 2)
    assert not bm.has_unhashed_full_block(table, 3)  # block 0 hashed, block 1 not full
    assert bm.has_unhashed_full_block(table, 4)
    bm.cache_full_blocks(table, tokens, 5)
    assert not bm.has_unhashed_full_block(table, 5)
    off = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    alloc = off.allocate(tokens, len(tokens))
    assert alloc is not None and not off.has_unhashed_full_block(alloc.block_table, 4)


def test_a_reservation_adopts_the_cached_blocks_of_its_prompt_and_frees_the_fresh_ones_it_replaces() -> None:
    """A decode worker's reservation (fresh blocks, no lookup) keeps the blocks already cached for
    its prompt's first tokens, of its salt only; the fresh blocks they replace go back to the pool,
    and freeing the adopted table drops exactly one reference of each."""
    bm = BlockManager(num_blocks=10, block_size=2)
    sent_before = _cached_and_computed(bm, [1, 2, 3, 4, 5], 5)  # blocks [1,2] [3,4] cached, no salt
    assert bm.cached_blocks([1, 2, 3, 4, 5], salt="tenant") == []  # another chain
    reservation = bm.reserve(6)
    assert reservation is not None and bm.num_free_blocks == 10 - 3 - 3
    cached = bm.cached_blocks([1, 2, 3, 4, 7])
    assert cached == sent_before[:2]
    fresh = reservation[:2]
    bm.adopt(reservation, cached)
    assert reservation[:2] == sent_before[:2] and bm.num_free_blocks == 10 - 3 - 1  # two fresh blocks back
    assert all(block_id in bm._free for block_id in fresh)
    bm.free(sent_before)
    assert bm.cached_blocks([1, 2, 3, 4]) == cached  # still referenced by the reservation
    bm.free(reservation)
    assert bm.num_free_blocks == 10 and bm.cached_blocks([1, 2, 3, 4]) == cached  # free, cached, reusable
