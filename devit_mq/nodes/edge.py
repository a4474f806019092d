"""The edge: run one sub-model on every image it is sent, send its CLS (and DIST) tokens onwards.

Dynamic batching: after the first image arrives the edge keeps collecting for at most ``max_wait_ms``
or until ``max_batch`` images are waiting, then runs them as one batch. The default wait is 0: take
whatever is already queued and start. While a batch computes (tens of ms for a ViT) new requests queue
up, so under load batches form by themselves, and a lone request never pays a batching delay.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from devit_mq.model import InputSpec, VisionTransformer
from devit_mq.transport import Transport
from devit_mq.wire import Kind, Limits, Message

from .base import HEARTBEAT_INTERVAL_S, NodeBase

log = logging.getLogger("devit_mq.nodes.edge")


@dataclass
class _Job:
    msg: Message
    received: float  # time.time() when decoded (travels in the timestamps)
    received_perf: float  # perf_counter() at the same moment (for this process's own durations)


class EdgeNode(NodeBase):
    role = "edge"

    def __init__(
        self,
        name: str,
        transport: Transport,
        model: VisionTransformer,
        input_spec: InputSpec,
        part: int,
        aggregator: str,
        codec: str = "fp32",
        max_batch: int = 8,
        max_wait_ms: float = 2.0,
        limits: Limits | None = None,
    ) -> None:
        super().__init__(name, transport, limits)
        self.model = model.eval()
        self.input_spec = input_spec
        self.part = part
        self.aggregator = aggregator
        self.codec = codec
        self.max_batch = max(1, max_batch)
        self.max_wait_s = max(0.0, max_wait_ms) / 1e3
        self._last_heartbeat = 0.0
        self.metrics.info = {"role": "edge", "part": part, "attention": model.attention_backend,
                             "threads": torch.get_num_threads(), "codec": codec}

    # -- lifecycle ----------------------------------------------------------------------------------
    def warm_up(self) -> None:
        """One forward pass before announcing readiness, so the first request is not slow."""
        with torch.inference_mode():
            self.model.forward_features(torch.zeros(1, self.input_spec.in_chans,
                                                    self.input_spec.img_size, self.input_spec.img_size))

    def run(self) -> None:
        self.warm_up()
        self.control(self.aggregator, "ready", part=self.part)
        while self.running:
            jobs = self._collect()
            if jobs:
                self._process(jobs)
            self._heartbeat()

    # -- batching -------------------------------------------------------------------------------
    def _collect(self) -> list[_Job]:
        jobs: list[_Job] = []
        images = 0
        first = self._next_job(HEARTBEAT_INTERVAL_S)
        if first is None:
            return jobs
        jobs.append(first)
        images += len(first.msg.request_ids)
        close_at = time.perf_counter() + self.max_wait_s
        while images < self.max_batch and self.running:
            remaining = close_at - time.perf_counter()
            job = self._next_job(max(remaining, 0.0))
            if job is None:
                if remaining <= 0:
                    break
                continue
            jobs.append(job)
            images += len(job.msg.request_ids)
        return jobs

    def _next_job(self, timeout: float) -> _Job | None:
        """Receive until an image request arrives or ``timeout`` passes; handle control inline."""
        msg = self.receive(timeout)
        if msg is None:
            return None
        if msg.kind == Kind.IMAGE:
            return _Job(msg, time.time(), time.perf_counter())
        if msg.kind == Kind.CONTROL and msg.meta.get("op") == "shutdown":
            log.info("%s: shutdown requested by %s", self.name, msg.source)
            self.running = False
        else:
            self.metrics.count("ignored_messages")
        return None

    # -- compute ----------------------------------------------------------------------------------
    def _valid(self, job: _Job) -> bool:
        """An image batch of the wrong shape gets an explicit error (the aggregator forwards it to
        the client), so the request is answered instead of timing out."""
        arr = job.msg.array
        expected = self.input_spec.image_shape
        problem = None
        if arr is None or arr.ndim != 4 or tuple(arr.shape[1:]) != expected:
            problem = f"image shape {None if arr is None else tuple(arr.shape)}, expected [B, {expected}]"
        elif arr.dtype != np.uint8:
            problem = f"image dtype {arr.dtype}, expected uint8"
        elif arr.shape[0] != len(job.msg.request_ids):
            problem = f"{arr.shape[0]} images for {len(job.msg.request_ids)} request ids"
        if problem is None:
            return True
        self.metrics.count("bad_images")
        self.send(self.aggregator, Message(
            Kind.ERROR, self.name, request_ids=job.msg.request_ids, reply_to=job.msg.reply_to,
            meta={"code": "bad_input", "message": f"{self.name}: {problem}", "part": self.part}))
        return False

    def _process(self, jobs: list[_Job]) -> None:
        jobs = [j for j in jobs if self._valid(j)]
        if not jobs:
            return
        images = np.concatenate([j.msg.array for j in jobs], axis=0)
        start = time.perf_counter()
        feats = []
        with torch.inference_mode():
            for lo in range(0, len(images), self.max_batch):
                x = self.input_spec.to_tensor(images[lo: lo + self.max_batch])
                feats.append(self.model.forward_features(x).float().numpy())
        features = np.concatenate(feats, axis=0)
        compute_s = time.perf_counter() - start
        self.metrics.observe("compute", compute_s)
        self.metrics.observe("batch_size", float(len(images)))
        offset = 0
        for job in jobs:
            n = len(job.msg.request_ids)
            stamps = dict(job.msg.timestamps)
            stamps.update({"edge_recv": job.received, "edge_sent": time.time()})
            self.send(self.aggregator, Message(
                Kind.FEATURES, self.name, request_ids=job.msg.request_ids, reply_to=job.msg.reply_to,
                array=np.ascontiguousarray(features[offset: offset + n]), codec=self.codec,
                meta={"part": self.part, "compute_ms": compute_s * 1e3, "batch": int(len(images)),
                      "queue_ms": (start - job.received_perf) * 1e3},
                timestamps=stamps))
            offset += n

    def _heartbeat(self) -> None:
        now = time.time()
        if now - self._last_heartbeat >= HEARTBEAT_INTERVAL_S:
            self._last_heartbeat = now
            # telemetry rides on the heartbeat, so the aggregator can report every node's figures
            self.send(self.aggregator, Message(Kind.HEARTBEAT, self.name,
                                               meta={"part": self.part, "metrics": self.metrics.snapshot()},
                                               timestamps={"sent": now}))

