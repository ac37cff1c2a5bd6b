"""The gateway process's last bound at shutdown: once it has stopped serving, it must be gone within
a deadline. If something hangs in the teardown (a client's close, a task that ignores its cancel, a
thread that never joins), every thread's stack goes to stderr and the process exits with status 1,
by faulthandler's own timer thread, which needs neither the GIL nor the event loop."""

from __future__ import annotations

import faulthandler
import sys

EXIT_TIMEOUT_S = 30.0  # closing the backend is bounded to ~15 s (router/closing.py); the rest is teardown


def arm(timeout_s: float = EXIT_TIMEOUT_S) -> None:
    """From now, the process has `timeout_s` to exit; arming again replaces the deadline."""
    faulthandler.dump_traceback_later(timeout_s, exit=True, file=sys.stderr)


def disarm() -> None:
    faulthandler.cancel_dump_traceback_later()
