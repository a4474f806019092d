"""Node loops over the in-process transport: routing, batching, deadlines, policies, bad input."""

import threading
import time

import numpy as np
import pytest
import torch

from devit_mq.model import load_ensemble, load_fusion, load_manifest, load_submodel
from devit_mq.nodes import AggregatorNode, ClientNode, EdgeNode
from devit_mq.nodes.auth import Roster
from devit_mq.nodes.client import Outstanding
from devit_mq.nodes.demo import wire_roundtrip
from devit_mq.nodes.executor import TorchEdgeExecutor, TorchFusionExecutor
from devit_mq.protocol import FeaturesMeta
from devit_mq.transport import InprocHub, InprocTransport
from devit_mq.wire import Kind, Message, encode

from .runtime_helpers import images, make_bundle

pytestmark = pytest.mark.timeout(60)


class Cluster:
    """Aggregator + edges as threads on one in-process hub."""

    def __init__(self, bundle, codec="fp32", start_edges=None, authenticate=True, edge_kwargs=None, **agg_kwargs):
        self.hub = InprocHub(authenticate=authenticate)
        manifest = load_manifest(bundle)
        n = manifest.num_parts
        self.edge_names = [f"edge{i}" for i in range(n)]
        self.roster = Roster("aggregator", dict(enumerate(self.edge_names)), frozenset({"admin"}))
        agg_kwargs.setdefault("deadline_ms", 500)
        fusion = load_fusion(bundle)
        self.aggregator = AggregatorNode("aggregator", InprocTransport(self.hub, "aggregator"),
                                         TorchFusionExecutor(fusion), fusion.config.in_dims,
                                         fusion.config.num_prefix_tokens, self.roster, **agg_kwargs)
        self.edges = [EdgeNode(name, InprocTransport(self.hub, name),
                               TorchEdgeExecutor(load_submodel(bundle, i), manifest.input, 4),
                               manifest.input.image_shape, i, self.roster, codec=codec, max_batch=4, max_wait_ms=2,
                               **(edge_kwargs or {}))
                      for i, name in enumerate(self.edge_names)]
        started = range(n) if start_edges is None else start_edges
        self.threads = [threading.Thread(target=self.aggregator.run, daemon=True)]
        self.threads += [threading.Thread(target=self.edges[i].run, daemon=True) for i in started]
        for t in self.threads:
            t.start()

    def client(self, timeout_s=10.0, name="client-1"):
        return ClientNode(name, InprocTransport(self.hub, name), self.roster, timeout_s=timeout_s)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        for node in [*self.edges, self.aggregator]:
            node.stop()
        for t in self.threads:
            t.join(5)
            assert not t.is_alive(), "a node loop did not stop"


@pytest.fixture
def bundle(tmp_path):
    return make_bundle(tmp_path / "bundle")


def reference(bundle, imgs, codec):
    ens, manifest = load_ensemble(bundle)
    with torch.inference_mode():
        parts = ens.features(manifest.input.to_tensor(imgs))
        return ens.fuse([wire_roundtrip(p, codec) for p in parts]).softmax(-1).numpy()


@pytest.mark.parametrize("codec", ["fp32", "int8"])
def test_distributed_matches_in_process_reference(bundle, codec):
    with Cluster(bundle, codec=codec) as cluster:
        client = cluster.client()
        status = client.connect(20)
        assert status["ready"] == [0, 1]
        imgs = images(23)
        pred = client.predict(imgs, batch_size=3, window=3)
        assert not pred.errors and pred.degraded == 0
        ref = reference(bundle, imgs, codec)
        np.testing.assert_array_equal(pred.labels, ref.argmax(1))
        np.testing.assert_allclose(pred.probabilities, ref, atol=1e-5)
        assert all(a.stages["edge_compute_ms"] > 0 for a in pred.answers)


def test_missing_edge_degrades_after_deadline(bundle):
    with Cluster(bundle, start_edges=[0], deadline_ms=200) as cluster:
        client = cluster.client()
        client.status = {}
        imgs = images(3)
        pred = client.predict(imgs, batch_size=3)
        assert not pred.errors
        assert pred.degraded == 3 and all(a.missing == [1] for a in pred.answers)
        ens, manifest = load_ensemble(bundle)
        with torch.inference_mode():
            ref = ens(manifest.input.to_tensor(imgs), missing=[1]).softmax(-1).numpy()
        np.testing.assert_allclose(pred.probabilities, ref, atol=1e-5)
        assert all(a.latency_s >= 0.15 for a in pred.answers)  # answered at the deadline, not before


def test_missing_edge_error_policy(bundle):
    with Cluster(bundle, start_edges=[0], deadline_ms=100, missing_policy="error") as cluster:
        pred = cluster.client().predict(images(2), batch_size=2)
        assert len(pred.errors) == 2
        assert all("missing_features" in a.error and "[1]" in a.error for a in pred.errors)


def test_bad_image_shape_is_answered_with_an_error(bundle):
    with Cluster(bundle) as cluster:
        client = cluster.client()
        client.connect(20)
        bad = np.zeros((2, 8, 8, 1), np.uint8)
        pred = client.predict(bad, batch_size=2)
        assert len(pred.errors) == 2 and "bad_input" in pred.errors[0].error
        assert "expected [B, 16, 16, 1]" in pred.errors[0].error
        # the nodes keep serving
        assert not client.predict(images(2)).errors


def test_malformed_and_stray_messages_do_not_stop_nodes(bundle):
    with Cluster(bundle, authenticate=False) as cluster:
        client = cluster.client()
        client.connect(20)
        junk = InprocTransport(cluster.hub, "junk")
        for peer in ["aggregator", "edge0", "edge1"]:
            junk.send(peer, [b"\x00garbage", b"x"])
            junk.send(peer, [b"only-one-frame"])
        # features with a wrong width (claiming to be the part's edge), from a non-owner, for an unknown part
        junk.send("aggregator", encode(Message(Kind.FEATURES, "edge0", request_ids=(1,), reply_to="client-1",
                                               array=np.zeros((1, 1, 7), np.float32), meta=FeaturesMeta(part=0))))
        junk.send("aggregator", encode(Message(Kind.FEATURES, "junk", request_ids=(1,), reply_to="client-1",
                                               array=np.zeros((1, 1, 32), np.float32), meta=FeaturesMeta(part=0))))
        junk.send("aggregator", encode(Message(Kind.FEATURES, "edge0", request_ids=(1,), reply_to="client-1",
                                               array=np.zeros((1, 1, 32), np.float32), meta=FeaturesMeta(part=9))))
        assert not client.predict(images(4), batch_size=2).errors
        deadline = time.time() + 5
        while cluster.aggregator.metrics.counters["wire_errors"] < 2 and time.time() < deadline:
            time.sleep(0.01)
        assert cluster.aggregator.metrics.counters["wire_errors"] >= 2
        assert cluster.aggregator.metrics.counters["bad_features"] == 1
        assert cluster.aggregator.metrics.counters["unauthorized"] == 2
        assert cluster.edges[0].metrics.counters["wire_errors"] >= 2


def test_duplicate_and_late_features_are_dropped(bundle):
    with Cluster(bundle, deadline_ms=100, authenticate=False) as cluster:
        client = cluster.client()
        client.connect(20)
        pred = client.predict(images(1))
        rid = pred.answers[0].request_id
        late = InprocTransport(cluster.hub, "edge-replay")
        late.send("aggregator", encode(Message(Kind.FEATURES, "edge0", request_ids=(rid,), reply_to="client-1",
                                               array=np.zeros((1, 1, 32), np.float32), meta=FeaturesMeta(part=0))))
        deadline = time.time() + 5
        while cluster.aggregator.metrics.counters["late_features"] < 1 and time.time() < deadline:
            time.sleep(0.01)
        assert cluster.aggregator.metrics.counters["late_features"] == 1
        assert not cluster.aggregator.table.pending
        assert client.collect(0.3) == []  # no second answer


def test_pending_state_is_bounded(bundle):
    with Cluster(bundle, start_edges=[0], deadline_ms=5000, max_pending=3) as cluster:
        client = cluster.client()
        client.submit(images(5))
        answers = []
        deadline = time.time() + 10
        while len(answers) < 2 and time.time() < deadline:
            answers += client.collect(0.1)
        assert sorted(a.error.split(":")[0] for a in answers) == ["overloaded", "overloaded"]
        assert len(cluster.aggregator.table.pending) == 3
    # shutdown answers whatever is still open: every request gets exactly one answer
    rest = client.collect(1.0)
    assert len(rest) == 3 and all(a.error.startswith("shutdown") for a in rest)


def test_client_times_out_instead_of_hanging(bundle):
    hub = InprocHub()
    client = ClientNode("c", InprocTransport(hub, "c"), Roster("aggregator", {0: "edge0", 1: "edge1"}), timeout_s=0.3)
    for name in ["edge0", "edge1", "aggregator"]:
        InprocTransport(hub, name)  # peers exist but nobody serves
    start = time.monotonic()
    pred = client.predict(images(2), batch_size=2)
    assert time.monotonic() - start < 5
    assert [a.error.split(":")[0] for a in pred.answers] == ["timeout", "timeout"]


def test_status_reports_every_nodes_metrics(bundle):
    with Cluster(bundle) as cluster:
        client = cluster.client()
        client.connect(20)
        client.submit(images(3))
        time.sleep(1.2)  # at least one heartbeat after the work
        status = client.query_status(5)
        assert set(status["nodes"]) == {"aggregator", "edge0", "edge1"}
        assert status["nodes"]["edge0"]["stages_ms"]["compute"]["n"] >= 1
        assert status["nodes"]["edge1"]["rss_mb"] > 0
        # the answers that arrived while waiting for the status are not lost
        assert len(client.collect(2.0)) == 3


def test_client_skips_an_edge_that_refused_a_send_for_a_while():
    hub = InprocHub()
    for name in ["edge0", "aggregator"]:
        InprocTransport(hub, name)
    client = ClientNode("c", InprocTransport(hub, "c"), Roster("aggregator", {0: "edge0", 1: "ghost"}), timeout_s=1)
    client.submit(images(1))
    client.submit(images(1))
    assert client.metrics.counters["send_failed.ghost"] == 1  # a topology node: counted by name
    assert client.metrics.counters["skipped.ghost"] == 1
    assert client.metrics.counters["sent.image"] == 2  # edge0 twice, ghost never


def test_client_encodes_an_image_once_for_every_edge(monkeypatch):
    import devit_mq.nodes.base as base

    hub = InprocHub()
    edges = [InprocTransport(hub, name) for name in ["edge0", "edge1"]]
    InprocTransport(hub, "aggregator")
    client = ClientNode("c", InprocTransport(hub, "c"), Roster("aggregator", {0: "edge0", 1: "edge1"}), timeout_s=1)
    client.hello()
    calls = []
    monkeypatch.setattr(base, "encode", lambda msg: calls.append(msg.kind) or encode(msg))
    client.submit(images(2))
    assert calls == [Kind.IMAGE]
    got = [edge.recv(1.0) for edge in edges]
    assert all(g is not None for g in got) and got[0].frames == got[1].frames
    assert client.metrics.counters["sent.image"] == 2


@pytest.mark.parametrize("prefix", [1, 2])
def test_numpy_fusion_matches_the_torch_head(tmp_path, prefix):
    from devit_mq.nodes.executor import NumpyFusionExecutor

    bundle = make_bundle(tmp_path / "b", prefix=prefix)
    manifest = load_manifest(bundle)
    torch_fusion = TorchFusionExecutor(load_fusion(bundle))
    numpy_fusion = NumpyFusionExecutor.from_bundle(bundle, manifest)
    x = np.random.default_rng(0).standard_normal((5, prefix, sum(manifest.fusion.in_dims))).astype(np.float32)
    x[1, :, :32] = 0  # a missing part is zero-filled
    ours, ref = numpy_fusion.fuse(x), torch_fusion.fuse(x)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    np.testing.assert_array_equal(ours.argmax(1), ref.argmax(1))
    np.testing.assert_allclose(ours.sum(1), 1.0, atol=1e-6)


def test_edges_answer_requests_that_waited_too_long_as_overloaded(bundle):
    """Admission control: a request that has already waited past max_queue_ms when its batch would
    start is answered "overloaded" at once, and the next requests are served normally (the limit
    is wide enough that a loaded machine's fresh requests stay under it)."""
    with Cluster(bundle, edge_kwargs={"max_queue_ms": 1000}) as cluster:
        client = cluster.client()
        client.connect(20)
        stale = Message(Kind.IMAGE, client.name, request_ids=(77, 78), array=images(2), codec="raw",
                        reply_to=client.name, timestamps={"client_sent": time.time() - 5.0})
        # sent outside submit(): epoch -1, so these overloaded answers do not cut the client's own
        # concurrency limit (tests/test_limiter.py covers that) and the next predict goes out whole
        client.outstanding.update({rid: Outstanding(time.perf_counter(), -1) for rid in (77, 78)})
        for edge in cluster.edge_names:
            client.send(edge, stale)
        answers = []
        deadline = time.time() + 10
        while len(answers) < 2 and time.time() < deadline:
            answers += client.collect(0.1)
        assert sorted(a.request_id for a in answers) == [77, 78]
        assert all(a.error and a.error.startswith("overloaded") for a in answers), [a.error for a in answers]
        # every edge refuses both on its own clock; the answer comes with the first edge's refusal
        refused = lambda: sum(e.metrics.counters["overloaded"] for e in cluster.edges)  # noqa: E731
        while refused() < 2 * len(cluster.edges) and time.time() < deadline:
            time.sleep(0.05)
        assert refused() == 2 * len(cluster.edges)
        pred = client.predict(images(3))
        assert not pred.errors and pred.degraded == 0


def test_a_node_tells_its_transport_when_it_is_idle_and_when_work_comes(monkeypatch):
    """Idle = nothing in flight and no request traffic for IDLE_AFTER_S; heartbeats do not count.
    The hint goes to the transport only when it changes."""
    import devit_mq.nodes.base as base
    from devit_mq.protocol import HeartbeatMeta

    monkeypatch.setattr(base, "IDLE_AFTER_S", 0.05)
    hints = []

    class Recording(InprocTransport):
        def set_idle(self, idle):
            hints.append(idle)

    hub = InprocHub()
    peer = InprocTransport(hub, "edge0")
    InprocTransport(hub, "edge1")
    client = ClientNode("c", Recording(hub, "c"), Roster("aggregator", {0: "edge0", 1: "edge1"}), timeout_s=5)
    agg = InprocTransport(hub, "aggregator")
    client.receive(0.01)
    assert hints == []  # work was recent (start-up counts): not idle yet
    time.sleep(0.06)
    client.receive(0.01)
    client.receive(0.01)
    assert hints == [True]  # once, not per call
    client.submit(images(1))  # a request in flight: never idle while it is
    assert peer.recv(1.0) is not None
    client.receive(0.01)
    assert hints == [True, False]
    time.sleep(0.06)
    agg.send("c", encode(Message(Kind.HEARTBEAT, "aggregator", meta=HeartbeatMeta(part=0))))
    client.receive(0.01)  # a heartbeat is not work, and the request is still in flight
    assert hints == [True, False]
    client.outstanding.clear()
    client.receive(0.01)
    assert hints == [True, False, True]


def test_a_client_refreshes_its_hello_only_without_signs_of_its_binding(monkeypatch):
    """Answers that keep coming prove the binding: a busy client sends no refresh hellos. One that
    was idle refreshes before its next request's images, and one whose requests in flight go
    unanswered for REHELLO_S refreshes then (a restarted aggregator); refreshes ask for no status."""
    from devit_mq.protocol import ErrorMeta, Hello
    from devit_mq.wire import decode

    hub = InprocHub()
    edge = InprocTransport(hub, "edge0")
    aggregator = InprocTransport(hub, "aggregator")
    client = ClientNode("c", InprocTransport(hub, "c"), Roster("aggregator", {0: "edge0"}), timeout_s=30)

    def hellos() -> list[bool]:
        """The ``reply`` flag of each hello the aggregator got."""
        got = []
        while (msg := aggregator.recv(0.05)) is not None:
            meta = decode(msg.frames).meta
            if isinstance(meta, Hello):
                got.append(meta.reply)
        return got

    client.hello()
    ids = client.submit(images(2))
    assert hellos() == [True]
    aggregator.send("c", encode(Message(Kind.ERROR, "aggregator", request_ids=(ids[0],),
                                        meta=ErrorMeta(code="overloaded", message="busy"))))
    assert [a.request_id for a in client.collect(1.0)] == [ids[0]]
    client._last_hello -= 60  # the last hello is long past, but an answer just came
    client.collect(0.01)
    assert hellos() == []
    client._last_answer -= 60  # nothing answered for a minute, but the request in flight is new
    client.collect(0.01)
    assert hellos() == []
    client._busy_since -= 60  # and it has waited a minute
    client.collect(0.01)
    assert hellos() == [False]

    client.outstanding.clear()  # idle for a minute, then a request: a refresh goes out first
    client._last_hello -= 60
    while edge.recv(0.01) is not None:
        pass
    client.submit(images(1))
    assert hellos() == [False] and edge.recv(1.0) is not None
    client.collect(0.01)  # and its wait starts now
    assert hellos() == []


def test_an_idle_clients_next_request_survives_an_aggregator_that_forgot_it(bundle):
    """A restarted aggregator knows no client: an idle client's refresh goes out ahead of its images,
    so the very first answer after the idle spell is routed (not dropped and waited out)."""
    with Cluster(bundle) as cluster:
        client = cluster.client(timeout_s=1.5)  # shorter than REHELLO_S: a late refresh would lose it
        client.connect(10)
        assert not client.predict(images(1), batch_size=1).errors
        cluster.aggregator.clients.forget(client.name)  # as after a restart
        client._last_hello -= 60  # and the client idle for a minute
        client._last_answer -= 60
        pred = client.predict(images(1), batch_size=1)
        assert not pred.errors, pred.errors
        assert cluster.aggregator.metrics.counters.get("unroutable", 0) == 0


def test_the_aggregator_answers_a_hello_with_its_status_unless_told_not_to(bundle):
    from devit_mq.protocol import Hello, Status
    from devit_mq.wire import decode

    with Cluster(bundle) as cluster:
        stranger = InprocTransport(cluster.hub, "stranger")
        for reply in (True, False, True):
            stranger.send("aggregator", encode(Message(Kind.CONTROL, "stranger", meta=Hello(reply=reply))))
            got = stranger.recv(2.0)
            assert (got is not None and isinstance(decode(got.frames).meta, Status)) == reply, reply
        assert cluster.aggregator.clients.route("stranger") is not None  # bound either way
