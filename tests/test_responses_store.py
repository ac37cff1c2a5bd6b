"""The Responses API's store, through the real HTTP app and the official openai client over a
scripted backend that records its prompts: a continued turn (`previous_response_id`) is generated
from the whole conversation, a stored response reads back as its client saw it (whole, streamed,
cut, failed), `store: false`, delete, other API keys, eviction, expiry and the input items' pages;
then the store in Redis, shared by two gateways, and what a client gets when Redis fails."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import redis

from pdserve.engine import SamplingParams
from pdserve.engine.outputs import RequestDelta
from pdserve.engine.tokenizer import Tokenizer
from pdserve.proto.deadlines import Deadlines
from pdserve.router.app import create_app
from pdserve.router.auth import tenant_of
from pdserve.router.config import GatewayConfig
from pdserve.router.response_store import MemoryResponseStore, RedisResponseStore, ResponseStore
from tests.servers import CLUSTER_SECRET, redis_process
from tests.test_router_http import ScriptedBackend, serve

INSTRUCTIONS, QUESTION, FOLLOW_UP = "Be brief.", "What is the weather like today?", "And tomorrow?"
KEYS = ("key-a", "key-b")


class RecordingBackend(ScriptedBackend):
    """Replies " the the the" (stop), unless given another script; keeps each prompt's token ids."""

    max_model_len = 2048

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__(tokenizer)
        self.prompts: list[list[int]] = []
        self.reply()

    def reply(self, *steps: object) -> None:
        token = self.tokenizer.encode(" the", add_special_tokens=False)[0]
        self.script = list(steps) or [RequestDelta("", [token] * 3, finish_reason="stop")]

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> AsyncIterator[RequestDelta]:
        self.prompts.append(list(prompt_token_ids))
        async for delta in super().generate(request_id, prompt_token_ids, params):
            yield delta

    def last_prompt(self) -> str:
        return self.tokenizer.decode(self.prompts[-1], skip_special_tokens=False)


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(demo_model_dir)


@contextmanager
def gateway(
    tokenizer: Tokenizer, store: ResponseStore | None = None, **config: object
) -> Iterator[tuple[dict[str, openai.OpenAI], httpx.Client, RecordingBackend]]:
    """A gateway over a recording backend: an openai client per API key (one, "x", without keys)."""
    backend = RecordingBackend(tokenizer)
    app = create_app(backend, config=GatewayConfig(Deadlines(first_token_s=10, request_s=10), **config), response_store=store)
    keys = config.get("api_keys") or ("x",)
    with serve(app) as url, httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {keys[0]}"}) as http:
        yield {key: openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0) for key in keys}, http, backend


def rendered(tokenizer: Tokenizer, instructions: str | None, *turns: tuple[str, str]) -> str:
    messages = [{"role": "system", "content": instructions}] if instructions else []
    return tokenizer.apply_chat_template([*messages, *({"role": r, "content": c} for r, c in turns)])


def test_a_continued_response_is_generated_from_the_whole_conversation(tokenizer: Tokenizer) -> None:
    with gateway(tokenizer) as (clients, _, backend):
        client = clients["x"]
        first = client.responses.create(model="scripted", instructions=INSTRUCTIONS, input=QUESTION)
        assert backend.last_prompt() == rendered(tokenizer, INSTRUCTIONS, ("user", QUESTION))
        assert first.store is True and first.previous_response_id is None
        # the earlier turns, its reply included; its instructions are not carried over, the new ones apply
        second = client.responses.create(model="scripted", input=FOLLOW_UP, previous_response_id=first.id, instructions="Rhyme.")
        history = [("user", QUESTION), ("assistant", first.output_text), ("user", FOLLOW_UP)]
        assert backend.last_prompt() == rendered(tokenizer, "Rhyme.", *history)
        assert second.previous_response_id == first.id and second.instructions == "Rhyme."
        third = client.responses.create(
            model="scripted", input=[{"role": "user", "content": "Why?"}], previous_response_id=second.id
        )
        assert backend.last_prompt() == rendered(tokenizer, None, *history, ("assistant", second.output_text), ("user", "Why?"))

        # its input items: the whole conversation it answered, each with an id (the replies' their own)
        items = list(client.responses.input_items.list(third.id, order="asc"))
        assert [(i.type, i.role) for i in items] == [("message", r) for r in ("user", "assistant", "user", "assistant", "user")]
        assert [i.id for i in items[1::2]] == [first.output[0].id, second.output[0].id]
        assert [i.content[0].text for i in items[::2]] == [QUESTION, FOLLOW_UP, "Why?"]
        assert items[0].id.startswith("msg_") and items[0].content[0].type == "input_text"


def test_a_stored_response_reads_back_as_its_client_saw_it_whole_or_streamed(tokenizer: Tokenizer) -> None:
    with gateway(tokenizer) as (clients, _, backend):
        client = clients["x"]
        whole = client.responses.create(model="scripted", input=QUESTION, metadata={"k": "v"})
        assert client.responses.retrieve(whole.id).model_dump() == whole.model_dump()
        events = list(client.responses.create(model="scripted", input=QUESTION, stream=True))
        streamed = events[-1].response
        assert (
            events[-1].type == "response.completed"
            and client.responses.retrieve(streamed.id).model_dump() == streamed.model_dump()
        )

        token = tokenizer.encode(" the", add_special_tokens=False)[0]
        backend.reply(RequestDelta("", [token] * 2, finish_reason="length"))  # cut by max_output_tokens
        events = list(client.responses.create(model="scripted", input=QUESTION, stream=True, max_output_tokens=2))
        assert client.responses.retrieve(events[-1].response.id).status == "incomplete"
        backend.reply(RequestDelta("", [token]), RuntimeError("worker lost"))  # a failure mid-stream: not kept
        events = list(client.responses.create(model="scripted", input=QUESTION, stream=True))
        failed = events[-1].response
        assert events[-1].type == "response.failed" and failed.output_text == " the" and failed.store is False
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(failed.id)


def test_a_response_not_to_be_stored_or_deleted_is_not_found(tokenizer: Tokenizer) -> None:
    with gateway(tokenizer) as (clients, http, _):
        client = clients["x"]
        unstored = client.responses.create(model="scripted", input=QUESTION, store=False)
        assert unstored.store is False
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(unstored.id)
        with pytest.raises(openai.NotFoundError) as caught:
            client.responses.create(model="scripted", input=FOLLOW_UP, previous_response_id=unstored.id)
        assert caught.value.body["param"] == "previous_response_id"

        stored = client.responses.create(model="scripted", input=QUESTION)
        cancel = http.post(f"/v1/responses/{stored.id}/cancel")
        assert cancel.status_code == 400 and "background" in cancel.json()["error"]["message"]
        assert http.delete(f"/v1/responses/{stored.id}").json() == {
            "id": stored.id,
            "object": "response.deleted",
            "deleted": True,
        }
        for method, path in (("GET", ""), ("DELETE", ""), ("GET", "/input_items"), ("POST", "/cancel")):
            answer = http.request(method, f"/v1/responses/{stored.id}{path}")
            assert answer.status_code == 404 and answer.json()["error"]["param"] == "response_id", (method, path)
        again = client.responses.create(model="scripted", input=QUESTION)
        assert client.responses.delete(again.id) is None
        with pytest.raises(openai.NotFoundError):
            client.responses.create(model="scripted", input=FOLLOW_UP, previous_response_id=again.id)


def test_another_api_key_finds_nothing(tokenizer: Tokenizer) -> None:
    with gateway(tokenizer, api_keys=KEYS) as (clients, _, backend):
        mine, theirs = clients["key-a"], clients["key-b"]
        response = mine.responses.create(model="scripted", input=QUESTION)
        num_prompts = len(backend.prompts)
        for attempt in (
            lambda: theirs.responses.retrieve(response.id),
            lambda: theirs.responses.input_items.list(response.id),
            lambda: theirs.responses.delete(response.id),
            lambda: theirs.responses.create(model="scripted", input=FOLLOW_UP, previous_response_id=response.id),
        ):
            with pytest.raises(openai.NotFoundError):
                attempt()
        assert len(backend.prompts) == num_prompts  # nothing of it reached a model
        assert mine.responses.retrieve(response.id).id == response.id


def test_the_memory_store_evicts_the_least_recently_used_and_expires(tokenizer: Tokenizer) -> None:
    with gateway(tokenizer, responses_store_max_entries=2) as (clients, _, _):
        client = clients["x"]
        first, second = (client.responses.create(model="scripted", input=QUESTION) for _ in range(2))
        client.responses.retrieve(first.id)  # now the most recently used
        client.responses.create(model="scripted", input=QUESTION)
        assert client.responses.retrieve(first.id).id == first.id
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(second.id)

    now = [0.0]
    store = MemoryResponseStore(max_entries=10, max_bytes=1 << 20, ttl_s=60.0, clock=lambda: now[0])
    with gateway(tokenizer, store) as (clients, _, _):
        client = clients["x"]
        response = client.responses.create(model="scripted", input=QUESTION)
        now[0] = 59.0
        assert client.responses.retrieve(response.id).id == response.id  # reading does not extend its life
        now[0] = 60.0
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(response.id)
        with pytest.raises(openai.NotFoundError):
            client.responses.create(model="scripted", input=FOLLOW_UP, previous_response_id=response.id)


def test_a_response_too_big_to_keep_says_so(tokenizer: Tokenizer) -> None:
    with gateway(tokenizer, responses_store_max_bytes=1500) as (clients, _, _):
        client = clients["x"]
        big = client.responses.create(model="scripted", input="x" * 1000)
        streamed = list(client.responses.create(model="scripted", input="x" * 1000, stream=True))[-1].response
        assert big.store is False and streamed.store is False
        for response in (big, streamed):
            with pytest.raises(openai.NotFoundError):
                client.responses.retrieve(response.id)
        assert client.responses.create(model="scripted", input=QUESTION).store is True


def test_an_item_id_twice_in_a_conversation_is_a_400(tokenizer: Tokenizer) -> None:
    """As on OpenAI: a previous response's output sent back as input, and its previous_response_id too."""
    with gateway(tokenizer) as (clients, http, backend):
        first = clients["x"].responses.create(model="scripted", input=QUESTION)
        num_prompts = len(backend.prompts)
        body = {"input": [first.output[0].model_dump(), {"role": "user", "content": FOLLOW_UP}], "previous_response_id": first.id}
        answer = http.post("/v1/responses", json=body)
        assert answer.status_code == 400 and "Duplicate item" in answer.json()["error"]["message"], answer.text
        twice = [{"id": "msg_1", "role": "user", "content": QUESTION}, {"id": "msg_1", "role": "user", "content": FOLLOW_UP}]
        assert http.post("/v1/responses", json={"input": twice}).status_code == 400
        assert http.post("/v1/responses", json={"input": [{"id": 7, "role": "user", "content": QUESTION}]}).status_code == 400
        assert len(backend.prompts) == num_prompts


def record(n: int, size: int = 0) -> dict:
    """A response object to store, with `size` characters of text."""
    return {"id": f"resp_{n:032x}", "output": [], "text": "x" * size}


async def kept(store: MemoryResponseStore, tenant: str | None, numbers: Iterable[int]) -> list[bool]:
    """Whether each of these responses of `tenant` is still stored."""
    return [await store.get(tenant, record(n)["id"]) is not None for n in numbers]


def test_the_memory_store_is_bounded_in_bytes() -> None:
    store = MemoryResponseStore(max_entries=100, max_bytes=1000, ttl_s=60.0)

    async def main() -> None:
        assert not await store.put(None, record(0, 1000), [])  # alone over the bound: not kept
        for n in range(1, 4):
            assert await store.put(None, record(n, 300), [{"id": "msg_1"}])
        assert await kept(store, None, (1, 2, 3)) == [False, True, True]  # three do not fit in 1000 bytes: the oldest went

    asyncio.run(main())


def test_a_tenant_flooding_the_store_evicts_its_own_responses() -> None:
    """When the store is full, the tenant holding the most loses its least recently used
    response: a flood from one API key does not push out another key's few."""
    store = MemoryResponseStore(max_entries=6, max_bytes=1 << 20, ttl_s=60.0)

    async def main() -> None:
        for n in range(2):
            assert await store.put("key-a", record(n), [])
        for n in range(2, 40):  # key-b's flood: 38 responses into the 4 places left
            assert await store.put("key-b", record(n), [])
        assert await kept(store, "key-a", range(2)) == [True, True]
        assert await kept(store, "key-b", range(34, 40)) == [False] * 2 + [True] * 4
        await store.get("key-b", record(36)["id"])  # read: the most recently used of key-b's
        assert await store.put("key-a", record(40), [])  # key-b still holds the most: its LRU goes
        assert await kept(store, "key-b", (37, 36)) == [False, True]

    asyncio.run(main())


def test_the_response_just_written_is_kept_whoever_holds_the_most() -> None:
    """A tenant whose one new response makes it the largest holder keeps it: the others' go."""
    store = MemoryResponseStore(max_entries=100, max_bytes=3000, ttl_s=60.0)

    async def main() -> None:
        for n in range(10):
            assert await store.put("key-a", record(n, 150), [])
        assert await store.put("key-b", record(10, 1700), [])
        assert await kept(store, "key-b", [10]) == [True]
        held = await kept(store, "key-a", range(10))
        assert held[-1] and not held[0]  # key-a's least recently used went

    asyncio.run(main())


def test_a_tenant_holding_the_most_bytes_loses_a_response_first() -> None:
    store = MemoryResponseStore(max_entries=100, max_bytes=2000, ttl_s=60.0)

    async def main() -> None:
        for n in range(3):
            assert await store.put("key-a", record(n, 100), [])
        assert await store.put("key-b", record(3, 900), [])
        assert await store.put("key-b", record(4, 900), [])  # over 2000 bytes: key-b holds the most bytes
        assert await kept(store, "key-a", range(3)) == [True] * 3
        assert await kept(store, "key-b", (3, 4)) == [False, True]

    asyncio.run(main())


def test_input_items_come_in_pages(tokenizer: Tokenizer) -> None:
    with gateway(tokenizer) as (clients, http, _):
        client = clients["x"]
        turns = [{"role": "user", "content": f"turn {n}"} for n in range(5)]
        turns[2]["id"] = "msg_mine"
        response = client.responses.create(model="scripted", input=turns)
        page = client.responses.input_items.list(response.id, limit=2)
        assert [i.content[0].text for i in page.data] == ["turn 4", "turn 3"] and page.has_more  # newest first
        assert (page.first_id, page.last_id) == (page.data[0].id, page.data[1].id)
        assert [i.content[0].text for i in client.responses.input_items.list(response.id, limit=2)] == [
            f"turn {n}" for n in (4, 3, 2, 1, 0)
        ]  # the client follows `after` from page to page
        after = client.responses.input_items.list(response.id, order="asc", after="msg_mine", limit=100)
        assert [i.content[0].text for i in after.data] == ["turn 3", "turn 4"] and not after.has_more
        for query, param in (("limit=0", "limit"), ("limit=101", "limit"), ("order=up", "order"), ("after=msg_none", "after")):
            answer = http.get(f"/v1/responses/{response.id}/input_items?{query}")
            assert answer.status_code == 400 and answer.json()["error"]["param"] == param, query


def test_with_the_store_off_nothing_is_kept(tokenizer: Tokenizer) -> None:
    with gateway(tokenizer, responses_store_max_entries=0) as (clients, http, _):
        response = clients["x"].responses.create(model="scripted", input=QUESTION)
        assert response.store is False
        answer = http.post("/v1/responses", json={"input": FOLLOW_UP, "previous_response_id": response.id})
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "previous_response_id"
        assert "store" in answer.json()["error"]["message"]
        assert http.get(f"/v1/responses/{response.id}").status_code == 404


# ---- in Redis ----


def redis_store(url: str, timeout_s: float = 2.0) -> RedisResponseStore:
    return RedisResponseStore(url, CLUSTER_SECRET, ttl_s=60.0, timeout_s=timeout_s)


def test_gateways_sharing_a_redis_share_their_responses(tokenizer: Tokenizer) -> None:
    with (
        redis_process() as server,
        gateway(tokenizer, redis_store(server.url), api_keys=KEYS) as (a, _, _),
        gateway(tokenizer, redis_store(server.url), api_keys=KEYS) as (b, _, backend_b),
    ):
        first = a["key-a"].responses.create(model="scripted", instructions=INSTRUCTIONS, input=QUESTION)
        second = b["key-a"].responses.create(model="scripted", input=FOLLOW_UP, previous_response_id=first.id)
        history = [("user", QUESTION), ("assistant", first.output_text), ("user", FOLLOW_UP)]
        assert backend_b.last_prompt() == rendered(tokenizer, None, *history)
        assert a["key-a"].responses.retrieve(second.id).model_dump() == second.model_dump()
        assert [i.id for i in a["key-a"].responses.input_items.list(second.id)][1] == first.output[0].id

        client = redis.Redis.from_url(server.url)
        [key] = [k for k in client.scan_iter("pdserve:response:*") if k.endswith(first.id.encode())]
        assert 0 < client.pttl(key) <= 60_000  # the TTL is Redis's expiry
        with pytest.raises(openai.NotFoundError):
            b["key-b"].responses.retrieve(first.id)
        # a record copied under another tenant's key (by whoever can write to Redis) does not verify there
        client.set(key.replace(tenant_of(b"key-a").encode(), tenant_of(b"key-b").encode()), client.get(key))
        with pytest.raises(openai.NotFoundError):
            b["key-b"].responses.retrieve(first.id)
        b["key-a"].responses.delete(first.id)
        with pytest.raises(openai.NotFoundError):
            a["key-a"].responses.retrieve(first.id)
        client.close()


def test_a_redis_failure_fails_only_what_needs_the_store(tokenizer: Tokenizer) -> None:
    with redis_process() as server, gateway(tokenizer, redis_store(server.url, timeout_s=0.5)) as (clients, http, _):
        client = clients["x"]
        stored = client.responses.create(model="scripted", input=QUESTION)
        assert server.process is not None
        server.process.send_signal(signal.SIGSTOP)  # a frozen Redis: every call ends at its deadline
        try:
            started = time.monotonic()
            answered = client.responses.create(model="scripted", input=QUESTION)  # not kept in time, still answered
            assert answered.output_text == stored.output_text and answered.store is False
            for method, path, body in (
                ("POST", "/v1/responses", {"input": FOLLOW_UP, "previous_response_id": stored.id}),
                ("GET", f"/v1/responses/{stored.id}", None),
            ):
                answer = http.request(method, path, json=body)
                assert answer.status_code == 503 and answer.headers["Retry-After"], answer.text
                assert "response store is unavailable" in answer.json()["error"]["message"]
            assert time.monotonic() - started < 6
        finally:
            server.process.send_signal(signal.SIGCONT)
        server.stop()  # gone: refused at once
        answer = http.post("/v1/responses", json={"input": FOLLOW_UP, "previous_response_id": stored.id})
        assert answer.status_code == 503 and answer.json()["error"]["type"] == "ServiceUnavailableError"
        assert client.responses.create(model="scripted", input=QUESTION).status == "completed"
