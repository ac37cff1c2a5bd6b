"""`end_within`: the gateway's shutdown steps, each bounded. A gRPC or Redis client can hang in its
close, or swallow a cancellation, after connection errors (grpc/grpc#29560, redis/redis-py#3941,
redis/redis-py#2028); a shutdown step that waits on one must still end, and say what it left."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable

logger = logging.getLogger(__name__)


async def end_within(awaitables: Iterable[Awaitable[object]], timeout_s: float, what: str) -> bool:
    """Awaits `awaitables` for at most `timeout_s`. What has not ended by then is cancelled and left
    behind (logged with where it waits); unlike `asyncio.wait_for`, this never waits on a
    cancellation that is not honoured. Errors are logged, not raised: the shutdown goes on. True if
    everything ended in time."""
    tasks = {asyncio.ensure_future(a) for a in awaitables}
    if not tasks:
        return True
    done, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            logger.warning("%s failed: %r", what, task.exception())
    for task in pending:
        task.cancel()
        frames = task.get_stack(limit=1)
        where = f"{frames[0].f_code.co_filename}:{frames[0].f_lineno}" if frames else "?"
        logger.warning("%s did not end within %g s; left behind (%s waits at %s)", what, timeout_s, task.get_name(), where)
    return not pending
