"""Hostile peers against a live topology: the attacks, and ``devit-mq bench hostile`` that measures them.

Each attack is what a peer that can reach the sockets (and, without CURVE, claim any name) can send.
The bench launches a topology, records a real client's answers, runs every attack, and after each one
reports what the README's failure-modes table shows: frames sent, whether every node is still alive,
whether the client's answers are still identical, how long until the first full answer after the
attack (time to recover), each node's RSS before and after, and what the nodes counted as refused.
The hostile-peer tests (``tests/test_hostile.py``) use the same attacks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq

from devit_mq.protocol import (
    ErrorMeta,
    FeaturesMeta,
    HeartbeatMeta,
    Hello,
    Kind,
    Ready,
    Shutdown,
    StatusQuery,
)
from devit_mq.topology import Topology
from devit_mq.wire import Message, encode


class Raw:
    """Raw pyzmq sockets towards a topology's servers: what an attacker on the network has (a DEALER
    to the aggregator, a PUSH per edge), optionally with a chosen routing id."""

    def __init__(self, topology: Topology, identity: bytes | None = None) -> None:
        self.ctx = zmq.Context()
        self.topology = topology
        self.identity = identity
        self.socks: dict[str, zmq.Socket] = {}

    def sock(self, peer: str) -> zmq.Socket:
        if peer not in self.socks:
            kind = zmq.DEALER if peer == self.topology.aggregator.name else zmq.PUSH
            s = self.ctx.socket(kind)
            s.sndtimeo = 2000
            if kind == zmq.DEALER and self.identity is not None:
                s.identity = self.identity
            s.connect(self.topology.node(peer).connect_endpoint)
            self.socks[peer] = s
        return self.socks[peer]

    def send(self, peer: str, frames: list[bytes]) -> None:
        self.sock(peer).send_multipart(frames)

    def recv(self, timeout_s: float) -> list[bytes] | None:
        s = self.sock(self.topology.aggregator.name)
        return s.recv_multipart() if s.poll(int(timeout_s * 1000)) else None

    def close(self, linger_s: float = 2.0) -> None:
        """Give what was sent a moment to leave (an attacker's frames must arrive to be measured)."""
        self.ctx.destroy(linger=int(linger_s * 1000))


def tamper_meta(msg: Message, meta: object) -> list[bytes]:
    """``msg`` encoded, with its meta blob replaced by ``meta`` packed as it is (and no checksum)."""
    head, body = encode(msg)
    header = msgpack.unpackb(head)
    header["m"] = msgpack.packb(meta)
    header.pop("x", None)
    return [msgpack.packb(header), body]


def features_msg(source: str = "edge0", part: int = 0, width: int = 32, reply_to: str = "mallory",
                 rid: int = 1) -> Message:
    return Message(Kind.FEATURES, source, (rid,), np.zeros((1, 1, width), np.float32), reply_to=reply_to,
                   meta=FeaturesMeta(part=part))


HOSTILE_FEATURE_METAS = [{"part": [0]}, {"part": 0.0}, {"part": 0, "compute_ms": "abc"}, {"part": 0, "queue_ms": None},
                         {"part": 0, "compute_ms": float("nan")}, {"part": 2**63}]


@dataclass
class Target:
    """What an attack needs to know: the topology, the image shape, a live victim client's name
    and some of its request ids (for the attacks that try to cancel or steal its answers)."""

    topology: Topology
    image: np.ndarray  # one uint8 [1, H, W, C] image of the right shape
    victim: str
    victim_ids: tuple[int, ...]


def _edges(t: Target) -> list[str]:
    return [e.name for e in t.topology.edges]


def attack_hostile_meta(t: Target, n: int) -> int:
    """Well-formed FEATURES / ready whose meta has the wrong types (stopped the aggregator before)."""
    raw, sent = Raw(t.topology), 0
    ready = Message(Kind.CONTROL, _edges(t)[0], meta=Ready(part=0))
    for i in range(n):
        if i % 7 == 6:
            raw.send(t.topology.aggregator.name, tamper_meta(ready, {"op": "ready", "part": [0]}))
        else:
            meta = HOSTILE_FEATURE_METAS[i % len(HOSTILE_FEATURE_METAS)]
            raw.send(t.topology.aggregator.name, tamper_meta(features_msg(_edges(t)[0]), meta))
        sent += 1
    raw.close()
    return sent


def attack_many_timestamps(t: Target, n: int) -> int:
    """IMAGE requests carrying 64 timestamps (an edge added two and failed to encode, unguarded)."""
    raw, sent = Raw(t.topology), 0
    stamps = {f"s{i:02d}": 1.0 for i in range(64)}
    for i in range(n):
        msg = Message(Kind.IMAGE, "mallory", (i,), t.image, codec="raw", reply_to="mallory", timestamps=stamps)
        raw.send(_edges(t)[i % len(_edges(t))], encode(msg))
        sent += 1
    raw.close()
    return sent


def _jpeg_file(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=50)
    return buf.getvalue()


def hostile_jpeg_payloads(image: np.ndarray) -> list[bytes]:
    """JPEG payloads for a ``[1, H, W, C]`` IMAGE header that a receiver must drop before decoding:
    a 4096x4096 file (64 MB of pixels from a ~100 KB file), a file of another mode, a truncated one,
    garbage after the JPEG marker, and a lengths table that does not add up."""
    h, w, c = image.shape[1:]
    good = _jpeg_file(image[0, ..., 0] if c == 1 else image[0])
    big = _jpeg_file(np.zeros((4096, 4096), np.uint8) if c == 1 else np.zeros((4096, 4096, 3), np.uint8))
    other = _jpeg_file(np.zeros((h, w, 3 if c == 1 else 1), np.uint8).squeeze())

    def framed(data: bytes, length: int | None = None) -> bytes:
        return np.array([len(data) if length is None else length], "<u4").tobytes() + data

    return [framed(big), framed(other), framed(good[: len(good) // 2]), framed(b"\xff\xd8\xff" + bytes(64)),
            framed(good, len(good) + 7)]


def attack_hostile_jpeg(t: Target, n: int) -> int:
    """IMAGE requests whose jpeg payloads lie about their size or are no JPEG (a bomb, another mode,
    truncated, garbage, a wrong lengths table): dropped before any pixel is decoded."""
    raw, sent = Raw(t.topology), 0
    head = encode(Message(Kind.IMAGE, "mallory", (1,), t.image, codec="jpeg", reply_to="mallory"))[0]
    payloads = hostile_jpeg_payloads(t.image)
    for i in range(n):
        raw.send(_edges(t)[i % len(_edges(t))], [head, payloads[i % len(payloads)]])
        sent += 1
    raw.close()
    return sent


def attack_name_flood(t: Target, n: int) -> int:
    """Messages under ``n`` distinct sender names (grew per-source counters past the message cap)."""
    raw, sent = Raw(t.topology), 0
    for i in range(n):
        name = f"sender-{i}"
        raw.send(t.topology.aggregator.name, encode(Message(Kind.CONTROL, name, meta=StatusQuery())))
        raw.send(_edges(t)[0], encode(Message(Kind.IMAGE, name, (i,), t.image, codec="raw", reply_to=name)))
        sent += 2
    raw.close()
    return sent


def attack_fat_heartbeats(t: Target, n: int) -> int:
    """Heartbeats claiming to be an edge with 100 KB telemetry maps (added 90 MB before)."""
    raw = Raw(t.topology)
    edge = _edges(t)[0]
    fat = {"part": 0, "telemetry": {"node": edge, "counters": {f"k{i:05d}": i for i in range(8000)}}}
    frames = tamper_meta(Message(Kind.HEARTBEAT, edge, meta=HeartbeatMeta(part=0)), fat)
    for _ in range(n):
        raw.send(t.topology.aggregator.name, frames)
    raw.close()
    return n


def attack_admin_ops(t: Target, n: int) -> int:
    """shutdown to every node without the launch's token (stopped nodes before)."""
    raw, sent = Raw(t.topology), 0
    ops = [Shutdown(), Shutdown(token="guess"), Shutdown(token="0" * 32)]
    for i in range(n):
        for peer in [t.topology.aggregator.name, *_edges(t)]:
            raw.send(peer, encode(Message(Kind.CONTROL, "mallory", meta=ops[i % len(ops)])))
            sent += 1
    raw.close()
    return sent


def attack_spoofed_errors(t: Target, n: int) -> int:
    """ERROR and FEATURES from a stranger naming a live client's requests (cancelled them before)."""
    raw, sent = Raw(t.topology), 0
    for i in range(n):
        rid = t.victim_ids[i % len(t.victim_ids)] if t.victim_ids else i
        raw.send(t.topology.aggregator.name, encode(Message(Kind.ERROR, "mallory", (rid,), reply_to=t.victim,
                                                            meta=ErrorMeta(message="cancelled"))))
        raw.send(t.topology.aggregator.name, encode(features_msg("mallory", reply_to=t.victim, rid=rid)))
        sent += 2
    raw.close()
    return sent


def attack_hijack(t: Target, n: int) -> int:
    """Connections that take a live client's name (as routing id and source) and say hello."""
    sent = 0
    for _ in range(max(1, n // 10)):
        raw = Raw(t.topology, identity=t.victim.encode())
        for _ in range(10):
            raw.send(t.topology.aggregator.name, encode(Message(Kind.CONTROL, t.victim, meta=Hello())))
            sent += 1
        raw.close()
    return sent


def attack_deaf_flood(t: Target, n: int) -> int:
    """Status queries and hellos from a connection that never reads its replies (each reply used to
    wait the send timeout once that connection's queue was full, stalling every client)."""
    raw = Raw(t.topology)
    for i in range(n):
        op = Hello() if i % 2 else StatusQuery()
        raw.send(t.topology.aggregator.name, encode(Message(Kind.CONTROL, "deaf", meta=op)))
    raw.close(linger_s=5.0)
    return n


def attack_random_frames(t: Target, n: int) -> int:
    rng = np.random.default_rng(0)
    raw, sent = Raw(t.topology), 0
    peers = [t.topology.aggregator.name, *_edges(t)]
    for i in range(n):
        raw.send(peers[i % len(peers)], [rng.bytes(int(rng.integers(0, 200))), rng.bytes(int(rng.integers(0, 300)))])
        sent += 1
    raw.close()
    return sent


def attack_push_flood(t: Target, n: int, senders: int = 50) -> int:
    """Many PUSH sockets flooding the edges' inboxes, then closing with linger 0 (aborted libzmq)."""
    ctx = zmq.Context()
    socks = []
    for i in range(senders):
        s = ctx.socket(zmq.PUSH)
        s.linger = 0
        s.sndhwm = 0
        s.connect(t.topology.edges[i % len(t.topology.edges)].connect_endpoint)
        socks.append(s)
    payload = [b"\x82" + bytes(64), bytes(4096)]
    sent = 0
    for i in range(n):
        try:
            socks[i % senders].send_multipart(payload, zmq.NOBLOCK)
            sent += 1
        except zmq.Again:
            pass
    for s in socks:
        s.close(linger=0)
    ctx.destroy(linger=0)
    return sent


ATTACKS: dict[str, tuple[Callable[[Target, int], int], str]] = {
    "hostile meta": (attack_hostile_meta, "FEATURES/ready with meta.part [0] / 0.0, compute_ms 'abc', NaN ..."),
    "64 timestamps": (attack_many_timestamps, "IMAGE carrying the 64-entry timestamp maximum"),
    "hostile jpeg": (attack_hostile_jpeg, "IMAGE as jpeg: a 4096x4096 file, wrong mode, truncated, garbage"),
    "name flood": (attack_name_flood, "status queries and images under distinct sender names"),
    "fat heartbeats": (attack_fat_heartbeats, "heartbeats with 100 KB telemetry maps, claiming edge0"),
    "admin ops": (attack_admin_ops, "shutdown to every node without the launch's token"),
    "spoofed errors": (attack_spoofed_errors, "ERROR/FEATURES from a stranger naming a live client's requests"),
    "hijack": (attack_hijack, "connections taking a live client's name and saying hello"),
    "deaf flood": (attack_deaf_flood, "status queries from a connection that never reads its replies"),
    "random frames": (attack_random_frames, "random bytes as two frames"),
    "PUSH flood": (attack_push_flood, "50 PUSH sockets flood the edges, then close with linger 0"),
}


# -- measuring ------------------------------------------------------------------------------------

def _node_figures(client) -> dict[str, dict[str, Any]]:
    time.sleep(0.6)  # one heartbeat: the edges' counters reach the aggregator's status
    status = client.query_status(10)
    return {name: {"rss_mb": m["rss_mb"], "counters": m["counters"]} for name, m in status["nodes"].items()}


def _refused(before: dict, after: dict) -> dict[str, int]:
    keys = ("wire_errors", "unauthorized", "identity_conflicts", "bad_features", "bad_images", "handler_errors")
    out = {}
    for node, fig in after.items():
        old = before.get(node, {}).get("counters", {})
        for k in keys:
            delta = fig["counters"].get(k, 0) - old.get(k, 0)
            if delta:
                out[f"{node}.{k}"] = delta
    return out


def run(topology_path: str | Path, frames: int = 2000, only: list[str] | None = None) -> dict[str, Any]:
    """Launch the topology, run every attack with ``frames`` frames, and measure after each."""
    from devit_mq.nodes.launcher import Launcher
    from devit_mq.nodes.runtime import Client

    with Launcher(topology_path) as launcher, Client(launcher.topology, timeout_s=30) as victim_client:
        client = launcher.client
        victim = victim_client.node  # its own connection: the recovery checks cannot swallow its answers
        shape = tuple(launcher.status["image_shape"])
        imgs = np.random.default_rng(0).integers(0, 256, size=(16, *shape), dtype=np.uint8)
        baseline = client.predict(imgs, batch_size=4, window=2)
        if baseline.errors:
            raise RuntimeError(f"the topology does not answer before any attack: {baseline.errors[0].error}")
        rows = []
        for name, (attack, what) in ATTACKS.items():
            if only and name not in only:
                continue
            before = _node_figures(client)
            pending = victim.submit(imgs[:2])  # live requests the attack can try to cancel or steal
            target = Target(launcher.topology, imgs[:1], victim.name, tuple(pending))
            t0 = time.perf_counter()
            sent = attack(target, frames)
            attack_s = time.perf_counter() - t0
            alive = all(p.proc.poll() is None for p in launcher.processes)
            recovered = None
            deadline = time.perf_counter() + 30
            while time.perf_counter() < deadline and alive:
                pred = client.predict(imgs, batch_size=4, window=2)
                same = (not pred.errors and np.array_equal(pred.labels, baseline.labels)
                        and np.allclose(pred.probabilities, baseline.probabilities, atol=1e-6))
                if same:
                    recovered = time.perf_counter() - t0 - attack_s
                    break
            answers: list = []
            deadline = time.perf_counter() + 10
            while len(answers) < len(pending) and time.perf_counter() < deadline:
                answers += victim.collect(0.1)
            after = _node_figures(client) if alive else {}
            rows.append({
                "attack": name, "what": what, "frames": sent, "attack_s": round(attack_s, 2),
                "nodes_alive": alive, "answers_correct": recovered is not None,
                "live_requests_answered_ok": sum(a.ok and not a.degraded for a in answers), "live_requests": len(pending),
                "recover_s": None if recovered is None else round(recovered, 3),
                "rss_mb_before": {n: round(f["rss_mb"], 1) for n, f in before.items()},
                "rss_mb_after": {n: round(f["rss_mb"], 1) for n, f in after.items()},
                "refused": _refused(before, after),
            })
            print(f"{name}: {sent} frames, alive={alive}, correct={recovered is not None}", file=sys.stderr, flush=True)
    return {"topology": str(topology_path), "frames_per_attack": frames, "attacks": rows}


def table(report: dict[str, Any]) -> str:
    lines = ["| attack | frames | nodes alive | answers correct after | live requests ok | time to recover | "
             "RSS before -> after (MB, max over nodes) | refused (counted) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["attacks"]:
        before = max(r["rss_mb_before"].values(), default=0.0)
        after = max(r["rss_mb_after"].values(), default=float("nan"))
        growth = max((r["rss_mb_after"].get(n, 0) - v for n, v in r["rss_mb_before"].items()), default=0.0)
        refused = ", ".join(f"{k} {v}" for k, v in r["refused"].items()) or "-"
        rec = "-" if r["recover_s"] is None else f"{r['recover_s'] * 1e3:.0f} ms"
        lines.append(f"| {r['attack']} | {r['frames']} | {'yes' if r['nodes_alive'] else 'NO'} | "
                     f"{'yes' if r['answers_correct'] else 'NO'} | {r['live_requests_answered_ok']}/{r['live_requests']} | "
                     f"{rec} | {before:.0f} -> {after:.0f} (max growth {growth:+.1f}) | {refused} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="devit-mq bench hostile", description=(
        "Launch a ZeroMQ topology and attack it as a hostile peer would; report, per attack, frames sent, "
        "nodes alive, answers correct, time to recover, RSS before/after and what was refused."))
    p.add_argument("topology", nargs="?", default="topologies/bench-2edge.yaml")
    p.add_argument("--frames", type=int, default=2000, help="frames per attack (default 2000)")
    p.add_argument("--only", default=None, help="comma-separated attack names")
    p.add_argument("--json", default=None, help="also write the report here")
    args = p.parse_args(argv)
    only = [a.strip() for a in args.only.split(",")] if args.only else None
    unknown = [a for a in only or [] if a not in ATTACKS]
    if unknown:
        print(f"devit-mq bench hostile: unknown attack(s) {unknown}; known: {', '.join(ATTACKS)}", file=sys.stderr)
        return 2
    report = run(args.topology, args.frames, only)
    print(table(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    ok = all(r["nodes_alive"] and r["answers_correct"] for r in report["attacks"])
    return 0 if ok else 1
