"""The aggregator's policy: a deadline-aware join table of the edges' tokens, by request.

A request is complete when all N parts are in; it is *due* when its deadline passes or every edge it
still waits for has gone silent. The table is bounded: at most ``max_pending`` open requests (the
oldest is evicted first, answered as overloaded) and a bounded memory of answered keys, so late or
duplicated features are dropped instead of reopening a request.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

Key = tuple[str, int]  # (client, request id): ids are unique per client


@dataclass
class Pending:
    parts: list[np.ndarray | None]  # per part: its prefix tokens [P, D_part], or None while missing
    first_seen: float  # time.monotonic()
    edge_compute_ms: float = 0.0  # the slowest edge decides the latency
    edge_queue_ms: float = 0.0
    filled: int = 0
    client_sent: float | None = None  # the client's send stamp (time.time()), as the first part carried it

    def missing(self) -> list[int]:
        return [i for i, p in enumerate(self.parts) if p is None]


@dataclass
class JoinTable:
    num_parts: int
    deadline_s: float
    max_pending: int = 10000
    pending: OrderedDict[Key, Pending] = field(default_factory=OrderedDict)
    answered: OrderedDict[Key, None] = field(default_factory=OrderedDict)
    count: Callable[[str], None] = lambda name: None  # told of "late_features", "duplicate_features"
    complete: list[Key] = field(default_factory=list)  # completed since the last take_complete()

    def add(self, key: Key, part: int, tokens: np.ndarray, compute_ms: float, queue_ms: float,
            now: float, client_sent: float | None = None) -> list[Key]:
        """Record one part of one request; returns the keys evicted to stay within ``max_pending``."""
        if key in self.answered:
            self.count("late_features")
            return []
        entry = self.pending.get(key)
        evicted: list[Key] = []
        if entry is None:
            entry = self.pending[key] = Pending([None] * self.num_parts, now, client_sent=client_sent)
            while len(self.pending) > self.max_pending:
                old, _ = self.pending.popitem(last=False)
                evicted.append(old)
                self.remember(old)  # answered (as overloaded): its late parts must not reopen it
        if entry.parts[part] is not None:
            self.count("duplicate_features")
            return evicted
        entry.parts[part] = np.array(tokens)  # a copy: a view would pin the whole received frame
        entry.filled += 1
        entry.edge_compute_ms = max(entry.edge_compute_ms, compute_ms)
        entry.edge_queue_ms = max(entry.edge_queue_ms, queue_ms)
        if entry.filled == self.num_parts:
            self.complete.append(key)
        return evicted

    def take_complete(self) -> list[Key]:
        """Requests completed since the last call (not a scan of every pending request)."""
        done = [k for k in dict.fromkeys(self.complete) if k in self.pending]  # once each, still open
        self.complete.clear()
        return done

    def due(self, now: float, silent_parts: set[int]) -> list[Key]:
        """Requests past their deadline, or waiting only for parts whose edges went silent."""
        out = []
        for key, entry in self.pending.items():
            if now - entry.first_seen >= self.deadline_s or (silent_parts and set(entry.missing()) <= silent_parts):
                out.append(key)
            elif not silent_parts:
                break  # entries are in arrival order: the rest are younger
        return out

    def pop(self, keys: Iterable[Key]) -> list[Pending]:
        return [self.pending.pop(k) for k in keys]

    def chunks(self, keys: list[Key], size: int) -> Iterable[list[Key]]:
        """``keys`` in fusion batches of at most ``size``."""
        for lo in range(0, len(keys), size):
            yield keys[lo: lo + size]

    def drop(self, key: Key) -> None:
        self.pending.pop(key, None)

    def remember(self, key: Key) -> None:
        self.answered[key] = None
        while len(self.answered) > 4 * self.max_pending:
            self.answered.popitem(last=False)

    def is_answered(self, key: Key) -> bool:
        return key in self.answered

    def wait_s(self, now: float) -> float:
        """How long the loop may block before the oldest request is due (capped at 50 ms)."""
        if not self.pending:
            return 0.2
        oldest = next(iter(self.pending.values()))
        return min(max(oldest.first_seen + self.deadline_s - now, 0.0), 0.05)
