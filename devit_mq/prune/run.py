"""``devit-mq prune``: importance -> budgeted search on validation -> slicing -> recovery -> bundle.

Every choice (which candidate, which recovery epoch) is made on the validation split; test figures
are computed only to be reported. The validation split is the bundle's own (``metadata.dataset``
with ``val_size``) or, for a bundle trained without one, carved the same way (stratified, seeded by
``data.seed + 2``) from the training images: then those images were seen in training, which the
report records (``val_seen_in_training``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import load_dataset
from ..dekd.batches import Batches
from ..dekd.config import StudentsSection, build
from ..dekd.evaluate import ensemble_features
from ..dekd.stages import distill_student, group_data
from ..model import (
    BundleError,
    DeViTEnsemble,
    VisionTransformer,
    ViTConfig,
    concat_features,
    count_parameters,
    load_ensemble,
    load_teacher,
    save_bundle,
    vit_macs,
)
from .importance import ImportanceSettings, estimate_importance
from .search import prune_to, sample_candidates, search

REPORT_FILE = "report.json"


@dataclass(frozen=True)
class PruneSettings:
    parts: tuple[int, ...]
    macs: float = 0.5                 # target MACs as a fraction of the unpruned sub-model's
    tolerance: float = 0.02           # candidates within +-tolerance of the target
    candidates: int = 100
    importance_batches: int = 8
    importance_batch_size: int = 64
    recover_epochs: int = 20
    recover_lr: float = 5e-4
    token_weight: float = 1.0         # recovery: MSE of the prefix tokens to the unpruned sub-model's
    val_size: int = 500               # only for a bundle without a validation split of its own
    seed: int = 0
    quick: bool = False               # smoke mode: few candidates, batches, images, one epoch
    latency_rounds: int = 5           # interleaved rounds of the before/after batch-1 timing
    latency_repeats: int = 20         # forwards per round (median)

    def effective(self) -> PruneSettings:
        if not self.quick:
            return self
        return dataclasses.replace(self, candidates=min(self.candidates, 6), importance_batches=2,
                                   importance_batch_size=32, recover_epochs=min(self.recover_epochs, 1),
                                   latency_rounds=1, latency_repeats=3)


QUICK_IMAGES = 160  # per split in --quick


class Split:
    """One split as batches, plus every part's prefix tokens on it (the unpruned parts' are fixed)."""

    def __init__(self, ensemble: DeViTEnsemble, images, labels, spec, seed: int) -> None:
        self.data = Batches(images, labels, spec, seed)
        self.parts = ensemble_features(ensemble, self.data)

    @torch.no_grad()
    def prefix(self, model: VisionTransformer) -> torch.Tensor:
        """``model``'s prefix tokens on this split."""
        model.eval()
        return torch.cat([model.forward_prefix(x) for x, _ in self.data.chunks()])

    @torch.no_grad()
    def fused(self, ensemble: DeViTEnsemble, part: int, model: VisionTransformer | None = None) -> dict[str, float]:
        """Fused accuracy and mean log-probability of the true class with ``part`` computed by ``model``."""
        parts = list(self.parts)
        if model is not None:
            parts[part] = self.prefix(model)
        cfg = ensemble.fusion.config
        logits = ensemble.fusion(concat_features(parts, cfg.in_dims, cfg.num_prefix_tokens))
        labels = self.data.labels
        log_p = logits.log_softmax(-1).gather(1, labels.view(-1, 1)).mean()
        return {"accuracy": float((logits.argmax(-1) == labels).float().mean()), "log_prob": float(log_p)}


def _dataset(manifest, settings: PruneSettings):
    spec = dict(manifest.metadata.get("dataset") or {})
    if "source" not in spec:
        raise BundleError("the bundle's manifest records no data set (metadata.dataset): cannot prune without data")
    own_val = bool(spec.get("val_size"))
    if not own_val:
        spec["val_size"] = settings.val_size
    data = load_dataset(**spec)
    return data, spec, own_val


def _subset(images, labels, n: int, seed: int):
    if len(labels) <= n:
        return images, labels
    keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:n].sort().values.numpy()
    return images[keep], labels[keep]


def _students_section(manifest, settings: PruneSettings) -> StudentsSection:
    """The bundle's own student objective (CE/KD/relation weights, augmentation), recovery's schedule."""
    stored = (manifest.metadata.get("config") or {}).get("students")
    section = build(StudentsSection, stored, "students") if stored else StudentsSection()
    train = dataclasses.replace(section.train, epochs=settings.recover_epochs, lr=settings.recover_lr,
                                warmup_epochs=min(section.train.warmup_epochs, 0.5), val_every=1)
    return dataclasses.replace(section, train=train)


def prune_part(ensemble: DeViTEnsemble, manifest, part: int, train: Batches, val: Split, test: Split,
               settings: PruneSettings, say=print) -> tuple[VisionTransformer, dict[str, Any]]:
    """Prune sub-model ``part`` of ``ensemble``; the pruned, recovered model and its record."""
    start = time.perf_counter()
    original = ensemble.submodels[part].eval()
    cfg, group = original.config, manifest.class_groups[part]
    target = int(round(settings.macs * vit_macs(cfg)))
    # importance on the group's training images, several seeded batches
    sub = group_data(train, group)
    order = torch.randperm(len(sub), generator=torch.Generator().manual_seed(settings.seed))
    bs = settings.importance_batch_size
    batches = [sub.get(order[i * bs:(i + 1) * bs])[0] for i in range(settings.importance_batches)
               if len(order[i * bs:(i + 1) * bs]) >= 2]
    imp_settings = ImportanceSettings()
    importance = estimate_importance(original, batches, imp_settings)
    candidates = sample_candidates(cfg, target, settings.candidates, settings.tolerance, settings.seed)
    say(f"part {part}: {len(candidates)} candidates within +-{100 * settings.tolerance:g}% of {target} MACs "
        f"(importance over {importance.batches} batches, {importance.samples} images)")

    def score(model: VisionTransformer) -> tuple[float, float]:
        r = val.fused(ensemble, part, model)
        return r["accuracy"], r["log_prob"]

    result = search(original, importance, candidates, score)
    pruned = prune_to(original, importance, result.best)
    before = {"val": val.fused(ensemble, part, original), "test": test.fused(ensemble, part, original)}
    after_prune = {"val": val.fused(ensemble, part, pruned), "test": test.fused(ensemble, part, pruned)}
    say(f"part {part}: chose {result.best.to_dict()}: fused val accuracy {after_prune['val']['accuracy']:.4f} "
        f"(unpruned {before['val']['accuracy']:.4f})")
    recovered, recovery = pruned, {"epochs": 0}
    section = _students_section(manifest, settings)
    if settings.recover_epochs:
        recovered, recovery = distill_student(
            original, pruned.config, group, section, train, settings.seed, f"recover part {part}",
            section.relation_weight, score=lambda m: val.fused(ensemble, part, m)["accuracy"], init=pruned,
            teacher_classes=range(len(group)), token_weight=settings.token_weight, all_images=True)
        # the last epoch's weights or the best on validation; never worse on validation than no recovery
        if val.fused(ensemble, part, recovered)["accuracy"] < after_prune["val"]["accuracy"]:
            recovered, recovery["kept"] = pruned, "pruned weights (recovery did not improve validation)"
    after = {"val": val.fused(ensemble, part, recovered), "test": test.fused(ensemble, part, recovered)}
    record = {
        "part": part, "target_macs_fraction": settings.macs, "target_macs": target,
        "tolerance": settings.tolerance, "achieved_macs": vit_macs(recovered.config),
        "achieved_macs_fraction": vit_macs(recovered.config) / vit_macs(cfg),
        "macs_before": vit_macs(cfg), "params_before": count_parameters(original),
        "params_after": count_parameters(recovered),
        "block_heads": list(recovered.config.block_heads), "block_mlp": list(recovered.config.block_mlp),
        "importance": {**imp_settings.to_dict(), "batches": importance.batches, "images": importance.samples,
                       "data": "training images of the part's class group"},
        "search": {**result.summary(), "score": "fused accuracy on validation, then mean log-probability "
                                                "of the true class (the other parts unpruned)"},
        "recovery": {"epochs": settings.recover_epochs, "lr": settings.recover_lr, "token_weight": settings.token_weight,
                     "objective": "DEKD student loss from the unpruned sub-model (CE, KD on the group's images) + "
                                  "prefix-token MSE and relation term on every training image",
                     **{k: v for k, v in recovery.items() if k != "val_history"},
                     "val_history": recovery.get("val_history", [])},
        "fused": {"unpruned": before, "pruned": after_prune, "recovered": after},
        "seconds": time.perf_counter() - start,
    }
    record["latency_ms"] = forward_latency(cfg, recovered.config, settings.latency_rounds, settings.latency_repeats)
    return recovered, record


LATENCY_EXECUTORS = ("numba", "numpy")  # the torch-free edge executors, what an edge device runs


def forward_latency(before: ViTConfig, after: ViTConfig, rounds: int, repeats: int) -> dict[str, Any]:
    """Batch-1 forward ms of the unpruned and the pruned shapes in each torch-free executor (1 thread).

    Shapes alone set the time, so random weights stand in for the trained ones; before and after are
    timed in interleaved rounds (a busy machine slows both alike) and the median round is kept.
    """
    from ..profile.measure import interleaved_ms, make_forward

    image = np.zeros((1, before.img_size, before.img_size, before.in_chans), np.uint8)
    out: dict[str, Any] = {"threads": 1, "rounds": rounds, "repeats": repeats,
                           "timing": "median over interleaved rounds of the median of each round's forwards"}
    for executor in LATENCY_EXECUTORS:
        unpruned, pruned = interleaved_ms([make_forward(before, executor, 1), make_forward(after, executor, 1)],
                                          image, repeats, rounds)
        out[executor] = {"unpruned": unpruned, "pruned": pruned, "speedup": unpruned / pruned}
    return out


def run(bundle: str | Path, out: str | Path, settings: PruneSettings, say=print) -> dict[str, Any]:
    """Prune ``settings.parts`` of ``bundle`` one after another; write the new bundle to ``out``."""
    bundle, out = Path(bundle), Path(out)
    if out.resolve() == bundle.resolve():
        raise BundleError("--out must differ from the input bundle (the source is never overwritten)")
    settings = settings.effective()
    torch.manual_seed(settings.seed)
    ensemble, manifest = load_ensemble(bundle)
    for p in settings.parts:
        if not 0 <= p < manifest.num_parts:
            raise BundleError(f"--part {p} out of range: the bundle has {manifest.num_parts} sub-models")
    if not 0 < settings.macs < 1:
        raise BundleError(f"--macs must be a fraction in (0, 1), got {settings.macs}")
    data, spec, own_val = _dataset(manifest, settings)
    splits = {"train": (data.train_images, data.train_labels), "val": (data.val_images, data.val_labels),
              "test": (data.test_images, data.test_labels)}
    if settings.quick:
        splits = {k: _subset(*v, QUICK_IMAGES * (4 if k == "train" else 1), settings.seed) for k, v in splits.items()}
    spec_in = manifest.input
    train = Batches(*splits["train"], spec_in, settings.seed)
    val = Split(ensemble, *splits["val"], spec_in, settings.seed)
    test = Split(ensemble, *splits["test"], spec_in, settings.seed)
    say(f"data {spec['source']}: {len(train)} train / {len(val.data)} val / {len(test.data)} test"
        + ("" if own_val else " (validation carved now from the training images: seen in training)"))
    records = []
    for part in settings.parts:
        model, record = prune_part(ensemble, manifest, part, train, val, test, settings, say)
        record["val_seen_in_training"] = not own_val
        ensemble.submodels[part] = model
        for split in (val, test):  # the next part is pruned beside this one's pruned tokens
            split.parts[part] = split.prefix(model)
        records.append(record)
    new = copy.deepcopy(manifest)
    new.submodels = [m.config for m in ensemble.submodels]
    new.metadata = {**manifest.metadata, "dataset": spec,
                    "pruning": list(manifest.metadata.get("pruning", [])) + [_manifest_record(r) for r in records],
                    "pruned_from": str(bundle), "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    teacher = load_teacher(bundle, manifest) if manifest.teacher is not None else None
    save_bundle(out, new, ensemble, teacher)
    report = _report(bundle, records)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    say(format_summary(records))
    return report


def _manifest_record(record: dict[str, Any]) -> dict[str, Any]:
    keep = ("part", "target_macs_fraction", "target_macs", "tolerance", "achieved_macs", "achieved_macs_fraction",
            "macs_before", "params_before", "params_after", "block_heads", "block_mlp", "importance",
            "val_seen_in_training")
    return {**{k: record[k] for k in keep}, "candidates": record["search"]["candidates"],
            "val_score_of_choice": record["search"]["best_val_score"],
            "fused_val_accuracy": {k: v["val"]["accuracy"] for k, v in record["fused"].items()},
            "recover_epochs": record["recovery"]["epochs"]}


def _report(bundle: Path, records: list[dict[str, Any]]) -> dict[str, Any]:
    source = bundle / REPORT_FILE
    report: dict[str, Any] = {"pruning": records}
    if source.is_file():
        report["source_report"] = json.loads(source.read_text())
    return report


def format_summary(records: list[dict[str, Any]]) -> str:
    lines = ["part  params before -> after   MACs before -> after (fraction)   fused val / test accuracy: "
             "unpruned, pruned, recovered"]
    for r in records:
        f = r["fused"]
        acc = ", ".join(f"{f[k]['val']['accuracy']:.4f}/{f[k]['test']['accuracy']:.4f}"
                        for k in ("unpruned", "pruned", "recovered"))
        lines.append(f"{r['part']:>4}  {r['params_before']:>9} -> {r['params_after']:<9}  {r['macs_before']:>11} -> "
                     f"{r['achieved_macs']:<11} ({r['achieved_macs_fraction']:.3f})   {acc}")
    for r in records:
        lat = r["latency_ms"]
        lines.append(f"part {r['part']} batch-1 forward, 1 thread: " + ", ".join(
            f"{e} {lat[e]['unpruned']:.3f} -> {lat[e]['pruned']:.3f} ms ({lat[e]['speedup']:.2f}x)"
            for e in LATENCY_EXECUTORS))
    return "\n".join(lines)


__all__ = ["PruneSettings", "format_summary", "prune_part", "run"]
