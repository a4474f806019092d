"""Lifecycle of real processes: a second launch is refused and leaves the first alone, signals stop
every node, a dead node is restarted, MPI jobs fail fast on a wrong topology and survive a dead rank,
`devit-mq check` verifies checksums, and the fault launcher reuses the real one."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
import yaml

from devit_mq.nodes.launcher import (
    ENV_ADMIN_TOKEN,
    ENV_INSTANCE,
    EndpointInUse,
    Launcher,
    LaunchError,
    NodeProcess,
    endpoint_busy,
)
from devit_mq.nodes.mpi_launch import ENV_TEST_EXIT, mpirun_command
from devit_mq.nodes.runtime import Client

from .runtime_helpers import free_ports, images, make_bundle, write_topology

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "devit_mq.cli"]


# -- helpers ----------------------------------------------------------------------------------------
class LaunchProcess:
    """`devit-mq launch` as a subprocess, its output read by a thread (so pipes never fill)."""

    def __init__(self, topo: Path, log_dir: Path, *extra: str) -> None:
        self.proc = subprocess.Popen([*CLI, "launch", str(topo), "--log-dir", str(log_dir), *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        self.lines: queue.Queue[tuple[str, str]] = queue.Queue()
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, sink, tag in ((self.proc.stdout, self.out, "out"), (self.proc.stderr, self.err, "err")):
            threading.Thread(target=self._pump, args=(stream, sink, tag), daemon=True).start()
        self.pids: dict[str, int] = {}

    def _pump(self, stream, sink, tag) -> None:
        for line in stream:
            sink.append(line)
            self.lines.put((tag, line))

    def wait_for(self, pattern: str, timeout: float = 90.0, stream: str | None = None) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                tag, line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            if (stream is None or tag == stream) and re.search(pattern, line):
                return line
        raise AssertionError(f"no line matching {pattern!r} within {timeout}s; stdout:\n{''.join(self.out)}\n"
                             f"stderr:\n{''.join(self.err)}")

    def wait_ready(self, timeout: float = 90.0) -> dict[str, int]:
        self.wait_for("all nodes ready", timeout, "out")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(self.pids) < 3:
            for line in self.out:
                m = re.search(r"node=(\w+), role=\w+, pid=(\d+)", line)
                if m:
                    self.pids[m.group(1)] = int(m.group(2))
            time.sleep(0.05)
        return dict(self.pids)

    def node_pids(self) -> dict[str, int]:
        """The launch's live child processes by node name (from their command lines)."""
        out = {}
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return out
        for child in children:
            try:
                cmd = child.cmdline()
            except psutil.Error:
                continue
            if "--name" in cmd and child.status() != psutil.STATUS_ZOMBIE:
                out[cmd[cmd.index("--name") + 1]] = child.pid
        return out

    def close(self) -> None:
        """Clean up whatever is left (the test's own assertions come first)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.pids.values():
            kill_quietly(pid)


def kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def gone(pids, timeout: float = 10.0) -> list[int]:
    """The pids still alive after ``timeout`` seconds (zombies count as gone)."""
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.1)
    return alive


@contextmanager
def launched(topo: Path, log_dir: Path, *extra: str):
    launch = LaunchProcess(topo, log_dir, *extra)
    try:
        yield launch
    finally:
        launch.close()


@pytest.fixture
def topo(tmp_path):
    return write_topology(tmp_path / "t.yaml", make_bundle(tmp_path / "bundle"), deadline_ms=300)


# -- 1. refusing a second launch ----------------------------------------------------------------------
def test_endpoint_busy_sees_tcp_listeners_and_live_ipc_sockets(tmp_path):
    port = free_ports(1)[0]
    assert endpoint_busy(f"tcp://127.0.0.1:{port}") is None
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        assert "in use" in endpoint_busy(f"tcp://127.0.0.1:{port}")
        assert endpoint_busy(f"tcp://*:{port}") is not None
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen()
        assert "accepts connections" in endpoint_busy(f"ipc://{path}")
    assert endpoint_busy(f"ipc://{path}") is None  # a stale socket file: ZeroMQ replaces it
    assert endpoint_busy(f"ipc://{tmp_path / 'none.sock'}") is None


def test_another_instance_answering_is_refused_and_never_shut_down(topo):
    launcher = Launcher(topo)
    launcher._check_instance({"ready": [0, 1], "parts": 2})  # an aggregator without the key: accepted
    launcher._check_instance({"instance": ""})
    launcher._check_instance({"instance": launcher.instance})
    assert launcher.owns_topology() is False  # nothing started yet
    with pytest.raises(EndpointInUse, match="another instance answers"):
        launcher._check_instance({"instance": "0123456789abcdef"})
    assert launcher.foreign == "0123456789abcdef" and not launcher.owns_topology()
    assert EndpointInUse("x").exit_code == 2 and LaunchError("x").exit_code == 1


@pytest.mark.timeout(180)
def test_second_launch_is_refused_and_leaves_the_first_running(topo, tmp_path):
    with launched(topo, tmp_path / "logs1") as first:
        pids = first.wait_ready()
        assert set(pids) == {"aggregator", "edge0", "edge1"}
        # every node got this launch's instance id and admin secret
        envs = [psutil.Process(pid).environ() for pid in pids.values()]
        assert len({e[ENV_INSTANCE] for e in envs}) == 1 and len({e[ENV_ADMIN_TOKEN] for e in envs}) == 1
        assert len(envs[0][ENV_INSTANCE]) == 16 and len(envs[0][ENV_ADMIN_TOKEN]) == 32
        started = time.perf_counter()
        second = subprocess.run([*CLI, "launch", str(topo), "--log-dir", str(tmp_path / "logs2")],
                                capture_output=True, text=True, timeout=60)
        took = time.perf_counter() - started
        assert second.returncode == 2, second.stderr
        assert "Traceback" not in second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "aggregator" in lines[0] and "in use" in lines[0], second.stderr
        assert "all nodes ready" not in second.stdout
        assert not (tmp_path / "logs2").exists()  # nothing was started
        # the first launch is untouched and still answers with both parts
        assert gone(pids.values(), timeout=1.0) == list(pids.values())
        with Client(topo, timeout_s=10, connect_timeout_s=30) as client:
            pred = client.predict(images(4))
        assert not pred.errors and pred.degraded == 0
        assert first.proc.poll() is None
        print(f"second launch refused after {took:.2f}s")


def test_launcher_client_carries_the_admin_token(topo, tmp_path):
    with Launcher(topo, log_dir=tmp_path / "logs") as launcher:
        assert launcher.client.admin_token == launcher.admin_token
        assert launcher.owns_topology()


# -- 2. signals stop every node -------------------------------------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_to_launch_stops_every_node(topo, tmp_path, signum):
    with launched(topo, tmp_path / "logs") as launch:
        pids = launch.wait_ready()
        assert len(pids) == 3
        started = time.perf_counter()
        launch.proc.send_signal(signum)
        assert launch.proc.wait(20) == 0
        left = gone(pids.values(), timeout=5.0)
        took = time.perf_counter() - started
        assert not left, f"orphans after {signal.Signals(signum).name}: {left}"
        assert "Traceback" not in "".join(launch.err)
        print(f"{signal.Signals(signum).name}: launch and all nodes gone after {took:.2f}s")


@pytest.mark.timeout(120)
def test_nodes_die_with_a_killed_launcher(topo, tmp_path):
    with launched(topo, tmp_path / "logs") as launch:
        pids = launch.wait_ready()
        launch.proc.kill()  # no handler runs: the nodes' parent-death signal must stop them
        launch.proc.wait(10)
        assert not gone(pids.values(), timeout=10.0)


# -- 3. restart with backoff ----------------------------------------------------------------------------
class _FakeProc:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.code: int | None = None

    def poll(self):
        return self.code


def test_restart_backoff_doubles_to_ten_seconds_and_resets(topo, monkeypatch, tmp_path):
    launcher = Launcher(topo, log_dir=tmp_path)
    pids = iter(range(1000, 2000))

    def fake_spawn(spec, append=False):
        node = NodeProcess(spec, _FakeProc(next(pids)), tmp_path / f"{spec.name}.log")
        node.started = clock[0]
        return node

    clock = [0.0]
    monkeypatch.setattr(launcher, "_spawn", fake_spawn)
    launcher.processes = [fake_spawn(launcher.topology.edges[0])]
    delays = []
    for _ in range(7):
        launcher.processes[0].proc.code = 1  # dies at once
        launcher.poll(now=clock[0])
        delays.append(launcher.processes[0].restart_at - clock[0])
        clock[0] = launcher.processes[0].restart_at
        launcher.poll(now=clock[0])  # due: restarted
        assert launcher.processes[0].restart_at is None
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert launcher.processes[0].restarts == 7
    clock[0] += 31.0  # it has now run for 31 s
    launcher.poll(now=clock[0])
    launcher.processes[0].proc.code = -9
    launcher.poll(now=clock[0])
    assert launcher.processes[0].restart_at - clock[0] == 0.5
    with pytest.raises(LaunchError, match="edge0.*exited with code 3"):
        launcher.processes = [fake_spawn(launcher.topology.edges[0])]
        launcher.processes[0].proc.code = 3
        launcher.poll(restart=False)


@pytest.mark.timeout(180)
def test_killed_edge_is_restarted_and_the_topology_answers_in_full_again(topo, tmp_path):
    with launched(topo, tmp_path / "logs") as launch:
        pids = launch.wait_ready()
        killed_at = time.perf_counter()
        os.kill(pids["edge1"], signal.SIGKILL)
        launch.wait_for(r"'edge1'.*exited with code -9.*restarting in 0.5s", 20, "err")
        # meanwhile the others keep serving: degraded answers, not errors
        with Client(topo, timeout_s=10, connect_timeout_s=30) as client:
            pred = client.predict(images(2))
            assert not pred.errors
            launch.wait_for(r"'edge1' restarted \(pid \d+", 20, "err")
            new_pid = launch.node_pids().get("edge1")
            restarted_after = time.perf_counter() - killed_at
            assert new_pid is not None and new_pid != pids["edge1"]
            launch.pids["edge1-new"] = new_pid
            deadline = time.monotonic() + 60
            while True:
                pred = client.predict(images(2))
                if not pred.errors and pred.degraded == 0:
                    break
                assert time.monotonic() < deadline, "edge1 never rejoined"
                time.sleep(0.2)
            full_after = time.perf_counter() - killed_at
        # a fresh client sees every edge ready again, with both parts in every answer
        with Client(topo, timeout_s=10, connect_timeout_s=30) as other:
            pred = other.predict(images(4))
            assert not pred.errors and pred.degraded == 0
        assert launch.proc.poll() is None
        print(f"edge1 killed: new process after {restarted_after:.2f}s, full answers after {full_after:.2f}s")
        launch.proc.send_signal(signal.SIGTERM)
        assert launch.proc.wait(20) == 0
        assert not gone([*pids.values(), new_pid], timeout=5.0)


@pytest.mark.timeout(120)
def test_no_restart_stops_everything_and_names_the_dead_node(topo, tmp_path):
    with launched(topo, tmp_path / "logs", "--no-restart") as launch:
        pids = launch.wait_ready()
        os.kill(pids["edge0"], signal.SIGKILL)
        assert launch.proc.wait(30) == 1
        err = "".join(launch.err)
        assert "node 'edge0'" in err and "exited with code -9" in err and "Traceback" not in err
        assert not gone(pids.values(), timeout=5.0)


# -- 4. MPI: fail fast, survive a dead rank ----------------------------------------------------------
@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_mpi_on_a_zmq_topology_fails_at_once(topo, tmp_path):
    started = time.perf_counter()
    out = subprocess.run(mpirun_command(3) + [*CLI, "mpi", str(topo), "--run", "check"],
                         capture_output=True, text=True, timeout=100, cwd=tmp_path)
    took = time.perf_counter() - started
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "transport is 'zmq'" in lines[0] and "devit-mq launch" in lines[0], out.stderr
    assert "Traceback" not in out.stderr
    print(f"mpi on a zmq topology failed after {took:.2f}s")


@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_mpi_wrong_rank_count_fails_at_once_with_one_line(tmp_path):
    topo = write_topology(tmp_path / "mpi.yaml", make_bundle(tmp_path / "bundle"), transport="mpi")
    started = time.perf_counter()
    out = subprocess.run(mpirun_command(5) + [*CLI, "mpi", str(topo)], capture_output=True, text=True, timeout=100)
    took = time.perf_counter() - started
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "started 5 rank(s)" in lines[0] and "mpirun -n 4" in lines[0], out.stderr
    print(f"mpi with 5 ranks for 4 nodes failed after {took:.2f}s")


@pytest.mark.mpi
@pytest.mark.timeout(180)
def test_mpi_dead_edge_rank_is_named_and_the_client_reports_what_it_has(tmp_path):
    topo = write_topology(tmp_path / "mpi.yaml", make_bundle(tmp_path / "bundle"), transport="mpi",
                          deadline_ms=500)
    result = tmp_path / "answers.json"
    env = dict(os.environ, **{ENV_TEST_EXIT: "edge1#3"})  # edge1 exits on its 3rd message (mid-run)
    started = time.perf_counter()
    out = subprocess.run(mpirun_command(4) + [*CLI, "mpi", str(topo), "--run", "check", "--images", "40",
                                              "--json", str(result)],
                         capture_output=True, text=True, timeout=150, cwd=tmp_path, env=env)
    took = time.perf_counter() - started
    assert out.returncode == 1, out.stdout + out.stderr
    died = [line for line in out.stderr.splitlines() if "died" in line]
    # every surviving rank names the dead node
    assert {line.split(":")[1].strip().split()[0] for line in died} >= {"client", "aggregator", "edge0"}, out.stderr
    assert all("'edge1' (edge, rank 3)" in line for line in died)
    assert "answered 40/40" in out.stdout, out.stdout + out.stderr
    data = json.loads(result.read_text())
    assert len(data["answers"]) == 40 and data["degraded"] > 0 and data["dead"] == ["edge1 (rank 3)"]
    assert all(a["missing"] == ["edge1"] for a in data["answers"] if a["degraded"])
    assert "BAD TERMINATION" not in out.stdout + out.stderr
    print(f"mpi job with a dead edge rank ended after {took:.2f}s: {data['degraded']} degraded of 40")


@pytest.mark.mpi
@pytest.mark.timeout(180)
def test_mpi_dead_aggregator_ends_the_job_with_a_partial_report(tmp_path):
    topo = write_topology(tmp_path / "mpi.yaml", make_bundle(tmp_path / "bundle"), transport="mpi")
    result = tmp_path / "answers.json"
    env = dict(os.environ, **{ENV_TEST_EXIT: "aggregator#40"})
    out = subprocess.run(mpirun_command(4) + [*CLI, "mpi", str(topo), "--run", "check", "--images", "400",
                                              "--json", str(result)],
                         capture_output=True, text=True, timeout=150, cwd=tmp_path, env=env)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "'aggregator' (aggregator, rank 1) died" in out.stderr
    data = json.loads(result.read_text())
    assert not data["complete"] and data["dead"] == ["aggregator (rank 1)"]
    assert 0 < len([a for a in data["answers"] if a["error"] is None]) < 400


@pytest.mark.mpi
@pytest.mark.timeout(180)
def test_mpi_dead_client_is_named_and_every_server_ends(tmp_path):
    topo = write_topology(tmp_path / "mpi.yaml", make_bundle(tmp_path / "bundle"), transport="mpi")
    env = dict(os.environ, **{ENV_TEST_EXIT: "client#10"})
    started = time.perf_counter()
    out = subprocess.run(mpirun_command(4) + [*CLI, "mpi", str(topo), "--run", "check", "--images", "400"],
                         capture_output=True, text=True, timeout=150, cwd=tmp_path, env=env)
    took = time.perf_counter() - started
    assert out.returncode != 0
    died = [line for line in out.stderr.splitlines() if "'client' (client, rank 0) died" in line]
    assert len(died) == 3, out.stderr
    print(f"mpi job with a dead client rank ended after {took:.2f}s")


# -- 5. the --run plug-in -----------------------------------------------------------------------------
def mpi_plugin(client, topology, config):
    """A --run plug-in for the test below: classify 3 images, say so, return an exit code."""
    pred = client.predict(images(3))
    print(f"plugin: {topology.name} answered {len(pred.answers)} config={config}", flush=True)
    return 3


@pytest.mark.mpi
@pytest.mark.timeout(180)
def test_mpi_run_takes_a_module_function_plugin(tmp_path):
    topo = write_topology(tmp_path / "mpi.yaml", make_bundle(tmp_path / "bundle"), transport="mpi")
    out = subprocess.run(mpirun_command(4) + [*CLI, "mpi", str(topo), "--run", "tests.test_lifecycle:mpi_plugin",
                                              "--run-config", "abc"],
                         capture_output=True, text=True, timeout=150, cwd=REPO)
    assert out.returncode == 3, out.stdout + out.stderr
    assert "plugin: mpi answered 3 config=abc" in out.stdout
    bad = subprocess.run(mpirun_command(4) + [*CLI, "mpi", str(topo), "--run", "no_such_module_x:run"],
                         capture_output=True, text=True, timeout=100, cwd=REPO)
    assert bad.returncode == 2
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot import no_such_module_x" in lines[0], bad.stderr


def test_runtime_does_not_import_the_benchmarks():
    code = ("import sys, devit_mq.nodes.cli, devit_mq.nodes.launcher, devit_mq.nodes.mpi_launch, "
            "devit_mq.nodes.runtime; bad = [m for m in sys.modules if m.startswith('devit_mq.bench')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    import devit_mq.nodes.cli as cli

    assert not hasattr(cli, "mpirun_command")


# -- 6. the fault launcher is the real launcher with another node command ------------------------------
def test_fault_launcher_only_swaps_the_node_command(topo):
    from devit_mq.bench.faults import FaultLauncher, FaultSpec

    launcher = FaultLauncher(topo, edge_faults=FaultSpec.parse("drop=0.1"), faulty_edges=["edge0"])
    assert "_spawn" not in FaultLauncher.__dict__ and "stop" not in FaultLauncher.__dict__
    edge0, edge1 = launcher.topology.edges
    assert launcher.node_command(edge0)[1:3] == ["-m", "devit_mq.bench.faults"]
    assert launcher.node_command(edge1) == Launcher(topo).node_command(edge1)
    assert launcher.node_command(launcher.topology.aggregator)[3] == "node"


# -- 7. checksums ---------------------------------------------------------------------------------------
def test_check_reports_a_corrupt_bundle_file(tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    topo = write_topology(tmp_path / "t.yaml", bundle)
    ok = subprocess.run([*CLI, "check", str(topo)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    weights = copy / "submodel_1.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit in the middle of the tensors: safetensors still parses it
    weights.write_bytes(bytes(data))
    raw = yaml.safe_load(topo.read_text())
    raw["bundle"] = str(copy)
    bad_topo = tmp_path / "bad.yaml"
    bad_topo.write_text(yaml.safe_dump(raw))
    out = subprocess.run([*CLI, "check", str(bad_topo)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "submodel_1.safetensors" in out.stderr and "SHA-256" in out.stderr and "Traceback" not in out.stderr
    assert "submodel_0" not in out.stderr and "fusion" not in out.stderr
    skipped = subprocess.run([*CLI, "check", str(bad_topo), "--no-checksums"], capture_output=True, text=True,
                             timeout=60)
    assert skipped.returncode == 0
