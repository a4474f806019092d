"""`devit-mq bench executors`, short: every part runs, the figures are sane, bad arguments fail."""

import json
import subprocess
import sys

import pytest


@pytest.mark.timeout(240)
def test_bench_executors_smoke(tmp_path):
    out = subprocess.run([sys.executable, "-m", "devit_mq.cli", "bench", "executors", "--shapes", "default",
                          "--batches", "1", "--budget", "0.3", "--ops-budget", "0.1", "--repeats", "1",
                          "--no-cold", "--json", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=230)
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    startup = {row["executor"]: row for row in result["startup"]}
    assert set(startup) == {"torch", "numba", "numpy"}
    assert startup["torch"]["torch_imported"] and not startup["numba"]["torch_imported"]
    assert not startup["numpy"]["numba_imported"]  # the numpy edge never loads Numba
    assert startup["numpy"]["rss_mb"] < startup["numba"]["rss_mb"] < startup["torch"]["rss_mb"]
    assert all(0 < row["import_s"] <= row["ready_s"] for row in startup.values())
    (row,) = result["latency"]
    assert row["shape"] == "default" and all(t["median_ms"] > 0 for t in row["timings"].values())
    assert "| default | 1 |" in out.stdout and "NumPy / Numba" in out.stdout


def test_bench_executors_rejects_unknown_shape():
    out = subprocess.run([sys.executable, "-m", "devit_mq.cli", "bench", "executors", "--shapes", "vit_huge"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "unknown ['vit_huge']" in out.stderr
