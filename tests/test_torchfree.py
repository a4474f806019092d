"""torch stays out of the edge, aggregator and client processes.

Each process runs under an import guard (a ``sitecustomize`` on ``PYTHONPATH``) that records every
attempt to import torch, with the stack that tried. Two tests use it: one with this development
venv (torch installed, so an import would succeed silently), and one with a fresh venv holding only
the base install (no torch at all), which also checks the packaging.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from devit_mq.bench.executors import create_base_venv

from .runtime_helpers import images, make_bundle, reference, write_topology

REPO = Path(__file__).resolve().parents[1]

GUARD = '''
import importlib.abc, os, sys, traceback
_DIR = os.environ["DEVIT_IMPORT_GUARD_DIR"]
open(os.path.join(_DIR, "started-%d" % os.getpid()), "w").close()

class _TorchGuard(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            with open(os.path.join(_DIR, "torch-%d" % os.getpid()), "a") as f:
                f.write(" ".join(sys.argv) + "\\n" + "".join(traceback.format_stack()))
        return None

sys.meta_path.insert(0, _TorchGuard())
'''

RUNTIME_MODULES = ["devit_mq", "devit_mq.cli", "devit_mq.protocol", "devit_mq.wire", "devit_mq.transport",
                   "devit_mq.topology", "devit_mq.topology.cli", "devit_mq.nodes", "devit_mq.nodes.runtime",
                   "devit_mq.nodes.cli", "devit_mq.nodes.launcher", "devit_mq.nodes.executor", "devit_mq.nodes.status",
                   "devit_mq.nodes.dashboard",
                   "devit_mq.model.numpy_vit", "devit_mq.model.manifest", "devit_mq.kernels.vit_numba",
                   "devit_mq.data", "devit_mq.metrics"]


def guarded_env(guard_dir: Path) -> dict[str, str]:
    guard_dir.mkdir(parents=True, exist_ok=True)
    (guard_dir / "sitecustomize.py").write_text(GUARD)
    env = dict(os.environ, DEVIT_IMPORT_GUARD_DIR=str(guard_dir), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(guard_dir), *filter(None, [env.get("PYTHONPATH")])])
    return env


def torch_imports(guard_dir: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in guard_dir.glob("torch-*")}


def run_topology_torch_free(python: str, tmp_path: Path, env: dict[str, str]) -> None:
    """Launch a 2-edge topology (edge0 ``numba``, edge1 ``numpy``) with ``python``'s ``devit-mq
    launch``, classify image files with its ``devit-mq infer``, compare with the torch reference."""
    from PIL import Image

    bundle = make_bundle(tmp_path / "bundle")
    topo = write_topology(tmp_path / "t.yaml", bundle, executor=None)
    data = yaml.safe_load(topo.read_text())
    for edge, executor in zip(data["edges"], ("numba", "numpy"), strict=True):
        edge["executor"] = executor
    topo.write_text(yaml.safe_dump(data))
    imgs = images(3)
    paths = []
    for i, img in enumerate(imgs):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(img[..., 0]).save(paths[-1])
    cli = [python, "-m", "devit_mq.cli"]
    launcher = subprocess.Popen([*cli, "launch", str(topo), "--log-dir", str(tmp_path / "logs")], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        lines = []
        for line in launcher.stdout:  # until every node is ready
            lines.append(line)
            if "all nodes ready" in line:
                break
        else:
            pytest.fail("launch ended before its nodes were ready:\n" + "".join(lines))
        described = [next(launcher.stdout) for _ in range(3)]
        assert sum("executor=numba" in row for row in described) == 1, described
        assert sum("executor=numpy" in row for row in described) == 1, described
        out = subprocess.run([*cli, "infer", str(topo), *map(str, paths), "--json"], env=env, capture_output=True,
                             text=True, timeout=60, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        labels = [json.loads(line)["label"] for line in out.stdout.splitlines()]
        assert labels == reference(bundle, imgs, "fp32").argmax(1).tolist()
    finally:
        launcher.send_signal(signal.SIGTERM)
        try:
            launcher.wait(30)
        except subprocess.TimeoutExpired:
            launcher.kill()
    assert launcher.returncode == 0, launcher.stdout.read()


def test_runtime_modules_import_without_torch():
    code = f"import importlib, sys\nfor m in {RUNTIME_MODULES!r}: importlib.import_module(m)\n" \
           "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.timeout(120)
def test_edges_aggregator_and_client_never_import_torch(tmp_path):
    guard_dir = tmp_path / "guard"
    run_topology_torch_free(sys.executable, tmp_path, guarded_env(guard_dir))
    started = list(guard_dir.glob("started-*"))
    assert len(started) >= 5, started  # launcher, aggregator, 2 edges, infer client
    assert torch_imports(guard_dir) == {}


@pytest.mark.timeout(600)
def test_fresh_base_install_runs_nodes_and_client_without_torch(tmp_path):
    started = time.perf_counter()
    python = create_base_venv(tmp_path / "venv")
    installed = time.perf_counter() - started
    missing = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True)
    assert missing.returncode != 0 and "No module named 'torch'" in missing.stderr
    guard_dir = tmp_path / "guard"
    run_topology_torch_free(python, tmp_path, guarded_env(guard_dir))
    assert torch_imports(guard_dir) == {}
    print(f"base install: {installed:.1f} s")


def test_import_guard_records_a_torch_import(tmp_path):
    """The guard itself works: a process that does import torch is caught, with the importer."""
    env = guarded_env(tmp_path / "guard")
    subprocess.run([sys.executable, "-c", "import devit_mq.model.vit"], env=env, check=True, timeout=60)
    (record,) = torch_imports(tmp_path / "guard").values()
    assert "devit_mq/model/vit.py" in record
