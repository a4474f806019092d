"""The aggregator: join the edges' tokens by request id, fuse, answer every request exactly once.

A request is fused when all N feature sets are in, or when its deadline passes (or every edge it still
waits for has gone silent). Then the missing-edge policy applies: ``degrade`` zero-fills the missing
tokens (the fusion head is trained for it with feature dropout) and flags the answer, ``error``
answers with an explicit error. State is bounded: at most ``max_pending`` open requests (the oldest is
expired first) and a bounded memory of answered ids to drop late or duplicated features.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from devit_mq.model import FusionHead
from devit_mq.transport import Transport
from devit_mq.wire import Kind, Limits, Message

from .base import EDGE_SILENCE_S, NodeBase

log = logging.getLogger("devit_mq.nodes.aggregator")

Key = tuple[str, int]  # (client, request id): ids are unique per client


@dataclass
class _Pending:
    parts: list[np.ndarray | None]
    first_seen: float  # time.monotonic()
    timing: dict[str, float] = field(default_factory=dict)

    def missing(self) -> list[int]:
        return [i for i, p in enumerate(self.parts) if p is None]


class AggregatorNode(NodeBase):
    role = "aggregator"

    def __init__(
        self,
        name: str,
        transport: Transport,
        fusion: FusionHead,
        edges: dict[int, str],
        deadline_ms: float = 1000.0,
        missing_policy: str = "degrade",
        max_pending: int = 10000,
        max_fuse_batch: int = 64,
        limits: Limits | None = None,
        info: dict | None = None,
    ) -> None:
        super().__init__(name, transport, limits)
        if missing_policy not in ("degrade", "error"):
            raise ValueError(f"missing_policy must be 'degrade' or 'error', got {missing_policy!r}")
        self.fusion = fusion.eval()
        cfg = fusion.config
        self.in_dims = cfg.in_dims
        self.num_prefix = cfg.num_prefix_tokens
        self.edges = dict(edges)  # part -> edge name
        if sorted(self.edges) != list(range(cfg.num_parts)):
            raise ValueError(f"edges must cover parts 0..{cfg.num_parts - 1}, got {sorted(self.edges)}")
        self.deadline_s = deadline_ms / 1e3
        self.policy = missing_policy
        self.max_pending = max_pending
        self.max_fuse_batch = max_fuse_batch
        self.info = dict(info or {})
        self.pending: OrderedDict[Key, _Pending] = OrderedDict()
        self.answered: OrderedDict[Key, None] = OrderedDict()
        self.ready_parts: set[int] = set()
        self._complete: list[Key] = []  # requests whose N feature sets are all in, not yet fused
        self.last_seen: dict[int, float] = {}
        self.node_metrics: dict[str, dict] = {}  # latest telemetry from each edge's heartbeat
        self.metrics.info = {"role": "aggregator", "policy": missing_policy, "deadline_ms": deadline_ms}

    # -- main loop --------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            while self.running:
                msg = self.receive(self._wait_time())
                if msg is not None:
                    self._dispatch(msg)
                    # drain what is already queued before fusing: fuse in batches, not one by one
                    for _ in range(256):
                        msg = self.receive(0)
                        if msg is None:
                            break
                        self._dispatch(msg)
                self._fuse_complete()
                self._expire(time.monotonic())
        finally:
            self._answer_all_pending("aggregator shutting down")

    def _wait_time(self) -> float:
        if not self.pending:
            return 0.2
        oldest = next(iter(self.pending.values()))
        return min(max(oldest.first_seen + self.deadline_s - time.monotonic(), 0.0), 0.05)

    def _dispatch(self, msg: Message) -> None:
        part = msg.meta.get("part")
        if isinstance(part, int) and part in self.edges:
            self.last_seen[part] = time.monotonic()
        if msg.kind == Kind.FEATURES:
            self._on_features(msg)
        elif msg.kind == Kind.ERROR:
            self._on_error(msg)
        elif msg.kind == Kind.HEARTBEAT:
            if isinstance(part, int) and part in self.edges:
                self.ready_parts.add(part)
                if isinstance(msg.meta.get("metrics"), dict):
                    self.node_metrics[msg.source] = msg.meta["metrics"]
        elif msg.kind == Kind.CONTROL:
            self._on_control(msg)
        else:
            self.metrics.count("ignored_messages")

    # -- handlers ---------------------------------------------------------------------------------
    def _on_control(self, msg: Message) -> None:
        op = msg.meta.get("op")
        if op == "ready":
            part = msg.meta.get("part")
            if part in self.edges:
                self.ready_parts.add(part)
                log.info("%s: edge %s (part %s) is ready", self.name, msg.source, part)
        elif op in ("hello", "status"):
            nodes = {**self.node_metrics, self.name: self.metrics.snapshot()}
            self.control(msg.source, "status", ready=sorted(self.ready_parts), parts=len(self.edges),
                         pending=len(self.pending), nodes=nodes, **self.info)
        elif op == "shutdown":
            log.info("%s: shutdown requested by %s", self.name, msg.source)
            self.running = False
        else:
            self.metrics.count("ignored_messages")

    def _on_features(self, msg: Message) -> None:
        part = msg.meta.get("part")
        arr = msg.array
        if part not in self.edges:
            self.metrics.count("bad_features")
            log.warning("%s: features from %s name unknown part %r", self.name, msg.source, part)
            return
        expected = (self.num_prefix, self.in_dims[part])
        if arr is None or arr.ndim != 3 or tuple(arr.shape[1:]) != expected or len(arr) != len(msg.request_ids):
            self.metrics.count("bad_features")
            log.warning("%s: features from %s have shape %s, expected [%d, %s]", self.name, msg.source,
                        None if arr is None else arr.shape, len(msg.request_ids), expected)
            return
        now = time.monotonic()
        edge_ms = {"edge_compute_ms": float(msg.meta.get("compute_ms", 0.0)),
                   "edge_queue_ms": float(msg.meta.get("queue_ms", 0.0))}
        for row, rid in enumerate(msg.request_ids):
            key = (msg.reply_to, rid)
            if key in self.answered:
                self.metrics.count("late_features")
                continue
            entry = self.pending.get(key)
            if entry is None:
                entry = self.pending[key] = _Pending([None] * len(self.edges), now)
                self._bound_pending()
            if entry.parts[part] is not None:
                self.metrics.count("duplicate_features")
                continue
            entry.parts[part] = arr[row]
            if all(p is not None for p in entry.parts):
                self._complete.append(key)
            for k, v in edge_ms.items():  # the slowest edge decides the latency
                entry.timing[k] = max(entry.timing.get(k, 0.0), v)

    def _on_error(self, msg: Message) -> None:
        code = str(msg.meta.get("code", "error"))
        text = str(msg.meta.get("message", ""))
        keys = [(msg.reply_to, rid) for rid in msg.request_ids]
        fresh = [k for k in keys if k not in self.answered]
        for k in fresh:
            self.pending.pop(k, None)
        self._send_error(msg.reply_to, [k[1] for k in fresh], code, text)

    # -- fusing -----------------------------------------------------------------------------------
    def _fuse_complete(self) -> None:
        # only keys completed since the last call (not a scan of every pending request per message)
        done = [k for k in self._complete if k in self.pending]
        self._complete.clear()
        for lo in range(0, len(done), self.max_fuse_batch):
            self._fuse(done[lo: lo + self.max_fuse_batch], degraded=False)

    def _expire(self, now: float) -> None:
        silent = {p for p, t in self.last_seen.items() if now - t > EDGE_SILENCE_S}
        expired = []
        for key, entry in self.pending.items():
            overdue = now - entry.first_seen >= self.deadline_s
            if overdue or (silent and set(entry.missing()) <= silent):
                expired.append(key)
            elif not silent:
                break  # entries are in arrival order: the rest are younger
        if not expired:
            return
        if self.policy == "degrade":
            for lo in range(0, len(expired), self.max_fuse_batch):
                self._fuse(expired[lo: lo + self.max_fuse_batch], degraded=True)
        else:
            for key in expired:
                missing = self.pending.pop(key).missing()
                self._send_error(key[0], [key[1]], "missing_features",
                                 f"no features from parts {missing} before the deadline")

    def _fuse(self, keys: list[Key], degraded: bool) -> None:
        entries = [self.pending.pop(k) for k in keys]
        start = time.perf_counter()
        columns = []
        for part, dim in enumerate(self.in_dims):
            zeros = np.zeros((self.num_prefix, dim), np.float32)
            columns.append(np.stack([e.parts[part] if e.parts[part] is not None else zeros for e in entries]))
        features = torch.from_numpy(np.concatenate(columns, axis=-1).astype(np.float32, copy=False))
        with torch.inference_mode():
            probs = self.fusion(features).softmax(dim=-1).numpy()
        fuse_ms = (time.perf_counter() - start) * 1e3
        self.metrics.observe("fuse", fuse_ms / 1e3)
        now = time.monotonic()
        by_client: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            by_client.setdefault(key[0], []).append(i)
        for client, rows in by_client.items():
            stages = []
            for i in rows:
                timing = dict(entries[i].timing)
                timing.update(fuse_ms=fuse_ms, hold_ms=(now - entries[i].first_seen) * 1e3)
                stages.append(timing)
            missing = [entries[i].missing() for i in rows]
            self.send(client, Message(
                Kind.RESULT, self.name, request_ids=tuple(keys[i][1] for i in rows), reply_to=client,
                array=np.ascontiguousarray(probs[rows]), codec="fp32",
                meta={"labels": [int(probs[i].argmax()) for i in rows],
                      "degraded": [bool(m) for m in missing], "missing": missing, "stages": stages},
                timestamps={"agg_sent": time.time()}))
            self.metrics.count("answered", len(rows))
            if degraded:
                self.metrics.count("degraded", sum(1 for m in missing if m))
        for key in keys:
            self._remember(key)

    # -- bookkeeping ------------------------------------------------------------------------------
    def _send_error(self, client: str, ids: list[int], code: str, text: str) -> None:
        if not ids:
            return
        self.send(client, Message(Kind.ERROR, self.name, request_ids=tuple(ids), reply_to=client,
                                  meta={"code": code, "message": text}))
        self.metrics.count(f"errors.{code}", len(ids))
        for rid in ids:
            self._remember((client, rid))

    def _remember(self, key: Key) -> None:
        self.answered[key] = None
        while len(self.answered) > 4 * self.max_pending:
            self.answered.popitem(last=False)

    def _bound_pending(self) -> None:
        while len(self.pending) > self.max_pending:
            key, entry = self.pending.popitem(last=False)
            self._send_error(key[0], [key[1]], "overloaded",
                             f"aggregator holds more than {self.max_pending} open requests")

    def _answer_all_pending(self, reason: str) -> None:
        for key in list(self.pending):
            self.pending.pop(key)
            self._send_error(key[0], [key[1]], "shutdown", reason)
