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


def check_targets(report: dict[str, Any]) -> dict[str, Any]:
    """Each target with the measured value and whether it is met (reported, never enforced)."""
    teacher = report["teacher"]["accuracy"]
    int8 = report["fused_accuracy"]["int8"]
    worst_missing = max((m["full_model_remaining_classes_accuracy"] - m["remaining_classes_accuracy"]
                         for m in report["missing_edge"]), default=0.0)
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


def format_report(report: dict[str, Any]) -> str:
    t = report["teacher"]
    lines = [f"DEKD report: {report['name']}  (data {report['dataset']['source']}, "
             f"{report['num_train']} train / {report['num_test']} test, groups {report['class_groups']})",
             "",
             f"{'model':<14}{'acc %':>8}{'params':>11}{'MFLOPs':>9}{'/teacher':>10}",
             f"{'teacher':<14}{_pct(t['accuracy']):>8}{t['params']:>11,}{t['flops'] / 1e6:>9.1f}{1.0:>10.2f}"]
    for i, s in enumerate(report["submodels"]):
        lines.append(f"{f'sub-model {i}':<14}{_pct(s['accuracy_on_group']):>8}{s['params']:>11,}"
                     f"{s['flops'] / 1e6:>9.1f}{s['flops_ratio']:>10.2f}   (on its group {s['group']})")
    f = report["fused_accuracy"]
    lines += ["", f"fused accuracy %:  fp32 {_pct(f['fp32'])}   fp16 {_pct(f['fp16'])}   int8 {_pct(f['int8'])}"]
    for m in report["missing_edge"]:
        lines.append(f"edge {m['missing_edge']} missing:  overall {_pct(m['accuracy'])}   remaining classes "
                     f"{_pct(m['remaining_classes_accuracy'])} (full model {_pct(m['full_model_remaining_classes_accuracy'])})"
                     f"   its own classes {_pct(m['missing_classes_accuracy'])}")
    ab = report.get("ablation_no_relation")
    if ab:
        fa = ab["fused_accuracy"]
        lines.append(f"ablation without relation loss:  fused fp32 {_pct(fa['fp32'])}  int8 {_pct(fa['int8'])}   "
                     f"sub-models on groups {' '.join(_pct(a) for a in ab['submodel_group_accuracy'])}")
    else:
        lines.append("ablation without relation loss: not run")
    lines.append("")
    lines.append("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in report["stage_seconds"].items()))
    for name, target in report["targets"].items():
        lines.append(f"target {name}: {'met' if target['met'] else 'MISSED'} ({target['value']:.4f})")
    return "\n".join(lines)
