"""The deployment files hold: the systemd unit verifies and its command serves a topology, and the
Dockerfile's steps (copies, the kernel precompile, the entrypoint, the health checks) run here.

No Docker daemon or image registry is needed: each step the Dockerfile runs is run on this host in
the test's own environment, with the container's paths swapped for the test's."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .runtime_helpers import images, make_bundle, write_topology

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "deploy" / "systemd" / "devit-mq-node@.service"
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
DEVIT = str(Path(sys.executable).with_name("devit-mq"))


def unit_service() -> dict[str, list[str]]:
    """The unit's [Service] settings: key -> values (Environment= may repeat)."""
    out: dict[str, list[str]] = {}
    section = None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def unit_env(service: dict[str, list[str]]) -> dict[str, str]:
    return dict(v.split("=", 1) for v in service.get("Environment", []))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_unit_verifies(tmp_path):
    # the unit names the install path of a deployment; point it at this test's devit-mq
    text = UNIT.read_text().replace("/opt/devit-mq/bin/devit-mq", DEVIT)
    unit = tmp_path / UNIT.name
    unit.write_text(text)
    out = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "devit-mq-node@edge0.service")],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    broken = tmp_path / "broken@.service"
    broken.write_text(text.replace(DEVIT, "devit-mq-not-installed"))
    out = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "broken@edge0.service")],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode != 0  # the check can fail: a command that does not exist is reported


@pytest.mark.timeout(180)
def test_systemd_units_command_and_environment_serve_a_topology(tmp_path):
    """Each node started as its unit starts it (ExecStart with %i, the unit's environment), with the
    topology file naming a bundle path this host does not have: the unit's DEVIT_MQ_BUNDLE wins."""
    service = unit_service()
    env_names = unit_env(service)
    bundle = make_bundle(tmp_path / "bundle")
    topo = write_topology(tmp_path / "topology.yaml", bundle)
    topo.write_text(topo.read_text().replace(str(bundle), "/var/lib/devit-mq/bundle-elsewhere"))
    env = dict(os.environ, **env_names)
    env.update(DEVIT_MQ_BUNDLE=str(bundle), DEVIT_MQ_KEYS_DIR=str(tmp_path / "keys"))
    env.pop("NUMBA_CACHE_DIR")  # the package's own (warm) cache: a cold one costs 14 s per node
    assert {"DEVIT_MQ_BUNDLE", "DEVIT_MQ_KEYS_DIR"} <= set(env_names)
    (exec_start,) = service["ExecStart"]
    procs = []
    try:
        for name in ("aggregator", "edge0", "edge1"):
            argv = shlex.split(exec_start.replace("%i", name).replace("/etc/devit-mq/topology.yaml", str(topo)))
            argv[0] = DEVIT
            procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                          text=True))
        img = tmp_path / "x.png"
        from PIL import Image

        Image.fromarray(images(1)[0, ..., 0]).save(img)
        out = subprocess.run([DEVIT, "infer", str(topo), str(img), "--json", "--timeout", "60"], env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["degraded"] is False
        # the Dockerfile's health checks against these nodes: healthy, then an edge dies
        assert healthcheck("edge", topo, "edge1", env) == 0
        assert healthcheck("aggregator", topo, "aggregator", env) == 0
        procs[2].kill()
        procs[2].wait(10)
        deadline = time.monotonic() + 20  # the aggregator counts an edge down after its silence window
        while healthcheck("edge", topo, "edge1", env) == 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert healthcheck("edge", topo, "edge1", env) == 1
        assert healthcheck("edge", topo, "edge0", env) == 0
        assert healthcheck("aggregator", topo, "aggregator", env) == 0  # degraded is not its fault
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)  # the unit's KillSignal
        logs = [p.communicate(timeout=30)[1] for p in procs]
    assert service["KillSignal"] == ["SIGTERM"]
    assert [p.returncode for p in procs[:2]] == [0, 0], logs
    for log in logs[:2]:  # --log-format json from the unit's command line: every line is one JSON object
        lines = [line for line in log.splitlines() if line.strip()]
        assert lines and all(json.loads(line)["level"] for line in lines)


# -- Dockerfile -----------------------------------------------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined and comments dropped."""
    joined, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        joined.append(buf)
        buf = ""
    return [tuple(re.split(r"\s+", line.strip(), maxsplit=1)) for line in joined]


def stage_of(target: str) -> list[tuple[str, str]]:
    """The instructions of one build stage (``FROM ... AS target``)."""
    out, current = [], None
    for ins, args in dockerfile_instructions():
        if ins == "FROM":
            current = args.split()[-1] if " AS " in f" {args} " else None
        if current == target:
            out.append((ins, args))
    return out


def healthcheck(target: str, topology: Path, node: str, env: dict[str, str]) -> int:
    """Run a Dockerfile stage's HEALTHCHECK command here, with the test's topology for /topology.yaml."""
    (check,) = [args for ins, args in stage_of(target) if ins == "HEALTHCHECK"]
    argv = json.loads(check.split(" CMD ", 1)[1])
    script = argv[2].replace("/topology.yaml", str(topology)).replace("devit-mq ", f"{DEVIT} ")
    return subprocess.run([*argv[:2], script], env=dict(env, DEVIT_MQ_NODE=node), timeout=60).returncode


def test_dockerfile_has_both_images_and_copies_what_exists():
    stages = [args.split()[-1] for ins, args in dockerfile_instructions() if ins == "FROM" and " AS " in args]
    assert {"build", "node", "edge", "aggregator"} <= set(stages)
    for ins, args in dockerfile_instructions():
        if ins == "COPY" and "--from" not in args:
            *sources, _dest = args.split()
            for src in sources:
                assert (REPO / src).exists(), f"COPY {src}: not in the repository"
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "runs" in ignored  # the build context stays small
    # the images are the base install: no torch extra anywhere
    assert "torch" not in " ".join(args for ins, args in dockerfile_instructions() if ins == "RUN")


def test_dockerfile_precompile_step_fills_the_numba_cache(tmp_path):
    (step,) = [args for ins, args in stage_of("node") if ins == "RUN" and "python -c" in args]
    code = shlex.split(step)[2]
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path)),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert len(list(tmp_path.rglob("*.nbi"))) >= 5  # the codec and executor kernels were cached


def test_dockerfile_entrypoint_runs_the_node_command(tmp_path):
    (entry,) = [args for ins, args in stage_of("node") if ins == "ENTRYPOINT"]
    argv = json.loads(entry)
    assert argv[:2] == ["sh", "-c"]
    script = argv[2].replace("devit-mq ", f"{DEVIT} ")
    out = subprocess.run(["sh", "-c", script, *argv[3:], "--help"], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, DEVIT_MQ_NODE="edge0"))
    assert out.returncode == 0, out.stderr
    assert "usage: devit-mq node" in out.stdout and "--bundle" in out.stdout
