"""ZeroMQ transport over real sockets (tcp and ipc), with peers in separate processes where it matters.

Every test is bounded by a pytest timeout and every wait by an explicit timeout: a hang fails.
"""

import hashlib
import multiprocessing as mp
import shutil
import time

import pytest
import zmq

from devit_mq.topology import load_topology
from devit_mq.transport import Peer, TransportError, open_transport
from devit_mq.transport.security import create_keys
from devit_mq.transport.zmq import ZmqTransport

SPAWN = mp.get_context("spawn")  # a fresh interpreter: no sockets or contexts inherited from pytest


def free_ports(n):
    from .runtime_helpers import free_ports as ports  # imported here: the helpers import torch

    return ports(n)


def topology_dict(kind, tmp_path, n_edges=2, **extra):
    if kind == "tcp":
        ports = free_ports(n_edges + 1)
        agg = {"name": "aggregator", "host": "127.0.0.1", "port": ports[0]}
        edges = [{"name": f"edge{i}", "submodel": i, "host": "127.0.0.1", "port": ports[i + 1]}
                 for i in range(n_edges)]
    else:
        agg = {"name": "aggregator", "ipc": str(tmp_path / "agg.sock")}
        edges = [{"name": f"edge{i}", "submodel": i, "ipc": str(tmp_path / f"e{i}.sock")} for i in range(n_edges)]
    return {"name": "zt", "bundle": str(tmp_path / "no-bundle"), "transport": "zmq", "aggregator": agg,
            "edges": edges, **extra}


def load(data):
    return load_topology(data, check_bundle=False)


def digest(frames):
    return hashlib.sha256(b"".join(len(f).to_bytes(8, "little") + f for f in frames)).digest()


# --------------------------------------------------------------------- processes (spawned targets)


def run_edge(data, name, count):
    """Forward `count` messages from the inbox to the aggregator, tagged with the edge's name."""
    with open_transport(load(data), name) as t:
        for _ in range(count):
            msg = t.recv(timeout=20)
            if msg is None:
                raise SystemExit(3)
            t.send("aggregator", [name.encode(), *msg.frames])
        t.close(linger=5)  # let the last (1 MiB) message leave before the process exits


def run_client(data, name, messages):
    """Say hello, send every message to every edge, then expect one digest answer per (edge, message)."""
    t = open_transport(load(data), name)
    try:
        t.send("aggregator", [b"hello", name.encode()])
        expected = set()
        for i, frames in enumerate(messages):
            for edge in load(data).edges:
                t.send(edge.name, [b"%d" % i, *frames])
                expected.add(digest([edge.name.encode(), b"%d" % i, *frames]))
        got = set()
        while len(got) < len(expected):
            msg = t.recv(timeout=20)
            if msg is None or msg.frames[0] != b"answer":
                raise SystemExit(4)
            got.add(msg.frames[1])
        raise SystemExit(0 if got == expected else 5)
    finally:
        t.close()


def run_hello_then_wait(data, name):
    with open_transport(load(data), name) as t:
        t.send("aggregator", [b"hello", name.encode()])
        time.sleep(30)  # the test kills us


def start(target, *args):
    proc = SPAWN.Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def stop(*procs):
    for proc in procs:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(5)


def serve_round_trip(data, client_name, messages, curve=False):
    """Be the aggregator for two edge processes and a client process (run_edge, run_client): answer
    every forwarded message over the client's own connection; all three processes must exit 0."""
    agg = open_transport(load(data), "aggregator")
    edges = [start(run_edge, data, f"edge{i}", len(messages)) for i in range(2)]
    client = start(run_client, data, client_name, messages)
    try:
        hello = agg.recv(timeout=30)
        assert hello.frames == [b"hello", client_name.encode()]
        assert type(hello.peer.route) is bytes and client_name.encode() not in hello.peer.route  # random, not the name
        assert hello.peer.key == (client_name if curve else None)  # CURVE names the connection by its key
        for _ in range(2 * len(messages)):
            msg = agg.recv(timeout=30)
            assert msg is not None and msg.frames[0] in (b"edge0", b"edge1")
            assert msg.peer.key == (msg.frames[0].decode() if curve else None)
            agg.reply(hello.peer, [b"answer", digest(msg.frames)])
        client.join(30)
        assert client.exitcode == 0
        for edge in edges:
            edge.join(10)
            assert edge.exitcode == 0
    finally:
        stop(client, *edges)
        agg.close()


# ------------------------------------------------------------------------------------------- tests


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["tcp", "ipc"])
def test_round_trip_between_processes(kind, tmp_path):
    """client -> edges (PUSH) -> aggregator (ROUTER) -> client's connection (DEALER), across 4 processes."""
    messages = [[b"small"], [b"", b"x"], [bytes(range(256)) * 4096, b"tail"]]  # incl. a 1 MiB frame
    serve_round_trip(topology_dict(kind, tmp_path), "client-7", messages)


@pytest.mark.timeout(30)
def test_aggregator_answers_each_client_over_its_own_connection(tmp_path):
    data = topology_dict("ipc", tmp_path)
    topology = load(data)
    with open_transport(topology, "aggregator") as agg, open_transport(topology, "alice") as alice, \
            open_transport(topology, "bob") as bob, open_transport(topology, "alice") as alice_impostor:
        alice.send("aggregator", [b"hi from alice"])
        bob.send("aggregator", [b"hi from bob"])
        got = {m.frames[0]: m.peer for m in (agg.recv(5), agg.recv(5))}
        assert set(got) == {b"hi from alice", b"hi from bob"}
        agg.reply(got[b"hi from bob"], [b"for bob"])
        agg.reply(got[b"hi from alice"], [b"for alice", b"2"])
        assert alice.recv(5).frames == [b"for alice", b"2"]
        assert bob.recv(5).frames == [b"for bob"]
        # a second connection that claims the same name gets nothing: routes are connections, not names
        assert alice.recv(0.1) is None and bob.recv(0.1) is None and alice_impostor.recv(0.1) is None
        with pytest.raises(TransportError, match="aggregator -> client: that connection is gone"):
            agg.reply(Peer(route=b"\0" * 16), [b"x"])
        with pytest.raises(TransportError, match="alice -> bob: no route"):
            alice.send("bob", [b"x"])
        with pytest.raises(TransportError, match="aggregator -> carol: no route"):
            agg.send("carol", [b"x"])
        with pytest.raises(TransportError, match="cannot send to itself"):
            agg.send("aggregator", [b"x"])
        with pytest.raises(TransportError, match="cannot answer"):
            alice.reply(got[b"hi from bob"], [b"x"])


@pytest.mark.timeout(60)
def test_send_to_a_dead_client_raises(tmp_path):
    data = topology_dict("tcp", tmp_path)
    agg = open_transport(load(data), "aggregator", send_timeout=1.0)
    proc = start(run_hello_then_wait, data, "doomed")
    try:
        hello = agg.recv(timeout=30)
        assert hello.frames == [b"hello", b"doomed"]
        agg.reply(hello.peer, [b"alive"])
        proc.kill()  # a crash: no goodbye
        proc.join(10)
        deadline = time.monotonic() + 15
        with pytest.raises(TransportError, match="that connection is gone"):
            while time.monotonic() < deadline:  # the disconnect is noticed asynchronously
                agg.reply(hello.peer, [b"anyone?"])
                time.sleep(0.05)
    finally:
        stop(proc)
        agg.close()


@pytest.mark.timeout(30)
def test_full_queue_times_out_and_does_not_block_other_edges(tmp_path):
    data = topology_dict("tcp", tmp_path, limits={"hwm": 4})
    topology = load(data)
    slow, fast = ZmqTransport(topology, "edge0"), ZmqTransport(topology, "edge1")  # slow never reads
    client = ZmqTransport(topology, "client", send_timeout=0.3)
    payload = [bytes(256 * 1024)]
    try:
        sent = 0
        with pytest.raises(TransportError, match=r"client -> edge0: not accepted within 0.3 s"):
            for _ in range(2000):  # kernel buffers absorb some MB before the high-water marks bite
                client.send("edge0", payload)
                sent += 1
        assert sent < 2000
        start_t = time.monotonic()
        client.send("edge1", [b"still flowing"])  # its own socket: not stuck behind edge0
        assert fast.recv(timeout=5).frames == [b"still flowing"]
        print(f"edge0 took {sent} x 256 KiB before its queue was full; edge1 send took "
              f"{(time.monotonic() - start_t) * 1e3:.2f} ms")
        assert slow.recv(timeout=5).frames == payload  # what was accepted is delivered
    finally:
        for t in (client, slow, fast):
            t.close()


@pytest.mark.timeout(30)
def test_send_to_an_edge_that_is_not_running_times_out(tmp_path):
    data = topology_dict("tcp", tmp_path)
    with open_transport(load(data), "client", send_timeout=0.2) as client:
        t0 = time.monotonic()
        with pytest.raises(TransportError, match="client -> edge1: not accepted within 0.2 s"):
            client.send("edge1", [b"nobody home"])
        assert time.monotonic() - t0 < 5
        with pytest.raises(TransportError, match="client -> edge7: no route"):
            client.send("edge7", [b"x"])


@pytest.mark.timeout(30)
def test_close_never_hangs(tmp_path):
    data = topology_dict("tcp", tmp_path)
    topology = load(data)
    # queued, undeliverable traffic in every direction, then close
    agg = open_transport(topology, "aggregator")
    edge = open_transport(topology, "edge0")
    client = open_transport(topology, "client")
    client.send("aggregator", [b"hello"])
    hello = agg.recv(5)
    assert hello.frames == [b"hello"]
    for _ in range(10):
        agg.reply(hello.peer, [bytes(100_000)])  # client never reads
        edge.send("aggregator", [bytes(100_000)])  # aggregator never reads
    t0 = time.monotonic()
    for t in (agg, edge, client):
        t.close()
        t.close()
    lonely = open_transport(topology, "edge1")  # its aggregator is gone: connecting forever
    lonely.close()
    assert time.monotonic() - t0 < 5
    with pytest.raises(TransportError, match="closed"):
        agg.recv(0)
    with pytest.raises(TransportError, match="closed"):
        client.send("aggregator", [b"x"])


@pytest.mark.timeout(30)
def test_recv_timeout_and_bind_errors(tmp_path):
    data = topology_dict("tcp", tmp_path)
    topology = load(data)
    with open_transport(topology, "edge0") as edge:
        t0 = time.monotonic()
        assert edge.recv(timeout=0.2) is None
        assert 0.15 < time.monotonic() - t0 < 3
        assert edge.recv(timeout=0) is None
        with pytest.raises(TransportError, match=r"edge0: cannot bind tcp://127.0.0.1:\d+: Address already in use"):
            open_transport(topology, "edge0")


@pytest.mark.timeout(30)
def test_size_limits_on_both_ends(tmp_path):
    data = topology_dict("ipc", tmp_path, limits={"max_message_bytes": 1000})
    topology = load(data)
    with open_transport(topology, "edge0") as edge, open_transport(topology, "client") as client:
        with pytest.raises(TransportError, match="message of 1001 bytes exceeds limits.max_message_bytes=1000"):
            client.send("edge0", [bytes(1001)])
        # a peer that ignores the limit is cut off by the receiver (MAXMSGSIZE), nothing is delivered
        ctx = zmq.Context()
        rogue = ctx.socket(zmq.PUSH)
        rogue.linger = 0
        rogue.connect(topology.edge_for(0).connect_endpoint)
        rogue.send(bytes(5000))
        assert edge.recv(timeout=0.5) is None
        ctx.destroy(linger=0)
        client.send("edge0", [bytes(1000)])
        assert edge.recv(timeout=5).frames == [bytes(1000)]


# -------------------------------------------------------------------------------------------- CURVE


@pytest.fixture
def curve_topology(tmp_path):
    keys = tmp_path / "keys"
    create_keys(keys, ["aggregator", "edge0", "edge1", "client", "admin"])
    return topology_dict("tcp", tmp_path, security={"curve": True, "keys_dir": str(keys)})


@pytest.mark.timeout(60)
def test_curve_round_trip_between_processes(curve_topology):
    serve_round_trip(curve_topology, "client", [[b"secret image"]], curve=True)  # the client's own key pair


@pytest.mark.timeout(60)
def test_curve_rejects_clients_without_an_admitted_key(curve_topology, tmp_path):
    data = curve_topology
    topology = load(data)
    # a rogue knows the servers' public keys but its own pair is not in the servers' folder
    rogue_keys = tmp_path / "rogue"
    create_keys(rogue_keys, ["client"])
    for server in ("aggregator", "edge0", "edge1"):
        shutil.copy(topology.security.keys_dir / f"{server}.key", rogue_keys)
    rogue_topology = load({**data, "security": {"curve": True, "keys_dir": str(rogue_keys)}})
    plain_topology = load({**data, "security": {"curve": False}})
    agg = open_transport(topology, "aggregator")
    edge = open_transport(topology, "edge0")
    try:
        for impostor in (rogue_topology, plain_topology):
            with open_transport(impostor, "client", send_timeout=0.5) as bad:
                for peer in ("edge0", "aggregator"):
                    try:  # refused at the handshake: either the send times out or it goes nowhere
                        bad.send(peer, [b"let me in"])
                    except TransportError as exc:
                        assert "not accepted within" in str(exc)
                assert edge.recv(timeout=0.5) is None
                assert agg.recv(timeout=0.2) is None
        with pytest.raises(TransportError, match="no key pair for 'friend'"):
            open_transport(topology, "friend")  # under CURVE a client is the key it holds: no shared fallback
        with open_transport(topology, "admin", send_timeout=5) as good:
            good.send("edge0", [b"welcome"])
            good.send("aggregator", [b"hello"])
            got = edge.recv(timeout=5)
            assert got.frames == [b"welcome"] and got.peer.key == "admin"  # the key's name, as the ZAP handler says
            got = agg.recv(timeout=5)
            assert got.frames == [b"hello"] and got.peer.key == "admin"
    finally:
        agg.close()
        edge.close()


@pytest.mark.timeout(30)
def test_curve_missing_keys_are_reported(tmp_path):
    data = topology_dict("tcp", tmp_path, security={"curve": True, "keys_dir": str(tmp_path / "nokeys")})
    with pytest.raises(TransportError, match="keys folder .*nokeys does not exist"):
        open_transport(load(data), "edge0")
    create_keys(tmp_path / "nokeys", ["aggregator"])
    with pytest.raises(TransportError, match="no key pair for 'edge0'.*devit-mq keys"):
        open_transport(load(data), "edge0")


@pytest.mark.timeout(30)
def test_a_burst_is_drained_in_order_and_no_socket_starves_another(tmp_path):
    """recv takes up to DRAIN_PER_POLL messages per ready socket per poll: a burst on one socket
    arrives complete and in order, and a second busy socket gets its turn after at most that many."""
    from devit_mq.transport.zmq import DRAIN_PER_POLL

    topology = load(topology_dict("tcp", tmp_path))
    agg, edge, client = (ZmqTransport(topology, n) for n in ("aggregator", "edge0", "client"))
    n = 3 * DRAIN_PER_POLL
    try:
        edge.send("aggregator", [b"hello"])  # the aggregator answers the edge over this connection
        hello = agg.recv(timeout=5)
        for i in range(n):
            client.send("edge0", [b"c%d" % i])  # the edge's inbox
            agg.reply(hello.peer, [b"a%d" % i])  # the edge's link to the aggregator
        time.sleep(0.5)  # both bursts are queued at the edge before it reads
        got = [edge.recv(timeout=5).frames[0] for _ in range(2 * n)]
        for tag in (b"c", b"a"):
            assert [g for g in got if g.startswith(tag)] == [tag + b"%d" % i for i in range(n)]
        run = longest = 0
        for prev, cur in zip(got, got[1:], strict=False):
            run = run + 1 if cur[:1] == prev[:1] else 0
            longest = max(longest, run + 1)
        assert longest <= DRAIN_PER_POLL, got
        assert edge.recv(timeout=0) is None
    finally:
        for t in (client, edge, agg):
            t.close()
