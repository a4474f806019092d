"""The DEKD pipeline end to end: data -> class split -> teacher -> (per-group teachers) -> students ->
fusion variants -> the variant chosen on validation -> report -> bundle, then the relation-loss
ablation over seeds (and the per-group-teacher ablation), after which report and bundle are rewritten.

Every choice (epochs, fusion variant) is made on the validation split carved from the training data;
test figures are computed for the report only."""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..data import load_dataset
from ..model import ConfigError, DeViTEnsemble, Manifest, VisionTransformer, count_parameters, save_bundle
from ..model.bundle import STORAGE_DTYPES
from ..profile.balance import balance_students
from .batches import Batches, input_spec
from .checkpoint import StageStore, stage_key
from .config import DEKDConfig, FusionSection
from .distributed import Context, session
from .evaluate import accuracy, evaluate_ensemble, model_cost, predict
from .report import check_targets, format_report, write_report
from .select import RULE, choose_variant
from .split import split_classes
from .stages import (
    build_ensemble,
    distill_student,
    finetune_group_teacher,
    group_data,
    train_fusion,
    train_teacher,
)

M = TypeVar("M", bound=torch.nn.Module)


def quick_config(cfg: DEKDConfig) -> DEKDConfig:
    """A smoke-test version of ``cfg``: one epoch per stage on a small stratified subset."""
    def one_epoch(section: Any) -> Any:
        return dataclasses.replace(section, train=dataclasses.replace(section.train, epochs=1, warmup_epochs=0.0))

    data = cfg.data
    data = dataclasses.replace(data, max_train=min(data.max_train or 512, 512), max_test=min(data.max_test or 256, 256),
                               val_size=min(data.val_size, 64) if data.val_size else 0)
    students = dataclasses.replace(one_epoch(cfg.students), group_teacher_epochs=min(cfg.students.group_teacher_epochs, 1))
    return cfg.replace(name=cfg.name + "-quick", data=data, teacher=one_epoch(cfg.teacher), students=students,
                       fusion=one_epoch(cfg.fusion))


def as_stored(module: M, storage_dtype: str) -> M:
    """Round a module's floating-point weights, in place, to what the bundle will store (e.g. fp16), so
    the report measures the model that ships rather than its fp32 original."""
    dtype = STORAGE_DTYPES[storage_dtype]
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(dtype).to(tensor.dtype))
    return module


def _check_validation(cfg: DEKDConfig, num_val: int) -> None:
    """Choices on validation data need validation data: refuse a config that asks for one without it."""
    if num_val:
        return
    asking = [f"{name}.train.val_every" for name, section in
              (("teacher", cfg.teacher), ("students", cfg.students), ("fusion", cfg.fusion))
              if section.train.val_every]
    if len(cfg.fusion.variants) > 1:
        asking.append("fusion.variants")
    if asking:
        raise ConfigError(f"{', '.join(asking)} choose on validation data, but data.val_size is 0; "
                          "set data.val_size (e.g. 500)")


def _mean_std(values: list[float]) -> dict[str, Any]:
    return {"values": values, "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


class Pipeline:
    """One training run's state: data splits, stage store, teacher(s), and the stage timings."""

    def __init__(self, cfg: DEKDConfig, work: Path, resume: bool, ctx: Context) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.store = StageStore(work, resume)
        self.seconds: dict[str, float] = {}
        self.data = load_dataset(**cfg.data.loader_args())
        self.spec = input_spec(self.data, cfg.data.normalize)
        d = self.data
        self.train = Batches(d.train_images, d.train_labels, self.spec, cfg.seed, ctx.device)
        self.val = Batches(d.val_images, d.val_labels, self.spec, cfg.seed, ctx.device)
        self.test = Batches(d.test_images, d.test_labels, self.spec, cfg.seed, ctx.device)
        _check_validation(cfg, len(self.val))
        self.groups = split_classes(d.num_classes, cfg.groups.num_groups, cfg.groups.seed)
        self.t_cfg = cfg.teacher_config(d.image_shape, d.num_classes)
        self.s_cfgs, self.balance = balance_students(cfg.students.balance, cfg.student_configs(d.image_shape, self.groups))
        self.say(f"data {d.spec['source']}: {len(self.train)} train / {len(self.val)} val / {len(self.test)} test, "
                 f"{d.num_classes} classes; groups {self.groups}; work dir {work}; device {ctx.device}"
                 + (f", {ctx.world} ranks" if ctx.world > 1 else "") + (", mixed precision" if ctx.amp else ""))

    def say(self, text: str) -> None:
        if self.ctx.main:
            print(text, flush=True)

    def _load(self, name: str, key: str, modules: dict[str, torch.nn.Module]) -> dict[str, Any] | None:
        for m in modules.values():
            m.to(self.ctx.device)
        return self.store.load(name, key, modules, verbose=self.ctx.main)

    def _save(self, name: str, key: str, modules: dict[str, torch.nn.Module], stats: dict[str, Any]) -> None:
        """Rank 0 writes the stage; every rank waits for it (all ranks hold the same weights)."""
        if self.ctx.main:
            self.store.save(name, key, modules, stats)
        self.ctx.barrier()

    # -- scores -----------------------------------------------------------------------------------
    def _acc(self, model: torch.nn.Module, split: Batches) -> float | None:
        return accuracy(predict(model, split), split.labels) if len(split) else None

    def _group_score(self, group: list[int]):
        sub = group_data(self.val, group)
        return lambda m: accuracy(predict(m, sub), sub.labels)

    def _fused_score(self, ensemble: DeViTEnsemble) -> float:
        return evaluate_ensemble(ensemble, self.groups, self.val, codecs=("int8",), with_missing=False)[
            "fused_accuracy"]["int8"]

    # -- stages -----------------------------------------------------------------------------------
    def teacher_stage(self) -> VisionTransformer:
        cfg = self.cfg
        self.t_key = stage_key(self.data.spec, self.spec.to_dict(), cfg.seed, self.t_cfg.to_dict(),
                               dataclasses.asdict(cfg.teacher))
        teacher = VisionTransformer(self.t_cfg)
        stats = self._load("teacher", self.t_key, {"teacher": teacher})
        if stats is None:
            teacher, stats = train_teacher(self.t_cfg, cfg.teacher, self.train, cfg.seed,
                                           score=lambda m: accuracy(predict(m, self.val), self.val.labels),
                                           ctx=self.ctx)
            stats["test_accuracy"] = accuracy(predict(teacher, self.test), self.test.labels)
            self._save("teacher", self.t_key, {"teacher": teacher}, stats)
        self.seconds["teacher"] = stats["seconds"]
        self.teacher = as_stored(teacher, cfg.output.storage_dtype)  # evaluate what the bundle stores
        self.teacher_stats = stats
        return self.teacher

    def group_teachers_stage(self) -> list[VisionTransformer]:
        """Per-group teachers (the paper's stage 1), or the shared teacher for every group."""
        section = self.cfg.students
        if not section.group_teacher_epochs:
            return [self.teacher] * len(self.groups)
        teachers = []
        self.group_teacher_report = []
        for i, group in enumerate(self.groups):
            name = f"group_teacher_{i}"
            key = stage_key(self.t_key, self.groups, i, section.group_teacher_epochs, section.group_teacher_lr,
                            dataclasses.asdict(section.train))
            model = VisionTransformer(self.t_cfg)
            st = self._load(name, key, {"teacher": model})
            if st is None:
                # a teacher's logits span every class: score it on the group's, as it teaches them
                model, st = finetune_group_teacher(
                    self.teacher, group, section, self.train, self.cfg.seed + 50 + i, name,
                    lambda m, g=group: self._restricted_accuracy(m, g, self.val), self.ctx)
                st["group_test_accuracy"] = self._restricted_accuracy(model, group, self.test)
                self._save(name, key, {"teacher": model}, st)
            self.seconds[name] = st["seconds"]
            self.group_teacher_report.append({
                "group": group, "val_accuracy_on_group": self._restricted_accuracy(model, group, self.val),
                "test_accuracy_on_group": st["group_test_accuracy"], "best_epoch": st.get("best_epoch"),
                "shared_teacher_val_accuracy_on_group": self._restricted_accuracy(self.teacher, group, self.val),
                "shared_teacher_test_accuracy_on_group": self._restricted_accuracy(self.teacher, group, self.test)})
            teachers.append(model.eval())
        return teachers

    def _restricted_accuracy(self, teacher: VisionTransformer, group: list[int], split: Batches) -> float:
        """A teacher's accuracy on one group's images with its logits restricted to the group."""
        sub = group_data(split, group)
        with torch.no_grad():
            teacher.eval()
            pred = torch.cat([teacher(x)[:, group].argmax(-1).cpu() for x, _ in sub.chunks()])
        return accuracy(pred, sub.labels)

    def students_stage(self, teachers: list[VisionTransformer], relation_weight: float, run_seed: int,
                       tag: str) -> tuple[list[VisionTransformer], list[str]]:
        models, keys = [], []
        cfg = self.cfg
        for i, (s_cfg, group, teacher) in enumerate(zip(self.s_cfgs, self.groups, teachers, strict=True)):
            name = f"{tag}student_{i}"
            seed = cfg.seed + 100 + i + 1000 * run_seed
            own_teacher = teacher is not self.teacher
            key = stage_key(self.t_key, self.groups, i, s_cfg.to_dict(), dataclasses.asdict(cfg.students),
                            relation_weight, seed, own_teacher)
            student = VisionTransformer(s_cfg)
            st = self._load(name, key, {"student": student})
            if st is None:
                student, st = distill_student(teacher, s_cfg, group, cfg.students, self.train, seed, name,
                                              relation_weight, self._group_score(group), self.ctx)
                sub = group_data(self.test, group)
                st["group_accuracy"] = accuracy(predict(student, sub), sub.labels)
                self._save(name, key, {"student": student}, st)
            self.seconds[name] = st["seconds"]
            self.say(f"{name}: accuracy on its group {group}: test {100 * st['group_accuracy']:.2f}%")
            models.append(student)
            keys.append(key)
        return models, keys

    def fusion_stage(self, students: list[VisionTransformer], keys: list[str], section: FusionSection,
                     run_seed: int, name: str) -> DeViTEnsemble:
        seed = self.cfg.seed + 200 + 1000 * run_seed
        key = stage_key(keys, dataclasses.asdict(section), seed)
        ensemble = build_ensemble([VisionTransformer(s.config) for s in students], self.t_cfg,
                                  self.data.num_classes)
        st = self._load(name, key, {"ensemble": ensemble})
        if st is None:
            ensemble, st = train_fusion(self.teacher, students, section, self.train, self.data.num_classes, seed,
                                        name, self.groups, self._fused_score, self.ctx)
            self._save(name, key, {"ensemble": ensemble}, st)
        self.seconds[name] = st["seconds"]
        return as_stored(ensemble, self.cfg.output.storage_dtype)

    def evaluate(self, ensemble: DeViTEnsemble) -> dict[str, Any]:
        return {"val": evaluate_ensemble(ensemble, self.groups, self.val),
                "test": evaluate_ensemble(ensemble, self.groups, self.test)}

    def choose_fusion(self, students, keys) -> tuple[int, list[FusionSection], list[DeViTEnsemble], list[dict]]:
        """Train every fusion variant on the same students; the validation split picks one."""
        candidates = self.cfg.fusion.candidates()
        ensembles, results = [], []
        for k, section in enumerate(candidates):
            name = "fusion" if len(candidates) == 1 else f"fusion_v{k}"
            ensembles.append(self.fusion_stage(students, keys, section, 0, name))
            results.append(self.evaluate(ensembles[-1]))
        chosen = choose_variant([r["val"] for r in results])
        return chosen, candidates, ensembles, results

    def relation_run(self, teachers, relation_weight: float, run_seed: int, section: FusionSection,
                     tag: str) -> dict[str, Any]:
        """Students + the chosen fusion variant at one seed; its val and test figures."""
        students, keys = self.students_stage(teachers, relation_weight, run_seed, tag)
        result = self.evaluate(self.fusion_stage(students, keys, section, run_seed, f"{tag}fusion"))
        return {"seed": run_seed, "relation_weight": relation_weight, **result}


def _tag(run_seed: int, relation: bool) -> str:
    return ("" if run_seed == 0 else f"seed{run_seed}_") + ("" if relation else "ablation_")


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def pick(split: str, fn) -> dict[str, Any]:
        return _mean_std([fn(r[split]) for r in runs])

    return {split: {"fused_int8": pick(split, lambda r: r["fused_accuracy"]["int8"]),
                    "submodel_group_accuracy": [
                        _mean_std([r[split]["submodel_group_accuracy"][i] for r in runs])
                        for i in range(len(runs[0][split]["submodel_group_accuracy"]))]}
            for split in ("val", "test")}


def run(cfg: DEKDConfig, out: str | Path | None = None, work_dir: str | Path | None = None,
        resume: bool = False, stop_after: str | None = None, ablation: bool | None = None) -> dict[str, Any] | None:
    """Train, evaluate and write the bundle + report; returns the report (None if stopped early)."""
    torch.set_num_threads(cfg.threads)
    out = Path(out or cfg.output.bundle)
    work = Path(work_dir or cfg.output.work_dir or out.with_name(out.name + ".work"))
    with session(cfg.device, cfg.amp) as ctx:
        return _run(Pipeline(cfg, work, resume, ctx), out, stop_after,
                    cfg.ablation.enabled if ablation is None else ablation)


def _run(p: Pipeline, out: Path, stop_after: str | None, run_ablation: bool) -> dict[str, Any] | None:
    cfg = p.cfg

    teacher = p.teacher_stage()
    teacher_acc = accuracy(predict(teacher, p.test), p.test.labels)
    teacher_val = p._acc(teacher, p.val)
    p.say(f"teacher accuracy: test {100 * teacher_acc:.2f}%"
          + (f", val {100 * teacher_val:.2f}%" if teacher_val is not None else ""))
    if stop_after == "teacher":
        return None
    teachers = p.group_teachers_stage()
    students, keys = p.students_stage(teachers, cfg.students.relation_weight, 0, "")
    if stop_after == "students":
        return None
    chosen, candidates, ensembles, results = p.choose_fusion(students, keys)
    ensemble, result = ensembles[chosen], results[chosen]
    report = _report(p, teacher_acc, teacher_val, ensemble, result, candidates, results, chosen)
    _write(out, p, ensemble, report)
    if stop_after == "fusion" or not run_ablation:
        return report

    # -- ablations: the same budget without the feature-matching (relation) loss, per seed -----------
    section = candidates[chosen]
    with_rel, without = [], []
    for s in cfg.ablation.seeds:
        main = s == 0 and cfg.students.relation_weight
        with_rel.append({"seed": 0, "relation_weight": cfg.students.relation_weight, **result} if main else
                        p.relation_run(teachers, cfg.students.relation_weight, s, section, _tag(s, True)))
        without.append(p.relation_run(teachers, 0.0, s, section, _tag(s, False)))
    report["relation_ablation"] = {
        "seeds": list(cfg.ablation.seeds), "fusion_variant": chosen,
        "with_relation": {"runs": with_rel, **_summary(with_rel)},
        "without_relation": {"runs": without, **_summary(without)},
    }
    if cfg.ablation.group_teachers and cfg.students.group_teacher_epochs:
        shared = [p.teacher] * len(p.groups)
        report["group_teacher_ablation"] = {
            "with_group_teachers": {k: result[k] for k in ("val", "test")},
            "shared_teacher": p.relation_run(shared, cfg.students.relation_weight, 0, section, "shared_teacher_")}
    report["stage_seconds"] = p.seconds
    _write(out, p, ensemble, report)
    return report


def _report(p: Pipeline, teacher_acc: float, teacher_val: float | None, ensemble: DeViTEnsemble,
            result: dict[str, Any], candidates: list[FusionSection], results: list[dict[str, Any]],
            chosen: int) -> dict[str, Any]:
    cfg, test, val = p.cfg, result["test"], result["val"]
    t_cost = model_cost(p.teacher)
    report: dict[str, Any] = {
        "name": cfg.name,
        "dataset": p.data.spec,
        "num_train": len(p.train), "num_val": len(p.val), "num_test": len(p.test),
        "class_groups": p.groups,
        "teacher": {"accuracy": teacher_acc, "val_accuracy": teacher_val,
                    "best_epoch": p.teacher_stats.get("best_epoch"), **t_cost},
        "group_teachers": getattr(p, "group_teacher_report", None),
        "submodels": [
            {"group": g, "accuracy_on_group": acc, "val_accuracy_on_group": v_acc, **c,
             "flops_ratio": c["flops"] / t_cost["flops"]}
            for g, acc, v_acc, c in zip(p.groups, test["submodel_group_accuracy"], val["submodel_group_accuracy"],
                                        (model_cost(s) for s in ensemble.submodels), strict=True)
        ],
        "fusion_params": count_parameters(ensemble.fusion),
        "fused_accuracy": test["fused_accuracy"],
        "missing_edge": test["missing_edge"],
        "validation": val,
        "fusion_selection": {
            "rule": RULE, "chosen": chosen,
            "variants": [{"settings": {k: dataclasses.asdict(c)[k] for k in
                                       ("finetune", "feature_dropout", "orphan_loss", "codecs", "student_lr_scale")},
                          "val": r["val"], "test": r["test"]} for c, r in zip(candidates, results, strict=True)],
        },
        "settings": {"fusion_finetune": candidates[chosen].finetune,
                     "feature_dropout": candidates[chosen].feature_dropout,
                     "orphan_loss": candidates[chosen].orphan_loss, "codecs": candidates[chosen].codecs,
                     "relation_weight": cfg.students.relation_weight,
                     "group_teacher_epochs": cfg.students.group_teacher_epochs},
        "relation_ablation": None,
        "stage_seconds": p.seconds,
    }
    if p.balance:
        report["balance"] = p.balance
    report["targets"] = check_targets(report)
    return report


def _write(out: Path, p: Pipeline, ensemble: DeViTEnsemble, report: dict[str, Any]) -> None:
    """Bundle + report (rank 0), then the report printed."""
    if not p.ctx.main:
        return
    cfg, d = p.cfg, p.data
    splits = {"train": len(p.train), "val": len(p.val), "test": len(p.test),
              "val_from": "training data (stratified, seeded by data.seed + 2)"}
    manifest = Manifest(
        classes=list(d.classes), class_groups=p.groups, submodels=list(p.s_cfgs), fusion=ensemble.fusion.config,
        input=p.spec, storage_dtype=cfg.output.storage_dtype,
        metadata={"dataset": d.spec, "splits": splits, "report": "report.json", "config": cfg.to_dict(),
                  "stage_seconds": report["stage_seconds"], "torch": torch.__version__,
                  **({"balance": p.balance} if p.balance else {}),
                  "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    )
    save_bundle(out, manifest, ensemble, p.teacher if cfg.output.ship_teacher else None)
    write_report(report, out)
    print(f"bundle written to {out}")
    print(format_report(report), flush=True)
