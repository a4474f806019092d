"""Authorization rules (devit_mq.nodes.auth) and the bounded node-side tables, unit by unit."""

import logging

import numpy as np
import pytest

from devit_mq.logs import RateLimitedLog
from devit_mq.metrics import Metrics
from devit_mq.nodes.auth import Authorizer, ClientTable, Roster
from devit_mq.protocol import (
    MAX_COUNTERS,
    MAX_LINKS,
    OTHER,
    ErrorMeta,
    FeaturesMeta,
    HeartbeatMeta,
    Hello,
    Kind,
    Ready,
    ResultMeta,
    Shutdown,
    Status,
    StatusQuery,
)
from devit_mq.transport import Peer
from devit_mq.wire import Message, decode, encode

ROSTER = Roster("aggregator", {0: "edge0", 1: "edge1"}, frozenset({"admin"}), admin_token="s3cret")
AGG = Authorizer(ROSTER, "aggregator", {Kind.FEATURES, Kind.ERROR, Kind.HEARTBEAT, Kind.CONTROL})
EDGE = Authorizer(ROSTER, "edge", {Kind.IMAGE, Kind.CONTROL})
CLIENT = Authorizer(ROSTER, "client", {Kind.RESULT, Kind.ERROR, Kind.CONTROL})
NOBODY = Peer()  # ZeroMQ without CURVE: no authenticated name


def feats(source, part):
    return Message(Kind.FEATURES, source, (1,), np.zeros((1, 1, 4), np.float32), reply_to="c", meta=FeaturesMeta(part=part))


def control(source, op):
    return Message(Kind.CONTROL, source, meta=op)


@pytest.mark.parametrize("auth, msg, peer, allowed", [
    # identity: an authenticated sender speaks only for itself
    (AGG, feats("edge0", 0), Peer(b"r", "edge0"), True),
    (AGG, feats("edge0", 0), Peer(b"r", "edge1"), False),
    (AGG, feats("edge0", 0), Peer(b"r", "client-1"), False),
    # role: features / heartbeats / ready for part p only from p's edge (claimed, without CURVE)
    (AGG, feats("edge0", 0), NOBODY, True),
    (AGG, feats("edge0", 1), NOBODY, False),
    (AGG, feats("mallory", 0), NOBODY, False),
    (AGG, feats("edge0", 7), NOBODY, False),
    (AGG, Message(Kind.HEARTBEAT, "edge1", meta=HeartbeatMeta(part=1)), NOBODY, True),
    (AGG, Message(Kind.HEARTBEAT, "edge1", meta=HeartbeatMeta(part=0)), NOBODY, False),
    (AGG, control("edge1", Ready(part=1)), NOBODY, True),
    (AGG, control("edge0", Ready(part=1)), NOBODY, False),
    (AGG, Message(Kind.ERROR, "edge0", (1,), reply_to="c", meta=ErrorMeta()), NOBODY, True),
    (AGG, Message(Kind.ERROR, "mallory", (1,), reply_to="c", meta=ErrorMeta()), NOBODY, False),
    (AGG, control("anyone", Hello()), NOBODY, True),
    (AGG, control("anyone", StatusQuery()), NOBODY, True),
    (AGG, Message(Kind.RESULT, "aggregator", (1,), np.zeros((1, 2), np.float32),
                  meta=ResultMeta(labels=[0], degraded=[False], missing=[[]])), NOBODY, False),  # not accepted here
    # admin: the admin key, or the launch's token where nobody is authenticated
    (AGG, control("admin", Shutdown()), Peer(b"r", "admin"), True),
    (AGG, control("edge0", Shutdown()), Peer(b"r", "edge0"), False),
    (AGG, control("x", Shutdown(token="s3cret")), NOBODY, True),
    (AGG, control("x", Shutdown(token="s3cre")), NOBODY, False),
    (AGG, control("x", Shutdown()), NOBODY, False),
    (AGG, control("admin", Shutdown(token="s3cret")), Peer(b"r", "client-1"), False),  # a key never uses the token
    # edges: images only from clients, asking for answers to themselves
    (EDGE, Message(Kind.IMAGE, "c", (1,), np.zeros((1, 2, 2, 1), np.uint8), reply_to="c"), NOBODY, True),
    (EDGE, Message(Kind.IMAGE, "c", (1,), np.zeros((1, 2, 2, 1), np.uint8), reply_to="d"), NOBODY, False),
    (EDGE, Message(Kind.IMAGE, "edge1", (1,), np.zeros((1, 2, 2, 1), np.uint8), reply_to="edge1"), NOBODY, False),
    (EDGE, feats("edge0", 0), NOBODY, False),
    # clients: answers and status only from the aggregator
    (CLIENT, Message(Kind.ERROR, "aggregator", (1,), meta=ErrorMeta()), NOBODY, True),
    (CLIENT, Message(Kind.ERROR, "edge0", (1,), meta=ErrorMeta()), NOBODY, False),
    (CLIENT, control("aggregator", Status()), NOBODY, True),
    (CLIENT, control("mallory", Status()), NOBODY, False),
])
def test_rules(auth, msg, peer, allowed):
    msg = decode(encode(msg))  # what a node sees: a typed, decoded message
    reason = auth.check(msg, peer)
    assert (reason is None) == allowed, reason


def test_a_node_without_a_token_takes_no_remote_shutdown():
    auth = Authorizer(Roster("aggregator", {0: "edge0"}), "edge", {Kind.CONTROL})
    assert auth.check(control("x", Shutdown()), NOBODY) is not None
    assert auth.check(control("x", Shutdown(token="")), NOBODY) is not None


def test_client_table_binds_names_to_connections():
    table = ClientTable(capacity=3)
    a, b = Peer(b"route-a"), Peer(b"route-b")
    assert table.bind("alice", a, alive=lambda old: True)
    assert not table.bind("alice", b, alive=lambda old: True)  # alice's connection is alive: refused
    assert table.route("alice") == a
    assert table.bind("alice", b, alive=lambda old: False)  # the old connection is gone: rebinds
    assert table.route("alice") == b
    # a personal key rebinds its own name from a new connection; a shared key does not
    assert table.bind("dave", Peer(b"d1", key="dave"), alive=lambda old: True)
    assert table.bind("dave", Peer(b"d2", key="dave"), alive=lambda old: True)
    assert table.bind("client.x", Peer(b"x1", key="client"), alive=lambda old: True)
    assert not table.bind("client.x", Peer(b"x2", key="client"), alive=lambda old: True)
    assert len(table) == 3


def test_client_table_cannot_be_flushed_by_hellos_from_one_connection():
    """4096 hellos under fresh names from one connection used to evict a live client's binding."""
    table = ClientTable(capacity=8)
    victim = Peer(b"victim")
    assert table.bind("victim", victim, alive=lambda old: True)
    attacker = Peer(b"attacker")
    for i in range(10_000):
        table.bind(f"fresh-{i}", attacker, alive=lambda old: True)
    assert table.route("victim") == victim and len(table) == 2  # one name per connection
    assert not table.bind("victim", attacker, alive=lambda old: True)


def test_client_table_evicts_the_least_recently_used():
    table = ClientTable(capacity=2)
    table.bind("a", Peer(b"a"), alive=lambda old: True)
    table.bind("b", Peer(b"b"), alive=lambda old: True)
    table.route("a")  # in use: refreshed
    table.bind("c", Peer(b"c"), alive=lambda old: True)
    assert table.route("a") is not None and table.route("b") is None


def test_metrics_stay_bounded_whatever_the_names():
    m = Metrics("edge0")
    for i in range(10_000):
        m.count(f"send_failed.peer{i}")
        m.add_bytes(f"peer{i}->edge0", 10)
    t = m.telemetry()
    assert len(t.counters) == MAX_COUNTERS + 1 and t.counters[OTHER] == 10_000 - MAX_COUNTERS
    assert len(t.bytes) == MAX_LINKS + 1
    assert m.counters["never-counted"] == 0 and "never-counted" not in m.counters
    # and it always fits its schema: it travels in a heartbeat
    decode(encode(Message(Kind.HEARTBEAT, "edge0", meta=HeartbeatMeta(part=0, telemetry=t))))


def test_rate_limited_log_folds_a_flood(caplog):
    log = RateLimitedLog(logging.getLogger("test.flood"), interval_s=60)
    with caplog.at_level(logging.WARNING, logger="test.flood"):
        for i in range(10_000):
            log.warning("wire", "dropped frame %d", i)
        log.warning("other-event", "something else")
    assert len(caplog.records) == 2
    assert caplog.records[0].getMessage() == "dropped frame 0"
