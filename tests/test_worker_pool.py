"""The gateway's `WorkerPool` tells the truth about its workers whatever the registry does: with Redis
down it keeps routing over the workers it knows and still notices one dying; a Redis restarted
empty drops nobody (and the workers register again within a couple of seconds); a worker that
leaves (unlisted and draining) gets no new request, its channel stays open until the requests
already on it have finished, and `/admin/workers` shows it draining until then. Real workers in
this process, a real redis-server."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from pdserve.deploy.worker_host import WorkerHost, WorkerSpec
from pdserve.engine import LLM, SamplingParams
from pdserve.engine.config import EngineConfig
from pdserve.engine.tokenizer import Tokenizer
from pdserve.router.admin import admin_routes
from pdserve.router.backend import BackendUnavailableError
from pdserve.router.disaggregated import DisaggregatedBackend
from pdserve.router.registry import KEY_PREFIX, InMemoryRegistry, RedisRegistry
from pdserve.router.workers import WorkerPool
from tests.servers import CLUSTER_SECRET, RedisServer, redis_process

MAX_MODEL_LEN = 256
PROMPT = "The decode worker reserves blocks for a prompt before the prefill worker pushes its KV"
POLL_S = 0.2


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture(scope="module")
def tokenizer(checkpoints: dict[str, Path]) -> Tokenizer:
    return Tokenizer.from_pretrained(checkpoints["llama"])


@pytest.fixture(scope="module")
def expected(checkpoints: dict[str, Path], tokenizer: Tokenizer) -> dict[int, list[int]]:
    """Greedy token ids of PROMPT by max_tokens, from the offline engine."""
    llm = LLM(model=str(checkpoints["llama"]), device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN)
    prompt = {"prompt_token_ids": tokenizer.encode(PROMPT)}
    return {n: llm.generate(prompt, greedy(n))[0].outputs[0].token_ids for n in (8, 200)}


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with redis_process() as process:
        yield process


def start_hosts(model: Path, redis_url: str | None) -> dict[str, WorkerHost]:
    engine = EngineConfig(model=str(model), device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN, num_kv_blocks=64)
    hosts = {
        role: WorkerHost(WorkerSpec(role, engine, "m", redis_url=redis_url, cluster_secret=CLUSTER_SECRET))
        for role in ("prefill", "decode")
    }
    for host in hosts.values():
        host.start()
    return hosts


@pytest.fixture
def hosts_factory(checkpoints: dict[str, Path]) -> Iterator[object]:
    started: list[WorkerHost] = []

    def make(redis_url: str | None) -> dict[str, WorkerHost]:
        hosts = start_hosts(checkpoints["llama"], redis_url)
        started.extend(hosts.values())
        return hosts

    yield make
    for host in started:
        if host.record is not None:
            host.stop()


async def generate(backend: DisaggregatedBackend, tokenizer: Tokenizer, max_tokens: int) -> list[int]:
    tokens = []
    async for delta in backend.generate(uuid.uuid4().hex, tokenizer.encode(PROMPT), greedy(max_tokens)):
        assert delta.finish_reason != "error", delta.error
        tokens += delta.token_ids
    return tokens


async def eventually(condition: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        await asyncio.sleep(0.05)


def test_with_redis_down_health_follows_the_workers_own_checks(
    redis: RedisServer, hosts_factory: object, tokenizer: Tokenizer, expected: dict[int, list[int]]
) -> None:
    hosts = hosts_factory(redis.url)

    async def main() -> None:
        pool = WorkerPool(RedisRegistry(redis.url, CLUSTER_SECRET, timeout_s=0.5), CLUSTER_SECRET, poll_interval_s=POLL_S)
        await pool.start()
        try:
            assert await pool.wait_ready(10)
            backend = DisaggregatedBackend(pool, tokenizer, "m", MAX_MODEL_LEN)
            redis.stop()
            await asyncio.sleep(5 * POLL_S)  # several polls without a registry
            assert await backend.is_healthy(), "Redis being down must not hide live workers"
            assert await generate(backend, tokenizer, 8) == expected[8]
            hosts["decode"].stop()  # a worker dies while Redis is down
            await eventually(lambda: not pool.healthy("decode"), 5, "the gateway notices the dead decode worker itself")
            assert not await backend.is_healthy()
            with pytest.raises(BackendUnavailableError):
                await generate(backend, tokenizer, 8)
        finally:
            await pool.close()

    asyncio.run(main())


class HangingRegistry(InMemoryRegistry):
    """A registry that stops answering once `is_hung` (a frozen controller or Redis)."""

    is_hung = False

    async def list_workers(self) -> list:
        if self.is_hung:
            await asyncio.sleep(3600)
        return await super().list_workers()


def test_a_registry_that_stops_answering_holds_up_no_health_check(hosts_factory: object) -> None:
    """Each health check waits at most its RPC timeout; the registry read must not make every check
    wait for it (a dead worker stayed routable for as long as the read took)."""
    hosts = hosts_factory(None)
    registry = HangingRegistry([host.record for host in hosts.values()])

    async def main() -> None:
        pool = WorkerPool(registry, CLUSTER_SECRET, poll_interval_s=POLL_S, rpc_timeout_s=1.0)
        await pool.start()
        try:
            assert await pool.wait_ready(10)
            registry.is_hung = True
            await asyncio.sleep(3 * POLL_S)
            assert pool.healthy("decode"), "a registry that does not answer must not hide live workers"
            hosts["decode"].stop()
            await eventually(lambda: not pool.healthy("decode"), 5, "the gateway notices the dead decode worker")
        finally:
            await pool.close()

    asyncio.run(main())


def test_a_redis_restarted_empty_drops_no_worker_and_the_workers_register_again(
    redis: RedisServer, hosts_factory: object, tokenizer: Tokenizer, expected: dict[int, list[int]]
) -> None:
    import redis as redis_client

    hosts_factory(redis.url)

    async def main() -> tuple[list[bool], float | None]:
        pool = WorkerPool(RedisRegistry(redis.url, CLUSTER_SECRET, timeout_s=0.5), CLUSTER_SECRET, poll_interval_s=POLL_S)
        await pool.start()
        samples: list[bool] = []
        try:
            assert await pool.wait_ready(10)
            backend = DisaggregatedBackend(pool, tokenizer, "m", MAX_MODEL_LEN)
            redis.stop()
            redis.start()  # the same port, empty
            restarted_at, registered_after = time.monotonic(), None
            client = redis_client.Redis.from_url(redis.url)
            while time.monotonic() - restarted_at < 3.0:
                samples.append(await backend.is_healthy())
                if registered_after is None and len(client.keys(KEY_PREFIX + "*")) == 2:
                    registered_after = time.monotonic() - restarted_at
                await asyncio.sleep(0.02)
            assert await generate(backend, tokenizer, 8) == expected[8]
            return samples, registered_after
        finally:
            await pool.close()

    samples, registered_after = asyncio.run(main())
    assert all(samples), f"/health would have said 503 in {samples.count(False)} of {len(samples)} samples"
    assert registered_after is not None and registered_after < 2.0, f"workers registered again after {registered_after} s"


async def admin_workers(pool: WorkerPool) -> dict[str, dict]:
    """This gateway's `GET /admin/workers`, by worker id."""
    app = FastAPI()
    app.include_router(admin_routes(pool, "admin-token"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
        response = await client.get("/admin/workers", headers={"Authorization": "Bearer admin-token"})
    assert response.status_code == 200, response.text
    return {view["worker_id"]: view for view in response.json()["workers"]}


def test_a_leaving_worker_gets_no_new_request_and_keeps_its_channel_until_its_requests_end(
    hosts_factory: object, tokenizer: Tokenizer, expected: dict[int, list[int]]
) -> None:
    hosts = hosts_factory(None)
    registry = InMemoryRegistry([hosts["prefill"].record, hosts["decode"].record])

    async def main() -> None:
        pool = WorkerPool(registry, CLUSTER_SECRET, poll_interval_s=POLL_S)
        await pool.start()
        try:
            assert await pool.wait_ready(10)
            backend = DisaggregatedBackend(pool, tokenizer, "m", MAX_MODEL_LEN)
            decode_id = hosts["decode"].record.worker_id
            stream = backend.generate(uuid.uuid4().hex, tokenizer.encode(PROMPT), greedy(200))
            tokens = (await anext(stream)).token_ids  # the first token: the request is on the decode worker
            registry.remove(decode_id)  # it leaves: unlisted, then draining
            hosts["decode"].drain()
            await eventually(lambda: decode_id not in pool.workers, 5, "the draining worker leaves the pool")
            with pytest.raises(BackendUnavailableError):
                await anext(backend.generate(uuid.uuid4().hex, tokenizer.encode(PROMPT), greedy(8)))
            view = (await admin_workers(pool)).get(decode_id)
            assert view is not None, "/admin/workers dropped the draining worker while it runs a request"
            assert (view["draining"], view["in_pool"], view["num_in_flight"]) == (True, False, 1)
            async for delta in stream:  # read the rest only now: the call must still be open
                assert delta.finish_reason != "error", delta.error
                tokens += delta.token_ids
            assert tokens == expected[200]
            await eventually(lambda: not pool.retired, 2, "the channel closes once its last request ended")
            assert decode_id not in await admin_workers(pool)
            assert hosts["decode"].worker.status()["num_used_blocks"] == 0
        finally:
            await pool.close()

    asyncio.run(main())


def test_the_gateways_context_length_follows_the_workers_it_routes_to(demo_model_dir: Path) -> None:
    """Before any worker reports, the model's (an upper bound); then the shortest a routable worker
    reports; a pool restarted with another --max-model-len is followed, a draining worker ignored."""
    from pdserve.proto import pdserve_pb2 as pb
    from pdserve.router.app import create_app
    from pdserve.router.metrics import Metrics
    from pdserve.router.registry import WorkerRecord
    from pdserve.router.workers import WorkerHandle

    pool = WorkerPool(InMemoryRegistry(), CLUSTER_SECRET)
    backend = DisaggregatedBackend(pool, Tokenizer.from_pretrained(demo_model_dir), "m", 4096)

    def worker(name: str, role: str, max_model_len: int, draining: bool = False) -> WorkerHandle:
        handle = WorkerHandle(WorkerRecord(name, role, "127.0.0.1:1"), channel=None, stub=None, is_healthy=True)
        handle.status = pb.WorkerStatus(role=role, max_model_len=max_model_len, is_draining=draining)
        pool.workers[name] = handle
        return handle

    assert backend.max_model_len == 4096
    worker("decode-0", "decode", 0)  # no length reported: not counted
    pool.workers["prefill-0"] = WorkerHandle(WorkerRecord("prefill-0", "prefill", "127.0.0.1:1"), None, None, is_healthy=True)
    assert backend.max_model_len == 4096
    del pool.workers["decode-0"], pool.workers["prefill-0"]
    worker("prefill-1", "prefill", 1024)
    worker("decode-1", "decode", 512)
    assert backend.max_model_len == 512
    for name in ("prefill-1", "decode-1"):  # restarted with a longer context
        del pool.workers[name]
    worker("prefill-2", "prefill", 2048)
    worker("decode-2", "decode", 2048)
    worker("decode-3", "decode", 256, draining=True)
    assert backend.max_model_len == 2048
    pool.workers.clear()
    assert backend.max_model_len == 2048  # none reports: the last known
    # the gateway's character bound on prompts (refused before tokenizing) follows it too
    app = create_app(backend, Metrics("m"))
    chars_at_2048 = app.state.serving.max_prompt_chars
    worker("decode-4", "decode", 1024)
    assert app.state.serving.max_prompt_chars == chars_at_2048 // 2


def test_without_a_healthy_prefill_worker_a_request_is_refused_before_any_decode_call(demo_model_dir: Path) -> None:
    """The prefill worker is picked after the decode worker's reservation; with none healthy the
    request is still refused at once (503), and no decode worker is called or counted."""
    from pdserve.proto import pdserve_pb2 as pb
    from pdserve.router.registry import WorkerRecord
    from pdserve.router.workers import WorkerHandle

    class NoCalls:
        def __getattr__(self, name: str) -> object:
            raise AssertionError(f"the decode worker was called: {name}")

    pool = WorkerPool(InMemoryRegistry(), CLUSTER_SECRET)
    decode = WorkerHandle(WorkerRecord("decode-1", "decode", "127.0.0.1:1"), channel=None, stub=NoCalls(), is_healthy=True)
    decode.status = pb.WorkerStatus(role="decode", max_model_len=256)
    pool.workers["decode-1"] = decode
    backend = DisaggregatedBackend(pool, Tokenizer.from_pretrained(demo_model_dir), "m", 256)

    async def main() -> None:
        with pytest.raises(BackendUnavailableError, match="no healthy prefill worker"):
            async for _ in backend.generate(uuid.uuid4().hex, [1, 2, 3], greedy(2)):
                pass

    asyncio.run(main())
    assert decode.num_in_flight == 0
