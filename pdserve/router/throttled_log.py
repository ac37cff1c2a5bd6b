"""`ThrottledLog`: a warning at most once a minute, so that an outage or a flood of bad messages,
which would say the same thing on every request, does not flood the log."""

from __future__ import annotations

import logging
import math
import time

INTERVAL_S = 60.0


class ThrottledLog:
    def __init__(self, logger: logging.Logger, interval_s: float = INTERVAL_S) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._logged_at = -math.inf

    def warning(self, message: str) -> None:
        """Logs `message` unless a warning went out less than the interval ago."""
        now = time.monotonic()
        if now - self._logged_at >= self._interval_s:
            self._logged_at = now
            self._logger.warning(message)
