"""Test-split evaluation of the teacher, each sub-model on its group, and the fused ensemble under
each codec and with each single edge missing."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..model import DeViTEnsemble, VisionTransformer, concat_features, count_parameters, vit_flops
from .batches import Batches
from .quant import simulate_codec
from .stages import group_data


def accuracy(pred: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    if mask is not None:
        pred, labels = pred[mask], labels[mask]
    return float((pred == labels).float().mean()) if len(labels) else float("nan")


@torch.no_grad()
def predict(model: VisionTransformer, data: Batches) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x).argmax(-1).cpu() for x, _ in data.chunks()])


@torch.no_grad()
def ensemble_features(ensemble: DeViTEnsemble, data: Batches) -> list[torch.Tensor]:
    ensemble.eval()
    per_batch = [ensemble.features(x) for x, _ in data.chunks()]
    return [torch.cat([b[i] for b in per_batch]).cpu() for i in range(ensemble.num_parts)]


@torch.no_grad()
def fused_predictions(ensemble: DeViTEnsemble, parts: Sequence[torch.Tensor | None], codec: str = "fp32") -> torch.Tensor:
    cfg = ensemble.fusion.config
    coded = [None if p is None else simulate_codec(p, codec) for p in parts]
    device = next(ensemble.fusion.parameters()).device
    return ensemble.fusion(concat_features(coded, cfg.in_dims, cfg.num_prefix_tokens).to(device)).argmax(-1).cpu()


def evaluate_ensemble(ensemble: DeViTEnsemble, groups: Sequence[Sequence[int]], split: Batches,
                      codecs: Sequence[str] = ("fp32", "fp16", "int8"), with_missing: bool = True) -> dict:
    """On one split (validation or test): fused accuracy per codec and, unless ``with_missing`` is
    false, the group accuracies and the accuracy with each single edge missing."""
    labels = split.labels
    parts = ensemble_features(ensemble, split)
    fused = {codec: accuracy(fused_predictions(ensemble, parts, codec), labels) for codec in codecs}
    if not with_missing:
        return {"fused_accuracy": fused}
    full = fused_predictions(ensemble, parts)
    groups_acc = [accuracy(predict(m, group_data(split, g)), group_data(split, g).labels)
                  for m, g in zip(ensemble.submodels, groups, strict=True)]
    missing = []
    if len(groups) > 1:
        for i, g in enumerate(groups):
            pred = fused_predictions(ensemble, [None if j == i else p for j, p in enumerate(parts)])
            own = torch.isin(labels, torch.tensor(list(g)))
            missing.append({
                "missing_edge": i,
                "accuracy": accuracy(pred, labels),
                "remaining_classes_accuracy": accuracy(pred, labels, ~own),
                "full_model_remaining_classes_accuracy": accuracy(full, labels, ~own),
                "missing_classes_accuracy": accuracy(pred, labels, own),
            })
    return {"submodel_group_accuracy": groups_acc, "fused_accuracy": fused, "missing_edge": missing}


def model_cost(model: VisionTransformer) -> dict:
    return {"params": count_parameters(model), "flops": vit_flops(model.config)}
