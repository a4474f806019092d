"""Stress runs against real node processes: every request id answered exactly once, under plain load
and under injected faults (drops, delays, duplicates, corrupted frames, an edge killed and restarted);
plus the accounting, fault-spec and report pieces on their own. No timing is asserted."""

import json

import pytest
import yaml

from devit_mq.bench import report
from devit_mq.bench.faults import FaultSpec, FaultSpecError
from devit_mq.bench.stress import Ledger, StressConfig, StressError, main, rss_summary, run_stress
from devit_mq.nodes import Answer

from .runtime_helpers import make_bundle, write_topology


@pytest.fixture
def topology(tmp_path):
    return write_topology(tmp_path / "t.yaml", make_bundle(tmp_path / "bundle"), deadline_ms=400)


def check_well_formed(result, path):
    """The JSON a run writes reads back with every section the report needs."""
    data = json.loads(report.write_json(path, result).read_text())
    for key in ("config", "summary", "windows", "rss", "targets", "node_counters"):
        assert key in data, key
    assert data["windows"] and all(w["t1"] > w["t0"] for w in data["windows"])
    assert {t["name"] for t in data["targets"]} >= {"lost requests (no answer at all)",
                                                  "duplicate answers (an id answered twice)"}
    assert "| requests |" in report.stress_markdown(result)
    return data


@pytest.mark.timeout(120)
def test_open_loop_answers_every_request_exactly_once(topology, tmp_path):
    cfg = StressConfig(duration=3.0, rate=30.0, window_s=1.0)
    result = run_stress(topology, cfg, launch=True, log_dir=tmp_path / "logs")
    s = result["summary"]
    assert s["submitted"] == 90  # open loop: one request per 1/rate, however the system behaves
    assert s["lost"] == 0 and s["duplicates"] == 0 and s["unexpected_answers"] == 0
    assert s["answered"] == s["submitted"] == s["ok"] + s["degraded"] + s["errors"]
    assert all(result["alive"].values())
    assert set(result["rss"]) >= {"aggregator", "edge0", "edge1"}
    assert set(result["standalone"]) == {"edge0", "edge1"} and s["standalone_img_s"] > 0
    data = check_well_formed(result, tmp_path / "stress.json")
    assert len(data["windows"]) == 3
    message = report.try_plot(report.plot_stress, result, tmp_path / "stress.png")
    assert (tmp_path / "stress.png").is_file() or "matplotlib is not installed" in message


@pytest.mark.timeout(120)
def test_faults_and_a_killed_edge_lose_no_request(topology, tmp_path):
    """Faults on every link of edge0 (client -> edge0 images, edge0 -> aggregator features) and edge0
    killed and restarted mid-run: edge1 stays clean, so the aggregator hears of every request and
    must answer each one exactly once (degraded where edge0's part is missing).

    Corruption is injected on the image link, where a flipped bit lands in the 150 KB payload: a flip
    in a feature message's small header can rewrite a request id, which the wire cannot detect (no
    checksum), and then a later real request with that id can be dropped as already answered."""
    spec = "drop=0.1,delay_ms=2,jitter_ms=4,duplicate=0.1"
    cfg = StressConfig(duration=5.0, rate=30.0, window_s=1.0, timeout_s=8.0, standalone=False,
                       client_faults=FaultSpec.parse(spec + ",corrupt=0.1,peers=edge0"),
                       edge_faults=FaultSpec.parse(spec),
                       faulty_edges=("edge0",), kill_edge="edge0", kill_at_s=1.5, restart_after_s=1.5)
    result = run_stress(topology, cfg, launch=True, log_dir=tmp_path / "logs")
    s = result["summary"]
    assert s["submitted"] == 150
    assert s["lost"] == 0 and s["duplicates"] == 0, s
    assert s["answered"] == s["submitted"]
    assert s["degraded"] > 0  # the faults and the dead edge did bite
    faults = result["client_fault_stats"]
    assert faults["dropped"] > 0 and faults["duplicated"] > 0 and faults["corrupted"] > 0
    assert [e["event"] for e in result["events"] if e["event"] != "status_missed"] == ["killed", "restarted"]
    assert all(result["alive"].values()), result["alive"]  # aggregator and edge1 survived, edge0 came back
    check_well_formed(result, tmp_path / "faults.json")


@pytest.mark.timeout(120)
def test_closed_loop_cli_writes_json(topology, tmp_path):
    out = tmp_path / "closed.json"
    code = main([str(topology), "--launch", "--clients", "3", "--duration", "2", "--window", "1",
                 "--no-standalone", "--json", str(out), "--log-dir", str(tmp_path / "logs")])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["summary"]["lost"] == 0 and data["summary"]["duplicates"] == 0
    assert data["summary"]["submitted"] >= 3 and data["config"]["clients"] == 3


@pytest.mark.timeout(180)
def test_capacity_sweep_measures_capacity_then_answers_every_request_past_it(topology, tmp_path):
    """Unloaded, capacity (closed loop), then open loop at 1x and 2x of it, on edges with admission
    control: every request gets a result or an explicit error, none is lost, and the rows and
    targets are consistent with the phases' own figures (the figures themselves are benchmarks)."""
    data = yaml.safe_load(topology.read_text())
    data["defaults"].update(max_batch=1, max_wait_ms=0.0, max_queue_ms=20)
    topology.write_text(yaml.safe_dump(data))
    out = tmp_path / "capacity.json"
    code = main([str(topology), "--launch", "--capacity-sweep", "1,2", "--duration", "1.5", "--window", "1",
                 "--no-standalone", "--json", str(out), "--log-dir", str(tmp_path / "logs")])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["kind"] == "stress-capacity" and result["admission"] == {"edge0": 20.0, "edge1": 20.0}
    cap = result["capacity_per_s"]
    assert cap == result["saturated"]["served_per_s"] > 0
    assert [r["multiple"] for r in result["sweep"]] == [1.0, 2.0]
    for row in result["sweep"]:
        assert row["lost"] == 0 and row["duplicates"] == 0
        assert row["answered"] == row["submitted"] == row["ok"] + row["degraded"] + row["errors"] + row["overloaded"]
        assert row["offered_per_s"] == pytest.approx(row["multiple"] * cap, rel=0.05)
        assert row["served_vs_capacity"] == pytest.approx(row["served_per_s"] / cap)
    names = [t["name"] for t in result["targets"]]
    assert "served / capacity at 2x capacity" in names and "admitted p99 / unloaded p99 at 2x capacity" in names
    md = report.capacity_markdown(result)
    assert "| 2.0x |" in md and "edge0 20 ms" in md


def test_capacity_sweep_refuses_bad_multiples(topology, capsys):
    assert main([str(topology), "--launch", "--capacity-sweep", "0,2", "--duration", "1"]) == 2
    assert "multiples > 0" in capsys.readouterr().err


def test_cli_rejects_bad_arguments(topology, capsys):
    assert main([str(topology), "--rate", "5", "--duration", "1", "--kill-edge", "edge0@1"]) == 2
    assert "--launch" in capsys.readouterr().err
    assert main([str(topology), "--rate", "5", "--duration", "1", "--client-faults", "drop=2"]) == 2
    assert "probability" in capsys.readouterr().err
    with pytest.raises(StressError, match="exactly one"):
        StressConfig(duration=1.0, rate=1.0, clients=2)
    with pytest.raises(SystemExit):
        main([str(topology), "--rate", "5,x", "--duration", "1"])
    # attach mode with nothing running: a clear error naming the aggregator, not a hang
    assert main([str(topology), "--rate", "5", "--duration", "1", "--connect-timeout", "1", "--no-standalone"]) == 2
    assert "aggregator" in capsys.readouterr().err


# -- pieces -------------------------------------------------------------------------------------------
def test_fault_spec_parse():
    spec = FaultSpec.parse("drop=0.1, delay_ms=5,jitter_ms=2,duplicate=0.2,corrupt=0.05,peers=edge0+edge1")
    assert (spec.drop, spec.delay_ms, spec.jitter_ms, spec.duplicate, spec.corrupt) == (0.1, 5, 2, 0.2, 0.05)
    assert spec.peers == ("edge0", "edge1")
    assert FaultSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    for bad, match in (("drop", "KEY=VALUE"), ("lose=0.1", "KEY=VALUE"), ("drop=x", "not a number"),
                       ("corrupt=1.5", "probability"), ("delay_ms=-1", ">= 0")):
        with pytest.raises(FaultSpecError, match=match):
            FaultSpec.parse(bad)


def test_ledger_counts_lost_duplicate_unexpected_and_timeouts():
    ledger = Ledger(active=True)
    ledger.submit("c", [1, 2, 3, 4], ledger.t0)
    ledger.tap("c", [1, 2, 2, 99])  # 2 answered twice by the system, 99 never sent
    ledger.record("c", [Answer(1, label=0), Answer(2, label=1, degraded=True),
                        Answer(3, error="timeout: no answer within 1s")])
    ledger.record("c", [Answer(2, label=1)])  # the client would never give it twice; the ledger ignores it
    s = ledger.summary(load_s=1.0)
    assert (s["submitted"], s["answered"], s["ok"], s["degraded"], s["timeouts"]) == (4, 2, 1, 1, 1)
    assert s["lost"] == 2  # 3 timed out, 4 never answered
    assert s["duplicates"] == 1 and s["unexpected_answers"] == 1
    assert sum(w["answered"] for w in ledger.windows(0.5, 1.0)) == 2


def test_rss_summary_growth_skips_warmup_and_restarted_nodes():
    samples = {"agg": [(0.0, 50.0), (5.0, 100.0), (10.0, 110.0)], "edge0": [(0.0, 10.0), (10.0, 20.0)]}
    out = rss_summary(samples, warmup_s=5.0, restarted=["edge0"])
    assert out["agg"]["first_mb"] == 100.0 and out["agg"]["growth_pct"] == pytest.approx(10.0)
    assert out["agg"]["max_mb"] == 110.0
    assert out["edge0"]["growth_pct"] is None


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_rate_sweep_cli_reports_each_offered_load(topology, tmp_path):
    out = tmp_path / "sweep.json"
    assert main([str(topology), "--launch", "--rate", "10,40", "--duration", "3", "--window", "1",
                 "--json", str(out), "--log-dir", str(tmp_path / "logs")]) == 0
    data = json.loads(out.read_text())
    assert [r["offered"] for r in data["sweep"]] == [10.0, 40.0]
    assert [r["summary"]["submitted"] for r in data["runs"]] == [30, 120]
    assert data["summary"] == {"lost": 0, "duplicates": 0}
    assert "offered req/s" in report.sweep_markdown(data)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_long_closed_loop_stress_with_faults(topology, tmp_path):
    spec = "drop=0.05,delay_ms=2,jitter_ms=5,duplicate=0.05"
    cfg = StressConfig(duration=120.0, clients=4, window_s=10.0,
                       client_faults=FaultSpec.parse(spec + ",corrupt=0.05,peers=edge0"),
                       edge_faults=FaultSpec.parse(spec), faulty_edges=("edge0",), kill_edge="edge0",
                       kill_at_s=40.0, restart_after_s=20.0)
    result = run_stress(topology, cfg, launch=True, log_dir=tmp_path / "logs")
    s = result["summary"]
    assert s["lost"] == 0 and s["duplicates"] == 0 and s["answered"] == s["submitted"]
    assert all(result["alive"].values())
    check_well_formed(result, tmp_path / "long.json")
