"""`RedisPrefixShare`: the gateways of one cluster tell each other where they sent which prompt
prefixes, so that a prompt whose prefix another gateway routed to a prefill worker (or, from a
prefill worker, to a decode worker: a pair record) goes there too. Each gateway publishes its `PrefixIndex` records on a Redis channel, batched every FLUSH_INTERVAL_S
into messages of at most MAX_MESSAGE_BYTES, each signed with the cluster secret and stamped with its
time; each gateway applies the others'. Pub/sub keeps nothing: a gateway that was disconnected, or
started later, learns from the next records on (its routing is only an estimate anyway, and a miss
costs a prefill, never a wrong answer). A message is dropped, and logged at most once a minute, when
its signature does not verify (checked before it is parsed), when it is older than REPLAY_WINDOW_S,
oversized or malformed. Every gateway also hears its own messages (a heartbeat when it has nothing
to say): a subscription that hears nothing for STALE_S is taken as dead and made again."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from pdserve.proto.cluster_secret import ClusterSecret
from pdserve.router.closing import end_within
from pdserve.router.prefix_index import PrefixIndex
from pdserve.router.throttled_log import ThrottledLog

logger = logging.getLogger(__name__)
CHANNEL = "pdserve:prefixes"
SIGNATURE_PURPOSE = "prefix-share"
FLUSH_INTERVAL_S = 0.05
HEARTBEAT_S = 5.0  # a gateway with nothing to publish says so this often
STALE_S = 20.0  # a subscription that heard nothing (not even its own heartbeat) this long is made again
REPLAY_WINDOW_S = 60.0  # a message stamped further from now than this is dropped
MAX_MESSAGE_BYTES = 1 << 20
MAX_RECORD_BLOCKS = 8192  # a record's first blocks at most (a prompt of 128k tokens at 16 a block)
MAX_PENDING_BLOCKS = 1 << 18  # waiting for the next flush; beyond, the oldest records are dropped
BYTES_PER_BLOCK = 21  # a 64-bit hash in JSON, with its comma
RECONNECT_S = 1.0
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
        """`capacity_of(worker)`: that worker's KV blocks, or None for one this gateway does not
        know (yet): its records are skipped."""
        import redis.asyncio as aioredis

        self._redis = aioredis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
        self._secret = secret
        self._index = index
        self._capacity_of = capacity_of
        self._timeout_s = timeout_s
        self.gateway_id = uuid.uuid4().hex
        self._pending: deque[tuple[str, list[int]]] = deque()
        self._num_pending_blocks = 0
        self._tasks: list[asyncio.Task] = []
        self._log = ThrottledLog(logger).warning

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._publish_forever()), asyncio.create_task(self._listen_forever())]

    def publish(self, worker: str, hashes: list[int]) -> None:
        """This gateway sent a prompt with these blocks to `worker` (sent with the next batch)."""
        hashes = hashes[:MAX_RECORD_BLOCKS]
        self._pending.append((worker, hashes))
        self._num_pending_blocks += len(hashes)
        while self._num_pending_blocks > MAX_PENDING_BLOCKS:
            self._num_pending_blocks -= len(self._pending.popleft()[1])

    async def close(self) -> None:
        """Stops publishing and listening; bounded even when the Redis client hangs in its close."""
        for task in self._tasks:
            task.cancel()
        await end_within(self._tasks, CLOSE_TIMEOUT_S, "the prefix share's tasks")
        await end_within([self._redis.aclose()], CLOSE_TIMEOUT_S, "closing the prefix share's Redis client")

    # -- publishing -------------------------------------------------------------------------------
    def message(self, records: list[tuple[str, list[int]]], now: float | None = None) -> bytes:
        """One signed message: `<signature> <body>`, the signature over the body's bytes."""
        body = json.dumps(
            {"gateway": self.gateway_id, "time": time.time() if now is None else now, "records": records},
            separators=(",", ":"),
        ).encode()
        return self._secret.sign(SIGNATURE_PURPOSE, body).encode() + b" " + body

    def batches(self, records: list[tuple[str, list[int]]]) -> list[list[tuple[str, list[int]]]]:
        """`records` in batches whose messages stay well under MAX_MESSAGE_BYTES."""
        batches: list[list[tuple[str, list[int]]]] = [[]]
        size = 0
        for record in records:
            record_size = 100 + BYTES_PER_BLOCK * len(record[1])
            if batches[-1] and size + record_size > MAX_MESSAGE_BYTES // 2:
                batches.append([])
                size = 0
            batches[-1].append(record)
            size += record_size
        return batches

    async def _publish_forever(self) -> None:
        last_sent = time.monotonic()
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            if not self._pending and time.monotonic() - last_sent < HEARTBEAT_S:
                continue
            records, self._pending, self._num_pending_blocks = list(self._pending), deque(), 0
            last_sent = time.monotonic()
            try:
                for batch in self.batches(records):
                    await asyncio.wait_for(self._redis.publish(CHANNEL, self.message(batch)), self._timeout_s)
            except Exception as exc:  # noqa: BLE001 - Redis away: these records are lost, routing goes on
                self._log(f"cannot publish prefix records ({exc})")

    # -- applying the other gateways' records -----------------------------------------------------
    async def _listen_forever(self) -> None:
        while True:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await asyncio.wait_for(pubsub.subscribe(CHANNEL), self._timeout_s)
                    heard_at = time.monotonic()
                    while time.monotonic() - heard_at < STALE_S:
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                        if message is not None:
                            heard_at = time.monotonic()
                            self.apply(message["data"])
                    raise ConnectionError(f"nothing heard on {CHANNEL} for {STALE_S:g} s, not even this gateway's own")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis away, restarted or silent: subscribe again
                self._log(f"prefix records from the other gateways are not readable ({exc}); subscribing again")
                await asyncio.sleep(RECONNECT_S)

    def apply(self, data: bytes | str, now: float | None = None) -> None:
        """One message of the channel: the records of another gateway of this cluster, or dropped."""
        records = self._records(data.encode() if isinstance(data, str) else data, time.time() if now is None else now)
        for worker, hashes in records or []:
            capacity = self._capacity_of(worker)
            if capacity is not None:
                self._index.record(worker, hashes, capacity)

    def _records(self, data: bytes, now: float) -> list[tuple[str, list[int]]] | None:
        if len(data) > MAX_MESSAGE_BYTES:
            self._log(f"dropped a prefix message of {len(data)} bytes")
            return None
        signature, _, body = data.partition(b" ")
        if not self._secret.verify(SIGNATURE_PURPOSE, body, signature):
            self._log("dropped a prefix message with a bad signature: forged, or from another cluster")
            return None
        try:
            message: Any = json.loads(body)
            if message["gateway"] == self.gateway_id:
                return None  # our own, already in the index (or a heartbeat)
            if not abs(now - float(message["time"])) <= REPLAY_WINDOW_S:
                self._log("dropped a prefix message stamped more than a minute from now (a replay, or a clock off)")
                return None
            return [(str(worker), [int(h) for h in hashes[:MAX_RECORD_BLOCKS]]) for worker, hashes in message["records"]]
        except Exception as exc:  # noqa: BLE001 - signed yet malformed (another version?): dropped, never fatal
            self._log(f"dropped a malformed prefix message ({type(exc).__name__})")
            return None
