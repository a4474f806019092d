"""Layer-wise pipeline partitioning of the teacher (PipeEdge/EdgeShard style), and the monolith.

The teacher's blocks are split into N contiguous runs, one per host: stage 0 takes the image
(patch embedding + its blocks), each stage ships its activations ``[B, T, D]`` to the next in fp16,
the last stage adds the final norm and head and sends the class probabilities to the client. The
monolithic teacher is the same thing with one stage. Everything that travels is a
:class:`devit_mq.wire.Message` (IMAGE from the client, FEATURES between stages, RESULT to the
client), so image bytes are identical to DeViT's and the wire-format prediction uses one encoder.

Transport: ZeroMQ PUSH/PULL along the chain (stage i binds, stage i-1 connects; the client binds the
result socket the last stage connects to). A link's added delay and jitter (this kernel has no
netem) is applied by the sender, which holds each message until it is due in a FIFO (order is kept).

``python -m devit_mq.testbed.pipeline --bundle B --stage I --stages N --bind tcp://*:P --next tcp://H:P``
runs one stage until SIGTERM.
"""

from __future__ import annotations

import argparse
import collections
import logging
import queue
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from devit_mq.protocol import DEFAULT_JPEG_QUALITY, FeaturesMeta, ResultMeta, StageTimes
from devit_mq.wire import Kind, Limits, Message, decode, encode

log = logging.getLogger("devit_mq.testbed")
ACTIVATION_CODEC = "fp16"  # as PipeEdge ships activations
LIMITS = Limits(max_message_bytes=64 << 20)


def split_blocks(depth: int, stages: int) -> list[tuple[int, int]]:
    """Contiguous ``[lo, hi)`` block ranges, sizes differing by at most one (earlier stages larger)."""
    if not 1 <= stages <= depth:
        raise ValueError(f"cannot split {depth} blocks into {stages} stages")
    bounds = [round(i * depth / stages) for i in range(stages + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(stages)]


class StageModel:
    """Stage ``stage`` of ``stages`` of a bundle's teacher, in torch with ``threads`` threads."""

    def __init__(self, bundle: Path, stage: int, stages: int, threads: int = 1, attention: str = "auto") -> None:
        import torch

        from devit_mq.model import load_manifest, load_teacher

        torch.set_num_threads(threads)
        manifest = load_manifest(bundle)
        self.model = load_teacher(bundle, manifest).eval()
        self.input = manifest.input
        self.stage, self.stages = stage, stages
        self.lo, self.hi = split_blocks(len(self.model.blocks), stages)[stage]
        self.first, self.last = stage == 0, stage == stages - 1
        if attention == "auto":
            from devit_mq.model import select_backend

            attention = select_backend(self.model, batch_size=1, apply=False)
        self.model.set_attention_backend(attention)
        self.attention = attention

    def __call__(self, array: np.ndarray) -> np.ndarray:
        import torch

        m = self.model
        with torch.inference_mode():
            if self.first:
                x = m._prepend_prefix(m.patch_embed(self.input.to_tensor(np.asarray(array))))
            else:
                x = torch.from_numpy(np.array(array, dtype=np.float32))
            for block in m.blocks[self.lo:self.hi]:
                x = block(x)
            if not self.last:
                return x.numpy()
            logits = m.forward_head(m.norm(x)[:, : m.num_prefix_tokens])
            if isinstance(logits, tuple):
                logits = (logits[0] + logits[1]) / 2
            return logits.softmax(-1).numpy()


class DelayedSender:
    """A PUSH socket whose sends arrive ``delay_s + U[0, jitter_s)`` later (FIFO, from a thread)."""

    def __init__(self, ctx: zmq.Context, endpoint: str, delay_s: float = 0.0, jitter_s: float = 0.0,
                 seed: int = 0, bind: bool = False) -> None:
        self.sock = ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 1000)
        (self.sock.bind if bind else self.sock.connect)(endpoint)
        self.delay_s, self.jitter_s = delay_s, jitter_s
        self.rng = random.Random(seed)
        self.queue: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None
        if delay_s > 0 or jitter_s > 0:
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()

    def send(self, frames: list[bytes]) -> None:
        if self.thread is None:
            self.sock.send_multipart(frames, copy=False)
            return
        self.queue.put((time.monotonic() + self.delay_s + self.rng.uniform(0, self.jitter_s), frames))

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            due, frames = item
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            self.sock.send_multipart(frames, copy=False)

    def close(self) -> None:
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join(2)
        self.sock.close(0)


def _stage_message(stage: StageModel, msg: Message, out: np.ndarray, compute_ms: float) -> Message:
    if stage.last:
        rows = len(msg.request_ids)
        meta = ResultMeta(labels=[int(i) for i in out.argmax(-1)], degraded=[False] * rows, missing=[[]] * rows,
                          stages=[StageTimes(edge_compute_ms=compute_ms)] * rows)
        return Message(Kind.RESULT, f"stage{stage.stage}", msg.request_ids, out.astype(np.float32), "fp32", meta,
                       msg.timestamps, msg.reply_to)
    return Message(Kind.FEATURES, f"stage{stage.stage}", msg.request_ids, out, ACTIVATION_CODEC,
                   FeaturesMeta(part=stage.stage, compute_ms=compute_ms), msg.timestamps, msg.reply_to)


def serve_stage(stage: StageModel, bind: str, next_endpoint: str, delay_s: float = 0.0, jitter_s: float = 0.0,
                seed: int = 0) -> None:
    """Receive, compute, forward, until SIGTERM/SIGINT."""
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.bind(bind)
    sender = DelayedSender(ctx, next_endpoint, delay_s, jitter_s, seed)
    stop = threading.Event()

    def _stop(_signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    expect = Kind.IMAGE if stage.first else Kind.FEATURES
    log.info("stage %d/%d (blocks %d-%d, attention %s) serving on %s -> %s", stage.stage, stage.stages,
             stage.lo, stage.hi - 1, stage.attention, bind, next_endpoint)
    served = 0
    try:
        while not stop.is_set():
            if not pull.poll(200):
                continue
            frames = pull.recv_multipart(copy=False)
            msg = decode([f.buffer for f in frames], LIMITS, expect_kind=expect)
            start = time.perf_counter()
            out = stage(msg.array)
            compute_ms = (time.perf_counter() - start) * 1e3
            sender.send(encode(_stage_message(stage, msg, out, compute_ms)))
            served += 1
    finally:
        log.info("stage %d: stopped after %d messages", stage.stage, served)
        sender.close()
        pull.close(0)
        ctx.term()


class ChainClient:
    """The client of a pipeline (or of the monolith): sends IMAGE messages to the first stage and
    receives RESULTs on its own bound socket."""

    def __init__(self, first_endpoint: str, result_bind: str, image_codec: str = "raw", delay_s: float = 0.0,
                 jitter_s: float = 0.0, seed: int = 0, image_quality: int = DEFAULT_JPEG_QUALITY) -> None:
        self.ctx = zmq.Context()
        self.results = self.ctx.socket(zmq.PULL)
        self.results.setsockopt(zmq.LINGER, 0)
        self.results.bind(result_bind)
        self.sender = DelayedSender(self.ctx, first_endpoint, delay_s, jitter_s, seed)
        self.image_codec, self.image_quality = image_codec, image_quality
        self.next_id = 1

    def _send(self, image: np.ndarray) -> int:
        rid, self.next_id = self.next_id, self.next_id + 1
        msg = Message(Kind.IMAGE, "client", (rid,), image[None], self.image_codec, reply_to="client",
                      timestamps={"client_sent": time.time()}, quality=self.image_quality)
        self.sender.send(encode(msg))
        return rid

    def _recv(self, timeout_s: float) -> Message:
        if not self.results.poll(int(timeout_s * 1e3)):
            raise TimeoutError(f"no result within {timeout_s:g} s")
        frames = self.results.recv_multipart(copy=False)
        return decode([f.buffer for f in frames], LIMITS, expect_kind=Kind.RESULT)

    def run(self, images: np.ndarray, window: int = 1, timeout_s: float = 60.0) -> tuple[list[float], np.ndarray]:
        """Classify ``images`` one per request with ``window`` in flight; returns each request's
        latency (s) and the probabilities, in order."""
        sent: dict[int, tuple[int, float]] = {}
        latencies = [0.0] * len(images)
        probs: list[np.ndarray | None] = [None] * len(images)
        pending = collections.deque(range(len(images)))
        done = 0
        while done < len(images):
            while pending and len(sent) < window:
                i = pending.popleft()
                t0 = time.perf_counter()
                sent[self._send(images[i])] = (i, t0)
            msg = self._recv(timeout_s)
            t1 = time.perf_counter()
            for row, rid in enumerate(msg.request_ids):
                i, t0 = sent.pop(rid)
                latencies[i] = t1 - t0
                probs[i] = np.array(msg.array[row])
                done += 1
        return latencies, np.stack(probs)  # type: ignore[arg-type]

    def close(self) -> None:
        self.sender.close()
        self.results.close(0)
        self.ctx.term()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m devit_mq.testbed.pipeline", description="Run one pipeline stage.")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--stage", type=int, required=True)
    p.add_argument("--stages", type=int, required=True)
    p.add_argument("--bind", required=True)
    p.add_argument("--next", required=True, dest="next_endpoint")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--attention", default="auto")
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s stage{args.stage} %(levelname)s %(message)s")
    stage = StageModel(args.bundle, args.stage, args.stages, args.threads, args.attention)
    serve_stage(stage, args.bind, args.next_endpoint, args.delay_ms / 1e3, args.jitter_ms / 1e3, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
