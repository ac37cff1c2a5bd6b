"""KV-aware decode routing: the gateway sends a prompt to the decode worker that already holds its
prefix's KV from the prefill worker computing it (a decode worker keeps received KV in a chain of
its sender's), so only the prompt's rest is shipped; but not to one busier than the least-loaded
by more than the slack. Real workers (one prefill, two decode) in this process, the decode workers'
`Begin` answers counting the blocks kept; the pick and the index on their own below."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdserve.deploy.worker_host import WorkerHost
from pdserve.engine import SamplingParams
from pdserve.engine.tokenizer import Tokenizer
from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.disaggregated import DisaggregatedBackend
from pdserve.router.prefix_index import PAIR, PrefixIndex, PromptBlocks, holder_of, index_key, pair_key
from pdserve.router.prefix_share import RedisPrefixShare
from pdserve.router.registry import InMemoryRegistry, WorkerRecord
from pdserve.router.workers import WorkerHandle, WorkerPool
from tests.servers import CLUSTER_SECRET
from tests.test_prefix_routing import MAX_MODEL_LEN, prompt, worker_hosts

BLOCK_SIZE = 16


@pytest.fixture(scope="module")
def tokenizer(checkpoints: dict[str, Path]) -> Tokenizer:
    return Tokenizer.from_pretrained(checkpoints["llama"])


@pytest.fixture(scope="module")
def hosts(checkpoints: dict[str, Path]) -> Iterator[list[WorkerHost]]:
    yield from worker_hosts(checkpoints, ("prefill", "decode", "decode"))


def run(hosts: list[WorkerHost], tokenizer: Tokenizer, body: object, kept: list[int]) -> None:
    """Runs `body(backend)`, appending to `kept` the blocks each hand-off kept on its decode worker."""

    async def main() -> None:
        pool = WorkerPool(InMemoryRegistry([host.record for host in hosts]), CLUSTER_SECRET, poll_interval_s=0.1)
        await pool.start()
        try:
            assert await pool.wait_ready(10)
            backend = DisaggregatedBackend(pool, tokenizer, "m", MAX_MODEL_LEN, on_kv_transfer=lambda *t: kept.append(t[3]))
            await body(backend)
        finally:
            await pool.close()

    asyncio.run(main())


async def generate(backend: DisaggregatedBackend, token_ids: list[int], max_tokens: int = 2) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    async for delta in backend.generate(uuid.uuid4().hex, token_ids, params):
        assert delta.finish_reason != "error", delta.error


def findable(token_ids: list[int]) -> int:
    """The blocks a decode worker can keep of a prompt: the full ones before its last token."""
    return (len(token_ids) - 1) // BLOCK_SIZE


def received(hosts: list[WorkerHost]) -> list[int]:
    return [host.worker.status()["kv_bytes_received"] for host in hosts[1:]]


def test_a_prompt_goes_to_the_decode_worker_holding_its_prefix(hosts: list[WorkerHost], tokenizer: Tokenizer) -> None:
    """Two prompts sent together land on the two decode workers, one each (least-loaded). Sent
    together again in the other order, each goes back to the decode worker holding it, where all but
    its last token's blocks are kept; least-loaded alone would swap them and keep nothing."""
    a, b = (tokenizer.encode(prompt(topic)) for topic in ("rivers", "compilers"))
    kept: list[int] = []

    async def body(backend: DisaggregatedBackend) -> None:
        before = received(hosts)
        await asyncio.gather(generate(backend, a), generate(backend, b))
        got = [after - b for after, b in zip(received(hosts), before, strict=True)]
        assert all(got), f"KV bytes the decode workers received: {got}: one took both prompts"
        kept.clear()
        await asyncio.gather(generate(backend, b), generate(backend, a))

    run(hosts, tokenizer, body, kept)
    assert sorted(kept) == sorted([findable(a), findable(b)]), f"blocks kept by the second round: {kept}"


def test_a_busy_holder_is_passed_over_beyond_the_slack(hosts: list[WorkerHost], tokenizer: Tokenizer) -> None:
    """A burst of prompts behind one shared prefix, after a first prompt of it: the decode worker
    holding the prefix takes them while it has at most one more request in flight than the other,
    so it takes most but not all; each it takes keeps the prefix."""
    shared = tokenizer.encode(prompt("a system prompt every request shares"))
    questions = [tokenizer.encode(f" Question {i}: how would you explain this?") for i in range(8)]
    kept: list[int] = []
    picks: list[str] = []

    async def body(backend: DisaggregatedBackend) -> None:
        pick = backend._pick_decode

        def recorded(*args: object) -> WorkerHandle:
            worker = pick(*args)  # type: ignore[arg-type]
            picks.append(worker.record.worker_id)
            return worker

        backend._pick_decode = recorded  # type: ignore[method-assign]
        await generate(backend, shared)
        await asyncio.gather(*(generate(backend, shared + q, max_tokens=16) for q in questions))

    run(hosts, tokenizer, body, kept)
    holder, burst = picks[0], picks[1:]
    other = next(p for p in burst if p != holder) if set(burst) - {holder} else None
    assert other is not None and burst.count(holder) > burst.count(other), f"decode picks: {picks}"
    assert sum(k >= findable(shared) for k in kept[1:]) >= burst.count(holder), kept


def handle(name: str, role: str, in_flight: int = 0) -> WorkerHandle:
    worker = WorkerHandle(WorkerRecord(name, role, f"{name}:1"), channel=None, stub=None, is_healthy=True)
    worker.status = pb.WorkerStatus(role=role, block_size=BLOCK_SIZE, num_total_blocks=64, is_prefix_caching=True)
    worker.num_in_flight = in_flight
    return worker


def test_the_decode_pick_weighs_held_blocks_against_load(checkpoints: dict[str, Path]) -> None:
    pool = WorkerPool(InMemoryRegistry(), CLUSTER_SECRET)
    p0, p1, d0, d1 = handle("p0", "prefill"), handle("p1", "prefill"), handle("d0", "decode"), handle("d1", "decode")
    pool.workers.update({w.record.worker_id: w for w in (p0, p1, d0, d1)})
    backend = DisaggregatedBackend(pool, Tokenizer.from_pretrained(checkpoints["llama"]), "m", MAX_MODEL_LEN)
    blocks = PromptBlocks(list(range(1, 130)), None, backend.hash_key)  # 8 findable blocks
    assert backend._pick_decode(blocks, True, set()) is d0  # nothing held: the least-loaded (a tie: the first)
    backend._record(pair_key(d1, p1), blocks.full(d1), d1)
    assert backend._pick_decode(blocks, True, set()) is d1  # held from a prefill worker the prefill pick may choose
    d1.num_in_flight = 1
    assert backend._pick_decode(blocks, True, set()) is d1  # within the slack of one
    d1.num_in_flight = 2
    assert backend._pick_decode(blocks, True, set()) is d0  # beyond it
    d0.num_in_flight, d1.num_in_flight = 8, 10
    assert backend._pick_decode(blocks, True, set()) is d1  # a quarter of the least-loaded's eight
    assert backend._pick_decode(blocks, True, {"d1"}) is d0  # a failed attempt's worker is avoided
    assert backend._pick_decode(blocks, True, {"p1"}) is d0  # ... and its sender: d1 holds nothing from p0
    p1.num_prefill_tokens = 500
    assert backend._pick_decode(blocks, True, set()) is d0  # p1 is busy: the prefill pick would choose p0
    p1.num_prefill_tokens = 0
    other = PromptBlocks(list(range(1, 130)), "tenant-b", backend.hash_key)  # another salt's chain
    assert backend._pick_decode(other, True, set()) is d0

    # the prefill pick breaks a tie towards the sender whose KV the decode worker holds
    assert backend._pick_prefill(blocks, True, d1, set())[0] is p1
    assert backend._pick_prefill(blocks, True, d0, set())[0] is p1  # p1 holds the prefix now: 1 token to compute
    assert backend.prefixes.num_cached(pair_key(d0, p1), blocks.findable(d0)) == 0  # recorded once a hand-off succeeds

    # decode workers that do not cache, or have not reported yet, hold nothing and break nothing
    d1.status.is_prefix_caching = False
    assert backend._pick_decode(blocks, True, set()) is d0
    d1.status = None
    assert backend._pick_decode(blocks, True, {"d0"}) is d1

    # another gateway's pair records, through Redis, count under the decode worker's own capacity
    ours = RedisPrefixShare("redis://127.0.0.1:1/0", CLUSTER_SECRET, backend.prefixes, backend._num_blocks_of)
    theirs = RedisPrefixShare("redis://127.0.0.1:1/0", CLUSTER_SECRET, PrefixIndex(), lambda _: 64)
    elsewhere = PromptBlocks(list(range(200, 329)), None, backend.hash_key)
    gone = f"gone@h:9{PAIR}{index_key(p0)}"
    now = time.time()
    d1.status = pb.WorkerStatus(role="decode", block_size=BLOCK_SIZE, num_total_blocks=64, is_prefix_caching=True)
    ours.apply(theirs.message([(pair_key(d1, p0), elsewhere.full(d1)), (gone, [1])], now), now)
    d0.num_in_flight = d1.num_in_flight = 0
    assert backend._pick_decode(elsewhere, True, set()) is d1
    assert backend.prefixes.num_cached(gone, [1]) == 0  # a decode worker this gateway does not know: skipped


def test_a_decode_workers_records_share_its_cache_and_follow_its_workers() -> None:
    index = PrefixIndex()
    ours, theirs = list(range(40)), list(range(100, 140))
    index.record("d@h:2<-p@h:1", ours, capacity=64)
    index.record("d@h:2<-q@h:3", theirs, capacity=64)  # another sender's: the same 64 blocks
    assert index.num_cached("d@h:2<-p@h:1", ours) == 24 and index.num_cached("d@h:2<-q@h:3", theirs) == 40
    assert index.num_cached("d@h:2<-q@h:3", ours) == 0 and index.num_cached("d@h:2", ours) == 0  # chains per sender
    index.record("p@h:1", ours, capacity=64)
    assert holder_of("d@h:2<-p@h:1") == "d@h:2" and holder_of("p@h:1") == "p@h:1"
    index.retain(["d@h:2", "p@h:1", "q@h:3"])
    assert index.num_cached("d@h:2<-p@h:1", ours) == 24
    index.retain(["p@h:1", "q@h:3"])  # the decode worker left: what it held went with it
    assert index.num_cached("d@h:2<-p@h:1", ours) == 0 and index.num_cached("p@h:1", ours) == 40
