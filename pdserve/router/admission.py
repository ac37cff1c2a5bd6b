"""`Admission`: bounds what this gateway has accepted but not yet started answering (requests
without a first token, and their prompt tokens). Beyond the bounds a request is refused at once
with 503 + Retry-After instead of joining an unbounded queue."""

from __future__ import annotations

from pdserve.proto.failures import Failure
from pdserve.router.backend import BackendFailure


class Ticket:
    """One admitted request's place in the queue; `release` (idempotent) gives it back."""

    def __init__(self, admission: Admission, num_tokens: int) -> None:
        self._admission = admission
        self.num_tokens = num_tokens
        self.is_released = False

    def release(self) -> None:
        if not self.is_released:
            self.is_released = True
            self._admission.num_queued_reqs -= 1
            self._admission.num_queued_tokens -= self.num_tokens


class Admission:
    def __init__(self, max_num_queued_reqs: int, max_num_queued_tokens: int) -> None:
        self.max_num_queued_reqs = max_num_queued_reqs
        self.max_num_queued_tokens = max_num_queued_tokens
        self.num_queued_reqs = 0
        self.num_queued_tokens = 0

    def admit(self, num_tokens: int) -> Ticket:
        """A ticket, or BackendFailure(OVERLOADED). An empty queue takes any prompt, so a prompt
        longer than the token bound is served alone rather than never."""
        is_full = self.num_queued_reqs >= self.max_num_queued_reqs
        is_full |= self.num_queued_reqs > 0 and self.num_queued_tokens + num_tokens > self.max_num_queued_tokens
        if is_full:
            raise BackendFailure(
                Failure.OVERLOADED,
                f"the server is overloaded: {self.num_queued_reqs} requests ({self.num_queued_tokens} prompt tokens) "
                f"are already waiting for their first token; try again shortly",
            )
        self.num_queued_reqs += 1
        self.num_queued_tokens += num_tokens
        return Ticket(self, num_tokens)
