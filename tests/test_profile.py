"""Device profiles: the cost model, files, `devit-mq profile`, balancing sub-models to unequal devices,
balanced training, and an edge's `profile:` in a topology."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from devit_mq.dekd.cli import main as train_main
from devit_mq.model import ViTConfig, load_manifest, vit_macs
from devit_mq.profile import DeviceProfile, ProfileError, cost_features, load_profile, save_profile
from devit_mq.profile.balance import balance, candidates
from devit_mq.profile.cli import main as profile_main
from devit_mq.profile.device import FEATURES, input_of
from devit_mq.profile.measure import Grid, measure
from devit_mq.testbed.net import CGROUP_CPU
from devit_mq.topology import TopologyError, load_topology

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = ROOT / "devit_mq" / "assets" / "bundles" / "default"
TINY = ROOT / "configs" / "tiny.yaml"
# a small MNIST-shaped sub-model: 28x28x1, patch 7 -> 16 patches + CLS = 17 tokens
BASE = ViTConfig(img_size=28, in_chans=1, patch_size=7, embed_dim=16, depth=2, num_heads=2, num_classes=5,
                 pos_embed="sincos", init="xavier")


def synthetic(device: str, coef: list[float], base: ViTConfig = BASE) -> DeviceProfile:
    """A profile whose samples follow ``coef`` exactly (what a noiseless device would measure)."""
    samples = []
    for dim in (16, 32, 48, 64):
        for heads in (1, 2, 4):
            for mlp in (1, 2, 4):
                for depth in (1, 3):
                    cfg = base.replace(embed_dim=dim, num_heads=heads, mlp_ratio=float(mlp), depth=depth)
                    samples.append({"embed_dim": dim, "num_heads": heads, "mlp_hidden": dim * mlp, "depth": depth,
                                    "ms": float(cost_features(cfg) @ np.array(coef))})
    return DeviceProfile(device=device, executor="numpy", threads=1, input=input_of(base), samples=samples).fit()


FAST = [0.05, 0.02, 0.01, 0.004, 0.3, 0.002, 0.01]
SLOW = [4 * c for c in FAST]  # the same device at a quarter of the speed


def test_cost_features_count_what_the_forward_computes():
    t, p, d = 17, 1, 16
    one = cost_features(BASE.replace(depth=1))
    # the last (only) block: QKV on all tokens, attention and the rest on the prefix row only
    assert one[2] * 1e6 == pytest.approx(t * d * 3 * d + p * (d * d + 2 * d * 4 * d))
    assert one[3] * 1e6 == pytest.approx(2 * p * t * d)
    two = cost_features(BASE)
    assert two[3] * 1e6 == pytest.approx(2 * t * t * d + 2 * p * t * d)
    assert (two[5], two[6]) == (4, 2) and len(two) == len(FEATURES)
    # a pruned block (one head of two, half the MLP) costs less than the full one
    pruned = cost_features(BASE.replace(block_heads=(1, 2), block_mlp=(32, 64)))
    assert pruned[2] < two[2] and pruned[3] < two[3] and pruned[5] == 3


def test_the_fit_recovers_a_noiseless_device_and_predicts_unseen_shapes():
    profile = synthetic("fast", FAST)
    assert profile.fit_max_rel_error < 1e-6
    unseen = BASE.replace(embed_dim=40, depth=5, block_heads=(2, 1, 2, 2, 1), block_mlp=(100, 160, 60, 160, 20))
    assert profile.predict_ms(unseen) == pytest.approx(float(cost_features(unseen) @ np.array(FAST)), rel=1e-4)
    assert all(c >= 0 for c in profile.coef_ms)


def test_a_profile_round_trips_and_refuses_other_inputs(tmp_path):
    profile = synthetic("fast", FAST)
    back = load_profile(save_profile(profile, tmp_path / "p.json"))
    assert back.to_dict() == profile.to_dict()
    assert back.predict_ms(BASE) == pytest.approx(profile.predict_ms(BASE))
    with pytest.raises(ProfileError, match="other inputs.*patch_size"):
        back.predict_ms(BASE.replace(patch_size=4))
    profile.speed = 0.25  # measured on an emulated slower device
    assert load_profile(save_profile(profile, tmp_path / "q.json")).speed == 0.25


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.pop("format"), "not a device profile"),
    (lambda d: d.update(version=99), "version 99"),
    (lambda d: d["model"].update(coef_ms=[-1.0] * len(FEATURES)), "non-negative"),
    (lambda d: d["model"].update(features=["x"]), "features"),
    (lambda d: d.update(executor="gpu"), "executor 'gpu'"),
    (lambda d: d.pop("samples"), "malformed profile"),
    (lambda d: d["input"].pop("stem"), "input needs exactly"),
])
def test_malformed_profiles_are_named_errors(tmp_path, edit, match):
    data = synthetic("fast", FAST).to_dict()
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=match):
        load_profile(path)


def test_missing_or_unreadable_profile_files(tmp_path):
    with pytest.raises(ProfileError, match="no such file"):
        load_profile(tmp_path / "nope.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ProfileError, match="cannot read it as JSON"):
        load_profile(tmp_path / "junk.json")


def test_measure_times_every_grid_shape_and_fits():
    grid = Grid(widths=(16, 32), heads=(1, 2), mlp_ratios=(2.0,), repeats=3, rounds=2)
    profile = measure(BASE, "here", executor="numpy", grid=grid)
    assert len(profile.samples) == 2 * len(grid.shapes()) and len(profile.blocks) == len(grid.shapes())
    assert all(s["ms"] > 0 for s in profile.samples)
    assert profile.predict_ms(BASE) > 0 and profile.host["logical_cpus"] == os.cpu_count()


def test_balance_gives_the_slow_device_the_smaller_model_within_the_budget():
    fast, slow = synthetic("fast", FAST), synthetic("slow", SLOW)
    base = BASE.replace(embed_dim=32)
    options = candidates(base, [16, 24, 32, 48, 64], [2])
    budget = 2 * vit_macs(base)
    picks = balance([fast, slow], [options, options], budget)
    assert picks[1].config.embed_dim < base.embed_dim < picks[0].config.embed_dim
    assert sum(p.macs for p in picks) >= budget
    equal_worst = slow.predict_ms(base)
    assert max(p.predicted_ms for p in picks) < equal_worst
    # equal devices keep the equal split
    same = balance([fast, fast], [options, options], budget)
    assert [p.config.embed_dim for p in same] == [32, 32]


def test_balance_errors_name_the_problem():
    fast = synthetic("fast", FAST)
    options = candidates(BASE, [16, 32], [2])
    with pytest.raises(ProfileError, match="at most .* MACs"):
        balance([fast, fast], [options, options], 10 ** 12)
    with pytest.raises(ProfileError, match="2 device profiles for 1"):
        balance([fast, fast], [options], 1)
    with pytest.raises(ProfileError, match="not multiples of 2 heads"):
        candidates(BASE, [15, 17], [2])


def test_profile_command_writes_a_loadable_profile(tmp_path, capsys):
    out = tmp_path / "edge.json"
    assert profile_main(["--device", "bench-box", "--out", str(out), "--executor", "numpy", "--quick",
                         "--widths", "32,64", "--repeats", "2", "--check"]) == 0
    profile = load_profile(out)
    assert profile.device == "bench-box" and profile.executor == "numpy" and profile.gap_ms == 0.0  # --quick
    manifest = load_manifest(DEFAULT_BUNDLE)
    assert profile.input == input_of(manifest.submodels[0])
    printed = capsys.readouterr().out
    assert "written to" in printed and printed.count("check:") == manifest.num_parts


def test_profile_command_errors_are_one_line(tmp_path, capsys):
    assert profile_main(["--device", "x", "--out", str(tmp_path / "p.json"), "--bundle", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("devit-mq profile: error:") and err.count("\n") == 1
    assert profile_main(["--device", "x", "--out", str(tmp_path / "p.json"), "--widths", "3", "--heads", "2"]) == 2
    assert "grid is empty" in capsys.readouterr().err
    assert profile_main(["--device", "x", "--out", str(tmp_path / "p.json"), "--speed", "2"]) == 2
    assert "--speed must be in (0, 1], got 2" in capsys.readouterr().err
    assert profile_main(["--device", "x", "--out", str(tmp_path / "p.json"), "--rounds", "0"]) == 2
    assert "--rounds must be >= 1" in capsys.readouterr().err


def test_profile_of_an_emulated_slower_device_is_slower_by_its_speed(tmp_path):
    times = {}
    for speed in (1.0, 0.25):
        out = tmp_path / f"s{speed}.json"
        assert profile_main(["--device", f"s{speed}", "--out", str(out), "--executor", "numpy", "--quick",
                             "--widths", "32", "--repeats", "3", "--speed", str(speed)]) == 0
        profile = load_profile(out)
        assert profile.speed == speed
        times[speed] = sum(s["ms"] for s in profile.samples)
    assert times[0.25] > 2 * times[1.0]  # a stretch is a sleep: never shorter than asked (4x)


def test_drift_scales_by_the_median_of_now_over_then_on_a_spread_of_grid_shapes(monkeypatch):
    import devit_mq.profile.measure as measure_mod

    profile = synthetic("fast", FAST)
    timed = []

    def fake_interleaved(forwards, image, repeats, rounds, say=None, gap_s=0.0):
        timed.append(len(forwards))
        return [2.0 * s for s in then]  # everything twice as slow now ...

    deep = sorted(s["ms"] for s in profile.samples if s["depth"] == 3)
    then = [deep[0], deep[7], deep[14], deep[21], deep[28], deep[-1]]
    monkeypatch.setattr(measure_mod, "interleaved_ms", fake_interleaved)
    result = measure_mod.drift(profile, shapes=6)
    assert result["ratio"] == pytest.approx(2.0) and timed == [6]
    assert [s["depth"] for s in result["shapes"]] == [3] * 6  # ... on the spread of depth-3 samples
    then[0] *= 10  # one outlier shape does not move the median
    assert measure_mod.drift(profile, shapes=6)["ratio"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="no depth-3 samples"):
        measure_mod.drift(DeviceProfile(device="x", executor="numpy", threads=1, input=profile.input,
                                        samples=[s for s in profile.samples if s["depth"] == 1]))


def test_drift_sees_a_device_slower_than_its_profile(tmp_path):
    from devit_mq.profile.measure import drift

    out = tmp_path / "p.json"
    assert profile_main(["--device", "d", "--out", str(out), "--executor", "numpy", "--quick",
                         "--widths", "32,64", "--repeats", "3"]) == 0
    profile = load_profile(out)
    profile.speed = 0.25  # the same device, now emulated at a quarter of its speed
    assert drift(profile, shapes=3, repeats=3, rounds=1)["ratio"] > 2  # a stretch is never shorter than asked


@pytest.mark.skipif(os.geteuid() != 0 or not (CGROUP_CPU / "cpu.cfs_quota_us").exists(),
                    reason="a CPU cap needs root and the cgroup v1 cpu controller")
def test_profile_under_a_cpu_cap_records_it_and_removes_its_cgroup(tmp_path):
    out = tmp_path / "capped.json"
    assert profile_main(["--device", "quarter", "--out", str(out), "--executor", "numpy", "--quick",
                         "--widths", "32", "--repeats", "2", "--cpu-quota", "0.25", "--cpu-period-ms", "8"]) == 0
    profile = load_profile(out)
    assert (profile.cpu_quota, profile.cfs_period_ms) == (0.25, 8.0)
    assert not list(CGROUP_CPU.glob(f"devit-mq-cap-{os.getpid()}"))
    assert str(os.getpid()) in (CGROUP_CPU / "cgroup.procs").read_text().split()


@pytest.fixture(scope="module")
def balanced_run(tmp_path_factory):
    """The tiny pipeline with one fast and one 4x slower device."""
    tmp = tmp_path_factory.mktemp("balanced")
    tiny = yaml.safe_load(TINY.read_text())
    base = ViTConfig.from_dict({**tiny["students"]["models"][0], "img_size": 28, "in_chans": 1, "num_classes": 5})
    paths = [save_profile(synthetic(name, coef, base), tmp / f"{name}.json") for name, coef in
             (("fast", FAST), ("slow", SLOW))]
    tiny["students"]["balance"] = {"profiles": [str(p) for p in paths], "widths": [8, 16, 24, 32]}
    tiny["output"]["bundle"] = str(tmp / "bundle")
    tiny["output"]["work_dir"] = str(tmp / "work")
    config = tmp / "balanced.yaml"
    config.write_text(yaml.safe_dump(tiny))
    assert train_main([str(config)]) == 0
    return tmp, base


@pytest.mark.timeout(180)
def test_balanced_training_sizes_parts_for_their_devices(balanced_run):
    tmp, base = balanced_run
    manifest = load_manifest(tmp / "bundle")
    fast, slow = manifest.submodels
    assert slow.embed_dim < base.embed_dim < fast.embed_dim
    record = manifest.metadata["balance"]
    assert [p["device"] for p in record["parts"]] == ["fast", "slow"]
    assert record["budget_macs"] == 2 * vit_macs(base)
    assert sum(p["macs"] for p in record["parts"]) >= record["budget_macs"]
    worst = max(p["predicted_ms"] for p in record["parts"])
    assert worst < max(p["equal_split_predicted_ms"] for p in record["parts"])
    report = json.loads((tmp / "bundle" / "report.json").read_text())
    assert report["balance"] == record


def _topology(tmp: Path, bundle: Path, profiles: list[Path], port: int = 5990) -> dict:
    return {"name": "t", "bundle": str(bundle), "transport": "zmq",
            "aggregator": {"name": "aggregator", "port": port},
            "edges": [{"name": f"edge{i}", "submodel": i, "port": port + 1 + i, "profile": str(p)}
                      for i, p in enumerate(profiles)]}


@pytest.mark.timeout(180)
def test_a_topology_runs_each_balanced_part_on_its_device(balanced_run):
    tmp, _ = balanced_run
    fast, slow = tmp / "fast.json", tmp / "slow.json"
    topo = load_topology(_topology(tmp, tmp / "bundle", [fast, slow]))
    assert topo.edges[1].profile == str(slow)
    with pytest.raises(TopologyError, match=r"edges\[0\].profile: device 'slow', but the bundle sized sub-model 0 "
                                            r"for device 'fast'"):
        load_topology(_topology(tmp, tmp / "bundle", [slow, fast]))


@pytest.mark.timeout(180)
def test_bench_balance_runs_both_topologies_and_reports_measured_and_predicted(balanced_run, tmp_path, capsys):
    from devit_mq.bench.balance import main

    tmp, _ = balanced_run
    profiles = [tmp / "fast.json", tmp / "slow.json"]
    paths = []
    for name, port in (("equal", 5980), ("balanced", 5985)):  # the same bundle twice: the runs are what is tested
        paths.append(tmp_path / f"{name}.yaml")
        paths[-1].write_text(yaml.safe_dump({**_topology(tmp, tmp / "bundle", profiles, port), "name": name}))
    out = tmp_path / "balance.json"
    assert main([*map(str, paths), "--requests", "6", "--warmup", "2", "--rounds", "2", "--json", str(out),
                 "--log-dir", str(tmp_path / "logs")]) == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert [len(result["runs"][k]) for k in ("equal", "balanced")] == [2, 2]
    manifest = load_manifest(tmp / "bundle")
    for name in ("equal", "balanced"):
        summary = result["summary"][name]
        assert 0 < summary["latency_p50_ms"] <= summary["latency_p99_ms"] and 0 <= summary["accuracy"] <= 1
        for i, edge in enumerate(("edge0", "edge1")):
            e = summary["edges"][edge]
            assert e["measured_ms"] > 0 and e["embed_dim"] == manifest.submodels[i].embed_dim
            assert e["predicted_ms"] == pytest.approx(load_profile(profiles[i]).predict_ms(manifest.submodels[i]))
            ratios = [r["edges"][edge]["drift"]["ratio"] for r in result["runs"][name]]
            assert e["predicted_calibrated_ms"] == pytest.approx(e["predicted_ms"] * np.median(ratios))
            assert e["rel_error_calibrated"] == pytest.approx(e["predicted_calibrated_ms"] / e["measured_ms"] - 1)
    assert result["summary"]["speedup_p50"] > 0 and "balanced vs equal, batch-1 p50" in capsys.readouterr().out


@pytest.mark.timeout(180)
def test_an_edge_runs_at_the_speed_its_profile_was_measured_at(balanced_run, tmp_path):
    tmp, _ = balanced_run
    slow = synthetic("slow", SLOW, load_manifest(tmp / "bundle").submodels[1])
    slow.speed = 0.25
    quarter = save_profile(slow, tmp_path / "slow.json")  # same device name, measured at a quarter speed
    data = _topology(tmp, tmp / "bundle", [tmp / "fast.json", quarter])
    with pytest.raises(TopologyError, match=r"edges\[1\].profile: profile 'slow' was measured at speed 0.25, but "
                                            r"the edge runs at speed 1"):
        load_topology(data)
    data["edges"][1]["speed"] = 0.25
    assert load_topology(data).edges[1].speed == 0.25


def test_a_topology_names_a_bad_edge_profile(tmp_path):
    fast = save_profile(synthetic("fast", FAST), tmp_path / "fast.json")  # measured for 7-pixel patches
    with pytest.raises(TopologyError, match=r"edges\[1\].profile: device profile .*nope.json: no such file"):
        load_topology(_topology(tmp_path, DEFAULT_BUNDLE, [fast, tmp_path / "nope.json"]))
    with pytest.raises(TopologyError, match=r"edges\[0\].profile: profile 'fast' was measured for other inputs"):
        load_topology(_topology(tmp_path, DEFAULT_BUNDLE, [fast, fast]))


def test_shipped_topologies_have_no_stale_profiles():
    for path in (ROOT / "topologies").rglob("*.yaml"):
        data = yaml.safe_load(path.read_text()) or {}
        for edge in data.get("edges", []) if isinstance(data, dict) else []:
            if isinstance(edge, dict) and "profile" in edge:
                assert (path.parent / edge["profile"]).is_file(), f"{path}: {edge['profile']}"


def _round(p50: float, edges: dict, ratio: float | None = None) -> dict:
    return {"latency_p50_ms": p50, "latency_p99_ms": 2 * p50, "accuracy": 0.97, "requests": 10,
            "edges": {e: {"embed_dim": d, "depth": 6, "executor": x, "measured_compute_p50_ms": m, "predicted_ms": p,
                          "predicted_calibrated_ms": None if ratio is None else p * ratio}
                      for e, (d, x, m, p) in edges.items()}}


def test_bench_balance_summary_takes_medians_and_the_prediction_error():
    from devit_mq.bench.balance import format_summary, summarize

    runs = {"equal": [_round(4.0, {"edge1": (64, "numpy", 3.0, 2.7)}), _round(5.0, {"edge1": (64, "numpy", 3.2, 2.7)})],
            "balanced": [_round(2.0, {"edge1": (32, "numpy", 1.0, 1.1)}), _round(3.0, {"edge1": (32, "numpy", 1.2, 1.1)})]}
    summary = summarize(runs)
    assert summary["equal"]["latency_p50_ms"] == 4.5 and summary["balanced"]["latency_p50_ms"] == 2.5
    assert summary["speedup_p50"] == pytest.approx(1.8)
    assert summary["balanced"]["edges"]["edge1"]["rel_error"] == pytest.approx(1.1 / 1.1 - 1)
    assert summary["equal"]["edges"]["edge1"]["rel_error"] == pytest.approx((2.7 - 3.1) / 3.1)
    assert summary["equal"]["edges"]["edge1"]["rel_error_calibrated"] is None  # not calibrated
    assert "1.80x" in format_summary(summary) and "calibrated" not in format_summary(summary).split("\n", 2)[2]
    runs["equal"] = [_round(4.0, {"edge1": (64, "numpy", 3.0, 2.7)}, 1.0),
                     _round(5.0, {"edge1": (64, "numpy", 3.2, 2.7)}, 1.2)]  # the device ran 0-20% slower
    edge = summarize(runs)["equal"]["edges"]["edge1"]
    assert edge["predicted_calibrated_ms"] == pytest.approx(2.7 * 1.1)
    assert edge["rel_error_calibrated"] == pytest.approx(2.97 / 3.1 - 1)
    assert "calibrated 2.970 (-4%)" in format_summary(summarize(runs))


def test_bench_balance_names_a_bad_topology(tmp_path, capsys):
    from devit_mq.bench.balance import main

    (tmp_path / "bad.yaml").write_text("name: x\n")
    assert main([str(tmp_path / "bad.yaml"), str(tmp_path / "bad.yaml")]) == 2
    assert capsys.readouterr().err.startswith("devit-mq bench balance: error:")
