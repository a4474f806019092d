"""The pipeline end to end on a tiny config: bundle, report, resume, teacher checkpoints, bad configs."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from devit_mq.data import load_dataset
from devit_mq.dekd.cli import main
from devit_mq.model import InputSpec, load_ensemble, load_teacher

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
REPORT_KEYS = {"name", "dataset", "num_train", "num_val", "num_test", "class_groups", "teacher", "group_teachers",
               "submodels", "fusion_params", "fused_accuracy", "missing_edge", "validation", "fusion_selection",
               "settings", "relation_ablation", "stage_seconds", "targets"}


def _train(tmp_path: Path, *extra: str, config: Path = TINY) -> tuple[int, Path]:
    out = tmp_path / "bundle"
    return main([str(config), "--out", str(out), *extra]), out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    code, out = _train(tmp)
    assert code == 0
    return tmp, out


@pytest.mark.timeout(120)
def test_tiny_run_writes_a_loadable_bundle(tiny_run):
    _, out = tiny_run
    ensemble, manifest = load_ensemble(out)
    assert manifest.num_parts == 2 and manifest.storage_dtype == "float16"
    assert sorted(c for g in manifest.class_groups for c in g) == list(range(10))
    assert manifest.metadata["report"] == "report.json"
    assert manifest.metadata["config"]["name"] == "tiny"
    assert set(manifest.metadata["stage_seconds"]) >= {"teacher", "student_0", "student_1", "fusion_v0", "fusion_v1"}
    assert manifest.metadata["splits"]["val"] == 40 and manifest.metadata["dataset"]["val_size"] == 40
    teacher = load_teacher(out, manifest)
    data = load_dataset(**manifest.metadata["dataset"])  # the runtime rebuilds the exact test split
    assert len(data.test_labels) == 60
    x = manifest.input.to_tensor(data.test_images[:4])
    assert ensemble(x).shape == (4, 10) and teacher(x).shape == (4, 10)
    assert ensemble(x, missing=[1]).shape == (4, 10)
    # the recorded normalisation is the training data's
    mean = data.train_images.mean() / 255.0
    assert manifest.input.mean[0] == pytest.approx(mean, rel=1e-6)
    assert isinstance(manifest.input, InputSpec)


@pytest.mark.timeout(120)
def test_report_has_every_field(tiny_run):
    _, out = tiny_run
    report = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert {"accuracy", "params", "flops"} <= set(report["teacher"])
    assert set(report["fused_accuracy"]) == {"fp32", "fp16", "int8"}
    for sub in report["submodels"]:
        assert {"group", "accuracy_on_group", "params", "flops", "flops_ratio"} <= set(sub)
        assert 0 < sub["flops_ratio"] < 1
    assert [m["missing_edge"] for m in report["missing_edge"]] == [0, 1]
    for m in report["missing_edge"]:
        assert {"accuracy", "remaining_classes_accuracy", "full_model_remaining_classes_accuracy",
                "missing_classes_accuracy"} <= set(m)
    assert report["num_val"] == 40 and report["teacher"]["val_accuracy"] is not None
    assert set(report["validation"]["fused_accuracy"]) == {"fp32", "fp16", "int8"}
    ab = report["relation_ablation"]
    assert ab["seeds"] == [0]
    for side in ("with_relation", "without_relation"):
        assert {"val", "test", "runs"} <= set(ab[side]) and len(ab[side]["runs"]) == 1
        assert len(ab[side]["test"]["submodel_group_accuracy"]) == 2
    # seed 0 with the relation loss is the shipped run itself
    assert ab["with_relation"]["runs"][0]["test"]["fused_accuracy"] == report["fused_accuracy"]
    assert {"ablation_student_0", "ablation_fusion"} <= set(report["stage_seconds"])
    assert len(report["targets"]) == 4 and all("met" in t for t in report["targets"].values())
    for value in report["fused_accuracy"].values():
        assert 0.0 <= value <= 1.0


@pytest.mark.timeout(120)
def test_resume_reuses_finished_stages(tiny_run, tmp_path, capsys):
    tmp, out = tiny_run
    work = out.with_name(out.name + ".work")
    assert (work / "teacher.safetensors").is_file() and (work / "fusion_v0.json").is_file()
    shutil.copytree(work, tmp_path / "bundle.work")
    capsys.readouterr()
    code, out2 = _train(tmp_path, "--resume", "--no-ablation", "--threads", "1")
    assert code == 0
    log = capsys.readouterr().out
    assert "stage teacher: loaded" in log and "stage fusion_v1: loaded" in log
    a, _ = load_ensemble(out)
    b, _ = load_ensemble(out2)
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(v, w), k
    # a changed fusion setting retrains only the fusion stage
    cfg = yaml.safe_load(TINY.read_text())
    cfg["fusion"]["student_lr_scale"] = 0.5  # not set by a variant: every candidate changes
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    code, _ = _train(tmp_path, "--resume", "--no-ablation", config=changed)
    log = capsys.readouterr().out
    assert code == 0 and "stage student_1: loaded" in log and "stage fusion_v0: configuration changed" in log


@pytest.mark.timeout(120)
def test_teacher_from_a_timm_format_checkpoint(tiny_run, tmp_path):
    _, out = tiny_run
    teacher = load_teacher(out)
    ckpt = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(ckpt))
    cfg = yaml.safe_load(TINY.read_text())
    cfg["teacher"]["checkpoint"] = str(ckpt)
    cfg["teacher"]["train"]["epochs"] = 0
    cfg["ablation"] = {"enabled": False}
    path = tmp_path / "ckpt.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, out2 = _train(tmp_path, "--stop-after", "teacher", config=path)
    assert code == 0
    from safetensors.torch import load_file
    stage = load_file(str(out2.with_name("bundle.work") / "teacher.safetensors"))
    for k, v in teacher.state_dict().items():
        assert torch.equal(stage[f"teacher.{k}"], v), k
    # a checkpoint for another architecture is refused with the key mismatch
    cfg["teacher"]["model"]["embed_dim"] = 64
    path.write_text(yaml.safe_dump(cfg))
    code, _ = _train(tmp_path, config=path)
    assert code == 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize("text,match", [
    ("teacher: {model: {embed_dim: 32}, trian: {}}\n", "teacher.trian"),
    ("fusion: {feature_dropout: high}\n", "fusion.feature_dropout: expected a number"),
    ("data: {source: nowhere}\n", "unknown data source"),
    ("[unclosed\n", "not valid YAML"),
])
def test_bad_config_fails_with_a_named_error(tmp_path, capsys, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main([str(path), "--out", str(tmp_path / "b")]) == 2
    assert match in capsys.readouterr().err


def test_missing_config_file(tmp_path, capsys):
    assert main([str(tmp_path / "none.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_shipped_configs_validate():
    from devit_mq.dekd.config import load_config
    from devit_mq.dekd.split import split_classes
    from devit_mq.model import vit_flops

    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(path)
        groups = split_classes(10, cfg.groups.num_groups, cfg.groups.seed)
        teacher = cfg.teacher_config((28, 28, 1), 10)
        subs = cfg.student_configs((28, 28, 1), groups)
        assert len(subs) == cfg.groups.num_groups
        if path.stem == "default":  # the target setting: N=2, each sub-model <= 1/3 of the teacher's FLOPs
            assert len(subs) == 2 and all(vit_flops(s) <= vit_flops(teacher) / 3 for s in subs)
            assert cfg.data.val_size and cfg.students.group_teacher_epochs and len(cfg.ablation.seeds) == 3
    # `make bundles` reuses the default teacher stage for n4 and hetero: what keys it must be equal
    default = load_config(ROOT / "configs" / "default.yaml")
    for name in ("n4", "hetero"):
        other = load_config(ROOT / "configs" / f"{name}.yaml")
        assert (other.data, other.seed, other.teacher) == (default.data, default.seed, default.teacher), name
