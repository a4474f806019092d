"""MPI transport under a real `mpirun` (the venv's, from the mpich wheel), each run bounded by a timeout."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

SCRIPT = Path(__file__).resolve().parent / "mpi_scripts" / "transport_ranks.py"
MPIRUN = Path(sys.executable).parent / "mpirun"
REPO = Path(__file__).resolve().parent.parent

needs_mpirun = pytest.mark.skipif(not MPIRUN.exists() and shutil.which("mpirun") is None,
                                  reason="no mpirun (install the mpich wheel)")


def mpirun(n, mode, topology, timeout=90):
    launcher = REPO / "launch" / "mpirun.sh"  # adds Open MPI's root/oversubscribe flags when needed
    cmd = ["bash", str(launcher), "-n", str(n), sys.executable, str(SCRIPT), mode, str(topology)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "MPIRUN": str(MPIRUN) if MPIRUN.exists() else shutil.which("mpirun"),
                               "PYTHONPATH": str(REPO)})


def write_topology(path, n_edges=1, **extra):
    data = {"name": "mpi-t", "bundle": extra.pop("bundle", "none"), "transport": "mpi", "client": {"name": "client"},
            "aggregator": {"name": "aggregator"},
            "edges": [{"name": f"edge{i}", "submodel": i} for i in range(n_edges)], **extra}
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.mpi
@needs_mpirun
@pytest.mark.timeout(120)
def test_frames_cross_ranks_and_an_idle_rank_does_not_spin(tmp_path):
    out = mpirun(3, "exchange", write_topology(tmp_path / "t.yaml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(re.findall(r"OK (aggregator|client|edge0)", out.stdout)) == ["aggregator", "client", "edge0"]
    for label, cpu, wall in re.findall(r"IDLE_CPU (\S+) aggregator ([\d.]+) s over ([\d.]+) s", out.stdout):
        cpu, wall = float(cpu), float(wall)
        print(f"aggregator idle in recv ({label} polling): {cpu:.3f} s CPU over {wall:.2f} s "
              f"({100 * cpu / wall:.1f}% of a core)")
        assert cpu < 0.5 * wall  # a blocking MPI receive would burn ~100%
    probes = dict(re.findall(r"PROBES (busy|idle|long-idle) (\d+) over", out.stdout))
    assert set(probes) == {"busy", "idle", "long-idle"}, out.stdout
    # 0.5 s idle-hinted: one probe per 10 ms nap at most (+ the first); busy: the 100 us spin alone
    # makes more than that; idle past long_idle_after: one per 50 ms nap
    assert int(probes["idle"]) <= 0.5 / 10e-3 + 2 < int(probes["busy"]), probes
    assert int(probes["long-idle"]) <= 0.5 / 50e-3 + 2 < 0.5 / 10e-3 / 2, probes


@pytest.mark.mpi
@needs_mpirun
@pytest.mark.timeout(120)
def test_send_to_a_rank_that_does_not_receive_times_out(tmp_path):
    out = mpirun(3, "timeout", write_topology(tmp_path / "t.yaml", limits={"hwm": 1}))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "TIMEOUT after" in out.stdout and "client -> edge0 (rank 2)" in out.stdout
    assert len(re.findall(r"OK (aggregator|client|edge0)", out.stdout)) == 3
    print(re.search(r"TIMEOUT.*", out.stdout).group(0))


@pytest.mark.mpi
@needs_mpirun
@pytest.mark.timeout(60)
def test_world_size_must_match_the_topology(tmp_path):
    out = mpirun(2, "mismatch", write_topology(tmp_path / "t.yaml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "MISMATCH" in out.stdout and "MPI started 2 rank(s) but topology 'mpi-t' has 3 nodes" in out.stdout
    assert "mpirun -n 3" in out.stdout


@pytest.fixture(scope="module")
def bundle3(tmp_path_factory):
    from .runtime_helpers import make_bundle

    return make_bundle(tmp_path_factory.mktemp("bundle") / "b3", widths=(32, 32, 32))


FAKE_MPIRUN = """#!/usr/bin/env bash
if [[ "$1" == --version ]]; then echo "{banner}"; exit 0; fi
echo "ARGS $*"
echo "ROOT_OK ${{OMPI_ALLOW_RUN_AS_ROOT:-unset}} ${{OMPI_ALLOW_RUN_AS_ROOT_CONFIRM:-unset}}"
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("flavour, banner", [("openmpi", "mpirun (Open MPI) 5.0.5"),
                                             ("mpich", "HYDRA build details: Version: 4.2")])
def test_mpirun_wrapper_flags_and_rank_count(tmp_path, bundle3, flavour, banner):
    fake = tmp_path / "mpirun"
    fake.write_text(FAKE_MPIRUN.format(banner=banner))
    fake.chmod(0o755)
    env = {**os.environ, "MPIRUN": str(fake), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("OMPI_ALLOW_RUN_AS_ROOT", None)
    env.pop("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", None)
    # the wrapper validates the topology, bundle included, before it starts anything
    topology = write_topology(tmp_path / "t.yaml", n_edges=3, bundle=str(bundle3))
    wrapper = str(REPO / "launch" / "mpirun.sh")
    out = subprocess.run(["bash", wrapper, str(topology), "-f", "hosts", "--", "--run", "check"],
                         capture_output=True, text=True, timeout=50, env=env)
    assert out.returncode == 0, out.stderr
    args = re.search(r"ARGS (.*)", out.stdout).group(1).split()
    oversubscribe = ["--oversubscribe"] if flavour == "openmpi" else []
    # under MPICH (hydra) a dead rank must not take the others with it: they name it and report
    flags = oversubscribe + (["-disable-auto-cleanup"] if flavour == "mpich" else [])
    assert args[:len(flags) + 4] == flags + ["-n", "5", "-f", "hosts"]
    assert args[-4:] == ["mpi", str(topology), "--run", "check"]
    root = os.geteuid() == 0 and flavour == "openmpi"
    assert ("ROOT_OK 1 1" in out.stdout) == root
    passthrough = subprocess.run(["bash", wrapper, "-n", "2", "hostname"], capture_output=True, text=True,
                                 timeout=20, env=env)
    assert re.search(r"ARGS (.*)", passthrough.stdout).group(1).split() == oversubscribe + ["-n", "2", "hostname"]
