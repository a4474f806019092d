"""Choices made on the validation split: which fusion variant ships.

Test figures never enter a choice; they are computed for every candidate only to be reported."""

from __future__ import annotations

from typing import Any

from .report import MISSING_EDGE_MAX_DROP, worst_missing_edge_drop

RULE = (f"on validation: among the variants whose worst missing-edge drop on the present edges' classes "
        f"is <= {100 * MISSING_EDGE_MAX_DROP:.0f} points, the highest int8 fused accuracy (ties: the earlier "
        f"variant); if none qualifies, the smallest such drop")


def choose_variant(val_results: list[dict[str, Any]]) -> int:
    """Index of the variant to ship, from each variant's ``evaluate_ensemble`` result on validation."""
    if not val_results:
        raise ValueError("no fusion variant to choose from")
    drops = [worst_missing_edge_drop(r["missing_edge"]) for r in val_results]
    # a 1e-9 slack: accuracies are float32 ratios, and 0.02 must count as "within 2 points"
    qualified = [i for i, d in enumerate(drops) if d <= MISSING_EDGE_MAX_DROP + 1e-9]
    if qualified:
        return max(qualified, key=lambda i: (val_results[i]["fused_accuracy"]["int8"], -i))
    return min(range(len(drops)), key=lambda i: (drops[i], i))
