"""`devit-mq status` against real node processes: exit 0 when every part is ready, 1 once a killed
edge has been silent for the silence window (and the report names it down), 2 quickly when nothing
listens or the topology is malformed (one error line); a status query binds no client name, and it
works under CURVE."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from devit_mq.nodes.launcher import Launcher
from devit_mq.nodes.runtime import Client
from devit_mq.nodes.status import StatusProbe, load, query_status
from devit_mq.transport.security import create_keys

from .runtime_helpers import images, make_bundle, one_error_line, write_topology

CLI = [sys.executable, "-m", "devit_mq.cli"]


def status(topo, *extra: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "status", str(topo), *extra], capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(120)
def test_status_ready_then_degraded_after_an_edge_is_killed(tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    topo = write_topology(tmp_path / "t.yaml", bundle)
    with Launcher(topo, log_dir=tmp_path / "logs") as launcher:
        launcher.client.predict(images(4), batch_size=2)
        pids = {p.spec.name: p.proc.pid for p in launcher.processes}
        deadline = time.monotonic() + 10
        while True:  # edges report their counters with their next heartbeat (every 0.5 s)
            out = status(topo, "--json")
            assert out.returncode == 0, out.stdout + out.stderr
            report = json.loads(out.stdout)
            counted = [n["counters"].get("images") for n in report["nodes"] if n["role"] == "edge"]
            if counted == [4, 4] or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert report["reachable"] and report["exit_code"] == 0
        by_name = {n["name"]: n for n in report["nodes"]}
        assert {n: by_name[n]["state"] for n in pids} == {n: "ready" for n in pids}
        assert {n: by_name[n]["pid"] for n in pids} == pids
        assert by_name["aggregator"]["counters"]["answered"] == 4
        edge0 = by_name["edge0"]
        assert edge0["executor"] and edge0["version"] and edge0["rss_mb"] > 0 and edge0["uptime_s"] > 0
        assert 0 <= edge0["last_heard_s"] <= report["silence_s"] and edge0["counters"]["images"] == 4
        text = status(topo)
        assert text.returncode == 0 and "READY" in text.stdout and "edge1" in text.stdout, text.stdout

        # probes bind no client name: a client that says hello under a probe's name is not refused
        probe = StatusProbe(load(topo))
        assert set(probe.node.transport._links) == {"aggregator"}  # no connection to any edge
        assert probe.query(5) is not None
        with Client(topo, name=probe.name, timeout_s=10) as same_name:
            assert len(same_name.predict(images(1)).answers) == 1
        probe.close()

        edge1 = next(p for p in launcher.processes if p.spec.name == "edge1")
        edge1.proc.kill()  # SIGKILL; nothing supervises (restarts) this launch's nodes
        edge1.proc.wait(10)
        deadline = time.monotonic() + 15
        while True:
            out = status(topo, "--json")
            if out.returncode != 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert out.returncode == 1, out.stdout + out.stderr
        report = json.loads(out.stdout)
        states = {n["name"]: n["state"] for n in report["nodes"]}
        assert states == {"aggregator": "ready", "edge0": "ready", "edge1": "down"}
        assert "edge1 down" in report["summary"]
        text = status(topo)
        assert text.returncode == 1 and "DEGRADED" in text.stdout.splitlines()[0]
        assert status(topo, "--degraded-ok").returncode == 0  # a liveness probe: the aggregator answers
        # one node's own health check (the edge container's HEALTHCHECK)
        assert [status(topo, "--node", n).returncode for n in ("edge0", "edge1", "aggregator")] == [0, 1, 0]


@pytest.mark.timeout(60)
def test_status_unreachable_is_fast_and_a_malformed_topology_is_one_line(tmp_path):
    topo = write_topology(tmp_path / "t.yaml", make_bundle(tmp_path / "bundle"))  # nothing started
    start = time.monotonic()
    out = status(topo, "--timeout", "1")
    elapsed = time.monotonic() - start
    assert out.returncode == 2, out.stdout + out.stderr
    assert "UNREACHABLE" in out.stdout and "aggregator" in out.stdout
    assert elapsed < 8, elapsed  # interpreter start + 1 s
    report = json.loads(status(topo, "--json", "--timeout", "0.5").stdout)
    assert not report["reachable"] and report["exit_code"] == 2
    assert {n["state"] for n in report["nodes"]} == {"unreachable"}
    # the in-process call honours its timeout
    start = time.monotonic()
    assert query_status(load(topo), 0.5).exit_code == 2
    assert time.monotonic() - start < 1.5

    (tmp_path / "bad.yaml").write_text("name: [\n")
    out = status(tmp_path / "bad.yaml")
    assert out.returncode == 2
    assert "bad.yaml" in one_error_line(out)
    assert status(topo, "--timeout", "0.5", "--degraded-ok").returncode == 2
    assert status(topo, "--timeout", "0.5", "--node", "edge0").returncode == 2
    out = status(topo, "--node", "edge7")
    assert out.returncode == 2 and "no node named 'edge7'" in one_error_line(out)
    out = status(tmp_path / "missing.yaml")
    assert out.returncode == 2 and "does not exist" in one_error_line(out)


@pytest.mark.timeout(120)
def test_status_over_curve(tmp_path):
    keys = tmp_path / "keys"
    create_keys(keys, ["aggregator", "edge0", "edge1", "admin", "client"])
    bundle = make_bundle(tmp_path / "bundle")
    topo = write_topology(tmp_path / "t.yaml", bundle, security={"curve": True, "keys_dir": str(keys)})
    with Launcher(topo, log_dir=tmp_path / "logs"):
        out = status(topo, "--json")
        assert out.returncode == 0, out.stdout + out.stderr
        assert [n["state"] for n in json.loads(out.stdout)["nodes"]] == ["ready"] * 3
        # with only the admin pair on this host, the probe goes by admin.<random>
        (keys / "client.key_secret").unlink()
        probe = StatusProbe(load(topo))
        assert probe.name.startswith("admin.")
        assert probe.query(5) is not None
        probe.close()
        # an edge's container: every public key, its own secret only, in the host's keys folder
        site = tmp_path / "site-keys"
        site.mkdir()
        for f in [*keys.glob("*.key"), keys / "edge0.key_secret"]:
            shutil.copy(f, site / f.name)
        env = dict(os.environ, DEVIT_MQ_KEYS_DIR=str(site))
        out = subprocess.run([*CLI, "status", str(topo), "--node", "edge0", "--json"], env=env, capture_output=True,
                             text=True, timeout=30)
        assert out.returncode == 0, out.stdout + out.stderr
        assert json.loads(out.stdout)["exit_code"] == 0
        # the aggregator's container runs `status` without --node: its own pair is found
        aggregator_site = tmp_path / "aggregator-keys"
        aggregator_site.mkdir()
        for f in [*keys.glob("*.key"), keys / "aggregator.key_secret"]:
            shutil.copy(f, aggregator_site / f.name)
        assert status(topo, "--keys-dir", str(aggregator_site)).returncode == 0
        (site / "edge0.key_secret").unlink()
        out = status(topo, "--keys-dir", str(site))
        assert out.returncode == 2 and "no key pair" in one_error_line(out)  # no secret at all on this host


def test_edge_states_from_a_status_reply(tmp_path):
    from devit_mq.nodes.status import build_report, render_text
    from devit_mq.protocol import Status

    topo = load(write_topology(tmp_path / "t.yaml", make_bundle(tmp_path / "bundle"), n_edges=3))
    # part 0 heard 0.2 s ago, part 1 said ready but has been silent 7 s, part 2 never heard from
    report = build_report(topo, Status(ready=[0, 1], parts=3, last_heard_s=[0.2, 7.0, -1.0], silence_s=3.0))
    assert [(n.name, n.state, n.last_heard_s) for n in report.edges] == [
        ("edge0", "ready", 0.2), ("edge1", "down", 7.0), ("edge2", "never", None)]
    assert report.exit_code == 1 and report.summary == "DEGRADED: 1 of 3 edges ready; edge1 down, edge2 never"
    text = render_text(report)
    assert text.splitlines()[0].startswith("t: DEGRADED") and len(text.splitlines()) == 2 + 4  # summary, columns, nodes
    # an edge heard from within the window but that never said ready is not ready either
    report = build_report(topo, Status(ready=[0, 2], parts=3, last_heard_s=[0.2, 0.1, 0.3], silence_s=3.0))
    assert [n.state for n in report.edges] == ["ready", "down", "ready"]
    assert build_report(topo, Status(ready=[0, 1, 2], parts=3, last_heard_s=[0.1] * 3, silence_s=3.0)).exit_code == 0
