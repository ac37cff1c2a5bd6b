"""Prefix-aware routing: the gateway sends a prompt to the prefill worker that holds its prefix in its
prefix cache, so a repeated prompt (or a shared system prompt) is not prefilled again on another
worker; one tenant's prefixes never steer another's prompts; a shared prefix spreads to a second
worker once the first has more to compute than recomputing the prefix would cost. Real workers (two prefill, one
decode) in this process, their own prefix caches reporting the cached tokens; the index itself on
its own below."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from pdserve.deploy.worker_host import WorkerHost, WorkerSpec
from pdserve.engine import SamplingParams
from pdserve.engine.config import EngineConfig
from pdserve.engine.tokenizer import Tokenizer
from pdserve.proto.cluster_secret import ClusterSecret
from pdserve.router.disaggregated import PREFIX_HASH_PURPOSE, DisaggregatedBackend
from pdserve.router.prefix_index import PrefixIndex, PromptBlocks, prefix_hashes
from pdserve.router.prefix_share import CHANNEL, MAX_MESSAGE_BYTES, MAX_RECORD_BLOCKS, RedisPrefixShare
from pdserve.router.registry import InMemoryRegistry
from pdserve.router.workers import WorkerPool
from tests.servers import CLUSTER_SECRET, redis_process

MAX_MODEL_LEN = 256
KEY = CLUSTER_SECRET.key(PREFIX_HASH_PURPOSE)
BLOCK_SIZE = 16
TOPICS = ["rivers", "compilers", "volcanoes", "chess openings", "bread", "satellites"]


def prompt(topic: str) -> str:
    return f"Write a long and careful essay about {topic}, with an introduction, three parts and an ending. " * 3


@pytest.fixture(scope="module")
def tokenizer(checkpoints: dict[str, Path]) -> Tokenizer:
    return Tokenizer.from_pretrained(checkpoints["llama"])


def worker_hosts(checkpoints: dict[str, Path], roles: tuple[str, ...]) -> Iterator[list[WorkerHost]]:
    """Started workers of these roles on the tiny llama, stopped after."""
    engine = EngineConfig(
        model=str(checkpoints["llama"]), device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN, num_kv_blocks=256
    )
    started = [WorkerHost(WorkerSpec(role, engine, "m", cluster_secret=CLUSTER_SECRET)) for role in roles]
    for host in started:
        host.start()
    yield started
    for host in started:
        host.stop()


@pytest.fixture(scope="module")
def hosts(checkpoints: dict[str, Path]) -> Iterator[list[WorkerHost]]:
    yield from worker_hosts(checkpoints, ("prefill", "prefill", "decode"))


async def cached_tokens(backend: DisaggregatedBackend, token_ids: list[int], salt: str | None = None) -> int:
    """The prompt tokens the prefill worker found in its prefix cache."""
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, cache_salt=salt)
    num_cached = None
    async for delta in backend.generate(uuid.uuid4().hex, token_ids, params):
        assert delta.finish_reason != "error", delta.error
        num_cached = delta.num_cached_tokens if num_cached is None else num_cached
    assert num_cached is not None
    return num_cached


def run(hosts: list[WorkerHost], tokenizer: Tokenizer, body: object) -> None:
    async def main() -> None:
        pool = WorkerPool(InMemoryRegistry([host.record for host in hosts]), CLUSTER_SECRET, poll_interval_s=0.1)
        await pool.start()
        try:
            assert await pool.wait_ready(10)
            await body(DisaggregatedBackend(pool, tokenizer, "m", MAX_MODEL_LEN))
        finally:
            await pool.close()

    asyncio.run(main())


def test_a_repeated_prompt_finds_its_prefix_on_the_worker_that_computed_it(hosts: list[WorkerHost], tokenizer: Tokenizer) -> None:
    prompts = [tokenizer.encode(prompt(topic)) for topic in TOPICS]

    async def body(backend: DisaggregatedBackend) -> None:
        for token_ids in prompts:  # first round: nothing cached
            await cached_tokens(backend, token_ids)
        for token_ids in prompts:  # second round, same order: each all but its last partial block
            assert await cached_tokens(backend, token_ids) == (len(token_ids) - 1) // BLOCK_SIZE * BLOCK_SIZE
        # another tenant's salt starts its own chains: nothing cached for it, whichever worker it gets
        assert await cached_tokens(backend, prompts[0], salt="tenant-b") == 0
        assert await cached_tokens(backend, prompts[0], salt="tenant-b") > 0

    run(hosts, tokenizer, body)


def test_a_shared_prefix_spreads_to_another_worker_once_its_holder_has_more_to_compute(
    hosts: list[WorkerHost], tokenizer: Tokenizer
) -> None:
    """A burst of prompts after one shared prefix: while the worker holding the prefix has fewer
    tokens to compute than recomputing it elsewhere would cost, they go there; then to the other
    worker, which from then on holds the prefix too."""
    shared = tokenizer.encode(prompt("a system prompt every request shares"))
    questions = [tokenizer.encode(f" Question {i}: " + "how would you explain this to a student? " * 3) for i in range(12)]
    sent_before = [host.worker.status()["kv_bytes_sent"] for host in hosts[:2]]

    async def body(backend: DisaggregatedBackend) -> None:
        await cached_tokens(backend, shared)
        cached = await asyncio.gather(*(cached_tokens(backend, shared + question) for question in questions))
        # most find it (a prompt sent to the second worker before it computed the prefix cannot)
        assert sum(c >= len(shared) // BLOCK_SIZE * BLOCK_SIZE for c in cached) >= len(questions) // 2, cached
        assert [w.num_prefill_tokens for w in backend.pool.workers.values()] == [0, 0, 0]  # every prefill counted out

    run(hosts, tokenizer, body)
    sent = [host.worker.status()["kv_bytes_sent"] - before for host, before in zip(hosts[:2], sent_before, strict=True)]
    assert all(sent), f"KV bytes each prefill worker sent: {sent}: one took the whole burst"


def test_prompts_waiting_for_decode_room_sit_in_no_prefill_workers_queue(
    checkpoints: dict[str, Path], tokenizer: Tokenizer
) -> None:
    """A decode worker with room for one long request at a time: while it runs, the prompts behind
    it wait for a reservation and no prefill worker has them to compute (the prefill worker is
    picked once the decode worker has room, so a queue that only waits for decode does not steer
    the prefill choice); then each one is prefilled and finishes."""
    prefill = EngineConfig(model=str(checkpoints["llama"]), device="cpu", dtype="float32", max_model_len=512, num_kv_blocks=256)
    decode = EngineConfig(model=str(checkpoints["llama"]), device="cpu", dtype="float32", max_model_len=512, num_kv_blocks=32)
    started = [WorkerHost(WorkerSpec(role, engine, "m", cluster_secret=CLUSTER_SECRET)) for role, engine in
               (("prefill", prefill), ("prefill", prefill), ("decode", decode))]  # fmt: skip
    long_prompt = tokenizer.encode(prompt("the decode worker's whole cache") * 8)[:400]  # 25 of its 32 blocks
    waiting = [tokenizer.encode(prompt(topic) * 4)[:150] for topic in TOPICS[:3]]  # 10 blocks each: no room beside it
    assert len(long_prompt) == 400 and {len(w) for w in waiting} == {150}

    async def body(backend: DisaggregatedBackend) -> None:
        long_params = SamplingParams(temperature=0.0, max_tokens=112, ignore_eos=True)  # to the 512-token limit
        stream = backend.generate(uuid.uuid4().hex, long_prompt, long_params)
        await anext(stream)  # the long request decodes: its blocks are taken
        produced = [1]

        async def drain() -> None:
            async for delta in stream:
                produced[0] += len(delta.token_ids)

        long_request = asyncio.create_task(drain())
        tasks = [asyncio.create_task(cached_tokens(backend, token_ids)) for token_ids in waiting]
        queued = []
        while produced[0] < 96 and not long_request.done():  # well before it ends and frees its blocks
            queued.append(sum(w.num_prefill_tokens + w.num_in_flight for w in backend.pool.healthy("prefill")))
            await asyncio.sleep(0.002)
        assert len(queued) >= 5 and not any(task.done() for task in tasks), (len(queued), produced)
        assert max(queued) == 0, f"prompts waiting for decode room counted in prefill queues: {queued}"
        await asyncio.wait_for(asyncio.gather(long_request, *tasks), 60)
        assert produced == [112]
        assert [w.num_prefill_tokens for w in backend.pool.workers.values()] == [0, 0, 0]

    for host in started:
        host.start()
    try:
        run(started, tokenizer, body)
    finally:
        for host in started:
            host.stop()


def test_gateways_sharing_redis_route_a_prefix_where_another_gateway_sent_it(
    hosts: list[WorkerHost], tokenizer: Tokenizer
) -> None:
    """Two gateways over the same workers and one Redis: prompts first sent through gateway A find
    their prefixes cached when they come again through gateway B; a forged or malformed message on
    the channel changes nothing."""
    prompts = [tokenizer.encode(prompt(topic + " in the sharing test")) for topic in TOPICS]

    async def main(redis_url: str) -> None:
        backends = []
        for _ in range(2):
            pool = WorkerPool(InMemoryRegistry([host.record for host in hosts]), CLUSTER_SECRET, poll_interval_s=0.1)
            await pool.start()
            assert await pool.wait_ready(10)
            backends.append(DisaggregatedBackend(pool, tokenizer, "m", MAX_MODEL_LEN, prefix_share_url=redis_url))
        a, b = backends
        try:
            forger = aioredis.Redis.from_url(redis_url)
            while (await forger.pubsub_numsub(CHANNEL))[0][1] < 2:  # both gateways subscribed
                await asyncio.sleep(0.05)
            forged = ClusterSecret("another-cluster-secret-of-32-chars!!")
            hashes = prefix_hashes(tokenizer.encode("Zebras play the xylophone on quartz. " * 8), BLOCK_SIZE, None, KEY)
            for message in (
                RedisPrefixShare(redis_url, forged, PrefixIndex(), lambda _: 64).message([(key_of(hosts[0]), hashes)]),
                b'{"body": "{}", "signature": 1}',
                b"not json",
            ):
                await forger.publish(CHANNEL, message)
            await forger.aclose()
            await asyncio.gather(*(cached_tokens(a, token_ids) for token_ids in prompts))  # A spreads them

            def knows(token_ids: list[int]) -> bool:
                blocks = prefix_hashes(token_ids, BLOCK_SIZE, None, KEY)
                return any(b.prefixes.num_cached(key_of(host), blocks) == len(blocks) for host in hosts[:2])

            deadline = time.monotonic() + 10
            while not all(knows(token_ids) for token_ids in prompts):  # A's records reach B
                assert time.monotonic() < deadline, "gateway B did not learn where gateway A sent its prompts"
                await asyncio.sleep(0.05)
            while any(w.status.num_queued_prompt_tokens for w in b.pool.healthy("prefill")):  # A's burst is over
                assert time.monotonic() < deadline, "the prefill workers still report A's prompts queued"
                await asyncio.sleep(0.05)
            assert b.prefixes.num_cached(key_of(hosts[0]), hashes) == 0, "a forged record was applied"
            for token_ids in prompts:
                assert await cached_tokens(b, token_ids) == (len(token_ids) - 1) // BLOCK_SIZE * BLOCK_SIZE
        finally:
            for backend in backends:
                await backend.close()

    with redis_process() as redis:
        asyncio.run(main(redis.url))


def key_of(host: WorkerHost) -> str:
    return f"{host.record.worker_id}@{host.record.address}"


def test_the_index_matches_leading_blocks_per_worker_and_salt_and_keeps_the_most_recent() -> None:
    tokens = list(range(100, 165))  # 65 tokens: 4 full blocks before the last token
    hashes = prefix_hashes(tokens, BLOCK_SIZE, None, KEY)
    assert len(hashes) == 4
    assert prefix_hashes(tokens[:63], BLOCK_SIZE, None, KEY) == hashes[:3]  # full blocks only; a chain
    assert prefix_hashes(tokens, BLOCK_SIZE, "salt", KEY)[0] != hashes[0]  # another salt: another chain
    assert prefix_hashes(tokens, BLOCK_SIZE, None, b"another cluster's key")[0] != hashes[0]

    index = PrefixIndex()
    index.record("a", hashes[:2], capacity=8)
    assert (index.num_cached("a", hashes), index.num_cached("b", hashes)) == (2, 0)
    other = prefix_hashes(list(range(500, 565)), BLOCK_SIZE, None, KEY)
    index.record("a", hashes, capacity=6)  # now holds 4 blocks ...
    index.record("a", other, capacity=6)  # ... of which the 2 oldest, the last ones, make room for these 4
    assert index.num_cached("a", other) == 4 and index.num_cached("a", hashes) == 2  # a prefix outlives its tail
    assert index.num_cached("a", [12345, *other]) == 0  # matched from the first block on
    index.retain(["b"])
    assert index.num_cached("a", other) == 0


def test_shared_records_are_signed_fresh_bounded_and_never_break_the_listener() -> None:
    index = PrefixIndex()
    ours = RedisPrefixShare("redis://127.0.0.1:1/0", CLUSTER_SECRET, index, lambda worker: 64 if worker == "w@h:1" else None)
    theirs = RedisPrefixShare("redis://127.0.0.1:1/0", CLUSTER_SECRET, PrefixIndex(), lambda _: 64)
    now = time.time()
    ours.apply(ours.message([("w@h:1", [1, 2])], now), now)  # its own: already in its index
    ours.apply(theirs.message([("w@h:1", [3, 4]), ("gone@h:2", [5])], now - 120), now)  # a replay
    assert index.num_cached("w@h:1", [1]) == index.num_cached("w@h:1", [3]) == 0
    ours.apply(theirs.message([("w@h:1", [3, 4]), ("gone@h:2", [5])], now), now)
    assert (index.num_cached("w@h:1", [3, 4]), index.num_cached("gone@h:2", [5])) == (2, 0)  # unknown worker: skipped

    body = b"[" * 200_000  # signed, yet nested past the parser's recursion limit
    for data in (body, CLUSTER_SECRET.sign("prefix-share", body).encode() + b" " + body, b"", b"x" * (2 << 20)):
        ours.apply(data, now)  # dropped, not raised

    records = [(f"w{i}@h:1", list(range(4000))) for i in range(40)]
    batches = theirs.batches(records)
    assert len(batches) > 1 and [r for batch in batches for r in batch] == records
    assert all(len(theirs.message(batch)) <= MAX_MESSAGE_BYTES for batch in batches)
    theirs.publish("w@h:1", list(range(MAX_RECORD_BLOCKS + 10)))
    assert len(theirs._pending[-1][1]) == MAX_RECORD_BLOCKS


def test_a_prefix_holder_busy_with_other_gateways_prompts_is_passed_over(checkpoints: dict[str, Path]) -> None:
    """The queue a worker reports (every gateway's prompts) counts, not only this gateway's own."""
    from pdserve.proto import pdserve_pb2 as pb
    from pdserve.router.registry import WorkerRecord
    from pdserve.router.workers import WorkerHandle

    pool = WorkerPool(InMemoryRegistry(), CLUSTER_SECRET)
    for name, role in (("p0", "prefill"), ("p1", "prefill"), ("d0", "decode")):
        handle = WorkerHandle(WorkerRecord(name, role, f"{name}:1"), channel=None, stub=None, is_healthy=True)
        handle.status = pb.WorkerStatus(role=role, block_size=16, num_total_blocks=64, is_prefix_caching=True)
        pool.workers[name] = handle
    backend = DisaggregatedBackend(pool, Tokenizer.from_pretrained(checkpoints["llama"]), "m", MAX_MODEL_LEN)
    blocks = PromptBlocks(list(range(1, 130)), None, backend.hash_key)
    decode = pool.workers["d0"]
    first, _ = backend._pick_prefill(blocks, True, decode, set())
    again, num_new = backend._pick_prefill(blocks, True, decode, set())
    assert again is first and num_new == 129 - 128  # its prefix is there: one token to compute
    first.status.num_queued_prompt_tokens = first.num_prefill_tokens_at_status = 500  # a report of our own prompts
    assert backend._pick_prefill(blocks, True, decode, set())[0] is first  # done since: not counted again
    first.num_prefill_tokens_at_status = 0  # other gateways' prompts queue there
    other, num_new = backend._pick_prefill(blocks, True, decode, set())
    assert other is not first and num_new == 129
    assert backend._pick_prefill(blocks, False, decode, set())[1] == 129  # prompt logprobs: computed whole


def test_a_prefill_worker_reports_the_prompt_tokens_it_has_still_to_compute() -> None:
    """What the gateways weigh against each other: a waiting prompt counts less the prefix its
    cache holds, an admitted one its rest; nothing once admitted prompts are computed or aborted."""
    from pdserve.engine.block_manager import BlockManager
    from pdserve.engine.request import Request
    from pdserve.prefill_worker.scheduler import PrefillScheduler

    blocks = BlockManager(num_blocks=32, block_size=BLOCK_SIZE)
    scheduler = PrefillScheduler(blocks, max_num_batched_tokens=40, max_num_seqs=4)
    prompt = list(range(1, 66))  # 65 tokens: 4 full blocks before the last
    cached = blocks.allocate(prompt)  # a first prompt computed and freed: its 4 blocks stay cached
    blocks.cache_full_blocks(cached.block_table, prompt, len(prompt))
    blocks.free(cached.block_table)
    greedy = SamplingParams(temperature=0.0, max_tokens=1)
    scheduler.add(Request("a", prompt, greedy))  # 65 - 64 cached
    scheduler.add(Request("b", list(range(100, 150)), greedy))  # 50, nothing cached
    scheduler.add(Request("c", prompt, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)))  # computed whole
    assert scheduler.num_queued_tokens == 1 + 50 + 65
    scheduler.schedule()  # admits a (1 token) and b (39 of its 50): c waits
    assert scheduler.num_queued_tokens == 1 + 50 + 65  # admitted: their rest, before this step runs
    scheduler.abort("c")
    assert scheduler.num_queued_tokens == 1 + 50
    for request_id in ("a", "b"):
        scheduler.abort(request_id)
    assert scheduler.num_queued_tokens == 0
