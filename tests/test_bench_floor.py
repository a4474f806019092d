"""``devit-mq bench floor``: the bare fan-out/fan-in over raw pyzmq and raw mpi4py. Results are checked
for shape and sanity, never against a speed (the machine is shared); every run must leave no process
behind, whether it finished or timed out."""

import json
import os
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from devit_mq.bench import cli
from devit_mq.bench.floor import FloorError, mpi_floor, summarize, zmq_floor

TAG = "DEVIT_MQ_FLOOR_TEST"  # inherited by every child and MPI rank, so that orphans can be found too


@pytest.fixture
def tag(monkeypatch):
    value = uuid.uuid4().hex
    monkeypatch.setenv(TAG, value)
    return value


def leftovers(tag):
    """Live processes started by this test: children of this process, or anything carrying its tag
    (an MPI rank whose mpirun is gone is no longer our child)."""
    me = psutil.Process()
    found = {p.pid: p for p in me.children(recursive=True)}
    for proc in psutil.process_iter():
        try:
            if proc.pid != me.pid and proc.environ().get(TAG) == tag:
                found[proc.pid] = proc
        except psutil.Error:
            pass
    alive = []
    for proc in found.values():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"pid {proc.pid} ppid {proc.ppid()} pgid {os.getpgid(proc.pid)} {proc.status()}: "
                             f"{' '.join(proc.cmdline())}")
        except (psutil.Error, ProcessLookupError):
            pass
    return alive


def check_result(result, transport, requests, rounds):
    assert result["transport"] == transport
    assert result["n"] == requests
    assert result["p50_us"] > 0 and result["p99_us"] >= result["p50_us"] and result["mean_us"] > 0
    assert len(result["rounds_p50_us"]) == rounds and all(x > 0 for x in result["rounds_p50_us"])
    assert result["image_bytes"] == 849 and result["feature_bytes"] == [142, 142]


@pytest.mark.timeout(120)
def test_zmq_floor_smoke(tag):
    result = zmq_floor(849, [142, 142], requests=30, warmup=5, rounds=3, timeout_s=60)
    check_result(result, "zmq", 30, 3)
    assert leftovers(tag) == []


@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_mpi_floor_smoke(tag):
    result = mpi_floor(849, [142, 142], requests=30, warmup=5, rounds=3, timeout_s=60)
    check_result(result, "mpi", 30, 3)
    assert leftovers(tag) == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("floor", [zmq_floor, pytest.param(mpi_floor, marks=pytest.mark.mpi)])
def test_busy_floor_edges_really_work(tag, floor):
    """With edge work the reported figures are latency minus the work (see the summarize test),
    and the work must really happen: else latency - work would be below 0. (How far above 0 the
    residual is depends on the machine's load: not a test's business.)"""
    work_ms = 15.0
    result = floor(849, [142, 142], requests=12, warmup=2, rounds=2, timeout_s=60, edge_work_ms=work_ms)
    check_result(result, result["transport"], 12, 2)
    assert result["edge_work_ms"] == work_ms
    assert min(result["rounds_p50_us"]) > 0
    assert leftovers(tag) == []


def test_summarize_subtracts_the_edges_work():
    result = summarize("zmq", [15_300.0, 15_100.0, 15_200.0, 15_400.0], rounds=2, image_bytes=849,
                       feature_bytes=[142, 142], edge_work_ms=15.0)
    assert result["p50_us"] == pytest.approx(250.0)
    assert result["rounds_p50_us"] == pytest.approx([200.0, 300.0])  # rounds in arrival order
    assert result["mean_us"] == pytest.approx(250.0) and result["n"] == 4


def test_busy_work_keeps_the_core_busy_for_its_time():
    from devit_mq.bench.floor import busy_work

    assert busy_work(0) is None
    work = busy_work(20.0)
    cpu0, t0 = time.process_time(), time.perf_counter()
    work()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    assert 0.020 <= wall < 0.020 + 0.05  # ends on time (one small GEMM of overshoot; slack for a busy host)
    assert cpu > 0.5 * wall  # it computed rather than slept


@pytest.mark.timeout(120)
def test_zmq_floor_timeout_stops_every_child(tag):
    with pytest.raises(FloorError):
        zmq_floor(849, [142, 142], requests=10**7, warmup=0, timeout_s=1.5)
    assert leftovers(tag) == []


@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_mpi_floor_timeout_kills_mpirun_and_its_ranks(tag):
    with pytest.raises(FloorError, match="did not finish"):
        mpi_floor(849, [142, 142], requests=10**7, warmup=0, timeout_s=1.5)
    assert leftovers(tag) == []


@pytest.mark.timeout(30)
@pytest.mark.parametrize("floor", [zmq_floor, mpi_floor])
@pytest.mark.parametrize("kwargs, match", [
    ({"feature_bytes": []}, "feature_bytes must list one size per edge"),
    ({"image_bytes": -1}, "image_bytes must be an int >= 0"),
    ({"feature_bytes": [142, 1.5]}, r"feature_bytes\[1\] must be an int"),
    ({"requests": 0}, "requests must be an int >= 1"),
    ({"rounds": 11}, r"rounds \(11\) must not exceed requests \(10\)"),
    ({"timeout_s": 0}, "timeout_s must be > 0"),
    ({"edge_work_ms": -1.0}, r"edge_work_ms must be in \[0, 10000\]"),
    ({"edge_work_ms": float("nan")}, r"edge_work_ms must be in \[0, 10000\]"),
])
def test_wrong_arguments_raise_before_starting_anything(tag, floor, kwargs, match):
    args = {"image_bytes": 849, "feature_bytes": [142, 142], "requests": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        floor(**args)
    assert leftovers(tag) == []


@pytest.mark.timeout(120)
def test_bench_cli_runs_floor_and_writes_json(tag, tmp_path, capsys):
    out = tmp_path / "floor.json"
    assert cli.main(["floor", "--transport", "zmq", "--requests", "20", "--warmup", "5", "--rounds", "2",
                     "--json", str(out)]) == 0
    assert "zmq" in capsys.readouterr().out
    check_result(json.loads(out.read_text())["zmq"], "zmq", 20, 2)
    with pytest.raises(SystemExit):  # argparse's usage error
        cli.main(["floor", "--feature-bytes", "142,x"])
    assert leftovers(tag) == []


@pytest.mark.timeout(60)
def test_floor_imports_neither_torch_nor_the_nodes():
    code = ("import sys, devit_mq.bench.floor; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('devit_mq.nodes')]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=50)


@pytest.mark.timeout(60)
def test_a_child_that_dies_at_start_is_named_and_the_rest_stopped(tag, monkeypatch):
    from devit_mq.bench import floor

    real = floor._role_command

    def broken_edges(role, *args):
        if role == "zmq-edge":
            return [sys.executable, "-c", "import sys; sys.exit('edge cannot start')"]
        return real(role, *args)

    monkeypatch.setattr(floor, "_role_command", broken_edges)
    with pytest.raises(FloorError, match="(?s)exited early.*edge cannot start"):
        zmq_floor(849, [142, 142], requests=10, timeout_s=60)
    assert leftovers(tag) == []
