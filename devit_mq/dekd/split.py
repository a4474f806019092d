"""DeViT's class split: a seeded shuffle of the classes dealt into near-equal disjoint groups."""

from __future__ import annotations

import numpy as np

from ..model import ConfigError


def split_classes(num_classes: int, num_groups: int, seed: int = 0) -> list[list[int]]:
    """Disjoint groups covering ``0..num_classes-1``; sizes differ by at most one (larger groups first).

    Each group is sorted, so a sub-model's local label ``j`` is the ``j``-th smallest class it owns."""
    if num_groups < 1 or num_classes < num_groups:
        raise ConfigError(f"cannot split {num_classes} classes into {num_groups} non-empty groups")
    order = np.random.default_rng(seed).permutation(num_classes)
    base, extra = divmod(num_classes, num_groups)
    groups, start = [], 0
    for g in range(num_groups):
        size = base + (1 if g < extra else 0)
        groups.append(sorted(int(c) for c in order[start:start + size]))
        start += size
    return groups
