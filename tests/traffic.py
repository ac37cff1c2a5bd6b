"""A steady stream of greedy requests through the official `openai` client, each checked against the
offline engine's answer, while a test rescales or kills workers; and waiting on the pools."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import openai

from pdserve.deploy.admin_client import AdminClient, render


@dataclass(frozen=True)
class Case:
    prompt: str
    token_ids: list[int]  # the offline engine's greedy answer
    text: str


@dataclass
class Outcome:
    case: int
    is_stream: bool
    error: str | None  # None: exactly the offline engine's answer


@dataclass
class RequestStream:
    """`num_threads` clients in a loop until `stop()`; odd ones stream (SSE), even ones do not."""

    base_url: str
    model: str
    cases: list[Case]
    max_tokens: int
    num_threads: int = 4
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.num_threads)]

    def __enter__(self) -> RequestStream:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)

    @property
    def num_done(self) -> int:
        with self._lock:
            return len(self.outcomes)

    def failures(self) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if o.error is not None]

    def wait_for(self, num_more: int, timeout_s: float = 60) -> None:
        target, deadline = self.num_done + num_more, time.monotonic() + timeout_s
        while self.num_done < target:
            assert time.monotonic() < deadline, f"only {self.num_done} of {target} requests done after {timeout_s} s"
            time.sleep(0.1)

    def _run(self, index: int) -> None:
        client = openai.OpenAI(base_url=self.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        is_stream, n = index % 2 == 1, index
        while not self._stop.is_set():
            case = self.cases[n % len(self.cases)]
            try:
                error = self._stream(client, case) if is_stream else self._whole(client, case)
            except Exception as exc:  # noqa: BLE001 - every failure is recorded and asserted on
                error = f"{type(exc).__name__}: {exc}"
            with self._lock:
                self.outcomes.append(Outcome(n % len(self.cases), is_stream, error))
            n += self.num_threads

    def _whole(self, client: openai.OpenAI, case: Case) -> str | None:
        got = client.completions.create(
            model=self.model,
            prompt=case.prompt,
            max_tokens=self.max_tokens,
            temperature=0.0,
            logprobs=1,
            extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
        )
        token_ids = [int(t.split(":", 1)[1]) for t in got.choices[0].logprobs.tokens]
        return None if token_ids == case.token_ids else f"tokens {token_ids} != {case.token_ids}"

    def _stream(self, client: openai.OpenAI, case: Case) -> str | None:
        chunks = list(
            client.completions.create(
                model=self.model,
                prompt=case.prompt,
                max_tokens=self.max_tokens,
                temperature=0.0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
        )
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        return None if (text, finish) == (case.text, "length") else f"stream {text!r} ({finish}) != {case.text!r}"


def wait_for_pools(admin: AdminClient, condition: object, timeout_s: float, what: str) -> dict:
    """Polls /admin/pools until `condition(view)`; returns that view."""
    deadline = time.monotonic() + timeout_s
    while True:
        view = admin.pools()
        if condition(view):
            return view
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}\n{render(view)}"
        time.sleep(0.25)


def ready(view: dict, pool: str) -> list[dict]:
    return [w for w in view["pools"][pool]["workers"] if w["state"] == "ready"]


def settled(pool: str, replicas: int) -> object:
    def condition(view: dict) -> bool:
        p = view["pools"][pool]
        return p["desired"] == replicas and len(ready(view, pool)) == replicas == len(p["workers"])

    return condition
