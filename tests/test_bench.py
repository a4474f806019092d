"""``devit-mq bench`` end to end on tiny random-weight shapes (a real launched topology, real mpirun and
real transport-rate processes), and its pieces: bundles of the issue's shapes, derived topologies,
the report. Numbers are checked for presence and sanity, never against a speed."""

import json
import math

import pytest
import yaml

from devit_mq.bench import report
from devit_mq.bench.bundles import build_bundle, ensure_bundle, issue_shapes, tiny_shapes
from devit_mq.bench.runtime import derive_topologies, main
from devit_mq.model import load_manifest, load_submodel, load_teacher
from devit_mq.topology import load_topology

from .runtime_helpers import make_bundle, write_topology


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def check_phase(phase, threads=("1", "2")):
    assert positive(phase["latency_ms"]["p50"]) and phase["latency_ms"]["p99"] >= phase["latency_ms"]["p50"]
    assert positive(phase["edge_compute_ms"]["p50"])
    assert phase["overhead_ms"]["n"] == phase["latency_ms"]["n"]
    assert phase["latency_errors"] == 0
    assert len(phase["latency_rounds_p50_ms"]) >= 1
    assert positive(phase["overhead_vs_floor"]) or math.isnan(phase["overhead_vs_floor"])  # overhead may be ~0
    assert phase["best_batch"] in phase["throughput"]
    for tp in phase["throughput"].values():
        assert positive(tp["img_s"]) and tp["errors"] == 0 and tp["cpu_s_per_img"] >= 0
    assert {"aggregator", "edge0", "edge1", "client"} <= set(phase["nodes"])
    assert all(positive(n["peak_rss_mb"]) for n in phase["nodes"].values())
    assert set(phase["teacher"]) == set(threads) == set(phase["teacher_attention"])
    for tr in phase["teacher"].values():
        assert positive(tr["latency_ms"]["p50"]) and positive(tr["best_img_s"])


@pytest.fixture
def topology(tmp_path):
    return write_topology(tmp_path / "t.yaml", make_bundle(tmp_path / "bundle"))


@pytest.mark.timeout(180)
def test_bench_quick_zmq_writes_well_formed_json(topology, tmp_path):
    out = tmp_path / "bench.json"
    assert main([str(topology), "--quick", "--shapes", "tiny", "--transports", "zmq",
                 "--work-dir", str(tmp_path / "work"), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["bundle"]["random_weights"] is True
    check_phase(data["devit"]["zmq"])
    assert data["floor"]["zmq"]["n"] == 20 and positive(data["floor"]["zmq"]["p50_us"])
    busy = data["busy_floor"]["zmq"]
    assert busy["n"] == 20 and busy["edge_work_ms"] == data["devit"]["zmq"]["edge_compute_ms"]["p50"]
    assert data["devit"]["zmq"]["overhead_vs_busy_floor"] == pytest.approx(
        data["devit"]["zmq"]["overhead_ms"]["p50"] * 1e3 / busy["p50_us"])
    assert set(data["speedup"]) == {"zmq vs teacher 1T", "zmq vs teacher 2T"}
    assert all(positive(v) for s in data["speedup"].values() for v in s.values())
    cases = data["transport"]["zmq"]["cases"]
    assert len(cases) == 3 and all(positive(c["ours_msgs_s"]) and positive(c["raw_msgs_s"]) for c in cases.values())
    names = [t["name"] for t in data["targets"]]
    assert any("overhead" in n for n in names) and any("latency speedup" in n for n in names)
    idle = data["devit"]["zmq"]["idle_cpu_pct"]
    assert set(idle) == {"aggregator", "edge0", "edge1", "client"} and all(0 <= v < 100 for v in idle.values())
    assert any(n.startswith("idle node CPU (zmq)") for n in names)
    md = report.bench_markdown(data)
    assert "DeViT over zmq" in md and "random weights" in md and "Idle nodes" in md


@pytest.mark.mpi
@pytest.mark.timeout(300)
def test_bench_quick_mpi_phase_runs_under_mpirun(topology, tmp_path):
    out = tmp_path / "bench.json"
    assert main([str(topology), "--quick", "--shapes", "tiny", "--transports", "mpi",
                 "--work-dir", str(tmp_path / "work"), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    check_phase(data["devit"]["mpi"])
    assert data["floor"]["mpi"]["n"] == 20 and positive(data["floor"]["mpi"]["p50_us"])
    assert all(positive(c["ratio"]) for c in data["transport"]["mpi"]["cases"].values())
    idle = data["devit"]["mpi"]["idle_cpu_pct"]
    assert set(idle) == {"aggregator", "edge0", "edge1", "client"} and all(0 <= v < 100 for v in idle.values())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_edges_sweep(topology, tmp_path):
    out = tmp_path / "bench.json"
    assert main([str(topology), "--quick", "--shapes", "tiny", "--transports", "zmq", "--no-rates",
                 "--edges-sweep", "1,3", "--work-dir", str(tmp_path / "work"), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["edges_sweep"]
    assert [r["edges"] for r in rows] == [1, 3]
    assert all(positive(r["best_img_s"]) and positive(r["latency_ms"]["p50"]) for r in rows)


def test_bench_rejects_unknown_transport(topology, capsys):
    assert main([str(topology), "--transports", "tcp"]) == 2
    assert "--transports" in capsys.readouterr().err
    assert main([str(topology), "--edges-sweep", "1,two"]) == 2
    assert "--edges-sweep" in capsys.readouterr().err
    assert main([str(topology.parent / "missing.yaml"), "--quick"]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_derived_topologies_keep_nodes_and_settings(topology, tmp_path):
    bundle = ensure_bundle(tmp_path / "b", tiny_shapes(2))
    paths = derive_topologies(topology, bundle, tmp_path)
    zmq, mpi = load_topology(paths["zmq"]), load_topology(paths["mpi"])
    original = load_topology(topology)
    assert zmq.transport == "zmq" and mpi.transport == "mpi"
    assert zmq.bundle == mpi.bundle == bundle.resolve()
    assert [e.name for e in mpi.edges] == [e.name for e in original.edges]
    assert [e.port for e in zmq.edges] == [e.port for e in original.edges]
    assert mpi.client is not None and len(mpi.nodes) == 4 and mpi.aggregator.port is None
    assert mpi.aggregator.deadline_ms == original.aggregator.deadline_ms
    # and back: an MPI topology gets loopback ports for its ZeroMQ variant
    (tmp_path / "again").mkdir()
    again = derive_topologies(paths["mpi"], bundle, tmp_path / "again")
    assert all(e.port for e in load_topology(again["zmq"]).edges)


def test_issue_shapes_are_vit_s_vs_vit_ti():
    shapes = issue_shapes(2)
    t, s = shapes.teacher, shapes.submodels
    assert (t.embed_dim, t.depth, t.num_heads, t.img_size, t.patch_size) == (384, 12, 6, 224, 16)
    assert len(s) == 2 and all((c.embed_dim, c.depth, c.num_heads, c.img_size) == (192, 12, 3, 224) for c in s)
    assert [c.embed_dim for c in issue_shapes(4).submodels] == [96] * 4
    with pytest.raises(ValueError, match="divide"):
        issue_shapes(5)


def test_built_bundle_has_teacher_and_says_random(tmp_path):
    shapes = tiny_shapes(3)
    bundle = build_bundle(tmp_path / "b", shapes, seed=1)
    manifest = load_manifest(bundle)
    assert manifest.metadata["random_weights"] is True and manifest.num_parts == 3
    assert load_teacher(bundle).config.embed_dim == shapes.teacher.embed_dim
    assert load_submodel(bundle, 2).config.embed_dim == shapes.submodels[2].embed_dim
    stamp = (bundle / "manifest.json").stat().st_mtime_ns
    assert ensure_bundle(bundle, shapes, seed=1) == bundle and (bundle / "manifest.json").stat().st_mtime_ns == stamp
    ensure_bundle(bundle, shapes, seed=2)  # other seed: rebuilt
    assert load_manifest(bundle).metadata["seed"] == 2


def test_report_targets_flag_misses_and_json_has_no_nan(tmp_path):
    result = {"speedup": {"zmq vs teacher 1T": {"latency_p50": 2.5, "latency_p99": 2.0, "throughput": 1.0},
                          "zmq vs teacher 2T": {"latency_p50": 1.9, "latency_p99": 2.0, "throughput": 1.0}},
              "devit": {"zmq": {"overhead_pct": {"p50": float("nan")}}},
              "transport": {"zmq": {"cases": {"features 768 B": {"ratio": 0.8}, "image": {"ratio": 0.1}}}}}
    verdicts = {t["name"]: t["met"] for t in report.bench_targets(result)}
    assert verdicts["batch-1 latency speedup, DeViT zmq vs teacher 1T"] is False
    assert verdicts["batch-1 latency speedup, DeViT zmq vs teacher 2T"] is True
    assert verdicts["framework overhead at batch 1 (zmq), p50 % of e2e"] is None
    assert [n for n in verdicts if n.startswith("transport")] == ["transport zmq: features 768 B, ours/raw msgs/s"]
    result["devit"]["mpi"] = {"overhead_pct": {}, "idle_cpu_pct": {"aggregator": 0.4, "edge0": 1.3, "client": 9.0}}
    verdicts = {t["name"]: t["met"] for t in report.bench_targets(result)}
    assert verdicts["idle node CPU (mpi), the busiest of 2 (edge0), % of a core"] is False  # the client is not a node
    result["devit"]["mpi"]["idle_cpu_pct"]["edge0"] = 0.9
    verdicts = {t["name"]: t["met"] for t in report.bench_targets(result)}
    assert verdicts["idle node CPU (mpi), the busiest of 2 (edge0), % of a core"] is True
    text = report.write_json(tmp_path / "r.json", result).read_text()
    assert "NaN" not in text and json.loads(text)["devit"]["zmq"]["overhead_pct"]["p50"] is None
    assert yaml.safe_load(text)  # plain JSON, readable by any tool
