"""The client: send images to every edge, collect exactly one answer per request from the aggregator.

Every request is answered: with a result (possibly flagged ``degraded``), with the error the system
sent, or with a client-side ``timeout`` error if nothing came back in time. Nothing blocks forever.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from devit_mq.metrics import percentiles
from devit_mq.protocol import (
    DEFAULT_JPEG_QUALITY,
    ErrorMeta,
    Hello,
    Kind,
    ResultMeta,
    Shutdown,
    Status,
    StatusQuery,
    to_builtins,
)
from devit_mq.transport import Transport
from devit_mq.wire import Limits, Message

from .auth import Roster
from .base import NodeBase
from .limiter import ConcurrencyLimit

log = logging.getLogger("devit_mq.nodes.client")


# After a failed send to an edge, skip it for this long before trying again.
EDGE_RETRY_S = 1.0
# Clients wait at most this long for an edge's queue (a dead or saturated edge): the request then
# goes on without that edge's features, and the aggregator answers it degraded at its deadline.
CLIENT_SEND_TIMEOUT_S = 0.25
# With no sign of its binding for this long, a client says hello again -- before its first request
# after an idle spell, and while requests in flight (counted from the first of them) go unanswered --
# so an aggregator that restarted (or forgot a vanished connection) binds the name anew instead of
# dropping answers. Answers that keep coming prove the binding: a busy client sends no hellos. These
# refreshes ask for no status reply (every node's telemetry: ~2.4 KB for 2 edges on the client's link).
REHELLO_S = 2.0


class ClientError(RuntimeError):
    """The topology is not reachable or not ready; the message says which node is missing."""


@dataclass
class Answer:
    request_id: int
    label: int = -1
    probs: np.ndarray | None = None
    degraded: bool = False
    missing: list[int] = field(default_factory=list)
    error: str | None = None
    latency_s: float = float("nan")
    stages: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Prediction:
    """Answers for a batch, in the order the images were given."""

    answers: list[Answer]

    @property
    def labels(self) -> np.ndarray:
        return np.array([a.label for a in self.answers], dtype=np.int64)

    @property
    def probabilities(self) -> np.ndarray:
        rows = [a.probs if a.probs is not None else np.full(0, np.nan) for a in self.answers]
        width = max((len(r) for r in rows), default=0)
        return np.stack([r if len(r) == width else np.full(width, np.nan) for r in rows]) if rows else np.empty((0, 0))

    @property
    def errors(self) -> list[Answer]:
        return [a for a in self.answers if not a.ok]

    @property
    def degraded(self) -> int:
        return sum(a.degraded for a in self.answers)


STAGES = ("edge_compute_ms", "edge_queue_ms", "fuse_ms", "hold_ms")


def latency_breakdown(answers: Sequence[Answer]) -> dict[str, Any]:
    """Percentiles of end-to-end latency, of the slowest edge's compute, and of the framework's
    overhead (the difference), from the successful answers' own stage timers."""
    ok = [a for a in answers if a.ok]
    lat_ms = [a.latency_s * 1e3 for a in ok]
    compute = [a.stages.get("edge_compute_ms", 0.0) for a in ok]
    overhead = [lat - c for lat, c in zip(lat_ms, compute, strict=True)]
    return {
        "latency_ms": percentiles(lat_ms),
        "edge_compute_ms": percentiles(compute),
        "overhead_ms": percentiles(overhead),
        "overhead_pct": percentiles([100 * o / lat for o, lat in zip(overhead, lat_ms, strict=True) if lat > 0]),
        "stages_ms": {k: percentiles([a.stages.get(k, 0.0) for a in ok]) for k in STAGES},
    }


class Outstanding(NamedTuple):
    """A request that went out and has no answer yet."""

    sent: float  # time.perf_counter() when it was sent
    epoch: int  # the concurrency limit's epoch then (an overloaded answer cuts the limit once per epoch)


def default_client_name() -> str:
    return f"client-{os.getpid()}-{secrets.token_hex(3)}"


class ClientNode(NodeBase):
    """Talks to the edges (images) and the aggregator (hello, results) through one transport.

    ``admin_token`` (given by a launcher to its own client) lets :meth:`shutdown_nodes` stop nodes
    that run without CURVE; under CURVE the admin key does."""

    role = "client"
    accepts = frozenset({Kind.RESULT, Kind.ERROR, Kind.CONTROL})

    def __init__(
        self,
        name: str,
        transport: Transport,
        roster: Roster,
        image_codec: str = "raw",
        timeout_s: float = 30.0,
        limits: Limits | None = None,
        admin_token: str | None = None,
        image_quality: int = DEFAULT_JPEG_QUALITY,
    ) -> None:
        super().__init__(name, transport, roster, limits)
        self.edges = [roster.owners[p] for p in sorted(roster.owners)]
        self.aggregator = roster.aggregator
        self.admin_token = admin_token
        self.image_codec = image_codec
        self.image_quality = image_quality  # for image_codec "jpeg"
        self.timeout_s = timeout_s
        # ids are unique per client; a random base keeps restarts from colliding with late answers
        self._ids = itertools.count(secrets.randbits(40) << 16)
        self.outstanding: dict[int, Outstanding] = {}  # request id -> when and in which limit epoch it went out
        self.limit = ConcurrencyLimit()  # adaptive: cut by the system's "overloaded" answers
        self.status: dict = {}
        self._held: list[Answer] = []  # answers received while waiting for something else
        self._skip_until: dict[str, float] = {}  # edge -> time.monotonic() before which it is skipped
        self._last_hello = -float("inf")  # time.monotonic() of the last hello that went out
        self._last_answer = -float("inf")  # time.monotonic() of the last RESULT or ERROR from the aggregator
        self._busy_since = -float("inf")  # time.monotonic() when requests went in flight after none were

    # -- readiness handshake ----------------------------------------------------------------------
    def connect(self, timeout_s: float = 60.0, alive=None) -> dict:
        """Say hello to the aggregator until it reports every edge ready. ``alive`` (optional) is a
        callable the launcher passes to abort early when a node process died."""
        deadline = time.monotonic() + timeout_s
        last_hello = 0.0
        while time.monotonic() < deadline:
            if alive is not None:
                alive()
            if time.monotonic() - last_hello > 0.25:
                self.hello(expect_failure=True)  # it may not be up yet
                last_hello = time.monotonic()
            msg = self.receive(0.05)
            if msg is not None and isinstance(msg.meta, Status):
                self.status = to_builtins(msg.meta)
                if len(msg.meta.ready) == msg.meta.parts:
                    return self.status
            elif msg is not None and isinstance(msg.meta, ErrorMeta) and msg.meta.code == "unauthorized":
                raise ClientError(f"aggregator {self.aggregator!r} refused this client: {msg.meta.message}")
        ready = self.status.get("ready")
        if ready is None:
            raise ClientError(f"no answer from aggregator {self.aggregator!r} within {timeout_s:.0f}s")
        missing = [e for i, e in enumerate(self.edges) if i not in ready]
        raise ClientError(f"edges not ready after {timeout_s:.0f}s: {missing} (ready parts: {ready})")

    def hello(self, expect_failure: bool = False, reply: bool = True) -> bool:
        """Announce this client to the aggregator, which binds its name to this connection: answers
        go only there; with ``reply`` it answers with its status. :meth:`connect` and the first
        :meth:`submit` do it, and refresh it without a reply after ``REHELLO_S`` with no sign of
        the binding (:meth:`submit` after an idle spell, :meth:`collect` while answers stop)."""
        if self.control(self.aggregator, Hello(reply=reply), expect_failure):
            self._last_hello = time.monotonic()
            return True
        return False

    # -- requests ---------------------------------------------------------------------------------
    def submit(self, images: np.ndarray) -> list[int]:
        """Send one batch (uint8 ``[B,H,W,C]``) to every edge; returns the request ids."""
        if self._last_hello == -float("inf"):
            self.hello()
        elif not self.outstanding and self._silent_for() > REHELLO_S:
            self.hello(expect_failure=True, reply=False)  # before the images: bound before any answer
        images = np.ascontiguousarray(images)
        ids = [next(self._ids) for _ in range(len(images))]
        if not self.limit.admits(len(self.outstanding), len(ids)):
            # refused here, for every edge at once (see limiter): answered now, never sent
            self.metrics.count("overloaded_local", len(ids))
            self._held.extend(Answer(rid, error=f"overloaded: client concurrency limit {self.limit.limit:.1f} "
                                                "reached (the system answered overloaded recently)", latency_s=0.0)
                              for rid in ids)
            return ids
        msg = Message(Kind.IMAGE, self.name, request_ids=tuple(ids), array=images, codec=self.image_codec,
                      reply_to=self.name, timestamps={"client_sent": time.time()}, quality=self.image_quality)
        now = time.perf_counter()
        if not self.outstanding:
            self._busy_since = time.monotonic()
        for rid in ids:
            self.outstanding[rid] = Outstanding(now, self.limit.epoch)
        # an edge that just refused a send is skipped for a while (its part is zero-filled by the
        # aggregator's deadline) instead of costing every request a send timeout
        now_s = time.monotonic()
        targets = [e for e in self.edges if now_s >= self._skip_until.get(e, 0.0)]
        for edge in set(self.edges) - set(targets):
            self.metrics.count(f"skipped.{edge}")
        for edge, sent in self.broadcast(targets, msg).items():
            if not sent:
                self._skip_until[edge] = time.monotonic() + EDGE_RETRY_S
        return ids

    def _silent_for(self, since: float = -float("inf")) -> float:
        """Seconds without a sign of the binding (a hello out, an answer in), nor since ``since``."""
        return time.monotonic() - max(self._last_hello, self._last_answer, since)

    def in_flight(self) -> bool:
        return bool(self.outstanding)

    def collect(self, timeout_s: float) -> list[Answer]:
        """Answers that arrive within ``timeout_s`` (returns early once something arrived), plus
        timeout errors for requests older than the client's ``timeout_s``."""
        answers, self._held = self._held, []
        if self.outstanding and self._silent_for(self._busy_since) > REHELLO_S:
            self.hello(expect_failure=True, reply=False)
        msg = self.receive(0 if answers else timeout_s)
        while msg is not None:
            answers.extend(self._answers(msg))
            msg = self.receive(0)
        answers.extend(self._expire())
        return answers

    def _answers(self, msg: Message) -> list[Answer]:
        now = time.perf_counter()
        out = []
        meta = msg.meta
        if msg.kind in (Kind.RESULT, Kind.ERROR):
            self._last_answer = time.monotonic()
        if msg.kind == Kind.RESULT:
            assert isinstance(meta, ResultMeta) and msg.array is not None
            width = msg.array.shape[1]
            for row, rid in enumerate(msg.request_ids):
                req = self.outstanding.pop(rid, None)
                if req is None:
                    self.metrics.count("unexpected_answers")
                    continue
                sent = req.sent
                self.limit.on_answer()
                label = meta.labels[row]
                stages = to_builtins(meta.stages[row]) if meta.stages else {}
                if label >= width:  # a label the probabilities cannot have: an error, not an index error later
                    out.append(Answer(rid, error=f"error: result label {label} for {width} classes",
                                      latency_s=now - sent))
                    continue
                out.append(Answer(rid, label=label, probs=np.array(msg.array[row]), degraded=meta.degraded[row],
                                  missing=list(meta.missing[row]), latency_s=now - sent, stages=stages))
        elif msg.kind == Kind.ERROR:
            assert isinstance(meta, ErrorMeta)
            text = f"{meta.code}: {meta.message}"
            for rid in msg.request_ids:
                req = self.outstanding.pop(rid, None)
                if req is not None:
                    if meta.code == "overloaded":
                        self.limit.on_overloaded(req.epoch, len(self.outstanding))
                    out.append(Answer(rid, error=text, latency_s=now - req.sent))
        elif isinstance(meta, Status):
            self.status = to_builtins(meta)
        else:
            self.metrics.count("ignored_messages")
        return out

    def _expire(self) -> list[Answer]:
        now = time.perf_counter()
        late = [rid for rid, req in self.outstanding.items() if now - req.sent > self.timeout_s]
        for rid in late:
            del self.outstanding[rid]
        return [Answer(rid, error=f"timeout: no answer within {self.timeout_s:g}s", latency_s=self.timeout_s)
                for rid in late]

    def stream(self, images: np.ndarray, batch_size: int = 1, window: int = 4) -> Iterator[tuple[int, Answer]]:
        """Pipelined requests: keep at most ``window`` batches in flight; yields ``(index, answer)`` as
        answers arrive (not in order)."""
        index_of: dict[int, int] = {}
        next_lo = 0
        total = len(images)
        done = 0
        while done < total:
            while next_lo < total and len(self.outstanding) < window * batch_size:
                ids = self.submit(images[next_lo: next_lo + batch_size])
                index_of.update({rid: next_lo + k for k, rid in enumerate(ids)})
                next_lo += len(ids)
            for answer in self.collect(min(self.timeout_s, 0.5)):
                if answer.request_id in index_of:
                    done += 1
                    yield index_of.pop(answer.request_id), answer

    def predict(self, images: np.ndarray, batch_size: int = 1, window: int = 4) -> Prediction:
        images = np.asarray(images)
        answers: list[Answer | None] = [None] * len(images)
        for i, answer in self.stream(images, batch_size, window):
            answers[i] = answer
        return Prediction([a for a in answers if a is not None])

    def query_status(self, timeout_s: float = 5.0) -> dict:
        """Ask the aggregator for its status: ready edges, pending requests and every node's metrics
        (``status["nodes"][name]``: counters, stage percentiles, cpu_s, rss_mb). Answers that arrive
        meanwhile are kept for ``collect``."""
        self.control(self.aggregator, StatusQuery())
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = self.receive(0.05)
            if msg is None:
                continue
            if isinstance(msg.meta, Status):
                self.status = to_builtins(msg.meta)
                return self.status
            self._held.extend(self._answers(msg))
        raise ClientError(f"no status from aggregator {self.aggregator!r} within {timeout_s:g}s")

    def shutdown_nodes(self) -> None:
        """Ask every node to stop (edges first, so the aggregator can still answer what is open).
        Nodes obey only an admin: the admin key under CURVE, else this client's ``admin_token``."""
        op = Shutdown(token=self.admin_token or "")
        for edge in self.edges:
            self.control(edge, op)
        self.control(self.aggregator, op)
