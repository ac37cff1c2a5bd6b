"""Which workers exist: in memory (one gateway, the launcher registers workers directly) or in
Redis (several gateways; each worker heartbeats a key with a TTL, so a dead worker disappears)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Protocol

KEY_PREFIX = "pdserve:worker:"
DEFAULT_TTL_S = 10.0


@dataclass(frozen=True)
class WorkerRecord:
    worker_id: str
    role: str  # "prefill" | "decode"
    address: str  # host:port of its gRPC server

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> WorkerRecord:
        return cls(**json.loads(text))


def redis_key(worker_id: str) -> str:
    return KEY_PREFIX + worker_id


class Registry(Protocol):
    async def list_workers(self) -> list[WorkerRecord]: ...

    async def close(self) -> None: ...


class InMemoryRegistry:
    def __init__(self, records: list[WorkerRecord] | None = None) -> None:
        self._records = {r.worker_id: r for r in records or []}

    def add(self, record: WorkerRecord) -> None:
        self._records[record.worker_id] = record

    def remove(self, worker_id: str) -> None:
        self._records.pop(worker_id, None)

    async def list_workers(self) -> list[WorkerRecord]:
        return list(self._records.values())

    async def close(self) -> None:
        return None


class RedisRegistry:
    """Reads the records workers keep alive with `heartbeat` (`SET key value EX ttl`)."""

    def __init__(self, url: str, timeout_s: float = 2.0) -> None:
        import redis.asyncio as aioredis

        self._redis = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)

    async def list_workers(self) -> list[WorkerRecord]:
        keys = [key async for key in self._redis.scan_iter(match=KEY_PREFIX + "*", count=256)]
        if not keys:
            return []
        values = await self._redis.mget(keys)
        return [WorkerRecord.from_json(v) for v in values if v is not None]

    async def close(self) -> None:
        await self._redis.aclose()


def heartbeat(client: object, record: WorkerRecord, ttl_s: float = DEFAULT_TTL_S) -> None:
    """One heartbeat from a worker's side, with a sync `redis.Redis` client."""
    client.set(redis_key(record.worker_id), record.to_json(), px=int(ttl_s * 1000))


def deregister(client: object, worker_id: str) -> None:
    client.delete(redis_key(worker_id))
