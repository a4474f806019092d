"""The edge's policy: dynamic batching, bounded by size and time.

After the first image of a batch arrives the edge keeps collecting for at most ``max_wait_s`` or until
``max_batch`` images wait, then runs them as one batch. With the default wait of 0 it takes whatever
is already queued and starts: while a batch computes (tens of ms for a ViT) new requests queue up, so
under load batches form by themselves, and a lone request never pays a batching delay.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from devit_mq.wire import Message


@dataclass
class Job:
    msg: Message  # an IMAGE
    received: float  # time.time() when decoded (sent on as the "edge_recv" stamp)
    received_perf: float  # perf_counter() at the same moment (for this process's own durations)

    @property
    def images(self) -> int:
        return len(self.msg.request_ids)


class Batcher:
    def __init__(self, max_batch: int = 8, max_wait_s: float = 0.0) -> None:
        self.max_batch = max(1, max_batch)
        self.max_wait_s = max(0.0, max_wait_s)
        self._jobs: list[Job] = []
        self._images = 0
        self._opened = 0.0  # perf_counter() when the batch's first job arrived

    def add(self, msg: Message) -> None:
        now = time.perf_counter()
        if not self._jobs:
            self._opened = now
        self._jobs.append(Job(msg, time.time(), now))
        self._images += len(msg.request_ids)

    @property
    def queued_images(self) -> int:
        """Images waiting for the next batch."""
        return self._images

    @property
    def full(self) -> bool:
        return self._images >= self.max_batch

    def wait_s(self) -> float | None:
        """How long the loop may wait for more before the open batch is due (None: nothing open)."""
        if not self._jobs:
            return None
        return max(0.0, self._opened + self.max_wait_s - time.perf_counter())

    def take_due(self) -> list[Job]:
        """The open batch if it is full or its wait is over, else ``[]``."""
        if not self._jobs or not (self.full or self.wait_s() == 0.0):
            return []
        jobs, self._jobs, self._images = self._jobs, [], 0
        return jobs
