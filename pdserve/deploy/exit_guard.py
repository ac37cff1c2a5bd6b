"""The gateway process's last bound at shutdown: once it has stopped serving, it must be gone within
a deadline. If something hangs in the teardown (a client's close, a task that ignores its cancel, a
thread that never joins), every thread's stack goes to stderr and the process exits with status 1,
by faulthandler's own timer thread, which needs neither the GIL nor the event loop."""

from __future__ import annotations

import faulthandler
import logging
import sys

logger = logging.getLogger(__name__)
EXIT_TIMEOUT_S = 30.0  # closing the backend is bounded to ~15 s (router/closing.py); the rest is teardown


def arm(timeout_s: float = EXIT_TIMEOUT_S) -> None:
    """From now, the process has `timeout_s` to exit; arming again replaces the deadline. Without a
    real stderr (no file descriptor to write the stacks to) there is no guard, and a warning."""
    try:
        faulthandler.dump_traceback_later(timeout_s, exit=True, file=sys.stderr)
    except (AttributeError, ValueError, OSError, RuntimeError) as exc:  # stderr None, closed, or no fileno()
        logger.warning("no exit guard at shutdown: %s", exc)
