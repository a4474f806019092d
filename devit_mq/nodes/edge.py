"""The edge: run one sub-model on every image it is sent, send its CLS (and DIST) tokens onwards.

A thin loop over three parts: the protocol (typed, authorized messages from :class:`NodeBase`), the
policy (:class:`~devit_mq.nodes.batcher.Batcher`: dynamic batching) and the executor (an
:class:`~devit_mq.nodes.executor.EdgeExecutor`: the sub-model's forward).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from devit_mq.protocol import MAX_TEXT, ErrorMeta, FeaturesMeta, HeartbeatMeta, Kind, Ready, Shutdown
from devit_mq.transport import Transport
from devit_mq.wire import Limits, Message

from .auth import Roster
from .base import HEARTBEAT_INTERVAL_S, NodeBase
from .batcher import Batcher, Job
from .executor import EdgeExecutor

log = logging.getLogger("devit_mq.nodes.edge")

# Timestamps an edge carries forward from an image request (a peer's other stamps are not copied:
# what the edge sends must stay within the wire's limits whatever the client sent).
FORWARDED_STAMPS = ("client_sent",)


class EdgeNode(NodeBase):
    role = "edge"
    accepts = frozenset({Kind.IMAGE, Kind.CONTROL})

    def __init__(
        self,
        name: str,
        transport: Transport,
        executor: EdgeExecutor,
        image_shape: tuple[int, int, int],
        part: int,
        roster: Roster,
        codec: str = "fp32",
        max_batch: int = 8,
        max_wait_ms: float = 0.0,
        max_queue_ms: float | None = None,
        limits: Limits | None = None,
    ) -> None:
        super().__init__(name, transport, roster, limits)
        self.executor = executor
        self.image_shape = tuple(image_shape)
        self.part = part
        self.aggregator = roster.aggregator
        self.codec = codec
        self.batcher = Batcher(max_batch, max_wait_ms / 1e3)
        # admission control: a request that has waited longer than this when its batch starts is
        # answered "overloaded" at once instead of computed late (None: every request is computed)
        self.max_queue_s = None if not max_queue_ms else max_queue_ms / 1e3
        self._last_heartbeat = 0.0
        self.metrics.info = {"role": "edge", "part": part, "codec": codec, **executor.describe()}

    # -- loop -----------------------------------------------------------------------------------
    def run(self) -> None:
        self.executor.warm_up()  # before announcing readiness, so the first request is not slow
        self.control(self.aggregator, Ready(part=self.part))
        while self.running:
            wait = self.batcher.wait_s()
            msg = self.receive(HEARTBEAT_INTERVAL_S if wait is None else wait)
            while msg is not None:
                self.handle_safely(self._dispatch, msg)
                if self.batcher.full or not self.running:
                    break
                msg = self.receive(0)  # take what is already queued into the batch
            jobs = self._admit(self.batcher.take_due())
            if jobs:
                self.step_safely(self._process, jobs)
            if self.running:  # not after a shutdown: the aggregator may be gone, the send would wait
                self.step_safely(self._heartbeat)

    def in_flight(self) -> bool:
        return self.batcher.wait_s() is not None  # a batch is open

    def queue_depth(self) -> int:
        return self.batcher.queued_images

    def _dispatch(self, msg: Message) -> None:
        if msg.kind == Kind.IMAGE:
            if self._valid(msg):
                self.batcher.add(msg)
        elif isinstance(msg.meta, Shutdown):
            log.info("%s: shutdown requested by %s", self.name, msg.source)
            self.running = False
        else:
            self.metrics.count("ignored_messages")

    # -- admission ------------------------------------------------------------------------------
    def _waited_s(self, job: Job, now: float) -> float:
        """How long a request has waited: since the client sent it where its stamp is plausible
        (requests queue inside the transport before the edge decodes them), else since decode."""
        sent = job.msg.timestamps.get("client_sent")
        if sent is not None and 0.0 <= now - sent <= 60.0:
            return now - sent
        return now - job.received

    def _admit(self, jobs: list[Job]) -> list[Job]:
        if self.max_queue_s is None or not jobs:
            return jobs
        now = time.time()
        admitted = []
        for job in jobs:
            waited = self._waited_s(job, now)
            if waited <= self.max_queue_s:
                admitted.append(job)
                continue
            self.metrics.count("overloaded", job.images)
            self._error(job.msg, "overloaded", f"waited {waited * 1e3:.0f} ms, more than max_queue_ms "
                                               f"{self.max_queue_s * 1e3:g}")
        return admitted

    # -- compute ----------------------------------------------------------------------------------
    def _valid(self, msg: Message) -> bool:
        """An image batch of the wrong shape or type gets an explicit error (the aggregator forwards
        it to the client), so the request is answered instead of timing out."""
        arr = msg.array
        assert arr is not None  # the wire guarantees an IMAGE has its [B, H, W, C] array
        problem = None
        if tuple(arr.shape[1:]) != self.image_shape:
            problem = f"image shape {tuple(arr.shape)}, expected [B, {', '.join(map(str, self.image_shape))}]"
        elif arr.dtype != np.uint8:
            problem = f"image dtype {arr.dtype}, expected uint8"
        if problem is None:
            return True
        self.metrics.count("bad_images")
        self._error(msg, "bad_input", problem)
        return False

    def _error(self, request: Message, code: str, problem: str) -> None:
        """Answer an image request with an error (the aggregator forwards it to the client)."""
        self.send(self.aggregator, Message(
            Kind.ERROR, self.name, request_ids=request.request_ids, reply_to=request.reply_to,
            meta=ErrorMeta(code=code, message=f"{self.name}: {problem}"[:MAX_TEXT], part=self.part)))

    def _process(self, jobs: list[Job]) -> None:
        images = jobs[0].msg.array if len(jobs) == 1 else np.concatenate([j.msg.array for j in jobs], axis=0)
        start = time.perf_counter()
        try:
            features = self.executor.forward_prefix(images)
        except Exception as exc:  # noqa: BLE001 -- a failed forward answers its requests with an error
            self.metrics.count("compute_errors")
            self.log.log(logging.ERROR, "compute", "%s: forward failed: %s", self.name, exc, exc_info=True)
            for job in jobs:
                self._error(job.msg, "error", f"forward failed: {exc}")
            return
        compute_s = time.perf_counter() - start
        self.metrics.observe("compute", compute_s)
        self.metrics.observe("batch_size", float(len(images)))
        self.metrics.count("images", len(images))  # computed images: throughput from its deltas
        offset = 0
        for job in jobs:
            n = job.images
            self.metrics.observe("queue", max(0.0, start - job.received_perf))
            stamps = {k: v for k, v in job.msg.timestamps.items() if k in FORWARDED_STAMPS}
            stamps.update({"edge_recv": job.received, "edge_sent": time.time()})
            self.send(self.aggregator, Message(
                Kind.FEATURES, self.name, request_ids=job.msg.request_ids, reply_to=job.msg.reply_to,
                array=features[offset: offset + n], codec=self.codec,
                meta=FeaturesMeta(part=self.part, compute_ms=compute_s * 1e3, batch=int(len(images)),
                                  queue_ms=max(0.0, start - job.received_perf) * 1e3),
                timestamps=stamps))
            offset += n

    def _heartbeat(self) -> None:
        now = time.time()
        if now - self._last_heartbeat >= HEARTBEAT_INTERVAL_S:
            self._last_heartbeat = now
            # telemetry rides on the heartbeat, so the aggregator can report every node's figures
            self.send(self.aggregator, Message(
                Kind.HEARTBEAT, self.name, meta=HeartbeatMeta(part=self.part, telemetry=self.metrics.telemetry()),
                timestamps={"sent": now}))
