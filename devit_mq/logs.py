"""Logging that a flood cannot turn into a disk-filling stream.

A node that receives 10,000 bad frames must say so, but not 10,000 times: :class:`RateLimitedLog`
writes the first occurrence of each kind of event at once and then at most one line per ``interval_s``
for it, saying how many were folded into that line.
"""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    """``log.warn("wire", "%s: dropped malformed message (%s)", name, exc)``: one line per ``key``
    per ``interval_s``, the next one carrying ``(+N similar)``. At most ``max_keys`` keys are tracked
    (keys are the code's own event names, not peer-chosen strings)."""

    def __init__(self, logger: logging.Logger, interval_s: float = 5.0, max_keys: int = 256) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, key: str, fmt: str, *args: object, exc_info: bool = False) -> None:
        if not self.logger.isEnabledFor(level):
            return
        now = time.monotonic()
        if key not in self._last and len(self._last) >= self.max_keys:
            key = "other"  # before the throttle lookup, so the shared key is rate-limited too
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        folded = self._suppressed.pop(key, 0)
        self._last[key] = now
        if folded:
            fmt += f" (+{folded} similar in the last {now - (last or now):.0f} s)"
        self.logger.log(level, fmt, *args, exc_info=exc_info)

    def warning(self, key: str, fmt: str, *args: object) -> None:
        self.log(logging.WARNING, key, fmt, *args)

    def info(self, key: str, fmt: str, *args: object) -> None:
        self.log(logging.INFO, key, fmt, *args)
