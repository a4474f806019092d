"""Fault injection at the application level: this kernel has no netem, so tests and stress runs
wrap a transport to drop, delay (with jitter, hence reorder), duplicate or corrupt what it sends.

Delays need no thread (the wrapped transport may not be thread-safe): delayed messages wait in a
heap and go out from inside later ``send``/``recv``/``flush`` calls once due; ``recv`` wakes up in
time for the next one. ``close`` drops what is still delayed, as a link going down would.
"""

from __future__ import annotations

import heapq
import itertools
import random
import time
from collections.abc import Collection, Sequence

from .base import Inbound, Peer, Transport, TransportError


class FaultyTransport(Transport):
    """Wraps ``inner``'s ``send`` and ``reply``. Probabilities are per message; ``delay_s`` plus a uniform
    ``[0, jitter_s)`` is added to every message; ``corrupt`` flips one random bit of one frame.
    ``peers`` limits the faults to sends to those peers. ``stats`` counts what was done."""

    def __init__(self, inner: Transport, drop: float = 0.0, delay_s: float = 0.0, jitter_s: float = 0.0,
                 duplicate: float = 0.0, corrupt: float = 0.0, seed: int = 0,
                 peers: Collection[str] | None = None) -> None:
        for name, p in (("drop", drop), ("duplicate", duplicate), ("corrupt", corrupt)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        if delay_s < 0 or jitter_s < 0:
            raise ValueError(f"delay_s and jitter_s must be >= 0, got {delay_s}, {jitter_s}")
        self.inner = inner
        self.node = inner.node
        self.drop, self.delay_s, self.jitter_s = drop, delay_s, jitter_s
        self.duplicate, self.corrupt = duplicate, corrupt
        self.peers = set(peers) if peers is not None else None
        self.rng = random.Random(seed)
        self.stats = {"sent": 0, "dropped": 0, "duplicated": 0, "corrupted": 0, "delayed": 0, "lost_in_flight": 0}
        self._delayed: list[tuple[float, int, str | Peer, list[bytes]]] = []
        self._order = itertools.count()

    def _corrupt(self, frames: list[bytes]) -> list[bytes]:
        candidates = [i for i, f in enumerate(frames) if len(f)]
        if not candidates:
            return frames
        i = self.rng.choice(candidates)
        frame = bytearray(frames[i])
        pos = self.rng.randrange(len(frame))
        frame[pos] ^= 1 << self.rng.randrange(8)
        return frames[:i] + [bytes(frame)] + frames[i + 1:]

    def _release_due(self) -> None:
        now = time.monotonic()
        while self._delayed and self._delayed[0][0] <= now:
            _, _, peer, frames = heapq.heappop(self._delayed)
            try:
                self._deliver(peer, frames)
            except TransportError:  # the link died while the message was delayed: it is lost, as it would be
                self.stats["lost_in_flight"] += 1

    def _deliver(self, peer: str | Peer, frames: Sequence[bytes]) -> None:
        if isinstance(peer, Peer):
            self.inner.reply(peer, frames)
        else:
            self.inner.send(peer, frames)

    def reply(self, peer: Peer, frames: Sequence[bytes]) -> None:
        """Answers to a connection suffer the same faults. ``peers`` selects them by the peer's
        authenticated name (CURVE, MPI, in-process) or its route where names route; a ZeroMQ
        connection without CURVE has neither, so only an unfiltered transport faults it."""
        name = peer.key or (peer.route if isinstance(peer.route, str) else "")
        self._faulty_send(peer, name, frames)

    def send(self, peer: str, frames: Sequence[bytes]) -> None:
        self._faulty_send(peer, peer, frames)

    def _faulty_send(self, peer: str | Peer, name: str, frames: Sequence[bytes]) -> None:
        self._release_due()
        if self.peers is not None and name not in self.peers:
            self._deliver(peer, frames)
            self.stats["sent"] += 1
            return
        message = [bytes(f) for f in frames]
        if self.drop and self.rng.random() < self.drop:
            self.stats["dropped"] += 1
            return
        if self.corrupt and self.rng.random() < self.corrupt:
            message = self._corrupt(message)
            self.stats["corrupted"] += 1
        copies = 1
        if self.duplicate and self.rng.random() < self.duplicate:
            copies = 2
            self.stats["duplicated"] += 1
        for _ in range(copies):
            delay = self.delay_s + (self.rng.uniform(0.0, self.jitter_s) if self.jitter_s else 0.0)
            if delay > 0:
                heapq.heappush(self._delayed, (time.monotonic() + delay, next(self._order), peer, message))
                self.stats["delayed"] += 1
            else:
                self._deliver(peer, message)
            self.stats["sent"] += 1

    def set_idle(self, idle: bool) -> None:
        self.inner.set_idle(idle)

    def recv(self, timeout: float | None = None) -> Inbound | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._release_due()
            now = time.monotonic()
            wait = None if deadline is None else max(0.0, deadline - now)
            if self._delayed:
                due = max(0.0, self._delayed[0][0] - now)
                wait = due if wait is None else min(wait, due)
            message = self.inner.recv(wait)
            if message is not None:
                return message
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def flush(self, timeout: float | None = None) -> bool:
        """Send every delayed message once due; ``False`` if ``timeout`` passes first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._delayed:
            self._release_due()
            if not self._delayed:
                break
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return False
            time.sleep(max(0.0, min(self._delayed[0][0] - now, 0.05)))
        return True

    @property
    def in_flight(self) -> int:
        return len(self._delayed)

    def close(self) -> None:
        self._delayed.clear()
        self.inner.close()
