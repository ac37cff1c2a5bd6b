"""Which workers exist: in memory (one gateway, the launcher registers workers directly) or in
Redis (several gateways; each worker heartbeats a key with a TTL, so a dead worker disappears).
A Redis entry is signed with the cluster secret (HMAC-SHA256 over the record's canonical JSON);
one that is forged, unsigned or malformed is skipped and logged, and never stops discovery."""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from pdserve.proto.cluster_secret import ClusterSecret

logger = logging.getLogger(__name__)
KEY_PREFIX = "pdserve:worker:"
DEFAULT_TTL_S = 10.0
SIGNATURE_PURPOSE = "registry-record"
MAX_ENTRY_BYTES = 4096  # a signed record is ~250 bytes
MAX_ENTRIES = 10_000  # keys read per listing: junk keys cannot make one unbounded
LOG_INTERVAL_S = 60.0
_WORKER_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_ADDRESS = re.compile(r"([A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]):\d{1,5}")


class InvalidRecordError(ValueError):
    """A registry entry that is not a worker record signed with this cluster's secret."""


@dataclass(frozen=True)
class WorkerRecord:
    worker_id: str
    role: str  # "prefill" | "decode"
    address: str  # host:port of its gRPC server

    def canonical(self) -> bytes:
        """What is signed: the record as JSON with sorted keys and no spaces."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    def signed_json(self, secret: ClusterSecret) -> str:
        return json.dumps({"record": asdict(self), "signature": secret.sign(SIGNATURE_PURPOSE, self.canonical())})

    @classmethod
    def from_signed_json(cls, key: str, value: bytes | str, secret: ClusterSecret) -> WorkerRecord:
        """The record stored under `key`; InvalidRecordError naming what is wrong with it."""
        if len(value) > MAX_ENTRY_BYTES:
            raise InvalidRecordError(f"{len(value)} bytes, over {MAX_ENTRY_BYTES}")
        try:
            entry = json.loads(value)
            fields, signature = entry["record"], entry["signature"]
            record = cls(**fields) if _is_flat(fields) else None
        except (ValueError, TypeError, KeyError) as error:
            raise InvalidRecordError(f"not a signed worker record ({type(error).__name__})") from None
        if record is None or not isinstance(signature, str):
            raise InvalidRecordError("not a signed worker record (nested or non-string fields)")
        if not secret.verify(SIGNATURE_PURPOSE, record.canonical(), signature):
            raise InvalidRecordError("bad signature: forged, or signed by another cluster")
        _check_fields(record, key)
        return record


def _is_flat(fields: object) -> bool:
    return isinstance(fields, dict) and all(isinstance(v, (str, int, float, bool)) for v in fields.values())


def _check_fields(record: WorkerRecord, key: str) -> None:
    if record.role not in ("prefill", "decode"):
        raise InvalidRecordError(f"role {record.role!r} is not prefill or decode")
    if not isinstance(record.worker_id, str) or not _WORKER_ID.fullmatch(record.worker_id) or key != redis_key(record.worker_id):
        raise InvalidRecordError("worker_id is malformed or does not match its key")
    if not isinstance(record.address, str) or not _ADDRESS.fullmatch(record.address):
        raise InvalidRecordError(f"address {str(record.address)[:100]!r} is not host:port")


def redis_key(worker_id: str) -> str:
    return KEY_PREFIX + worker_id


def redacted_url(url: str) -> str:
    """`url` without its password, for logs (`redis://user:***@host:port/0`)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class Registry(Protocol):
    async def list_workers(self) -> list[WorkerRecord]: ...

    async def close(self) -> None: ...


class InMemoryRegistry:
    """Records the launcher itself made (trusted as they are: they never left the process)."""

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


def check_redis_url(url: str, flag: str = "--redis-url") -> None:
    """Raises ValueError naming `flag` when `url` is not one redis-py can connect with
    (`redis://`, `rediss://`, `unix://`); it connects to nothing."""
    from redis.connection import parse_url

    try:
        parse_url(url)
    except ValueError as exc:
        raise ValueError(f"{flag} {url!r}: {exc}") from exc


class RedisRegistry:
    """Reads the records workers keep alive with `heartbeat` (`SET key value EX ttl`). `url` may
    carry a user and password (`redis://user:pass@host:port/0`) and use TLS (`rediss://`)."""

    def __init__(self, url: str, secret: ClusterSecret, timeout_s: float = 2.0) -> None:
        import redis.asyncio as aioredis

        self._redis = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._secret = secret
        self._ignored = _IgnoredEntries()

    async def list_workers(self) -> list[WorkerRecord]:
        keys = []
        async for key in self._redis.scan_iter(match=KEY_PREFIX + "*", count=256):
            keys.append(key)
            if len(keys) >= MAX_ENTRIES:
                break
        values = await self._redis.mget(keys) if keys else []
        records = []
        for key, value in zip(keys, values):
            if value is None:  # expired between the scan and the read
                continue
            name = key.decode(errors="replace")
            try:
                records.append(WorkerRecord.from_signed_json(name, value, self._secret))
            except InvalidRecordError as error:
                self._ignored.add(name, str(error))
        self._ignored.log()
        return records

    async def close(self) -> None:
        await self._redis.aclose()


class _IgnoredEntries:
    """Ignored entries are logged at once, then at most once a minute: a flood of junk keys must
    not flood the log."""

    def __init__(self) -> None:
        self._examples: list[str] = []
        self._num_ignored = 0
        self._logged_at = -LOG_INTERVAL_S

    def add(self, key: str, reason: str) -> None:
        self._num_ignored += 1
        if len(self._examples) < 3:
            self._examples.append(f"{key[:160]!r}: {reason}")

    def log(self) -> None:
        now = time.monotonic()
        if self._num_ignored and now - self._logged_at >= LOG_INTERVAL_S:
            logger.warning(
                "ignored %d registry entries that are not signed worker records; e.g. %s",
                self._num_ignored,
                "; ".join(self._examples),
            )
            self._logged_at = now
        self._examples, self._num_ignored = [], 0


def heartbeat(client: Any, record: WorkerRecord, secret: ClusterSecret, ttl_s: float = DEFAULT_TTL_S) -> None:
    """One heartbeat from a worker's side, with a sync `redis.Redis` client: the record, signed."""
    client.set(redis_key(record.worker_id), record.signed_json(secret), px=int(ttl_s * 1000))


def deregister(client: Any, worker_id: str) -> None:
    client.delete(redis_key(worker_id))
