"""Data-parallel DEKD under torchrun (2 CPU ranks, gloo) against one process with the same global batch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from devit_mq.dekd.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "tests" / "configs" / "ddp.yaml"
TORCHRUN = Path(sys.executable).with_name("torchrun")
STAGES = ("teacher", "group_teacher_0", "group_teacher_1", "student_0", "student_1", "fusion")

pytestmark = pytest.mark.skipif(not TORCHRUN.is_file(), reason="torchrun is not installed beside this python")


def _torchrun(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "devit_mq.cli", "train", str(CONFIG),
           "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=out.parent)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    single, ddp = tmp / "single", tmp / "ddp"
    assert main([str(CONFIG), "--out", str(single)]) == 0
    proc = _torchrun(ddp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return single, ddp, proc


@pytest.mark.timeout(180)
def test_two_ranks_train_what_one_process_trains(runs):
    single, ddp, proc = runs
    assert "2 ranks" in proc.stdout
    for stage in STAGES:
        a = load_file(str(single.with_name("single.work") / f"{stage}.safetensors"))
        b = load_file(str(ddp.with_name("ddp.work") / f"{stage}.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            # the same update from two half-batch gradients as from one whole batch, up to float
            # rounding (AdamW's normalised steps carry ~1e-5 differences over a few steps)
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=2e-4, msg=f"{stage}: {k}")
        sa = json.loads((single.with_name("single.work") / f"{stage}.json").read_text())["stats"]
        sb = json.loads((ddp.with_name("ddp.work") / f"{stage}.json").read_text())["stats"]
        assert sa["steps"] == sb["steps"] and sa["best_epoch"] == sb["best_epoch"], stage
        assert sb["final_loss"] == pytest.approx(sa["final_loss"], rel=1e-4), stage  # the global batch's mean
    ra = json.loads((single / "report.json").read_text())
    rb = json.loads((ddp / "report.json").read_text())
    for i, g in enumerate(ra["group_teachers"]):  # the epoch was chosen on the group-restricted score
        stats = json.loads((single.with_name("single.work") / f"group_teacher_{i}.json").read_text())["stats"]
        assert stats["val_score"] == pytest.approx(g["val_accuracy_on_group"])
    assert rb["fused_accuracy"]["fp32"] == pytest.approx(ra["fused_accuracy"]["fp32"], abs=1.5 / 60)


@pytest.mark.timeout(180)
def test_resume_under_torchrun_loads_every_stage(runs, tmp_path):
    _, ddp, _ = runs
    again = tmp_path / "ddp"
    shutil.copytree(ddp.with_name("ddp.work"), tmp_path / "ddp.work")
    proc = _torchrun(again, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in STAGES:
        assert proc.stdout.count(f"stage {stage}: loaded") == 1, stage  # printed by rank 0 only
    a, b = load_file(str(ddp / "fusion.safetensors")), load_file(str(again / "fusion.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
