"""The Responses API's store: each stored response (the object its client saw) with the conversation
it was generated from, per tenant, for `previous_response_id` and GET/DELETE /v1/responses/{id}. In
this gateway's memory (bounded in responses and bytes, least recently used first out, a TTL), or in
Redis (the TTL as its expiry, signed records) so that the gateways behind one load balancer share it."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pdserve.proto.cluster_secret import ClusterSecret
from pdserve.proto.failures import Failure
from pdserve.router.closing import end_within
from pdserve.router.config import GatewayConfig
from pdserve.router.errors import APIError
from pdserve.router.throttled_log import ThrottledLog

logger = logging.getLogger(__name__)
KEY_PREFIX = "pdserve:response:"
SIGNATURE_PURPOSE = "response-store"
CLOSE_TIMEOUT_S = 5.0
MAX_RECORD_BYTES = 16 * 2**20  # one response with its conversation: more is not kept (a Redis write of it must end in time)
RESPONSE_ID = re.compile(r"resp_[0-9a-f]{32}")  # what `create_response` makes: any other id was never stored
ITEM_ID_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


@dataclass(frozen=True)
class StoredResponse:
    response: dict[str, Any]  # the response object, as its client last saw it
    input_items: list[dict[str, Any]]  # the whole conversation it answered, each item with an id

    def encode(self) -> bytes:
        return json.dumps({"response": self.response, "input_items": self.input_items}, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, blob: bytes) -> StoredResponse:
        record = json.loads(blob)
        return cls(record["response"], record["input_items"])

    def conversation(self) -> list[dict[str, Any]]:
        """What a response continuing this one starts from: its input, then its output."""
        return [*self.input_items, *self.response["output"]]


class ResponseStore(Protocol):
    async def put(self, tenant: str | None, response: dict[str, Any], input_items: list[dict[str, Any]]) -> bool:
        """Keeps the response, under its id, with its input; False (logged) if it could not: never raises."""
        ...

    async def get(self, tenant: str | None, response_id: str) -> StoredResponse | None:
        """None when absent, expired or another tenant's; a 503 APIError when the store does not answer."""
        ...

    async def delete(self, tenant: str | None, response_id: str) -> bool: ...

    async def close(self) -> None: ...


class MemoryResponseStore:
    """One gateway's store: at most `max_entries` responses and `max_bytes` (their JSON); each
    expires `ttl_s` after it was written. When full, the tenant holding the most (responses, or
    bytes, whichever is over) loses its least recently read or written one: a tenant storing a
    flood evicts its own responses, not those of tenants holding less."""

    def __init__(
        self, max_entries: int, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:  # fmt: skip
        self._max_entries, self._max_bytes, self._ttl_s, self._clock = max_entries, max_bytes, ttl_s, clock
        self._tenants: dict[str, _TenantResponses] = {}
        self._expiry: dict[tuple[str, str], float] = {}  # in the order written: the order they expire in
        self._num_bytes = 0

    async def put(self, tenant: str | None, response: dict[str, Any], input_items: list[dict[str, Any]]) -> bool:
        blob, key = StoredResponse(response, input_items).encode(), (tenant or "", response["id"])
        if len(blob) > min(self._max_bytes, MAX_RECORD_BYTES):
            logger.warning("response %s not stored: %d bytes, over %d", key[1], len(blob), min(self._max_bytes, MAX_RECORD_BYTES))
            return False
        self._drop(key)
        self._tenants.setdefault(key[0], _TenantResponses()).add(key[1], blob)
        self._expiry[key] = self._clock() + self._ttl_s
        self._num_bytes += len(blob)
        self._expire()
        while len(self._expiry) > self._max_entries:
            self._evict(lambda held: len(held.blobs), key)
        while self._num_bytes > self._max_bytes:
            self._evict(lambda held: held.num_bytes, key)
        return True

    async def get(self, tenant: str | None, response_id: str) -> StoredResponse | None:
        self._expire()
        held = self._tenants.get(tenant or "")
        if held is None or response_id not in held.blobs:
            return None
        held.blobs.move_to_end(response_id)
        return StoredResponse.decode(held.blobs[response_id])

    async def delete(self, tenant: str | None, response_id: str) -> bool:
        self._expire()
        return self._drop((tenant or "", response_id))

    async def close(self) -> None:
        return None

    def _expire(self) -> None:
        now = self._clock()
        while self._expiry and next(iter(self._expiry.values())) <= now:
            self._drop(next(iter(self._expiry)))

    def _evict(self, holding: Callable[[_TenantResponses], int], keep: tuple[str, str]) -> None:
        """The least recently used response of the tenant that holds the most by `holding`, never
        `keep` (the one just written: it fits alone)."""
        for tenant, held in sorted(self._tenants.items(), key=lambda item: -holding(item[1])):
            victim = next((response_id for response_id in held.blobs if (tenant, response_id) != keep), None)
            if victim is not None:
                self._drop((tenant, victim))
                return
        raise AssertionError("a response that fits alone was written")

    def _drop(self, key: tuple[str, str]) -> bool:
        held = self._tenants.get(key[0])
        blob = held.remove(key[1]) if held is not None else None
        if held is not None and not held.blobs:
            del self._tenants[key[0]]
        self._expiry.pop(key, None)
        self._num_bytes -= len(blob or b"")
        return blob is not None


class _TenantResponses:
    """One tenant's stored responses, least recently used first."""

    def __init__(self) -> None:
        self.blobs: OrderedDict[str, bytes] = OrderedDict()
        self.num_bytes = 0

    def add(self, response_id: str, blob: bytes) -> None:
        self.blobs[response_id] = blob
        self.num_bytes += len(blob)

    def remove(self, response_id: str) -> bytes | None:
        blob = self.blobs.pop(response_id, None)
        self.num_bytes -= len(blob or b"")
        return blob


class RedisResponseStore:
    """The store of every gateway sharing one Redis: `SET key value PX ttl` under a key per tenant.
    A value is `<signature> <json>`, signed with the cluster secret over its key and JSON (a record
    forged, or moved to another tenant's key, reads as absent). Every call ends within `timeout_s`.
    Its Redis bounds the total (`maxmemory`): it should not be the registry's, whose records must
    not be evicted or refused for want of room."""

    def __init__(
        self, url: str, secret: ClusterSecret, ttl_s: float, max_record_bytes: int = MAX_RECORD_BYTES, timeout_s: float = 2.0
    ) -> None:
        import redis.asyncio as aioredis

        self._redis = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._secret, self._max_bytes, self._ttl_s, self._timeout_s = secret, max_record_bytes, ttl_s, timeout_s
        self._log = ThrottledLog(logger).warning

    async def put(self, tenant: str | None, response: dict[str, Any], input_items: list[dict[str, Any]]) -> bool:
        blob, key = StoredResponse(response, input_items).encode(), _key(tenant, response["id"])
        if len(blob) > self._max_bytes:
            logger.warning("response %s not stored: %d bytes, over the store's %d", response["id"], len(blob), self._max_bytes)
            return False
        value = self._signature(key, blob).encode() + b" " + blob
        try:
            await asyncio.wait_for(self._redis.set(key, value, px=max(1, int(self._ttl_s * 1000))), self._timeout_s)
        except Exception as exc:  # noqa: BLE001 - the response is already answered: it is only not kept
            self._log(f"response {response['id']} not stored: Redis failed ({type(exc).__name__}: {exc})")
            return False
        return True

    async def get(self, tenant: str | None, response_id: str) -> StoredResponse | None:
        key = _key(tenant, response_id)
        value = await self._call(self._redis.get(key), "read")
        if value is None:
            return None
        signature, _, blob = value.partition(b" ")
        if not self._secret.verify(SIGNATURE_PURPOSE, key.encode() + b"\0" + blob, signature):
            logger.warning("ignored the stored response %s: bad signature (forged, or another cluster's)", response_id)
            return None
        return StoredResponse.decode(blob)

    async def delete(self, tenant: str | None, response_id: str) -> bool:
        return bool(await self._call(self._redis.delete(_key(tenant, response_id)), "delete"))

    async def close(self) -> None:
        await end_within([self._redis.aclose()], CLOSE_TIMEOUT_S, "closing the response store's Redis client")

    def _signature(self, key: str, blob: bytes) -> str:
        return self._secret.sign(SIGNATURE_PURPOSE, key.encode() + b"\0" + blob)

    async def _call(self, call: Any, what: str) -> Any:
        try:
            return await asyncio.wait_for(call, self._timeout_s)
        except Exception as exc:  # noqa: BLE001 - Redis away, slow or refusing: the client may try again
            self._log(f"response store: Redis failed to {what} ({type(exc).__name__}: {exc})")
            raise APIError.of(Failure.UNAVAILABLE, "the response store is unavailable; try again") from None


def _key(tenant: str | None, response_id: str) -> str:
    return f"{KEY_PREFIX}{tenant or '-'}:{response_id}"


def open_response_store(config: GatewayConfig, secret: ClusterSecret | None = None) -> ResponseStore | None:
    """The gateway's store: none when `responses_store_max_entries` is 0, in Redis given
    `responses_store_redis_url` (and the cluster secret that signs its records), else in memory."""
    if config.responses_store_max_entries == 0:
        return None
    if config.responses_store_redis_url is not None:
        assert secret is not None, "records in Redis are signed with the cluster secret"
        return RedisResponseStore(config.responses_store_redis_url, secret, config.responses_store_ttl_s)
    return MemoryResponseStore(config.responses_store_max_entries, config.responses_store_max_bytes, config.responses_store_ttl_s)


def input_items(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A request's `input` as the items the store lists: a string as one user message, a message's
    string content as one text part, every item with an id (its own, or a new one)."""
    if isinstance(items, str):
        items = [{"type": "message", "role": "user", "content": items}]
    listed = []
    for item in items:
        kind = item.get("type", "message")
        item = {**item, "type": kind, "id": item.get("id") or f"{ITEM_ID_PREFIXES.get(str(kind), 'item')}_{uuid.uuid4().hex}"}
        if kind == "message" and isinstance(item.get("content"), str):
            part = "output_text" if item.get("role") == "assistant" else "input_text"
            item["content"] = [{"type": part, "text": item["content"]}]
        listed.append(item)
    return listed


def check_item_ids(items: list[dict[str, Any]]) -> None:
    """A 400 for an item id that is not a string or comes twice in a conversation (as OpenAI's: a
    previous response's output sent back as input with its `previous_response_id`)."""
    seen: set[str] = set()
    for item in items:
        item_id = item["id"]
        if not isinstance(item_id, str):
            raise APIError(400, f"an input item's id must be a string, got {item_id!r}", "input")
        if item_id in seen:
            raise APIError(400, f"Duplicate item found with id {item_id[:100]!r}", "input")
        seen.add(item_id)


def item_page(items: list[dict[str, Any]], limit: int, order: str, after: str | None) -> dict[str, Any]:
    """GET /v1/responses/{id}/input_items: `limit` items (1-100) after the item `after`, newest first
    (`desc`) or oldest first (`asc`)."""
    if not 1 <= limit <= 100:
        raise APIError(400, f"limit must be in [1, 100], got {limit}", "limit")
    ordered = items[::-1] if order == "desc" else items
    ids = [item.get("id") for item in ordered]
    if after is not None and after not in ids:
        raise APIError(400, f"after: no input item {after!r} in this response", "after")
    start = 0 if after is None else ids.index(after) + 1
    page = ordered[start : start + limit]
    first_id, last_id = (page[0]["id"], page[-1]["id"]) if page else (None, None)
    return {"object": "list", "data": page, "first_id": first_id, "last_id": last_id, "has_more": start + limit < len(ordered)}


async def find(store: ResponseStore, tenant: str | None, response_id: str, param: str = "response_id") -> StoredResponse:
    """The response stored under this tenant, else a 404 naming `param` (a 503 when the store does not answer)."""
    found = await store.get(tenant, response_id) if RESPONSE_ID.fullmatch(response_id) else None
    if found is None:
        raise APIError(404, f"response {response_id[:100]!r} not found", param)
    return found


async def previous_conversation(
    store: ResponseStore | None, tenant: str | None, previous_response_id: str | None
) -> list[dict[str, Any]]:  # fmt: skip
    """The stored conversation `previous_response_id` continues (404 when not stored for this tenant)."""
    if previous_response_id is None:
        return []
    if store is None:
        message = "previous_response_id needs the response store, which is off on this server (send the conversation in `input`)"
        raise APIError(400, message, "previous_response_id")
    return (await find(store, tenant, previous_response_id, "previous_response_id")).conversation()


def not_stored(response_id: str) -> APIError:
    return APIError(404, f"response {response_id} not found: this server stores no responses", "response_id")
