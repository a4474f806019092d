"""Smoke test of ``devit-mq bench kernels`` (numbers are printed, never asserted)."""

from __future__ import annotations

import json

import pytest

from devit_mq.bench import kernels as bench


@pytest.mark.timeout(120)
def test_bench_kernels_quick_writes_table_and_json(tmp_path, capsys):
    path = tmp_path / "kernels.json"
    assert bench.main(["--quick", "--no-vit", "--threads", "1", "--budget", "0.01", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| threads | B | heads | tokens | SDPA µs" in out and "numba/SDPA" in out
    data = json.loads(path.read_text())
    rows = data["attention"]
    assert [(r["batch"], r["heads"], r["tokens"]) for r in rows] == bench.QUICK_GRID
    for r in rows:
        assert r["threads"] == 1 and r["sdpa_us"] > 0 and r["numba_us"] > 0
        assert r["ratio_numba_sdpa"] == pytest.approx(r["numba_us"] / r["sdpa_us"])
        assert r["ratio_numba_sdpa_cpu"] == pytest.approx(r["numba_cpu_us"] / r["sdpa_cpu_us"])
        assert r["numba_min_us"] <= r["numba_us"]
        assert r["max_abs_diff"] <= 1e-4
    assert data["vit"] == [] and data["environment"]["blas"]


def test_bench_kernels_rejects_bad_thread_list(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--threads", "0,x"])
    assert "--threads" in capsys.readouterr().err
