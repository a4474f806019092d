"""The client's adaptive concurrency limit: admission control that every edge agrees on.

Edges refuse requests that waited too long (``max_queue_ms``), but each edge decides on its own
clock: past capacity two edges refuse *different* requests, and the work each did on a request the
other refused is wasted (measured at 2x capacity: 0.4x of the capacity served). The client is the
one place that sees a request before it fans out, so a refusal there holds for every edge.

The limit is AIMD, as TCP's congestion window: ``overloaded`` answers from the system are the
congestion signal. On the first such answer to a request sent since the last cut, the limit drops
to half of what was in flight (one cut per round trip, however many stale requests are refused
together); every answered request raises it by ``1 / limit`` (one more per round trip). A submit
that would exceed the limit is answered ``overloaded`` at once without being sent, unless nothing is
in flight (so progress never stops). A system that never answers ``overloaded`` (no admission control
configured) never moves the limit from ``max_limit``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ConcurrencyLimit:
    max_limit: float = 4096.0
    min_limit: float = 1.0
    limit: float = 4096.0
    epoch: int = 0  # how many cuts so far: a request remembers the epoch it was sent in
    cuts: int = 0

    def admits(self, in_flight: int, batch: int) -> bool:
        """May ``batch`` more requests go out with ``in_flight`` outstanding?"""
        return in_flight == 0 or in_flight + batch <= self.limit

    def on_answer(self) -> None:
        self.limit = min(self.max_limit, self.limit + 1.0 / self.limit)

    def on_overloaded(self, sent_epoch: int, in_flight: int) -> None:
        """An ``overloaded`` answer to a request sent in ``sent_epoch``; ``in_flight`` outstanding now."""
        if sent_epoch != self.epoch:
            return  # sent before the last cut: that cut already answered this congestion
        self.limit = max(self.min_limit, min(self.limit, in_flight + 1) / 2.0)
        self.epoch += 1
        self.cuts += 1
