"""The DEKD pipeline end to end: data -> class split -> teacher -> students -> fusion -> report -> bundle
(-> the ablation without the relation loss, after which report and bundle are rewritten)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..data import load_dataset
from ..model import DeViTEnsemble, Manifest, VisionTransformer, count_parameters, save_bundle
from ..model.bundle import STORAGE_DTYPES
from .batches import Batches, input_spec
from .checkpoint import StageStore, stage_key
from .config import DEKDConfig
from .evaluate import accuracy, evaluate_ensemble, model_cost, predict
from .report import check_targets, format_report, write_report
from .split import split_classes
from .stages import build_ensemble, distill_student, group_data, train_fusion, train_teacher

M = TypeVar("M", bound=torch.nn.Module)

STAGES = ("teacher", "students", "fusion", "ablation")


def quick_config(cfg: DEKDConfig) -> DEKDConfig:
    """A smoke-test version of ``cfg``: one epoch per stage on a small stratified subset."""
    def one_epoch(section: Any) -> Any:
        return dataclasses.replace(section, train=dataclasses.replace(section.train, epochs=1, warmup_epochs=0.0))

    data = cfg.data
    data = dataclasses.replace(data, max_train=min(data.max_train or 512, 512), max_test=min(data.max_test or 256, 256))
    students = dataclasses.replace(one_epoch(cfg.students), group_teacher_epochs=min(cfg.students.group_teacher_epochs, 1))
    return cfg.replace(name=cfg.name + "-quick", data=data, teacher=one_epoch(cfg.teacher), students=students,
                       fusion=one_epoch(cfg.fusion))


def run(cfg: DEKDConfig, out: str | Path | None = None, work_dir: str | Path | None = None,
        resume: bool = False, stop_after: str | None = None, ablation: bool | None = None) -> dict[str, Any] | None:
    """Train, evaluate and write the bundle + report; returns the report (None if stopped early)."""
    torch.set_num_threads(cfg.threads)
    out = Path(out or cfg.output.bundle)
    work = Path(work_dir or cfg.output.work_dir or out.with_name(out.name + ".work"))
    store = StageStore(work, resume)
    run_ablation = cfg.ablation.enabled if ablation is None else ablation
    seconds: dict[str, float] = {}

    data = load_dataset(**dataclasses.asdict(cfg.data))
    spec = input_spec(data)
    train = Batches(data.train_images, data.train_labels, spec, cfg.seed)
    test = Batches(data.test_images, data.test_labels, spec, cfg.seed)
    groups = split_classes(data.num_classes, cfg.groups.num_groups, cfg.groups.seed)
    t_cfg = cfg.teacher_config(data.image_shape, data.num_classes)
    s_cfgs = cfg.student_configs(data.image_shape, groups)
    print(f"data {data.spec['source']}: {len(train)} train / {len(test)} test, {data.num_classes} classes; "
          f"groups {groups}; work dir {work}")

    # -- teacher --------------------------------------------------------------------------------
    t_key = stage_key(data.spec, cfg.seed, t_cfg.to_dict(), dataclasses.asdict(cfg.teacher))
    teacher = VisionTransformer(t_cfg)
    stats = store.load("teacher", t_key, {"teacher": teacher})
    if stats is None:
        teacher, stats = train_teacher(t_cfg, cfg.teacher, train, cfg.seed)
        stats["test_accuracy"] = accuracy(predict(teacher, test), test.labels)
        store.save("teacher", t_key, {"teacher": teacher}, stats)
    seconds["teacher"] = stats["seconds"]
    # report what ships: the bundle stores weights in cfg.output.storage_dtype, so evaluate those
    teacher_acc = accuracy(predict(as_stored(teacher, cfg.output.storage_dtype), test), test.labels)
    print(f"teacher test accuracy {100 * teacher_acc:.2f}%")
    if stop_after == "teacher":
        return None

    def students_stage(relation_weight: float, tag: str) -> tuple[list[VisionTransformer], list[str], list[float]]:
        models, keys, accs = [], [], []
        for i, (s_cfg, group) in enumerate(zip(s_cfgs, groups, strict=True)):
            name = f"{tag}student_{i}"
            key = stage_key(t_key, groups, i, s_cfg.to_dict(), dataclasses.asdict(cfg.students), relation_weight)
            student = VisionTransformer(s_cfg)
            st = store.load(name, key, {"student": student})
            if st is None:
                student, st = distill_student(teacher, s_cfg, group, cfg.students, train, cfg.seed + 100 + i,
                                              name, relation_weight)
                sub = group_data(test, group)
                st["group_accuracy"] = accuracy(predict(student, sub), sub.labels)
                store.save(name, key, {"student": student}, st)
            seconds[name] = st["seconds"] + st.get("group_teacher", {}).get("seconds", 0.0)
            print(f"{name}: accuracy on its group {groups[i]} {100 * st['group_accuracy']:.2f}%")
            models.append(student)
            keys.append(key)
            accs.append(st["group_accuracy"])
        return models, keys, accs

    def fusion_stage(students: list[VisionTransformer], keys: list[str], tag: str) -> DeViTEnsemble:
        name = f"{tag}fusion"
        key = stage_key(keys, dataclasses.asdict(cfg.fusion))
        ensemble = build_ensemble([VisionTransformer(s.config) for s in students], t_cfg, data.num_classes)
        st = store.load(name, key, {"ensemble": ensemble})
        if st is None:
            ensemble, st = train_fusion(teacher, students, cfg.fusion, train, data.num_classes, cfg.seed + 200, name,
                                         groups)
            store.save(name, key, {"ensemble": ensemble}, st)
        seconds[name] = st["seconds"]
        return ensemble

    students, keys, distilled_accs = students_stage(cfg.students.relation_weight, "")
    if stop_after == "students":
        return None
    ensemble = as_stored(fusion_stage(students, keys, ""), cfg.output.storage_dtype)
    result = evaluate_ensemble(ensemble, groups, test)
    t_cost = model_cost(teacher)
    report: dict[str, Any] = {
        "name": cfg.name,
        "dataset": data.spec,
        "num_train": len(train),
        "num_test": len(test),
        "class_groups": groups,
        "teacher": {"accuracy": teacher_acc, **t_cost},
        "submodels": [
            {"group": g, "accuracy_on_group": acc, "accuracy_on_group_after_distillation": d_acc, **c,
             "flops_ratio": c["flops"] / t_cost["flops"]}
            for g, acc, d_acc, c in zip(groups, result["submodel_group_accuracy"], distilled_accs,
                                        (model_cost(s) for s in ensemble.submodels), strict=True)
        ],
        "fusion_params": count_parameters(ensemble.fusion),
        "fused_accuracy": result["fused_accuracy"],
        "missing_edge": result["missing_edge"],
        "settings": {"fusion_finetune": cfg.fusion.finetune, "feature_dropout": cfg.fusion.feature_dropout,
                     "orphan_loss": cfg.fusion.orphan_loss,
                     "codecs": cfg.fusion.codecs, "relation_weight": cfg.students.relation_weight},
        "ablation_no_relation": None,
        "stage_seconds": seconds,
    }
    report["targets"] = check_targets(report)
    _write(out, cfg, data.spec, spec, groups, s_cfgs, ensemble, teacher, data.classes, report)
    print(format_report(report))
    if stop_after == "fusion" or not run_ablation:
        return report

    # -- ablation: the same budget without the feature-matching (relation) loss -----------------------
    ab_students, ab_keys, ab_distilled = students_stage(0.0, "ablation_")
    ab_ensemble = as_stored(fusion_stage(ab_students, ab_keys, "ablation_"), cfg.output.storage_dtype)
    ab = evaluate_ensemble(ab_ensemble, groups, test)
    ab["submodel_group_accuracy_after_distillation"] = ab_distilled
    report["ablation_no_relation"] = ab
    report["stage_seconds"] = seconds
    _write(out, cfg, data.spec, spec, groups, s_cfgs, ensemble, teacher, data.classes, report)
    print(format_report(report))
    return report


def as_stored(module: M, storage_dtype: str) -> M:
    """Round a module's floating-point weights, in place, to what the bundle will store (e.g. fp16), so
    the report measures the model that ships rather than its fp32 original."""
    dtype = STORAGE_DTYPES[storage_dtype]
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(dtype).to(tensor.dtype))
    return module


def _write(out: Path, cfg: DEKDConfig, data_spec: dict, spec, groups, s_cfgs, ensemble: DeViTEnsemble,
           teacher: VisionTransformer, classes: list[str], report: dict[str, Any]) -> None:
    manifest = Manifest(
        classes=list(classes), class_groups=groups, submodels=list(s_cfgs), fusion=ensemble.fusion.config,
        input=spec, storage_dtype=cfg.output.storage_dtype,
        metadata={"dataset": data_spec, "report": "report.json", "config": cfg.to_dict(),
                  "stage_seconds": report["stage_seconds"], "torch": torch.__version__,
                  "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    )
    save_bundle(out, manifest, ensemble, teacher if cfg.output.ship_teacher else None)
    write_report(report, out)
    print(f"bundle written to {out}")
