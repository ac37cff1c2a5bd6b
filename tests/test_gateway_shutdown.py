"""The gateway's shutdown ends, whatever its clients do: the worker pool closes within its bound when
the registry's client hangs in its close and swallows the poller's cancel (as gRPC and Redis clients
have done after connection errors), polls nothing after, and the process that stops serving exits
within the exit guard's deadline, with every thread's stack on stderr, when its teardown hangs."""

from __future__ import annotations

import asyncio
import io
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pdserve.router.registry import WorkerRecord
from pdserve.router.workers import WorkerPool
from tests.servers import CLUSTER_SECRET

ROOT = Path(__file__).parent.parent


class StuckRegistry:
    """A registry whose client, once stuck, waits forever, answers every cancel with an empty list
    instead of raising it, and never returns from close()."""

    def __init__(self) -> None:
        self.is_stuck = False
        self.is_waiting = asyncio.Event()

    async def list_workers(self) -> list[WorkerRecord]:
        if self.is_stuck:
            self.is_waiting.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                return []  # the cancel swallowed
        return []

    async def close(self) -> None:
        await asyncio.Event().wait()


def test_the_pool_closes_within_its_bound_and_leaves_no_task_when_its_registry_client_hangs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A task left running would hang `asyncio.run`'s teardown: the gateway process would never exit."""

    async def scenario() -> tuple[bool, float, list[asyncio.Task]]:
        registry = StuckRegistry()
        pool = WorkerPool(registry, CLUSTER_SECRET, poll_interval_s=0.02, close_timeout_s=0.5)
        await pool.start()
        registry.is_stuck = True
        await asyncio.wait_for(registry.is_waiting.wait(), 5)  # the poller is inside the stuck read
        started = time.monotonic()
        closing = asyncio.ensure_future(pool.close())
        done, _ = await asyncio.wait({closing}, timeout=10)
        elapsed = time.monotonic() - started
        await asyncio.sleep(0.2)  # what was cancelled has ended by now
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
        return bool(done), elapsed, left

    loop = asyncio.new_event_loop()  # not asyncio.run: its teardown would wait on a task that never ends
    try:
        with caplog.at_level(logging.WARNING, logger="pdserve.router.closing"):
            is_closed, elapsed, left = loop.run_until_complete(scenario())
    finally:
        loop.close()
    assert is_closed, "WorkerPool.close() did not return within 10 s"
    assert elapsed < 2.0, f"close took {elapsed:.2f} s with a 0.5 s bound per step"
    assert not left, f"tasks still running after close(): {left}"
    assert "closing the worker registry did not end within 0.5 s" in caplog.text


def python(code: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter, importing this checkout's pdserve."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=ROOT)


def test_a_process_whose_teardown_hangs_after_serving_exits_with_every_stack_on_stderr() -> None:
    code = """
import threading
from pdserve.deploy import exit_guard

def stuck_teardown():
    threading.Event().wait()  # a teardown step that never ends

exit_guard.arm(1.0)
stuck_teardown()
"""
    started = time.monotonic()
    try:
        result = python(code)
    except subprocess.TimeoutExpired:
        pytest.fail("the process was still running 30 s after its exit guard's 1 s deadline")
    assert time.monotonic() - started < 20
    assert result.returncode == 1
    assert "Timeout (0:00:01)!" in result.stderr
    assert "in stuck_teardown" in result.stderr, result.stderr  # where it hung


def test_arming_again_replaces_the_deadline_and_a_process_that_ends_in_time_exits_normally() -> None:
    """`pdserve serve` re-arms with a longer deadline while it stops its workers."""
    code = """
import time
from pdserve.deploy import exit_guard

exit_guard.arm(0.5)
exit_guard.arm(5.0)
time.sleep(1.5)
print("still here")
"""
    result = python(code)
    assert (result.returncode, result.stdout.strip()) == (0, "still here"), result.stderr


def test_without_a_real_stderr_the_shutdown_goes_on_without_a_guard(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from pdserve.deploy import exit_guard

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # no file descriptor for the stacks
    with caplog.at_level(logging.WARNING, logger="pdserve.deploy.exit_guard"):
        exit_guard.arm(1.0)
    assert "no exit guard at shutdown" in caplog.text
