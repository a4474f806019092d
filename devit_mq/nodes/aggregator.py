"""The aggregator: join the edges' tokens by request id, fuse, answer every request exactly once.

A thin loop over three parts: the protocol (typed, authorized messages from :class:`NodeBase`), the
policy (:class:`~devit_mq.nodes.join.JoinTable`: the deadline-aware join) and the executor (a
:class:`~devit_mq.nodes.executor.FusionExecutor`). A request is fused when all N feature sets are in,
or when its deadline passes (or every edge it still waits for has gone silent); then the
missing-edge policy applies: ``degrade`` zero-fills the missing tokens (the fusion head is trained
for it with feature dropout) and flags the answer, ``error`` answers with an explicit error.

Answers go to the connection a client said hello on (:class:`~devit_mq.nodes.auth.ClientTable`),
never to whoever claims its name. Every table is bounded: open requests (``max_pending``), answered
keys, bound clients, and per-edge state keyed by the topology's parts only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np

from devit_mq.protocol import (
    MAX_TEXT,
    MISSING_POLICIES,
    ErrorMeta,
    FeaturesMeta,
    Hello,
    Kind,
    Ready,
    ResultMeta,
    Shutdown,
    StageTimes,
    Status,
    StatusQuery,
    Telemetry,
)
from devit_mq.transport import Peer, Transport
from devit_mq.wire import Limits, Message

from .auth import ClientTable, Roster
from .base import EDGE_SILENCE_S, NodeBase, Sent
from .executor import FusionExecutor
from .join import JoinTable, Key, Pending

log = logging.getLogger("devit_mq.nodes.aggregator")

STATUS_CACHE_S = 0.25  # a status reply costs psutil and percentiles: built at most this often


class AggregatorNode(NodeBase):
    role = "aggregator"
    accepts = frozenset({Kind.FEATURES, Kind.ERROR, Kind.HEARTBEAT, Kind.CONTROL})

    def __init__(
        self,
        name: str,
        transport: Transport,
        fusion: FusionExecutor,
        in_dims: Sequence[int],
        num_prefix: int,
        roster: Roster,
        deadline_ms: float = 1000.0,
        missing_policy: str = "degrade",
        max_pending: int = 10000,
        max_fuse_batch: int = 64,
        limits: Limits | None = None,
        info: dict | None = None,
    ) -> None:
        super().__init__(name, transport, roster, limits)
        if missing_policy not in MISSING_POLICIES:
            raise ValueError(f"missing_policy must be 'degrade' or 'error', got {missing_policy!r}")
        self.fusion = fusion
        self.in_dims = list(in_dims)
        self.num_prefix = num_prefix
        if sorted(roster.owners) != list(range(len(self.in_dims))):
            raise ValueError(f"edges must cover parts 0..{len(self.in_dims) - 1}, got {sorted(roster.owners)}")
        self.num_parts = len(self.in_dims)
        self.policy = missing_policy
        self.max_fuse_batch = max_fuse_batch
        self.table = JoinTable(self.num_parts, deadline_ms / 1e3, max_pending, count=self.metrics.count)
        self.clients = ClientTable()
        self.info = dict(info or {})  # classes, codec, image_shape, instance: what a status reply says
        self.ready_parts: set[int] = set()
        self.last_seen: dict[int, float] = {}  # part -> time.monotonic() of its edge's last message
        self.edge_telemetry: dict[str, Telemetry] = {}  # latest heartbeat of each edge (by owner name)
        self._status: tuple[float, Status] | None = None
        self.started = time.monotonic()
        self.metrics.info = {"role": "aggregator", "policy": missing_policy, "deadline_ms": deadline_ms}

    # -- loop -----------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            while self.running:
                msg = self.receive(self.table.wait_s(time.monotonic()))
                drained = 0
                # drain what is already queued before fusing: fuse in batches, not one by one
                while msg is not None:
                    self.handle_safely(self._dispatch, msg)
                    drained += 1
                    msg = self.receive(0) if drained < 256 and self.running else None
                self.step_safely(self._fuse_complete)
                self.step_safely(self._expire, time.monotonic())
        finally:
            self._answer_all_pending("aggregator shutting down")

    def in_flight(self) -> bool:
        return bool(self.table.pending)

    def queue_depth(self) -> int:
        return len(self.table.pending)

    def _dispatch(self, msg: Message) -> None:
        kind, meta = msg.kind, msg.meta
        if kind == Kind.FEATURES:
            self._on_features(msg)
        elif kind == Kind.ERROR:
            self._on_error(msg)
        elif kind == Kind.HEARTBEAT:
            self._edge_alive(meta.part)
            if meta.telemetry is not None:
                self.edge_telemetry[msg.source] = meta.telemetry
        elif isinstance(meta, Ready):
            self._edge_alive(meta.part)
            log.info("%s: edge %s (part %s) is ready", self.name, msg.source, meta.part)
        elif isinstance(meta, Hello):
            self._on_hello(msg)
        elif isinstance(meta, StatusQuery):
            self.control(self.last_peer, self.status())
        elif isinstance(meta, Shutdown):
            log.info("%s: shutdown requested by %s", self.name, msg.source)
            self.running = False
        else:
            self.metrics.count("ignored_messages")

    # -- handlers ---------------------------------------------------------------------------------
    def _edge_alive(self, part: int) -> None:
        self.last_seen[part] = time.monotonic()
        self.ready_parts.add(part)

    def _on_hello(self, msg: Message) -> None:
        peer = self.last_peer
        assert peer is not None
        if not self.clients.bind(msg.source, peer, alive=self._probe):
            self.metrics.count("identity_conflicts")
            self.log.warning("identity", "%s: refused hello from a second connection claiming %r (its first "
                             "connection is alive)", self.name, msg.source)
            self.send(peer, Message(Kind.ERROR, self.name, reply_to=msg.source, meta=ErrorMeta(
                code="unauthorized", message=f"client name {msg.source!r} is bound to another live connection")))
            return
        assert isinstance(msg.meta, Hello)
        if msg.meta.reply:
            self.control(peer, self.status())

    def _probe(self, old: Peer) -> bool:
        """Is a bound connection still there? A tiny message to it fails at once with ``GONE`` if
        the connection vanished; anything else (delivered, or a full queue) means it is there."""
        return self.control(old, Hello(), expect_failure=True) is not Sent.GONE

    def status(self) -> Status:
        now = time.monotonic()
        if self._status is None or now - self._status[0] > STATUS_CACHE_S:
            nodes = {**self.edge_telemetry, self.name: self.metrics.telemetry()}
            heard = [round(now - self.last_seen[p], 3) if p in self.last_seen else -1.0 for p in range(self.num_parts)]
            self._status = (now, Status(
                ready=sorted(self.ready_parts), parts=self.num_parts, pending=len(self.table.pending), nodes=nodes,
                classes=list(self.info.get("classes", [])), codec=str(self.info.get("codec", "")),
                image_shape=list(self.info.get("image_shape", [])), instance=str(self.info.get("instance", "")),
                last_heard_s=heard, silence_s=EDGE_SILENCE_S))
        return self._status[1]

    def _on_features(self, msg: Message) -> None:
        meta: FeaturesMeta = msg.meta
        part, arr = meta.part, msg.array
        self.last_seen[part] = time.monotonic()
        expected = (self.num_prefix, self.in_dims[part])
        if tuple(arr.shape[1:]) != expected:
            self.metrics.count("bad_features")
            self.log.warning("features.shape", "%s: features from %s have shape %s, expected [%d, %s]", self.name,
                             msg.source, arr.shape, len(msg.request_ids), expected)
            return
        now = time.monotonic()
        sent = msg.timestamps.get("client_sent")  # the client's wall clock (the e2e stage)
        for row, rid in enumerate(msg.request_ids):
            evicted = self.table.add((msg.reply_to, rid), part, arr[row], meta.compute_ms, meta.queue_ms, now,
                                     client_sent=sent)
            for key in evicted:
                self._send_error(key[0], [key[1]], "overloaded",
                                 f"aggregator holds more than {self.table.max_pending} open requests")

    def _on_error(self, msg: Message) -> None:
        meta: ErrorMeta = msg.meta
        keys = [(msg.reply_to, rid) for rid in msg.request_ids]
        fresh = [k for k in keys if not self.table.is_answered(k)]
        for k in fresh:
            self.table.drop(k)
        self._send_error(msg.reply_to, [k[1] for k in fresh], meta.code, meta.message)

    # -- fusing -----------------------------------------------------------------------------------
    def _fuse_complete(self) -> None:
        for keys in self.table.chunks(self.table.take_complete(), self.max_fuse_batch):
            self._fuse(keys)

    def _expire(self, now: float) -> None:
        # a part never heard from counts from the aggregator's start: an edge that died before it
        # was ready must not make every request wait its full deadline
        silent = {p for p in range(self.num_parts) if now - self.last_seen.get(p, self.started) > EDGE_SILENCE_S}
        expired = self.table.due(now, silent)
        if not expired:
            return
        if self.policy == "degrade":
            for keys in self.table.chunks(expired, self.max_fuse_batch):
                self._fuse(keys)
        else:
            for key, entry in zip(expired, self.table.pop(expired), strict=True):
                self._send_error(key[0], [key[1]], "missing_features",
                                 f"no features from parts {entry.missing()} before the deadline")

    def _stack(self, entries: list[Pending]) -> np.ndarray:
        """float32 [B, P, sum(D_i)]: each part's tokens, zeros where a part is missing."""
        out = np.zeros((len(entries), self.num_prefix, sum(self.in_dims)), np.float32)
        lo = 0
        for part, dim in enumerate(self.in_dims):
            for i, e in enumerate(entries):
                if e.parts[part] is not None:
                    out[i, :, lo: lo + dim] = e.parts[part]
            lo += dim
        return out

    def _fuse(self, keys: list[Key]) -> None:
        entries = self.table.pop(keys)
        start = time.perf_counter()
        try:
            probs = self.fusion.fuse(self._stack(entries))
        except Exception as exc:  # noqa: BLE001 -- a failed fusion answers its requests with an error
            self.metrics.count("fusion_errors")
            self.log.log(logging.ERROR, "fusion", "%s: fusion failed: %s", self.name, exc, exc_info=True)
            for key in keys:
                self._send_error(key[0], [key[1]], "error", f"fusion failed: {exc}")
            return
        fuse_ms = (time.perf_counter() - start) * 1e3
        self.metrics.observe("fuse", fuse_ms / 1e3)
        self.metrics.observe("fuse_batch", float(len(keys)))
        now, wall = time.monotonic(), time.time()
        for entry in entries:
            self.metrics.observe("hold", now - entry.first_seen)
            # client send -> answer, on two hosts' wall clocks: only a plausible stamp counts (a
            # client whose clock is off by more than a minute, or a forged stamp, is not a sample)
            if entry.client_sent is not None and 0.0 <= wall - entry.client_sent <= 60.0:
                self.metrics.observe("e2e", wall - entry.client_sent)
        by_client: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            by_client.setdefault(key[0], []).append(i)
        for client, rows in by_client.items():
            missing = [entries[i].missing() for i in rows]
            stages = [StageTimes(edge_compute_ms=entries[i].edge_compute_ms, edge_queue_ms=entries[i].edge_queue_ms,
                                 fuse_ms=fuse_ms, hold_ms=(now - entries[i].first_seen) * 1e3) for i in rows]
            meta = ResultMeta(labels=[int(probs[i].argmax()) for i in rows], degraded=[bool(m) for m in missing],
                              missing=missing, stages=stages)
            self._to_client(client, Message(Kind.RESULT, self.name, request_ids=tuple(keys[i][1] for i in rows),
                                            reply_to=client, array=np.ascontiguousarray(probs[rows]), codec="fp32",
                                            meta=meta, timestamps={"agg_sent": time.time()}))
            self.metrics.count("answered", len(rows))
            self.metrics.count("degraded", sum(1 for m in missing if m))
        for key in keys:
            self.table.remember(key)

    # -- answering --------------------------------------------------------------------------------
    def _to_client(self, client: str, msg: Message) -> bool:
        peer = self.clients.route(client)
        if peer is None:
            self.metrics.count("unroutable")
            self.log.warning("unroutable", "%s: no connection for client %r (it never said hello): answer dropped",
                             self.name, client)
            return False
        sent = self.send(peer, msg)
        if sent is Sent.GONE:
            self.clients.forget(client)  # that connection is gone: the next hello may bind the name
        return bool(sent)

    def _send_error(self, client: str, ids: list[int], code: str, text: str) -> None:
        if not ids:
            return
        self._to_client(client, Message(Kind.ERROR, self.name, request_ids=tuple(ids), reply_to=client,
                                        meta=ErrorMeta(code=code, message=text[:MAX_TEXT])))
        self.metrics.count(f"errors.{code}", len(ids))
        for rid in ids:
            self.table.remember((client, rid))

    def _answer_all_pending(self, reason: str) -> None:
        keys = list(self.table.pending)
        self.table.pop(keys)
        for key in keys:
            self._send_error(key[0], [key[1]], "shutdown", reason)
