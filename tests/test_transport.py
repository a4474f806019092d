"""Transport pieces that need no sockets: in-process transport, fault injection, MPI framing, factory."""

import threading
import time

import pytest

from devit_mq.topology import load_topology
from devit_mq.transport import (
    FaultyTransport,
    InprocHub,
    InprocTransport,
    Peer,
    Transport,
    TransportError,
    check_frames,
    open_transport,
)
from devit_mq.transport.mpi import pack_frames, unpack_frames

TOPO = {
    "name": "t", "bundle": "b",
    "aggregator": {"name": "aggregator", "port": 5600},
    "edges": [{"name": "edge0", "submodel": 0, "port": 5610}],
}


# ------------------------------------------------------------------------------------------ inproc


@pytest.mark.timeout(10)
def test_inproc_round_trip_between_threads():
    hub = InprocHub()
    agg, edge = InprocTransport(hub, "aggregator"), InprocTransport(hub, "edge0")
    buf = bytearray(b"abc")

    def run_edge():
        msg = edge.recv(timeout=5)
        assert msg.peer == Peer(route="aggregator", key="aggregator")  # the hub knows who sent it
        edge.send("aggregator", [b"feat", *msg.frames])

    thread = threading.Thread(target=run_edge)
    thread.start()
    agg.send("edge0", [b"img", buf])
    buf[:] = b"xyz"  # the message in flight is a copy
    assert agg.recv(timeout=5).frames == [b"feat", b"img", b"abc"]
    thread.join(5)
    assert agg.recv(timeout=0.01) is None


def test_inproc_errors():
    hub = InprocHub(maxsize=2)
    a = InprocTransport(hub, "a", send_timeout=0.05)
    b = InprocTransport(hub, "b")
    with pytest.raises(TransportError, match="already open"):
        InprocTransport(hub, "a")
    with pytest.raises(TransportError, match="a -> nobody: no such endpoint"):
        a.send("nobody", [b"x"])
    a.send("b", [b"1"])
    a.send("b", [b"2"])
    with pytest.raises(TransportError, match="a -> b: queue full for 0.05 s"):
        a.send("b", [b"3"])
    b.close()
    b.close()  # idempotent
    with pytest.raises(TransportError, match="no such endpoint"):
        a.send("b", [b"4"])
    with pytest.raises(TransportError, match="closed"):
        b.recv(0)
    with InprocTransport(hub, "b") as again:  # the name is free again; context manager closes
        assert isinstance(again, Transport)
    assert hub.names == ["a"]


def test_frames_are_checked_before_sending():
    assert check_frames("n", "p", (b"a", bytearray(b"b"), memoryview(b"c")), 10) == [b"a", bytearray(b"b"),
                                                                                      memoryview(b"c")]
    with pytest.raises(TransportError, match="n -> p: a message needs at least one frame"):
        check_frames("n", "p", [], 10)
    with pytest.raises(TransportError, match="frame 1 is str, not bytes"):
        check_frames("n", "p", [b"a", "b"], 10)
    with pytest.raises(TransportError, match="message of 11 bytes exceeds limits.max_message_bytes=10"):
        check_frames("n", "p", [b"a" * 5, b"b" * 6], 10)
    hub = InprocHub(max_message_bytes=4)
    a, _ = InprocTransport(hub, "a"), InprocTransport(hub, "b")
    with pytest.raises(TransportError, match="exceeds"):
        a.send("b", [b"12345"])


def test_open_transport_with_a_hub_gives_inproc():
    topology = load_topology(TOPO, check_bundle=False)
    hub = InprocHub()
    t = open_transport(topology, "edge0", hub=hub, send_timeout=1.0)
    assert isinstance(t, InprocTransport) and t.node == "edge0" and t.send_timeout == 1.0
    t.close()


# ------------------------------------------------------------------------------------------ faults


def pair(**faults):
    hub = InprocHub(maxsize=10_000)
    rx = InprocTransport(hub, "rx")
    tx = FaultyTransport(InprocTransport(hub, "tx"), **faults)
    return tx, rx


def drain(rx, timeout=0.0):
    out = []
    while (msg := rx.recv(timeout)) is not None:
        out.append(msg.frames)
    return out


def test_faults_drop_duplicate_and_corrupt_at_their_rates():
    n = 2000
    tx, rx = pair(drop=0.2, seed=1)
    for i in range(n):
        tx.send("rx", [i.to_bytes(4, "little")])
    got = drain(rx)
    assert len(got) == n - tx.stats["dropped"]
    assert 0.15 * n < tx.stats["dropped"] < 0.25 * n
    assert [int.from_bytes(m[0], "little") for m in got] == sorted(int.from_bytes(m[0], "little") for m in got)

    tx, rx = pair(duplicate=0.1, seed=2)
    for _ in range(n):
        tx.send("rx", [b"x"])
    assert len(drain(rx)) == n + tx.stats["duplicated"] and 0.05 * n < tx.stats["duplicated"] < 0.15 * n

    tx, rx = pair(corrupt=0.5, seed=3)
    payload = bytes(range(256)) * 4
    for _ in range(200):
        tx.send("rx", [b"", payload])
    got = drain(rx)
    changed = [m for m in got if m[1] != payload]
    assert len(changed) == tx.stats["corrupted"] and 60 < len(changed) < 140
    for m in changed:  # exactly one bit flipped, empty frames untouched
        assert m[0] == b"" and sum(bin(a ^ b).count("1") for a, b in zip(m[1], payload, strict=True)) == 1


def test_faults_are_reproducible_with_a_seed():
    def run(seed):
        tx, rx = pair(drop=0.3, duplicate=0.2, corrupt=0.2, seed=seed)
        for i in range(300):
            tx.send("rx", [i.to_bytes(2, "little") * 8])
        return drain(rx)

    assert run(7) == run(7)
    assert run(7) != run(8)


@pytest.mark.timeout(10)
def test_delay_and_jitter_hold_messages_without_blocking_the_sender():
    tx, rx = pair(delay_s=0.2, jitter_s=0.1, seed=4)
    back = FaultyTransport(rx)  # recv through a wrapper wakes for its own delayed sends
    start = time.monotonic()
    for i in range(20):
        tx.send("rx", [bytes([i])])
    assert time.monotonic() - start < 0.15  # the sender was not put to sleep
    assert rx.recv(0.05) is None and tx.in_flight == 20
    assert tx.flush(timeout=5)
    got = drain(back, timeout=0.01)
    assert sorted(m[0][0] for m in got) == list(range(20))
    assert time.monotonic() - start >= 0.2
    assert tx.stats["delayed"] == 20


@pytest.mark.timeout(10)
def test_delayed_messages_go_out_from_recv():
    hub = InprocHub()
    a = FaultyTransport(InprocTransport(hub, "a"), delay_s=0.1)
    b = InprocTransport(hub, "b")
    a.send("b", [b"late"])
    assert a.recv(timeout=0.3) is None  # a's recv released the delayed message while it waited
    assert b.recv(timeout=0).frames == [b"late"]
    a.send("b", [b"dropped with the link"])
    a.close()
    assert b.recv(timeout=0.2) is None


def test_faults_only_on_selected_peers():
    hub = InprocHub()
    tx = FaultyTransport(InprocTransport(hub, "tx"), drop=1.0, peers={"lossy"})
    lossy, fine = InprocTransport(hub, "lossy"), InprocTransport(hub, "fine")
    tx.send("lossy", [b"a"])
    tx.send("fine", [b"b"])
    assert lossy.recv(0) is None and fine.recv(0).frames == [b"b"]
    with pytest.raises(ValueError, match="drop must be a probability"):
        FaultyTransport(tx, drop=1.5)


# ------------------------------------------------------------------------------------ MPI framing


@pytest.mark.parametrize("frames", [[b""], [b"a"], [b"header", b"", bytes(range(256)) * 100],
                                    [bytearray(b"x" * 70000), memoryview(b"yz")]])
def test_mpi_framing_round_trip(frames):
    assert unpack_frames(pack_frames(frames)) == [bytes(f) for f in frames]


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b[:5], "shorter than the 8-byte header"),
    (lambda b: b"XX" + b[2:], "bad magic"),
    (lambda b: b[:2] + b"\x09" + b[3:], "framing version 9"),
    (lambda b: b[:-1], "frame lengths add up to"),
    (lambda b: b + b"!", "frame lengths add up to"),
    (lambda b: b[:4] + (1000).to_bytes(4, "little") + b[8:], "1000 frames announced"),
])
def test_mpi_framing_rejects_malformed_buffers(mutate, message):
    buf = bytes(pack_frames([b"abc", b"de"]))
    with pytest.raises(ValueError, match=message):
        unpack_frames(mutate(buf))


def test_faulty_transport_survives_a_link_that_dies_while_a_message_is_delayed():
    from devit_mq.transport import FaultyTransport, TransportError

    class DeadLink:
        node = "a"

        def send(self, peer, frames):
            raise TransportError(f"a -> {peer}: link is down")

        def recv(self, timeout=None):
            time.sleep(timeout or 0)
            return None

        def close(self):
            pass

    faulty = FaultyTransport(DeadLink(), delay_s=0.01, seed=0)
    faulty.send("b", [b"x"])  # delayed, not sent yet
    assert faulty.recv(0.05) is None  # the delayed send fails inside recv: counted, not raised
    assert faulty.stats["lost_in_flight"] == 1
