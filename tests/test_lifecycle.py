"""Lifecycle of real processes: a second launch is refused and leaves the first alone, signals stop
every node, a dead node is restarted, MPI jobs fail fast on a wrong topology and survive a dead rank,
`devit-mq check` verifies checksums, and the fault launcher reuses the real one."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from .runtime_helpers import make_bundle, write_topology

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "devit_mq.cli"]


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
