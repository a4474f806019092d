"""The edge testbed: a short run on real namespaces and links (skipped unless root with ``ip netns``,
``tc tbf`` and cgroup v1), whose DeViT answers must equal a loopback run's, and whose teardown --
normal, by signal, and by ``--cleanup`` after its owner was killed -- must leave nothing behind."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from devit_mq.testbed.net import leftovers, unavailable_reason
from devit_mq.testbed.pipeline import split_blocks
from devit_mq.testbed.profiles import LinkProfile, ProfileError, load_links

from .runtime_helpers import free_ports

REASON = unavailable_reason()
needs_testbed = pytest.mark.skipif(REASON is not None, reason=f"testbed unavailable: {REASON}")


def assert_nothing_left(prefix: str) -> None:
    """No namespace, link, qdisc or cgroup of ``prefix``, checked with the system's own tools."""
    assert leftovers(prefix) == {"netns": [], "links": [], "qdiscs": [], "cgroups": []}
    assert prefix not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
    assert prefix not in subprocess.run(["tc", "qdisc", "show"], capture_output=True, text=True).stdout
    for root in (Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup/cpuset")):
        assert not list(root.glob(f"{prefix}*"))


def test_split_blocks_is_contiguous_and_covers_every_block():
    assert split_blocks(12, 2) == [(0, 6), (6, 12)]
    assert split_blocks(5, 3) == [(0, 2), (2, 3), (3, 5)]
    with pytest.raises(ValueError):
        split_blocks(2, 3)


def test_shipped_link_profiles_load():
    links = load_links()
    assert {"gigabit", "fast-ethernet", "wifi-20"} <= set(links.profiles)
    assert links.profiles["wifi-20"].rate_mbit == 20 and links.profiles["wifi-20"].delay_ms == 5
    # the bandwidth sweep: profiles that differ in rate only
    sweep = [p for p in links.profiles.values() if p.delay_ms == 0 and p.jitter_ms == 0]
    assert sorted(p.rate_mbit for p in sweep) == [10, 20, 100, 1000]
    assert links.device.cpu is not None and links.client.cpu is None
    assert links.device_of("edge0") == links.device and links.device_of("client") == links.client



def test_rounds_split_every_request_and_alternate_the_order():
    from devit_mq.testbed.runner import RunPlan, round_orders

    plan = RunPlan(latency_requests=7, throughput_images=5, rounds=3)
    rounds = plan.per_round()
    assert [r.latency_requests for r in rounds] == [3, 2, 2]
    assert [r.throughput_images for r in rounds] == [2, 2, 1]
    assert all(r.rounds == 1 and r.window == plan.window for r in rounds)
    assert RunPlan(latency_requests=4, throughput_images=4, rounds=1).per_round()[0].latency_requests == 4
    assert round_orders(["devit", "pipeline", "monolith"], 3) == [
        ["devit", "pipeline", "monolith"], ["monolith", "pipeline", "devit"], ["devit", "pipeline", "monolith"]]
    for bad in (0, 6):  # at least one latency request and one throughput image per round
        with pytest.raises(ValueError, match="rounds must be in"):
            RunPlan(latency_requests=7, throughput_images=5, rounds=bad)


def test_merged_rounds_add_up_and_keep_each_rounds_p50(tmp_path):
    from devit_mq.testbed.runner import RunPlan, measured_images, merge_rounds

    def report(lat, thr, per_s, tx, probs):
        return {"latencies_ms": lat, "probabilities": probs, "images_per_s": per_s, "throughput_images": thr,
                "window": 4, "images_measured": len(lat) + thr, "warmup_s": 1.0, "measured_s": 2.0,
                "link_bytes": {"client": {"tx": tx, "rx": 10}}, "background_bytes": {"client": {"tx": 1, "rx": 1}}}

    merged = merge_rounds([report([10.0, 30.0, 20.0], 4, 2.0, 100, [[1.0], [2.0], [3.0]]),
                           report([50.0, 40.0], 6, 1.0, 300, [[4.0], [5.0]])])
    assert merged["latencies_ms"] == [10.0, 30.0, 20.0, 50.0, 40.0]
    assert merged["probabilities"] == [[1.0], [2.0], [3.0], [4.0], [5.0]]
    assert merged["images_per_s"] == pytest.approx(10 / (4 / 2.0 + 6 / 1.0))  # images over the total time
    assert merged["throughput_images"] == 10 and merged["images_measured"] == 15 and merged["measured_s"] == 4.0
    assert merged["link_bytes"] == {"client": {"tx": 400, "rx": 20}}
    assert merged["background_bytes"] == {"client": {"tx": 2, "rx": 2}}
    assert merged["rounds_p50_ms"] == [20.0, 45.0]
    # the bytes prediction sees exactly the images the rounds' probes send
    images = np.arange(4 * 2 * 2 * 3, dtype=np.uint8).reshape(4, 2, 2, 3)
    np.save(tmp_path / "images.npy", images)
    sent = measured_images(tmp_path / "images.npy", RunPlan(latency_requests=5, throughput_images=3, rounds=2))
    np.testing.assert_array_equal(sent, images[[0, 1, 2, 0, 1, 0, 1, 0]])


def test_a_bad_rounds_count_is_one_error_line(monkeypatch, capsys):
    from devit_mq.testbed import cli

    monkeypatch.setattr(cli, "unavailable_reason", lambda: None)  # the check comes before anything is built
    assert cli.main(["--requests", "3", "--rounds", "4"]) == 2
    assert "= [1, 3], got 4" in capsys.readouterr().err

def _results(rows: dict[str, tuple[float, float, dict[str, float]]]) -> dict:
    """Testbed results from {profile: (rate_mbit, delay_ms, {system: p50_ms})}."""
    return {"profiles": {n: {s: {"latency_p50_ms": ms} for s, ms in p50.items()} for n, (_, _, p50) in rows.items()},
            "links": {n: {"rate_mbit": r, "delay_ms": d, "jitter_ms": 0.0} for n, (r, d, _) in rows.items()},
            "image_codec": "jpeg", "shapes": "issue"}


def test_the_bandwidth_sweep_holds_the_delay_fixed_and_says_whether_the_advantage_grows(tmp_path):
    from devit_mq.testbed.cli import bandwidth_sweep, plot

    results = _results({"slow": (10, 0, {"devit": 50, "pipeline": 250, "monolith": 150}),
                        "fast": (1000, 0, {"devit": 40, "pipeline": 120, "monolith": 150}),
                        "mid": (100, 0, {"devit": 42, "pipeline": 140, "monolith": 150}),
                        "wifi": (20, 5, {"devit": 70, "pipeline": 200, "monolith": 150})})
    (sweep,) = bandwidth_sweep(results)  # wifi alone at its delay: no sweep of its own
    assert sweep["delay_ms"] == 0 and [s["profile"] for s in sweep["steps"]] == ["fast", "mid", "slow"]
    assert [s["p50_vs_pipeline"] for s in sweep["steps"]] == pytest.approx([3.0, 140 / 42, 5.0])
    assert sweep["steps"][2]["gap_ms_vs_monolith"] == 100 and sweep["grows_vs_pipeline"] is True
    results["profiles"]["mid"]["pipeline"]["latency_p50_ms"] = 100  # 2.38x: falls, then grows
    assert bandwidth_sweep(results)[0]["grows_vs_pipeline"] is False
    plot(results, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 10_000


def test_hosts_can_be_made_unequal(tmp_path):
    path = tmp_path / "links.yaml"
    path.write_text("profiles: {lan: {rate_mbit: 100}}\ndevices: {cpu: 0.9}\nhosts: {edge1: {cpu: 0.4, cpus: [1]}}\n")
    links = load_links(path)
    assert links.device_of("edge0").cpu == 0.9
    assert (links.device_of("edge1").cpu, links.device_of("edge1").cpus) == (0.4, (1,))
    assert links.device_of("edge1").cpu_period_ms is None


def test_a_device_can_spread_its_quota_over_short_periods(tmp_path):
    path = tmp_path / "links.yaml"
    path.write_text("profiles: {lan: {rate_mbit: 100}}\ndevices: {cpu: 0.9, cpu_period_ms: 10}\n"
                    "hosts: {edge1: {cpu: 0.25}}\n")
    links = load_links(path)
    assert (links.device_of("edge1").cpu, links.device_of("edge1").cpu_period_ms) == (0.25, 10.0)
    path.write_text("profiles: {lan: {rate_mbit: 100}}\ndevices: {cpu: 0.5, cpu_period_ms: 0.5}\n")
    with pytest.raises(ProfileError, match="cpu_period_ms: expected a number >= 1"):
        load_links(path)


@needs_testbed
def test_short_run_answers_like_loopback_and_leaves_nothing(tmp_path):
    from devit_mq.bench.bundles import ensure_bundle, tiny_shapes
    from devit_mq.nodes.launcher import Launcher
    from devit_mq.testbed.probe import photo_crops
    from devit_mq.testbed.runner import QUICK, run_profile

    bundle = ensure_bundle(tmp_path / "bundle", tiny_shapes(2))
    ports = free_ports(3)
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({
        "name": "tb-test", "bundle": str(bundle), "transport": "zmq", "codec": "fp16", "image_codec": "raw",
        "defaults": {"threads": 1, "executor": "numpy", "max_batch": 4},
        "aggregator": {"name": "aggregator", "host": "127.0.0.1", "port": ports[0], "deadline_ms": 5000},
        "edges": [{"name": f"edge{i}", "submodel": i, "host": "127.0.0.1", "port": ports[i + 1]} for i in range(2)]}))
    images = photo_crops(QUICK.latency_requests, 32, seed=0)
    images_path = tmp_path / "images.npy"
    np.save(images_path, images)
    links = load_links()
    keep: dict = {}
    plan = dataclasses.replace(QUICK, rounds=2)  # two alternating rounds per system, merged
    out = run_profile(LinkProfile("test", 100.0), links, ["devit", "pipeline", "monolith"], base, bundle, "raw",
                      images_path, plan, tmp_path, keep=keep, say=lambda _m: None)
    assert_nothing_left(keep["prefix"])
    # each round's latency requests, one after the other: the first 3 images, then the first 2
    images = np.concatenate([images[: r.latency_requests] for r in plan.per_round()])
    for row in out.values():
        assert row["rounds"] == 2 and len(row["latency_rounds_p50_ms"]) == 2
        assert row["latency_requests"] == QUICK.latency_requests

    with Launcher(base, log_dir=tmp_path / "loopback") as launcher:
        loopback = launcher.client.predict(images, batch_size=1, window=1).probabilities
    testbed = np.array(out["devit"]["probabilities"])
    np.testing.assert_allclose(testbed, loopback, atol=1e-6)
    for system, row in out.items():
        assert row["latency_p50_ms"] > 0 and row["images_per_s"] > 0, system
        for host, ratio in row["bytes_per_image_ratio"].items():
            # measured on the interface vs the wire format (+ TCP/IP headers and ACKs); the aggregator's
            # link carries only small messages next to the edges' heartbeats (~0.8 KB each, every
            # 0.5 s), estimated from 2 idle seconds and subtracted: whether one falls in a round's
            # ~0.1 s is chance, worth +-25% at a few requests, so a looser bound there
            low, high = (0.7, 1.5) if host == "aggregator" else (0.93, 1.07)
            assert ratio is not None and low < ratio < high, (system, host, row["bytes_per_image"])
    # the monolith is the in-process teacher; the pipeline is it too, up to its fp16 activations
    import torch

    from devit_mq.model import load_manifest, load_teacher

    manifest = load_manifest(bundle)
    with torch.inference_mode():
        teacher = load_teacher(bundle, manifest)(manifest.input.to_tensor(images)).softmax(-1).numpy()
    np.testing.assert_allclose(np.array(out["monolith"]["probabilities"]), teacher, atol=1e-5)
    np.testing.assert_allclose(np.array(out["pipeline"]["probabilities"]), teacher, atol=2e-3)


def _owner_script(tmp_path: Path) -> Path:
    script = tmp_path / "owner.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        from devit_mq.testbed.net import HostSpec, Testbed
        tb = Testbed([HostSpec("a", 10, cpu=0.5), HostSpec("b", 10, cpu=0.5)]).open()
        tb.spawn("a", ["sleep", "300"], __import__("pathlib").Path(sys.argv[1]))
        print(tb.prefix, flush=True)
        time.sleep(300)
    """))
    return script


def _start_owner(tmp_path: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(_owner_script(tmp_path)), str(tmp_path / "sleep.log")],
                            stdout=subprocess.PIPE, text=True)
    prefix = proc.stdout.readline().strip()
    assert prefix, "the owner process did not build its testbed"
    assert leftovers(prefix)["netns"], "nothing was built"
    return proc, prefix


@needs_testbed
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_tears_everything_down(tmp_path, sig):
    proc, prefix = _start_owner(tmp_path)
    proc.send_signal(sig)
    proc.wait(30)
    assert_nothing_left(prefix)


@needs_testbed
def test_cleanup_removes_what_a_killed_run_left_and_keeps_live_runs(tmp_path):
    proc, prefix = _start_owner(tmp_path)
    try:
        cli = [sys.executable, "-m", "devit_mq.cli", "testbed", "--cleanup"]
        kept = subprocess.run(cli, capture_output=True, text=True, timeout=60)
        assert f"kept {prefix}" in kept.stdout and leftovers(prefix)["netns"]  # its owner is alive
    finally:
        proc.kill()  # no teardown: SIGKILL cannot be handled
        proc.wait(10)
    time.sleep(0.2)
    assert leftovers(prefix)["netns"]
    done = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and f"removed {prefix}" in done.stdout, done.stdout + done.stderr
    assert_nothing_left(prefix)


def test_without_root_the_command_skips_with_the_reason(monkeypatch, capsys):
    from devit_mq.testbed import cli

    monkeypatch.setattr(cli, "unavailable_reason", lambda: "the testbed needs root (network namespaces, tc and cgroups)")
    assert cli.main(["--quick"]) == 0
    assert "skipped: the testbed needs root" in capsys.readouterr().err
    assert cli.main(["--quick", "--require"]) == 1


def test_a_malformed_links_file_is_one_error_line(tmp_path, capsys):
    from devit_mq.testbed import cli

    bad = tmp_path / "links.yaml"
    bad.write_text("profiles:\n  slow: {rate_mbit: -1}\n")
    if REASON is None:
        assert cli.main(["--links", str(bad)]) == 2
        assert "profiles.slow.rate_mbit: expected a number > 0" in capsys.readouterr().err
    from devit_mq.testbed.profiles import ProfileError

    with pytest.raises(ProfileError, match="rate_mbit"):
        load_links(bad)
