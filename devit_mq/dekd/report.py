"""The training report: one JSON document (``report.json`` beside the bundle) and a printed table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

REPORT_FILE = "report.json"

# Targets of the default setting (N=2 sub-models, each at most 1/3 of the teacher's FLOPs).
TEACHER_MIN_ACCURACY = 0.97
INT8_MAX_DROP = 0.01
MISSING_EDGE_MAX_DROP = 0.02
SUBMODEL_MAX_FLOPS_RATIO = 1 / 3


def worst_missing_edge_drop(missing_edge: list[dict[str, Any]]) -> float:
    """The largest loss, over single missing edges, on the classes of the edges still present
    (full model minus degraded model; 0 with one edge)."""
    return max((m["full_model_remaining_classes_accuracy"] - m["remaining_classes_accuracy"]
                for m in missing_edge), default=0.0)


def check_targets(report: dict[str, Any]) -> dict[str, Any]:
    """Each target with the measured value on test and whether it is met (reported, never enforced)."""
    teacher = report["teacher"]["accuracy"]
    int8 = report["fused_accuracy"]["int8"]
    worst_missing = worst_missing_edge_drop(report["missing_edge"])
    worst_ratio = max(s["flops_ratio"] for s in report["submodels"])
    return {
        "teacher_accuracy_at_least_0.97": {"value": teacher, "met": teacher >= TEACHER_MIN_ACCURACY},
        "int8_fused_within_1pt_of_teacher": {"value": teacher - int8, "met": teacher - int8 <= INT8_MAX_DROP},
        "missing_edge_remaining_classes_within_2pt": {"value": worst_missing,
                                                       "met": worst_missing <= MISSING_EDGE_MAX_DROP},
        "submodel_flops_at_most_1/3_teacher": {"value": worst_ratio, "met": worst_ratio <= SUBMODEL_MAX_FLOPS_RATIO},
    }


def write_report(report: dict[str, Any], directory: str | Path) -> Path:
    path = Path(directory) / REPORT_FILE
    path.write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
    return path


def _pct(x: float | None) -> str:
    return "  n/a " if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:6.2f}"


def _spread(stat: dict[str, Any]) -> str:
    return f"{100 * stat['mean']:.2f} +- {100 * stat['std']:.2f} (n={len(stat['values'])})"


def format_report(report: dict[str, Any]) -> str:
    t = report["teacher"]
    lines = [f"DEKD report: {report['name']}  (data {report['dataset']['source']}, {report['num_train']} train / "
             f"{report['num_val']} val / {report['num_test']} test, groups {report['class_groups']})",
             "",
             f"{'model':<14}{'test %':>8}{'val %':>8}{'params':>11}{'MFLOPs':>9}{'/teacher':>10}",
             f"{'teacher':<14}{_pct(t['accuracy']):>8}{_pct(t['val_accuracy']):>8}{t['params']:>11,}"
             f"{t['flops'] / 1e6:>9.1f}{1.0:>10.2f}"]
    for i, s in enumerate(report["submodels"]):
        lines.append(f"{f'sub-model {i}':<14}{_pct(s['accuracy_on_group']):>8}{_pct(s['val_accuracy_on_group']):>8}"
                     f"{s['params']:>11,}{s['flops'] / 1e6:>9.1f}{s['flops_ratio']:>10.2f}   (on its group {s['group']})")
    for i, g in enumerate(report.get("group_teachers") or []):
        lines.append(f"group teacher {i}: on its group test {_pct(g['test_accuracy_on_group'])} val "
                     f"{_pct(g['val_accuracy_on_group'])} (shared teacher: test "
                     f"{_pct(g['shared_teacher_test_accuracy_on_group'])} val "
                     f"{_pct(g['shared_teacher_val_accuracy_on_group'])})")
    f, fv = report["fused_accuracy"], report["validation"]["fused_accuracy"]
    lines += ["", f"fused accuracy %:  test fp32 {_pct(f['fp32'])}  fp16 {_pct(f['fp16'])}  int8 {_pct(f['int8'])}"
                  f"   | val fp32 {_pct(fv['fp32'])}  int8 {_pct(fv['int8'])}"]
    for m in report["missing_edge"]:
        lines.append(f"edge {m['missing_edge']} missing (test):  overall {_pct(m['accuracy'])}   remaining classes "
                     f"{_pct(m['remaining_classes_accuracy'])} (full model {_pct(m['full_model_remaining_classes_accuracy'])})"
                     f"   its own classes {_pct(m['missing_classes_accuracy'])}")
    sel = report["fusion_selection"]
    lines += ["", f"fusion variants (chosen: {sel['chosen']}; rule: {sel['rule']})"]
    for k, v in enumerate(sel["variants"]):
        drop_v = worst_missing_edge_drop(v["val"]["missing_edge"])
        drop_t = worst_missing_edge_drop(v["test"]["missing_edge"])
        lines.append(f"  {'*' if k == sel['chosen'] else ' '}{k} {v['settings']}: int8 val {_pct(v['val']['fused_accuracy']['int8'])}"
                     f" test {_pct(v['test']['fused_accuracy']['int8'])}; missing-edge drop val {_pct(drop_v)} test {_pct(drop_t)}")
    ab = report.get("relation_ablation")
    if ab:
        for name in ("with_relation", "without_relation"):
            side = ab[name]
            lines.append(f"{name.replace('_', ' ')}: fused int8 test {_spread(side['test']['fused_int8'])}, "
                         f"val {_spread(side['val']['fused_int8'])}")
    else:
        lines.append("relation-loss ablation: not run")
    gt = report.get("group_teacher_ablation")
    if gt:
        lines.append(f"per-group teachers: fused int8 test {_pct(gt['with_group_teachers']['test']['fused_accuracy']['int8'])}"
                     f" val {_pct(gt['with_group_teachers']['val']['fused_accuracy']['int8'])}; shared teacher: test "
                     f"{_pct(gt['shared_teacher']['test']['fused_accuracy']['int8'])} val "
                     f"{_pct(gt['shared_teacher']['val']['fused_accuracy']['int8'])}")
    lines.append("")
    lines.append("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in report["stage_seconds"].items()))
    for name, target in report["targets"].items():
        lines.append(f"target {name} (test): {'met' if target['met'] else 'MISSED'} ({target['value']:.4f})")
    return "\n".join(lines)
