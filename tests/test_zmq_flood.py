"""A hostile flood into an edge's PULL inbox from many PUSH sockets that then close with linger 0.

This used to abort the edge process inside libzmq ("Assertion failed: !_io_error
(src/stream_engine_base.cpp:310)"): a connection whose receive queue was full got reset by its peer,
and the ZMTP heartbeat timer then wrote to it before the queue drained (see the comment above
TCP_KEEPALIVE_IDLE_S in devit_mq/transport/zmq.py). The flood must fill the edge's per-connection
queues (its senders see EAGAIN) and the edge must then outlive two of the old heartbeat intervals.
"""

import os
import time

import numpy as np
import pytest
import yaml
import zmq

from devit_mq.nodes.launcher import Launcher
from devit_mq.transport.zmq import ZmqTransport
from devit_mq.wire import Kind, Message, encode

from .runtime_helpers import images, make_bundle, write_topology
from .test_transport_zmq import SPAWN, load, stop, topology_dict

HOLD_S = 2.5  # > 2 x the 1 s ZMTP heartbeat interval that used to trigger the abort


def image_request(batch: int) -> list[bytes]:
    """A well-formed image request for a client nobody knows: the cheapest way to keep an edge busy."""
    return encode(Message(Kind.IMAGE, "flooder", request_ids=tuple(range(batch)), array=images(batch),
                          codec="raw", reply_to="flooder"))


def flood(endpoints, sockets_per_endpoint, seconds, messages, heavy=(), heavy_at=0.0, oversized=None):
    """Send ``messages`` round-robin from many PUSH sockets per endpoint, without blocking, for
    ``seconds``; ``heavy_at`` seconds in, send ``heavy`` to each endpoint from one more socket; send
    ``oversized`` over and over from two more (each one disconnects its socket, which reconnects).
    Then close every socket with linger 0 (what is still queued is dropped). Returns (sent, refused):
    refused sends mean the queues towards the receiver were full, the state the abort needed."""
    ctx = zmq.Context()
    socks, heavy_socks, rogues = [], [], []
    sent = refused = 0
    try:
        for endpoint in endpoints:
            for group, n in ((socks, sockets_per_endpoint), (heavy_socks, 1 if heavy else 0),
                             (rogues, 2 if oversized else 0)):
                for _ in range(n):
                    sock = ctx.socket(zmq.PUSH)
                    sock.linger = 0
                    sock.connect(endpoint)
                    group.append(sock)
        start = time.monotonic()
        pending = list(heavy)
        i = 0
        while time.monotonic() - start < seconds:
            if pending and time.monotonic() - start >= heavy_at:
                for sock in heavy_socks:
                    for frames in pending:
                        sock.send_multipart(frames, zmq.NOBLOCK)  # its own, empty queue: accepted
                        sent += 1
                pending = []
            for sock in rogues:
                try:
                    sock.send_multipart(oversized, zmq.NOBLOCK)
                    sent += 1
                except zmq.Again:
                    pass  # disconnected, reconnecting
            for sock in socks:
                try:
                    sock.send_multipart(messages[i % len(messages)], zmq.NOBLOCK)
                    sent += 1
                except zmq.Again:
                    refused += 1
                i += 1
    finally:
        for sock in socks + heavy_socks + rogues:
            sock.close(linger=0)
        ctx.term()
    return sent, refused


def hold_alive(launcher, seconds):
    """Every node must stay up for ``seconds`` (raises LaunchError with the node's log otherwise)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        launcher.check_alive()
        time.sleep(0.1)
    launcher.check_alive()


def assert_answers(launcher, bundle_imgs):
    """A real request still gets complete (not degraded) answers from every edge."""
    deadline = time.monotonic() + 20
    while True:  # the edges may still be working off the flood's backlog
        pred = launcher.client.predict(bundle_imgs, batch_size=2)
        if (not pred.errors and pred.degraded == 0) or time.monotonic() > deadline:
            break
        launcher.check_alive()
    assert not pred.errors and pred.degraded == 0, pred.answers
    assert len(pred.labels) == len(bundle_imgs)


def edge_counts(launcher):
    """Messages each edge has taken from its inbox so far (from the telemetry on its heartbeats)."""
    nodes = launcher.client.query_status(10).get("nodes", {})
    return {name: sum(v for k, v in snap.get("counters", {}).items() if k.startswith("recv.") or k == "wire_errors")
            for name, snap in nodes.items() if name.startswith("edge")}


def settle(launcher, timeout_s):
    """Wait until the edges have worked off the flood's backlog (their counts stop moving), so that
    they stop promptly when the launcher asks them to."""
    deadline = time.monotonic() + timeout_s
    last = edge_counts(launcher)
    while time.monotonic() < deadline:
        time.sleep(1.5)  # three 0.5 s heartbeats
        now = edge_counts(launcher)
        if now == last:
            return now
        last = now
    raise AssertionError(f"edges still busy after {timeout_s} s: {last}")


def run_flood(tmp_path, *, edges, sockets, seconds, messages, heavy=(), heavy_at=0.0, oversized=None,
              limits=None, settle_s=60):
    bundle = make_bundle(tmp_path / "bundle")
    topo = write_topology(tmp_path / "t.yaml", bundle)
    if limits:
        data = yaml.safe_load(topo.read_text())
        data["limits"] = limits
        topo.write_text(yaml.safe_dump(data, sort_keys=False))
    with Launcher(topo, log_dir=tmp_path / "logs") as launcher:
        targets = [e.connect_endpoint for e in launcher.topology.edges if e.name in edges]
        t0 = time.monotonic()
        sent, refused = flood(targets, sockets, seconds, messages, heavy, heavy_at, oversized)
        took = time.monotonic() - t0
        print(f"flood: {sent} messages into {sorted(edges)} from {sockets} PUSH sockets each (+ the heavy "
              f"and oversized senders) in {took:.1f} s, {refused} sends refused (queues full), then "
              "closed with linger 0")
        assert refused > 0, "the flood never filled the edge's queues: it does not test the abort"
        hold_alive(launcher, HOLD_S)
        assert_answers(launcher, images(4, seed=1))
        print(f"edges alive {HOLD_S} s after the flood and answering; messages taken per edge: "
              f"{settle(launcher, settle_s)}")
        launcher.check_alive()
    for node in launcher.processes:
        assert node.proc.returncode == 0, node.tail()


# ------------------------------------------------------------------------------------------- tests


def edge_inbox(data, ready, pause_s):
    """An edge-like process: a bound inbox from ZmqTransport itself that does not read for `pause_s`
    (a busy edge: the queues fill), then drains until it gets b"probe" and exits 0."""
    with ZmqTransport(load(data), "edge0") as t:
        ready.set()
        time.sleep(pause_s)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            msg = t.recv(timeout=1)
            if msg is not None and msg.frames == [b"probe"]:
                return
        raise SystemExit(3)


@pytest.mark.timeout(60)
def test_flooded_inbox_survives_senders_closing_with_linger_0(tmp_path):
    data = topology_dict("tcp", tmp_path)
    ready = SPAWN.Event()
    proc = SPAWN.Process(target=edge_inbox, args=(data, ready, 1.0 + HOLD_S), daemon=True)
    proc.start()
    try:
        assert ready.wait(30)
        endpoint = load(data).edges[0].connect_endpoint
        sent, refused = flood([endpoint], 20, 1.0, [[os.urandom(n)] for n in (10, 300, 2000)])
        print(f"flood: {sent} messages from 20 PUSH sockets in 1 s, {refused} refused")
        assert refused > 0
        with ZmqTransport(load(data), "client") as client:
            client.send("edge0", [b"probe"])
            proc.join(40)
        assert proc.exitcode == 0, f"edge inbox process exited with {proc.exitcode} (-6: libzmq abort)"
    finally:
        stop(proc)


@pytest.mark.timeout(120)
def test_flooded_edge_process_survives_and_still_answers(tmp_path):
    # Ten full-size image requests (~0.3 s of compute each) keep the edge from reading for a few
    # seconds, through the flood and its end: its queues fill with junk, the flooders see them full,
    # close, and the edge's heartbeat timer used to fire on the reset connections before it drained
    # them. Junk is dropped at once, so little work is left; a small high-water mark bounds memory.
    junk = [[os.urandom(16 * 1024)]]
    run_flood(tmp_path, edges={"edge0"}, sockets=20, seconds=1.5, messages=junk,
              heavy=[image_request(4096)] * 10, limits={"hwm": 100})


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_long_flood_of_both_edges_with_oversized_frames(tmp_path):
    """The hostile-peer figures: 20 s into both edges from 50 sockets each, with random frames of
    many sizes and small image requests, plus frames over max_message_bytes from two more sockets per
    edge; 40 large image requests per edge 1.5 s before the end keep the edges busy across the close,
    as a loaded edge would be."""
    limit = 512 * 1024  # small, so that oversized frames are cheap to send
    rng = np.random.default_rng(0)
    messages = [image_request(1), [os.urandom(1000)], image_request(4), [os.urandom(10)],
                *[[os.urandom(int(n)) for n in rng.integers(1, 8192, int(k))] for k in rng.integers(1, 4, 7)]]
    run_flood(tmp_path, edges={"edge0", "edge1"}, sockets=50, seconds=20.0, messages=messages,
              heavy=[image_request(1024)] * 40, heavy_at=18.5, oversized=[os.urandom(limit + 1)], limits={"max_message_bytes": limit},
              settle_s=150)
