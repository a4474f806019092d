"""The client's adaptive concurrency limit (AIMD on the system's "overloaded" answers)."""

import time

import numpy as np
import pytest

from devit_mq.nodes import ClientNode
from devit_mq.nodes.auth import Roster
from devit_mq.nodes.limiter import ConcurrencyLimit
from devit_mq.protocol import ErrorMeta, Kind
from devit_mq.transport import InprocHub, InprocTransport
from devit_mq.wire import Message, encode


def test_untouched_without_overload_signals():
    lim = ConcurrencyLimit()
    for _ in range(1000):
        lim.on_answer()
    assert lim.limit == lim.max_limit and lim.admits(4000, 1)


def test_one_cut_per_round_trip_then_additive_increase():
    lim = ConcurrencyLimit()
    epoch = lim.epoch
    lim.on_overloaded(epoch, in_flight=9)  # a burst of refusals of requests sent before any cut ...
    assert lim.limit == 5.0 and lim.cuts == 1
    for _ in range(20):
        lim.on_overloaded(epoch, in_flight=9)  # ... cuts once
    assert lim.limit == 5.0 and lim.cuts == 1
    lim.on_overloaded(lim.epoch, in_flight=3)  # a request sent after the cut: the next cut
    assert lim.limit == 2.0 and lim.cuts == 2
    for _ in range(2):
        lim.on_answer()  # +1/limit each: one more per round trip
    assert lim.limit == pytest.approx(2 + 1 / 2 + 1 / 2.5)
    lim.on_overloaded(lim.epoch, in_flight=0)
    lim.on_overloaded(lim.epoch, in_flight=0)
    assert lim.limit == lim.min_limit == 1.0


def test_admits_within_the_limit_and_always_when_nothing_is_in_flight():
    lim = ConcurrencyLimit(limit=2.0)
    assert lim.admits(0, 1) and lim.admits(1, 1) and not lim.admits(2, 1)
    assert lim.admits(0, 8)  # a batch larger than the limit still goes when nothing is in flight
    assert not lim.admits(1, 2)


def test_client_refuses_locally_after_the_system_says_overloaded():
    """Past a cut the client answers "overloaded" itself, for every edge at once, without sending."""
    hub = InprocHub()
    edges = [InprocTransport(hub, name) for name in ("edge0", "edge1")]
    agg = InprocTransport(hub, "aggregator")
    client = ClientNode("c", InprocTransport(hub, "c"), Roster("aggregator", {0: "edge0", 1: "edge1"}), timeout_s=5)
    img = np.zeros((1, 4, 4, 3), np.uint8)
    ids = [client.submit(img)[0] for _ in range(4)]
    for e in edges:
        while e.recv(0.2) is not None:
            pass
    assert client.metrics.counters["sent.image"] == 8
    while agg.recv(0.05) is not None:  # the hello
        pass
    agg.send("c", encode(Message(Kind.ERROR, "aggregator", request_ids=(ids[0],), reply_to="c",
                                 meta=ErrorMeta(code="overloaded", message="edge0: waited too long"))))
    got = []
    deadline = time.time() + 5
    while not got and time.time() < deadline:
        got = client.collect(0.1)
    assert [a.request_id for a in got] == [ids[0]] and got[0].error.startswith("overloaded")
    assert client.limit.limit == 2.0  # (3 still in flight + 1) / 2
    refused = client.submit(img)
    assert client.metrics.counters["sent.image"] == 8  # not sent
    answers = client.collect(0)
    assert [a.request_id for a in answers] == refused
    assert answers[0].error.startswith("overloaded: client concurrency limit")
