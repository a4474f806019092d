"""A user's mistake on the command line is one clear line on stderr and exit code 2, never a
traceback; `infer` keeps going past an unreadable file and marks degraded answers."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from devit_mq.nodes.launcher import Launcher

from .runtime_helpers import images, make_bundle, one_error_line, write_topology

CLI = [sys.executable, "-m", "devit_mq.cli"]


def run(*args: str, timeout: float = 60, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    bundle = make_bundle(tmp / "bundle")
    topo = write_topology(tmp / "t.yaml", bundle, deadline_ms=300)
    (tmp / "malformed.yaml").write_text("name: [\n")
    raw = yaml.safe_load(topo.read_text())
    raw["bundle"] = str(tmp / "no-such-bundle")
    (tmp / "nobundle.yaml").write_text(yaml.safe_dump(raw))
    partial = tmp / "partial"
    make_bundle(partial)
    (partial / "submodel_0.safetensors").unlink()
    raw["bundle"] = str(partial)
    (tmp / "partial.yaml").write_text(yaml.safe_dump(raw))
    (tmp / "garbage.png").write_bytes(b"this is not an image")
    imgs = images(2)
    for i, img in enumerate(imgs):
        Image.fromarray(img[..., 0]).save(tmp / f"ok{i}.png")
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(tmp / "rgb.png")  # converted and resized
    return tmp


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", ["launch", "demo"])
def test_missing_and_malformed_topology(files, command):
    prefix = [command] if command == "launch" else [command, "--topology"]
    one_error_line(run(*prefix, str(files / "nope.yaml")), "nope.yaml", "does not exist")
    out = run(*prefix, str(files / "malformed.yaml"))
    assert out.returncode == 2
    one_error_line(out, "malformed.yaml", "not valid YAML")
    out = run(*prefix, str(files / "nobundle.yaml"))
    assert out.returncode == 2
    one_error_line(out, "no-such-bundle", "not found")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", ["launch", "demo"])
def test_missing_bundle_file_is_refused_before_starting(files, command):
    prefix = [command] if command == "launch" else [command, "--topology"]
    out = run(*prefix, str(files / "partial.yaml"))
    assert out.returncode == 2
    one_error_line(out, "submodel_0", "missing", "nothing was started")


@pytest.mark.timeout(120)
def test_node_user_errors(files):
    out = run("node", str(files / "t.yaml"), "--name", "nope")
    assert out.returncode == 2
    one_error_line(out, "no node named 'nope'", "edge0")
    out = run("node", str(files / "partial.yaml"), "--name", "edge0")
    assert out.returncode == 2
    one_error_line(out, "edge0", "submodel_0", "missing")
    out = run("node", str(files / "nope.yaml"), "--name", "edge0")
    assert out.returncode == 2
    one_error_line(out, "does not exist")


@pytest.mark.timeout(120)
def test_port_in_use(files):
    port = yaml.safe_load((files / "t.yaml").read_text())["aggregator"]["port"]
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        out = run("launch", str(files / "t.yaml"))
        assert out.returncode == 2
        one_error_line(out, f"127.0.0.1:{port}", "'aggregator'", "in use")
        out = run("demo", "--topology", str(files / "t.yaml"))
        assert out.returncode == 2
        one_error_line(out, f"127.0.0.1:{port}", "in use")
        out = run("node", str(files / "t.yaml"), "--name", "aggregator")
        assert out.returncode == 2
        one_error_line(out, "aggregator", f"127.0.0.1:{port}")


@pytest.mark.timeout(120)
def test_infer_user_errors_without_a_topology_running(files):
    out = run("infer", str(files / "nope.yaml"), str(files / "ok0.png"))
    assert out.returncode == 2
    one_error_line(out, "nope.yaml")
    out = run("infer", str(files / "t.yaml"), str(files / "garbage.png"))
    assert out.returncode == 2
    one_error_line(out, "garbage.png", "not an image")
    out = run("infer", str(files / "t.yaml"), str(files / "ok0.png"), "--timeout", "2")
    assert out.returncode == 2
    one_error_line(out, "aggregator")


@pytest.mark.timeout(180)
def test_infer_goes_on_past_a_bad_file_warns_and_marks_degraded(files, tmp_path):
    topo = files / "t.yaml"
    paths = [str(files / "ok0.png"), str(files / "garbage.png"), str(files / "rgb.png"), str(files / "gone.png")]
    with Launcher(topo, log_dir=tmp_path / "logs") as launcher:
        out = run("infer", str(topo), *paths)
        assert out.returncode == 1, out.stderr
        assert "Traceback" not in out.stderr
        lines = out.stdout.splitlines()
        assert len(lines) == 4
        assert lines[0].startswith(f"{paths[0]}: c") and "degraded" not in lines[0]
        assert lines[1].startswith(f"{paths[1]}: ERROR cannot read image")
        assert lines[2].startswith(f"{paths[2]}: c")
        assert lines[3].startswith(f"{paths[3]}: ERROR cannot read image: no such file")
        assert "rgb.png: converted from RGB to L" in out.stderr and "rgb.png: resized from 24x20 to 16x16" in out.stderr
        assert "ok0.png" not in out.stderr
        rows = [json.loads(line) for line in run("infer", str(topo), *paths, "--json").stdout.splitlines()]
        assert [r["error"] is None for r in rows] == [True, False, True, False]
        # an edge down: answers are marked degraded and name the missing edge
        edge1 = next(p for p in launcher.processes if p.spec.name == "edge1")
        edge1.proc.kill()
        edge1.proc.wait(10)
        out = run("infer", str(topo), paths[0])
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().endswith("[degraded: no features from edge1]"), out.stdout
        row = json.loads(run("infer", str(topo), paths[0], "--json").stdout)
        assert row["degraded"] is True and row["missing"] == ["edge1"]


def test_infer_expands_folders_and_patterns(tmp_path):
    from devit_mq.nodes.cli import expand_inputs

    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    for name in ("a/2.png", "a/1.JPG", "a/notes.txt", "a/sub/3.png"):
        (tmp_path / name).write_bytes(b"x")
    a = str(tmp_path / "a")
    paths, problems = expand_inputs([a, str(tmp_path / "a" / "1.JPG")])
    assert paths == [f"{a}/1.JPG", f"{a}/2.png"] and not problems  # sorted, images only, no repeats
    paths, _ = expand_inputs([a], recursive=True)
    assert paths == [f"{a}/1.JPG", f"{a}/2.png", f"{a}/sub/3.png"]
    paths, _ = expand_inputs([f"{tmp_path}/**/*.png"])
    assert paths == [f"{a}/2.png", f"{a}/sub/3.png"]
    paths, problems = expand_inputs([str(tmp_path / "empty"), f"{tmp_path}/*.gif", str(tmp_path / "missing.png")])
    assert paths == [str(tmp_path / "missing.png")]  # a missing file stays: infer reports it by name
    assert "no image files" in problems[str(tmp_path / "empty")]
    assert problems[f"{tmp_path}/*.gif"] == "pattern matches no file"


@pytest.mark.timeout(180)
def test_infer_classifies_a_folder_and_a_pattern_like_the_files(files, tmp_path):
    folder = tmp_path / "digits"
    folder.mkdir()
    for i, img in enumerate(images(3, seed=5)):
        Image.fromarray(img[..., 0]).save(folder / f"d{i}.png")
    topo = files / "t.yaml"
    with Launcher(topo, log_dir=tmp_path / "logs"):
        by_file = [json.loads(line) for line in run("infer", str(topo), *sorted(map(str, folder.glob("*.png"))),
                                                    "--json").stdout.splitlines()]
        by_folder = run("infer", str(topo), str(folder), "--json")
        by_glob = run("infer", str(topo), f"{tmp_path}/**/d*.png", "--json")
        empty = run("infer", str(topo), str(folder), str(tmp_path / "logs"))  # a folder without images
    for out in (by_folder, by_glob):
        assert out.returncode == 0, out.stderr
        rows = [json.loads(line) for line in out.stdout.splitlines()]
        assert [(r["image"], r["label"]) for r in rows] == [(r["image"], r["label"]) for r in by_file]
    assert len(by_file) == 3 and all(r["error"] is None for r in by_file)
    assert empty.returncode == 1 and "logs: folder has no image files" in empty.stderr
    assert len(empty.stdout.splitlines()) == 3


@pytest.mark.timeout(180)
def test_one_topology_file_for_hosts_that_keep_the_bundle_elsewhere(files, tmp_path):
    """`node` and `infer` take this host's bundle (--bundle, or DEVIT_MQ_BUNDLE) in place of the file's."""
    import os
    import signal

    raw = yaml.safe_load((files / "t.yaml").read_text())
    real = raw["bundle"]
    raw["bundle"] = "/srv/devit/bundle-not-on-this-host"
    topo = tmp_path / "site.yaml"
    topo.write_text(yaml.safe_dump(raw))
    out = run("infer", str(topo), str(files / "ok0.png"))
    assert out.returncode == 2
    one_error_line(out, "bundle", "bundle-not-on-this-host")
    env = dict(os.environ, DEVIT_MQ_BUNDLE=real)
    procs = [subprocess.Popen([*CLI, "node", str(topo), "--name", "aggregator", "--bundle", real],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)]
    procs += [subprocess.Popen([*CLI, "node", str(topo), "--name", name], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
              for name in ("edge0", "edge1")]
    try:
        out = run("infer", str(topo), str(files / "ok0.png"), "--bundle", real, "--json", "--timeout", "60",
                  timeout=120)
        assert out.returncode == 0, out.stderr
        row = json.loads(out.stdout)
        assert row["error"] is None and row["degraded"] is False
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(30)
    assert all(p.returncode == 0 for p in procs), [p.stderr.read() for p in procs]
