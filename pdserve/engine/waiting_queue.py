"""`WaitingQueue`: the requests a scheduler has not started, in the order it serves them. Under
`fcfs` (the default) by arrival, a preempted request (or a sibling to fork) back at the front; under
`priority` (vLLM's `--scheduling-policy priority`) by `(params.priority, arrival)`, lower values
first, a request put back going where its key says. The same key picks the running request a
scheduler preempts first (`serving_key`: the largest goes)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from pdserve.engine.config import SCHEDULING_POLICIES
from pdserve.engine.request import Request


def serving_key(request: Request) -> tuple[int, float]:
    """Lower first: the request's priority, then its arrival."""
    return request.params.priority, request.arrival_time


class WaitingQueue:
    def __init__(self, policy: str = "fcfs") -> None:
        if policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling policy must be one of {', '.join(SCHEDULING_POLICIES)}; got {policy!r}")
        self.by_priority = policy == "priority"
        self._queue: deque[Request] = deque()

    def add(self, request: Request) -> None:
        """A new request: last of its priority."""
        if self.by_priority:
            self._insert(request)
        else:
            self._queue.append(request)

    def put_back(self, request: Request) -> None:
        """A request that was started (preempted, or a sibling whose fork found no block)."""
        if self.by_priority:
            self._insert(request)
        else:
            self._queue.appendleft(request)

    def peek(self) -> Request:
        return self._queue[0]

    def pop(self) -> Request:
        return self._queue.popleft()

    def remove(self, request: Request) -> None:
        self._queue.remove(request)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._queue)

    def __len__(self) -> int:
        return len(self._queue)

    def __contains__(self, request: object) -> bool:
        return request in self._queue

    def _insert(self, request: Request) -> None:
        """After every request whose key is not larger (the search from the back: new requests of
        one priority arrive in order)."""
        key, i = serving_key(request), len(self._queue)
        while i > 0 and serving_key(self._queue[i - 1]) > key:
            i -= 1
        self._queue.insert(i, request)
