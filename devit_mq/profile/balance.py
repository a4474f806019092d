"""Sizing each sub-model for its device: equal predicted latency within a total compute budget.

The slowest edge sets every request's latency, so on unequal devices an equal split wastes the
fast ones. Given one :class:`~devit_mq.profile.device.DeviceProfile` per edge and a list of
candidate shapes per edge, :func:`balance` picks one shape per edge so that the *largest* predicted
edge latency is as small as possible while the parts together keep at least the budget's MACs
(by default what the equal split computes, so the decomposition keeps its total capacity and only
moves it to where it runs fastest). The weakest device therefore gets the smallest model.

Exact for this objective: for a latency bound ``L`` the best each edge can do is its largest
candidate predicted under ``L``; total MACs grow with ``L``, so the smallest feasible ``L`` is found
by a scan over the sorted candidate latencies (no enumeration of combinations).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from devit_mq.model import ViTConfig, vit_macs

from .device import DeviceProfile, ProfileError


@dataclass(frozen=True)
class Choice:
    config: ViTConfig
    macs: int
    predicted_ms: float

    def to_dict(self) -> dict:
        return {"embed_dim": self.config.embed_dim, "depth": self.config.depth, "num_heads": self.config.num_heads,
                "macs": self.macs, "predicted_ms": round(self.predicted_ms, 4)}


def candidates(base: ViTConfig, widths: Sequence[int], depths: Sequence[int]) -> list[ViTConfig]:
    """``base`` at every width x depth (its heads, MLP ratio and input side kept; widths the head
    count does not divide are skipped)."""
    out = [base.replace(embed_dim=w, depth=d) for w in widths for d in depths if w % base.num_heads == 0]
    if not out:
        raise ProfileError(f"no candidate shapes: widths {list(widths)} are not multiples of {base.num_heads} heads")
    return out


def balance(profiles: Sequence[DeviceProfile], options: Sequence[Sequence[ViTConfig]], budget_macs: int
            ) -> list[Choice]:
    """One choice per edge (``profiles[i]`` runs a shape from ``options[i]``) minimising the largest
    predicted latency subject to total MACs >= ``budget_macs``. ProfileError if even the largest
    candidates cannot reach the budget."""
    if len(profiles) != len(options):
        raise ProfileError(f"{len(profiles)} device profiles for {len(options)} sub-models")
    scored = [sorted((Choice(c, vit_macs(c), p.predict_ms(c)) for c in opts), key=lambda ch: (ch.predicted_ms, -ch.macs))
              for p, opts in zip(profiles, options, strict=True)]
    most = sum(max(ch.macs for ch in edge) for edge in scored)
    if most < budget_macs:
        raise ProfileError(f"the candidate shapes reach at most {most:,} MACs in total, under the budget of "
                           f"{budget_macs:,}: allow wider or deeper sub-models")
    for bound in sorted({ch.predicted_ms for edge in scored for ch in edge}):
        picks = [max((ch for ch in edge if ch.predicted_ms <= bound), key=lambda ch: ch.macs, default=None)
                 for edge in scored]
        if all(picks) and sum(ch.macs for ch in picks) >= budget_macs:  # type: ignore[union-attr]
            return picks  # type: ignore[return-value]
    raise AssertionError("unreachable: the largest bound admits every candidate")


def balance_students(section, bases: Sequence[ViTConfig]) -> tuple[list[ViTConfig], dict | None]:
    """The sub-model shapes a training config's ``students.balance`` asks for (``bases`` unchanged
    when it names no profiles), and the record the bundle keeps of the choice: each part's device,
    shape, MACs and predicted latency, and the equal split's predicted latencies beside them."""
    from .device import load_profile

    if not section.profiles:
        return list(bases), None
    if len(section.profiles) != len(bases):
        raise ProfileError(f"students.balance.profiles: {len(section.profiles)} profiles for {len(bases)} sub-models "
                           "(one per class group, in part order)")
    profiles = [load_profile(p) for p in section.profiles]
    options = [candidates(b, section.widths, section.depths or [b.depth]) for b in bases]
    budget = section.budget_macs or sum(vit_macs(b) for b in bases)
    picks = balance(profiles, options, budget)
    record = {"budget_macs": budget, "widths": list(section.widths), "depths": list(section.depths),
              "parts": [{"device": p.device, "profile": str(path), **ch.to_dict(),
                         "equal_split_predicted_ms": round(p.predict_ms(b), 4)}
                        for p, path, ch, b in zip(profiles, section.profiles, picks, bases, strict=True)]}
    return [ch.config for ch in picks], record
