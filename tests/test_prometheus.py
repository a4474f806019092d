"""Prometheus /metrics: histograms, the collector's families, and a real topology scraped while it serves."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from devit_mq.metrics import LATENCY_BUCKETS_S, Histogram, Metrics
from devit_mq.metrics.prometheus import NodeCollector, serve_metrics
from devit_mq.nodes.launcher import Launcher
from devit_mq.topology import TopologyError, parse_topology
from tests.runtime_helpers import free_ports, images, make_bundle, write_topology


def scrape(port: int) -> dict[str, list]:
    """``{family name: [(sample name, labels, value), ...]}`` of one /metrics page."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {fam.name: [(s.name, s.labels, s.value) for s in fam.samples] for fam in text_string_to_metric_families(text)}


def value(families: dict, family: str, sample: str | None = None, **labels) -> float:
    """The one sample of ``family`` (named ``sample``, default the family's own) with ``labels``."""
    hits = [v for name, lab, v in families[family] if name == (sample or family)
            and all(lab.get(k) == str(x) for k, x in labels.items())]
    assert len(hits) == 1, (family, sample, labels, families[family])
    return hits[0]


# -- histograms -------------------------------------------------------------------------------------
def test_histogram_bins_with_prometheus_le_semantics():
    h = Histogram((0.001, 0.01))
    for v in (0.0005, 0.001, 0.002, 0.01, 5.0):
        h.add(v)
    assert h.counts == [2, 2, 1]  # a value equal to a bound falls in that bound's bucket (le)
    assert h.total == pytest.approx(5.0135)


def test_metrics_histograms_are_cumulative_past_the_ring_buffer():
    m = Metrics("edge0", max_samples=4)
    for _ in range(10):
        m.observe("compute", 0.003)
        m.observe("batch_size", 8.0)
    assert sum(m.histograms["compute"].counts) == 10  # percentiles keep 4 samples; the histogram all 10
    assert len(m._samples["compute"]) == 4
    assert m.histograms["compute"].bounds == LATENCY_BUCKETS_S
    assert m.histograms["batch_size"].counts[3] == 10  # counts get count buckets: 8 is in le=8



def test_telemetry_percentiles_follow_new_samples_and_are_reused_when_none_came():
    m = Metrics("edge0", max_samples=4)
    for v in (0.001, 0.002, 0.003):
        m.observe("compute", v)
    first = m.telemetry().stages_ms["compute"]
    assert first.n == 3 and first.p50 == pytest.approx(2.0)
    assert m.telemetry().stages_ms["compute"] is first  # nothing new: not recomputed
    for _ in range(4):  # the ring buffer now holds only these (same length, new values)
        m.observe("compute", 0.010)
    again = m.telemetry().stages_ms["compute"]
    assert again.n == 4 and again.p50 == pytest.approx(10.0)


class _FakeNode:
    role = "aggregator"
    name = "aggregator"
    metrics_server = None

    def __init__(self) -> None:
        self.metrics = Metrics(self.name)
        self.metrics.info = {"role": "aggregator"}

    def queue_depth(self) -> int:
        return 7


def test_collector_families_from_a_nodes_counters():
    node = _FakeNode()
    m = node.metrics
    m.count("answered", 10)
    m.count("degraded", 3)
    m.count("errors.overloaded", 2)
    m.count("wire_errors", 5)
    m.count("loop_errors", 1)
    m.count("handler_errors", 1)
    m.count("send_failed.edge1", 4)
    m.add_bytes("edge0->aggregator", 1000)
    m.observe("e2e", 0.004)
    m.observe("fuse_batch", 2.0)
    fams = {f.name: f for f in NodeCollector(node).collect()}
    req = {(s.labels["outcome"], s.labels["code"]): s.value for s in fams["devit_mq_requests"].samples}
    assert req == {("ok", ""): 7, ("degraded", ""): 3, ("error", "overloaded"): 2}
    assert fams["devit_mq_handler_errors"].samples[0].value == 2  # handler + loop-step errors
    assert fams["devit_mq_wire_errors"].samples[0].value == 5
    assert fams["devit_mq_queue_depth"].samples[0].value == 7
    link = fams["devit_mq_link_bytes"].samples[0]
    assert (link.labels["src"], link.labels["dst"], link.value) == ("edge0", "aggregator", 1000)
    fail = fams["devit_mq_send_failures"].samples[0]
    assert (fail.labels["peer"], fail.value) == ("edge1", 4)
    e2e = {s.labels["le"]: s.value for s in fams["devit_mq_stage_seconds"].samples if s.name.endswith("_bucket")}
    assert e2e["0.0025"] == 0 and e2e["0.005"] == 1 and e2e["+Inf"] == 1
    batch = [s for s in fams["devit_mq_batch_size"].samples if s.name.endswith("_count")]
    assert batch[0].labels["stage"] == "fuse" and batch[0].value == 1


def test_server_serves_the_text_format_and_stops():
    node = _FakeNode()
    node.metrics.count("answered", 2)
    server = serve_metrics(node, "127.0.0.1", 0)
    try:
        fams = scrape(server.port)
        assert value(fams, "devit_mq_requests", "devit_mq_requests_total", outcome="ok") == 2
        assert value(fams, "process_resident_memory_bytes") > 1e6  # prometheus_client's process collector
        assert value(fams, "devit_mq_node_info", role="aggregator") == 1
    finally:
        server.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=2)


# -- topology ---------------------------------------------------------------------------------------
def _topology(**edges) -> dict:
    return {"name": "t", "bundle": "b", "aggregator": {"name": "agg", "port": 5600, "metrics_port": 9100},
            "edges": [{"name": "e0", "submodel": 0, "port": 5601, **edges}]}


def test_metrics_port_is_checked_against_every_port_of_its_host(tmp_path):
    topo = parse_topology(_topology(metrics_port=9101), base_dir=tmp_path)
    assert topo.aggregator.metrics_address == ("127.0.0.1", 9100)  # loopback host: loopback only
    with pytest.raises(TopologyError, match=r"edges\[0\]\.metrics_port: 9100 clashes with aggregator\.metrics_port"):
        parse_topology(_topology(metrics_port=9100), base_dir=tmp_path)
    with pytest.raises(TopologyError, match=r"edges\[0\]\.metrics_port: 5600 clashes with aggregator\.port"):
        parse_topology(_topology(metrics_port=5600), base_dir=tmp_path)
    with pytest.raises(TopologyError, match=r"edges\[0\]\.metrics_port: .*65535"):
        parse_topology(_topology(metrics_port=70000), base_dir=tmp_path)
    remote = _topology(metrics_port=9100, host="10.0.0.7")  # another host: the same port is fine
    assert parse_topology(remote, base_dir=tmp_path).edges[0].metrics_address == (
        "0.0.0.0", 9100)


def _with_metrics(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    topo = write_topology(tmp_path / "prom.yaml", make_bundle(tmp_path / "bundle"))
    data = yaml.safe_load(topo.read_text())
    ports = dict(zip(("aggregator", "edge0", "edge1"), free_ports(3), strict=True))
    for node in (data["aggregator"], *data["edges"]):
        node["metrics_port"] = ports[node["name"]]
    topo.write_text(yaml.safe_dump(data, sort_keys=False))
    return topo, ports


def test_a_running_topology_is_scraped_while_it_serves(tmp_path):
    import zmq

    topo, ports = _with_metrics(tmp_path)
    n = 12
    with Launcher(topo, log_dir=tmp_path / "logs") as launcher:
        pred = launcher.client.predict(images(n), batch_size=1)
        assert not pred.errors
        # a malformed frame at the aggregator: counted, and the node keeps serving
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.connect(launcher.topology.aggregator.connect_endpoint)
        sock.send_multipart([b"\xc1garbage", b""])
        deadline = time.monotonic() + 10
        while True:
            agg = scrape(ports["aggregator"])
            if value(agg, "devit_mq_wire_errors", "devit_mq_wire_errors_total") >= 1 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        sock.close(linger=0)
        edges = {name: scrape(ports[name]) for name in ("edge0", "edge1")}
        assert not launcher.client.predict(images(2, seed=1)).errors  # still serving

    assert value(agg, "devit_mq_wire_errors", "devit_mq_wire_errors_total") == 1
    assert value(agg, "devit_mq_requests", "devit_mq_requests_total", outcome="ok") == n
    assert value(agg, "devit_mq_stage_seconds", "devit_mq_stage_seconds_count", stage="e2e") == n
    assert value(agg, "devit_mq_stage_seconds", "devit_mq_stage_seconds_count", stage="fuse") >= 1
    assert value(agg, "devit_mq_stage_seconds", "devit_mq_stage_seconds_bucket", stage="hold", le="+Inf") == n
    assert value(agg, "devit_mq_queue_depth") == 0
    assert value(agg, "devit_mq_link_bytes", "devit_mq_link_bytes_total", src="edge0", dst="aggregator") > 0
    assert value(agg, "devit_mq_node_info", role="aggregator") == 1
    assert value(agg, "process_cpu_seconds", "process_cpu_seconds_total") > 0
    for part, (name, fams) in enumerate(edges.items()):
        assert value(fams, "devit_mq_node_info", role="edge", part=part) == 1
        assert value(fams, "devit_mq_stage_seconds", "devit_mq_stage_seconds_count", stage="compute") >= 1
        assert value(fams, "devit_mq_stage_seconds", "devit_mq_stage_seconds_count", stage="queue") == n
        assert value(fams, "devit_mq_batch_size", "devit_mq_batch_size_sum", stage="compute") == n
        assert value(fams, "devit_mq_link_bytes", "devit_mq_link_bytes_total", src=name, dst="aggregator") > 0
        assert value(fams, "process_resident_memory_bytes") > 1e7


def test_a_metrics_port_in_use_is_a_one_line_error(tmp_path):
    import socket

    topo, ports = _with_metrics(tmp_path)
    busy = socket.socket()
    busy.bind(("127.0.0.1", ports["edge0"]))
    busy.listen()
    try:
        proc = subprocess.run([sys.executable, "-m", "devit_mq.cli", "node", str(topo), "--name", "edge0"],
                              capture_output=True, text=True, timeout=120)
    finally:
        busy.close()
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"edges[0].metrics_port: cannot serve /metrics on 127.0.0.1:{ports['edge0']}" in proc.stderr
