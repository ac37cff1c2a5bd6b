"""`RedisPrefixShare`: the gateways of one cluster tell each other where they sent which prompt
prefixes, so that a prompt whose prefix another gateway routed to a prefill worker goes there too.
Each gateway publishes its `PrefixIndex` records on a Redis channel, batched every FLUSH_INTERVAL_S,
signed with the cluster secret; each applies the others'. Pub/sub keeps nothing: a gateway that was
disconnected, or started later, learns from the next records on (its routing is only an estimate
anyway, and a miss costs a prefill, never a wrong answer). A message that is unsigned, forged,
malformed or oversized is dropped and logged at most once a minute."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from pdserve.proto.cluster_secret import ClusterSecret
from pdserve.router.closing import end_within
from pdserve.router.prefix_index import PrefixIndex

logger = logging.getLogger(__name__)
CHANNEL = "pdserve:prefixes"
SIGNATURE_PURPOSE = "prefix-index"
FLUSH_INTERVAL_S = 0.05
MAX_MESSAGE_BYTES = 4 << 20
MAX_PENDING_RECORDS = 4096  # records waiting for the next flush; beyond, the oldest are dropped
RECONNECT_S = 1.0
LOG_INTERVAL_S = 60.0
CLOSE_TIMEOUT_S = 5.0


class RedisPrefixShare:
    def __init__(
        self,
        url: str,
        secret: ClusterSecret,
        index: PrefixIndex,
        capacity_of: Callable[[str], int | None],
        timeout_s: float = 2.0,
    ) -> None:
        """`capacity_of(worker_id)`: that worker's KV blocks, or None for a worker this gateway does
        not know (yet): its records are skipped."""
        import redis.asyncio as aioredis

        # No read timeout: the subscription waits for messages; a dead connection is found by its
        # health checks, and a publish is bounded by `timeout_s`.
        self._redis = aioredis.Redis.from_url(url, socket_connect_timeout=timeout_s, health_check_interval=30)
        self._timeout_s = timeout_s
        self._secret = secret
        self._index = index
        self._capacity_of = capacity_of
        self.gateway_id = uuid.uuid4().hex
        self._pending: list[tuple[str, list[int]]] = []
        self._tasks: list[asyncio.Task] = []
        self._last_logged = -LOG_INTERVAL_S

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._publish_forever()), asyncio.create_task(self._listen_forever())]

    def publish(self, worker_id: str, hashes: list[int]) -> None:
        """This gateway sent a prompt with these blocks to `worker_id` (sent with the next batch)."""
        self._pending.append((worker_id, hashes))
        del self._pending[:-MAX_PENDING_RECORDS]

    async def close(self) -> None:
        """Stops publishing and listening; bounded even when the Redis client hangs in its close."""
        for task in self._tasks:
            task.cancel()
        await end_within(self._tasks, CLOSE_TIMEOUT_S, "the prefix share's tasks")
        await end_within([self._redis.aclose()], CLOSE_TIMEOUT_S, "closing the prefix share's Redis client")

    # -- publishing -------------------------------------------------------------------------------
    def message(self, records: list[tuple[str, list[int]]]) -> bytes:
        body = json.dumps({"gateway": self.gateway_id, "records": records}, separators=(",", ":"))
        return json.dumps({"body": body, "signature": self._secret.sign(SIGNATURE_PURPOSE, body.encode())}).encode()

    async def _publish_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            if not self._pending:
                continue
            records, self._pending = self._pending, []
            try:
                await asyncio.wait_for(self._redis.publish(CHANNEL, self.message(records)), self._timeout_s)
            except Exception as exc:  # noqa: BLE001 - Redis away: these records are lost, routing goes on
                self._log(f"cannot publish prefix records ({exc})")

    # -- applying the other gateways' records -----------------------------------------------------
    async def _listen_forever(self) -> None:
        while True:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(CHANNEL)
                    async for message in pubsub.listen():
                        self.apply(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis away or restarted: subscribe again
                self._log(f"prefix records from the other gateways are not readable ({exc}); retrying")
                await asyncio.sleep(RECONNECT_S)

    def apply(self, data: bytes | str) -> None:
        """One message of the channel: the records of another gateway of this cluster, or dropped."""
        records = self._records(data)
        if records is None:
            return
        for worker_id, hashes in records:
            capacity = self._capacity_of(worker_id)
            if capacity is not None:
                self._index.record(worker_id, hashes, capacity)

    def _records(self, data: bytes | str) -> list[tuple[str, list[int]]] | None:
        if len(data) > MAX_MESSAGE_BYTES:
            self._log(f"dropped a prefix message of {len(data)} bytes")
            return None
        try:
            envelope = json.loads(data)
            body, signature = envelope["body"], envelope["signature"]
            if not isinstance(body, str) or not isinstance(signature, str):
                raise TypeError
            if not self._secret.verify(SIGNATURE_PURPOSE, body.encode(), signature):
                self._log("dropped a prefix message with a bad signature: forged, or from another cluster")
                return None
            message: Any = json.loads(body)
            if message["gateway"] == self.gateway_id:
                return None  # our own, already in the index
            return [(str(worker_id), [int(h) for h in hashes]) for worker_id, hashes in message["records"]]
        except (ValueError, TypeError, KeyError) as exc:
            self._log(f"dropped a malformed prefix message ({type(exc).__name__})")
            return None

    def _log(self, what: str) -> None:
        now = time.monotonic()
        if now - self._last_logged >= LOG_INTERVAL_S:
            self._last_logged = now
            logger.warning(what)
