"""The budgeted search over per-layer sparsities.

A candidate is a head count and an MLP width per block. Candidates are drawn at random and each
is fitted to the MACs budget: the head counts are drawn uniformly per block, the MLP widths are
``round(t * w_i * M)`` for random per-block weights ``w_i`` and the scale ``t`` found by bisection,
so that the candidate's MACs (:func:`devit_mq.model.vit_macs`) lie within ``tolerance`` of the
target; a draw that cannot reach the band (too many heads kept for the budget) is drawn again.
The kept heads and neurons of a candidate are the most important ones (:mod:`.importance`); each
candidate is scored on the validation split and the best one is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..model import VisionTransformer, ViTConfig, vit_macs
from .importance import Importance
from .slicing import slice_model


@dataclass(frozen=True)
class Candidate:
    heads: tuple[int, ...]
    neurons: tuple[int, ...]
    macs: int

    def to_dict(self) -> dict:
        return {"block_heads": list(self.heads), "block_mlp": list(self.neurons), "macs": self.macs}


def _fit_widths(cfg: ViTConfig, heads: tuple[int, ...], weights: np.ndarray, target: int) -> Candidate:
    """MLP widths ``clip(round(t * w_i * M_i), 1, M_i)`` with ``t`` bisected to bring the MACs nearest
    ``target`` (MACs grow with ``t``)."""
    full = np.array([cfg.mlp_at(i) for i in range(cfg.depth)])

    def make(t: float) -> Candidate:
        widths = tuple(int(w) for w in np.clip(np.rint(t * weights * full), 1, full))
        return Candidate(heads, widths, vit_macs(cfg.replace(block_heads=heads, block_mlp=widths)))

    lo, hi = 0.0, 1.0 / float(weights.min())
    for _ in range(40):
        mid = (lo + hi) / 2
        if make(mid).macs < target:
            lo = mid
        else:
            hi = mid
    return min((make(lo), make(hi)), key=lambda c: abs(c.macs - target))


def sample_candidates(cfg: ViTConfig, target_macs: int, count: int, tolerance: float = 0.02, seed: int = 0,
                      max_draws: int | None = None) -> list[Candidate]:
    """``count`` distinct candidates whose MACs are within ``tolerance`` (relative) of ``target_macs``.

    The first is the uniform one when it fits (every head kept, the same MLP fraction everywhere).
    ValueError if the band cannot be reached (a budget below the model's unprunable MACs)."""
    if count < 1 or not 0 < tolerance < 1:
        raise ValueError(f"need count >= 1 and 0 < tolerance < 1, got {count}, {tolerance}")
    rng = np.random.default_rng(seed)
    full_heads = tuple(cfg.heads_at(i) for i in range(cfg.depth))
    found: dict[tuple, Candidate] = {}

    def offer(c: Candidate) -> None:
        if abs(c.macs - target_macs) <= tolerance * target_macs:
            found.setdefault((c.heads, c.neurons), c)

    offer(_fit_widths(cfg, full_heads, np.ones(cfg.depth), target_macs))
    draws, max_draws = 0, max_draws or 200 * count
    while len(found) < count and draws < max_draws:
        draws += 1
        heads = tuple(int(rng.integers(1, h + 1)) for h in full_heads)
        offer(_fit_widths(cfg, heads, rng.uniform(0.1, 1.0, cfg.depth), target_macs))
    if not found:
        raise ValueError(f"no per-layer sparsity reaches {target_macs} MACs +-{100 * tolerance:g}% (the "
                         f"unpruned model has {vit_macs(cfg)}; patch embedding, stem and heads are not pruned)")
    return list(found.values())[:count]


@dataclass
class SearchResult:
    best: Candidate
    best_score: tuple[float, ...]
    scores: list[tuple[float, ...]]
    candidates: list[Candidate]

    def summary(self) -> dict:
        order = sorted(range(len(self.scores)), key=lambda i: self.scores[i], reverse=True)
        return {"candidates": len(self.candidates), "best": self.best.to_dict(),
                "best_val_score": list(self.best_score),
                "top5": [{**self.candidates[i].to_dict(), "val_score": list(self.scores[i])} for i in order[:5]],
                "macs_range": [min(c.macs for c in self.candidates), max(c.macs for c in self.candidates)]}


def search(model: VisionTransformer, importance: Importance, candidates: list[Candidate],
           score: Callable[[VisionTransformer], tuple[float, ...]]) -> SearchResult:
    """Slice ``model`` to each candidate (its most important heads/neurons) and keep the candidate
    whose ``score`` (on the validation split; compared as a tuple, higher is better; ties: earlier) is best."""
    scores = []
    for c in candidates:
        heads, neurons = importance.keep(c.heads, c.neurons)
        scores.append(tuple(float(v) for v in score(slice_model(model, heads, neurons))))
    best = max(range(len(candidates)), key=lambda i: (scores[i], -i))
    return SearchResult(candidates[best], scores[best], scores, candidates)


def prune_to(model: VisionTransformer, importance: Importance, candidate: Candidate) -> VisionTransformer:
    """The physically smaller model of ``candidate``."""
    return slice_model(model, *importance.keep(candidate.heads, candidate.neurons))


__all__ = ["Candidate", "SearchResult", "prune_to", "sample_candidates", "search"]
