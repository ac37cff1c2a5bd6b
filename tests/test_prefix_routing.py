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
from pdserve.router.disaggregated import DisaggregatedBackend
from pdserve.router.prefix_index import PrefixIndex, prefix_hashes
from pdserve.router.prefix_share import CHANNEL, RedisPrefixShare
from pdserve.router.registry import InMemoryRegistry
from pdserve.router.workers import WorkerPool
from tests.servers import CLUSTER_SECRET, redis_process

MAX_MODEL_LEN = 256
BLOCK_SIZE = 16
TOPICS = ["rivers", "compilers", "volcanoes", "chess openings", "bread", "satellites"]


def prompt(topic: str) -> str:
    return f"Write a long and careful essay about {topic}, with an introduction, three parts and an ending. " * 3


@pytest.fixture(scope="module")
def tokenizer(checkpoints: dict[str, Path]) -> Tokenizer:
    return Tokenizer.from_pretrained(checkpoints["llama"])


@pytest.fixture(scope="module")
def hosts(checkpoints: dict[str, Path]) -> Iterator[list[WorkerHost]]:
    engine = EngineConfig(
        model=str(checkpoints["llama"]), device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN, num_kv_blocks=256
    )
    started = [
        WorkerHost(WorkerSpec(role, engine, "m", cluster_secret=CLUSTER_SECRET)) for role in ("prefill", "prefill", "decode")
    ]
    for host in started:
        host.start()
    yield started
    for host in started:
        host.stop()


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
            hashes = prefix_hashes(tokenizer.encode("Zebras play the xylophone on quartz. " * 8), BLOCK_SIZE, None)
            for message in (
                RedisPrefixShare(redis_url, forged, PrefixIndex(), lambda _: 64).message([(hosts[0].record.worker_id, hashes)]),
                b'{"body": "{}", "signature": 1}',
                b"not json",
            ):
                await forger.publish(CHANNEL, message)
            await forger.aclose()
            await asyncio.gather(*(cached_tokens(a, token_ids) for token_ids in prompts))  # A spreads them

            def knows(token_ids: list[int]) -> bool:
                blocks = prefix_hashes(token_ids, BLOCK_SIZE, None)
                return any(b.prefixes.num_cached(host.record.worker_id, blocks) == len(blocks) for host in hosts[:2])

            deadline = time.monotonic() + 10
            while not all(knows(token_ids) for token_ids in prompts):  # A's records reach B
                assert time.monotonic() < deadline, "gateway B did not learn where gateway A sent its prompts"
                await asyncio.sleep(0.05)
            assert b.prefixes.num_cached(hosts[0].record.worker_id, hashes) == 0, "a forged record was applied"
            for token_ids in prompts:
                assert await cached_tokens(b, token_ids) == (len(token_ids) - 1) // BLOCK_SIZE * BLOCK_SIZE
        finally:
            for backend in backends:
                await backend.close()

    with redis_process() as redis:
        asyncio.run(main(redis.url))


def test_the_index_matches_leading_blocks_per_worker_and_salt_and_keeps_the_most_recent() -> None:
    tokens = list(range(100, 165))  # 65 tokens: 4 full blocks before the last token
    hashes = prefix_hashes(tokens, BLOCK_SIZE, None)
    assert len(hashes) == 4
    assert prefix_hashes(tokens[:64], BLOCK_SIZE, None) == hashes[:3]  # the last token is always computed
    assert prefix_hashes(tokens, BLOCK_SIZE, "salt") != hashes and prefix_hashes(tokens, BLOCK_SIZE, "salt")[0] != hashes[0]

    index = PrefixIndex()
    index.record("a", hashes[:2], capacity=8)
    assert (index.num_cached("a", hashes), index.num_cached("b", hashes)) == (2, 0)
    other = prefix_hashes(list(range(500, 565)), BLOCK_SIZE, None)
    index.record("a", hashes, capacity=6)  # now holds 4 blocks ...
    index.record("a", other, capacity=6)  # ... of which the 2 oldest make room for these 4
    assert index.num_cached("a", other) == 4 and index.num_cached("a", hashes) == 0
    mixed = [*hashes[:1], *other[1:]]  # a chain is matched from its start: a gap ends it
    assert index.num_cached("a", mixed) == 0
    index.retain(["b"])
    assert index.num_cached("a", other) == 0
