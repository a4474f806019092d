"""Integration: real node processes over real ZeroMQ sockets and real mpirun, checked against the
in-process reference; bad topologies fail fast with their message."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from devit_mq.nodes.launcher import Launcher, LaunchError
from devit_mq.nodes.mpi_launch import mpirun_command
from devit_mq.nodes.runtime import Client

from .runtime_helpers import images, make_bundle, reference, write_topology

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("codec", ["int8"])
def test_zmq_launch_matches_reference_and_serves_a_second_client(tmp_path, codec):
    bundle = make_bundle(tmp_path / "bundle")
    topo = write_topology(tmp_path / "t.yaml", bundle, codec=codec, executor=None)  # edges calibrate
    imgs = images(20)
    with Launcher(topo, log_dir=tmp_path / "logs") as launcher:
        assert {r["role"] for r in launcher.describe()} == {"edge", "aggregator"}
        pred = launcher.client.predict(imgs, batch_size=4, window=2)
        assert not pred.errors
        ref = reference(bundle, imgs, codec)
        np.testing.assert_array_equal(pred.labels, ref.argmax(1))
        np.testing.assert_allclose(pred.probabilities, ref, atol=1e-5)
        # an independent client (as `devit-mq infer` would be) gets its own answers back
        with Client(topo, timeout_s=10) as other:
            np.testing.assert_array_equal(other.predict(imgs[:5]).labels, ref[:5].argmax(1))
    for node in launcher.processes:
        assert node.proc.returncode == 0, node.tail()


@pytest.mark.timeout(120)
def test_killed_edge_gives_degraded_answers_and_launcher_notices(tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    topo = write_topology(tmp_path / "t.yaml", bundle, deadline_ms=300, executor="torch", attention="torch")
    imgs = images(4)
    with Launcher(topo, log_dir=tmp_path / "logs") as launcher:
        edge1 = next(p for p in launcher.processes if p.spec.name == "edge1")
        edge1.proc.kill()
        edge1.proc.wait(10)
        pred = launcher.client.predict(imgs, batch_size=2)
        assert not pred.errors and pred.degraded == 4
        np.testing.assert_allclose(pred.probabilities, reference(bundle, imgs, "fp32", missing=[1]), atol=1e-5)
        with pytest.raises(LaunchError, match="edge1.*exited with code"):
            launcher.check_alive()


@pytest.mark.timeout(60)
def test_launch_fails_fast_on_bad_topology(tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    topo = write_topology(tmp_path / "t.yaml", bundle)
    data = yaml.safe_load(topo.read_text())
    data["edges"][1]["submodel"] = 0
    topo.write_text(yaml.safe_dump(data))
    out = subprocess.run([sys.executable, "-m", "devit_mq.cli", "launch", str(topo)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0
    assert "edges[1]" in out.stderr and "submodel" in out.stderr


@pytest.mark.timeout(60)
def test_launch_reports_a_node_that_dies_at_start(tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    topo = write_topology(tmp_path / "t.yaml", bundle)
    (bundle / "submodel_1.safetensors").unlink()  # edge1 cannot load its part
    with pytest.raises(LaunchError, match=r"edge1.*exited with code.*\n(.|\n)*submodel_1.*missing"):
        Launcher(topo, log_dir=tmp_path / "logs", ready_timeout_s=50).start()


@pytest.mark.mpi
@pytest.mark.timeout(180)
def test_mpirun_demo_matches_reference(tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    # the demo workload needs a dataset: use a tiny ImageFolder written here
    topo = write_topology(tmp_path / "mpi.yaml", bundle, transport="mpi", codec="fp16")
    cmd = mpirun_command(4) + [sys.executable, "-m", "devit_mq.cli", "mpi", str(topo), "--run", "check",
                               "--images", "12"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=150, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    labels = [int(x) for x in out.stdout.split("labels:")[1].split()[:12]]
    ref = reference(bundle, images(12), "fp16").argmax(1)
    assert labels == ref.tolist()


@pytest.mark.mpi
@pytest.mark.timeout(60)
def test_mpirun_with_wrong_rank_count_fails_clearly(tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    topo = write_topology(tmp_path / "mpi.yaml", bundle, transport="mpi")
    cmd = mpirun_command(3) + [sys.executable, "-m", "devit_mq.cli", "mpi", str(topo)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=50)
    assert out.returncode != 0
    assert "4" in out.stderr and "3" in out.stderr


@pytest.mark.timeout(120)
def test_infer_command_classifies_image_files(tmp_path):
    from PIL import Image

    import devit_mq

    bundle = make_bundle(tmp_path / "bundle")
    topo = write_topology(tmp_path / "t.yaml", bundle)
    imgs = images(3)
    paths = []
    for i, img in enumerate(imgs):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(img[..., 0]).save(paths[-1])
    with Launcher(topo, log_dir=tmp_path / "logs"):
        out = subprocess.run([sys.executable, "-m", "devit_mq.cli", "infer", str(topo), *map(str, paths), "--json"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        rows = [json.loads(line) for line in out.stdout.splitlines()]
        assert [r["label"] for r in rows] == reference(bundle, imgs, "fp32").argmax(1).tolist()
        assert all(r["class"] == f"c{r['label']}" and r["error"] is None for r in rows)
        with devit_mq.Client(topo) as client:
            assert client.classes == ["c0", "c1", "c2", "c3"]
        missing = subprocess.run([sys.executable, "-m", "devit_mq.cli", "infer", str(topo), "nope.png"],
                                 capture_output=True, text=True, timeout=60)
        assert missing.returncode == 2 and "nope.png" in missing.stderr
