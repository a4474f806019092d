"""DEKD's losses: hard-label KD, the Q/K/V token-relation KL, and the fusion objective."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def hard_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the teacher's argmax (DeiT's hard distillation)."""
    return F.cross_entropy(student_logits, teacher_logits.argmax(dim=-1))


def restrict_logits(logits: torch.Tensor, group: Sequence[int]) -> torch.Tensor:
    """The teacher's logits over one group's classes, in the group's (local label) order."""
    return logits[:, list(group)]


def relation_log_probs(x: torch.Tensor) -> torch.Tensor:
    """Row-wise log-softmax of the token relation ``X Xᵀ / √d`` for ``x`` ``[B, N, d]``."""
    return F.log_softmax(x @ x.transpose(-1, -2) / math.sqrt(x.shape[-1]), dim=-1)


def relation_kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """KL(teacher relation || student relation), summed over each row and averaged over rows and batch.

    Widths may differ: both relations are ``[B, N, N]``; only the token counts must agree."""
    if teacher.shape[:2] != student.shape[:2]:
        raise ValueError(f"relation KL needs the same [B, N]: teacher {tuple(teacher.shape)}, "
                         f"student {tuple(student.shape)}")
    log_t, log_s = relation_log_probs(teacher), relation_log_probs(student)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean()


def _relation_tokens(qkv: torch.Tensor, num_prefix: int) -> torch.Tensor:
    # CLS + patch tokens: a DeiT model's DIST token has no counterpart in a plain ViT
    return qkv if num_prefix == 1 else torch.cat([qkv[:, :1], qkv[:, num_prefix:]], dim=1)


def qkv_relation_loss(
    teacher_qkv: torch.Tensor, student_qkv: torch.Tensor, weights: Sequence[float] = (0.2, 0.1, 0.3),
    teacher_prefix: int = 1, student_prefix: int = 1,
) -> torch.Tensor:
    """Weighted sum of the Q, K and V relation KLs; ``*_qkv`` are packed ``[B, N, 3D]`` (all heads
    concatenated), as ``VisionTransformer.forward_tokens(..., qkv_block=i)`` returns."""
    t = _relation_tokens(teacher_qkv, teacher_prefix).chunk(3, dim=-1)
    s = _relation_tokens(student_qkv, student_prefix).chunk(3, dim=-1)
    return sum(w * relation_kl(tp, sp) for w, tp, sp in zip(weights, t, s, strict=True))  # type: ignore[return-value]


def feature_dropout_mask(batch: int, num_parts: int, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[B, num_parts]`` of 0/1: with probability ``p`` a sample loses exactly one random part."""
    keep = torch.ones(batch, num_parts)
    if num_parts < 2 or p <= 0:
        return keep
    drop = torch.rand(batch, generator=generator) < p
    which = torch.randint(num_parts, (batch,), generator=generator)
    keep[drop, which[drop]] = 0.0
    return keep


def fusion_loss(
    logits: torch.Tensor, mapped: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor,
    teacher_tokens: torch.Tensor, mse_weight: float = 1.0, ce_weight: float = 0.5, kd_weight: float = 0.5,
    label_smoothing: float = 0.0, sample_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE(mapped tokens, teacher's final-norm tokens) + CE + hard KD over all classes.

    ``teacher_tokens`` ``[B, P_t, D]``: a plain-ViT teacher's CLS token is the target for every mapped
    token; a DeiT teacher's CLS and DIST tokens map to the CLS and DIST branches. ``sample_weight``
    ``[B]`` (0/1) leaves samples out of every term (mean over the kept ones)."""
    target = teacher_tokens[:, : mapped.shape[1]]
    if target.shape[1] < mapped.shape[1]:
        target = target[:, :1].expand(-1, mapped.shape[1], -1)
    per_sample = (
        mse_weight * (mapped - target).pow(2).flatten(1).mean(1)
        + ce_weight * F.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction="none")
        + kd_weight * F.cross_entropy(logits, teacher_logits.argmax(dim=-1), reduction="none")
    )
    if sample_weight is None:
        return per_sample.mean()
    return (per_sample * sample_weight).sum() / sample_weight.sum().clamp_min(1.0)


def orphan_mask(keep: torch.Tensor, labels: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """``[B]`` 1.0 where the sub-model owning the sample's class is present, 0.0 where it was dropped.

    ``keep`` ``[B, N]`` is the feature-dropout mask, ``owner`` ``[C]`` maps class -> owning sub-model."""
    return keep.gather(1, owner[labels].unsqueeze(1)).squeeze(1)
