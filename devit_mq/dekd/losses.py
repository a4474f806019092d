"""DEKD's losses: hard-label KD, the Q/K/V token-relation KL, and the fusion objective."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def hard_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy against the teacher's argmax (DeiT's hard distillation)."""
    return F.cross_entropy(student_logits, teacher_logits.argmax(dim=-1), reduction=reduction)


def restrict_logits(logits: torch.Tensor, group: Sequence[int]) -> torch.Tensor:
    """The teacher's logits over one group's classes, in the group's (local label) order."""
    return logits[:, list(group)]


def relation_log_probs(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Row-wise log-softmax of the token relation ``X Xᵀ / √dh`` ``[B, N, N]``.

    ``x`` ``[B, N, H*dh]`` holds the heads concatenated; the scale is the *head* size ``dh``, as in the
    attention itself (and in the paper's code), not the full width."""
    width = x.shape[-1]
    if num_heads <= 0 or width % num_heads:
        raise ValueError(f"relation: width {width} is not divisible by num_heads={num_heads}")
    return F.log_softmax(x @ x.transpose(-1, -2) / math.sqrt(width // num_heads), dim=-1)


def relation_kl(teacher: torch.Tensor, student: torch.Tensor, *, teacher_heads: int,
                student_heads: int) -> torch.Tensor:
    """KL(teacher relation || student relation), summed over all N rows and averaged over the batch
    (``KLDivLoss(reduction="batchmean")`` on ``[B, N, N]``: the published quantity).

    Inputs ``[B, N, H*dh]``, heads concatenated; widths and head counts may differ between the two
    sides, only ``[B, N]`` must agree."""
    if teacher.shape[:2] != student.shape[:2]:
        raise ValueError(f"relation KL needs the same [B, N]: teacher {tuple(teacher.shape)}, "
                         f"student {tuple(student.shape)}")
    log_t = relation_log_probs(teacher, teacher_heads)
    log_s = relation_log_probs(student, student_heads)
    return (log_t.exp() * (log_t - log_s)).sum() / teacher.shape[0]


def relation_tokens(qkv: torch.Tensor, num_prefix: int, other_prefix: int) -> torch.Tensor:
    """The tokens both sides have: all of them, except a DIST token whose other side has none
    (a DeiT model against a plain ViT; the paper's code only pairs models of one family)."""
    if num_prefix == other_prefix or num_prefix == 1:
        return qkv
    return torch.cat([qkv[:, :1], qkv[:, num_prefix:]], dim=1)


def qkv_relation_loss(
    teacher_qkv: torch.Tensor, student_qkv: torch.Tensor, weights: Sequence[float] = (0.2, 0.1, 0.3), *,
    teacher_heads: int, student_heads: int, student_depth: int, teacher_prefix: int = 1, student_prefix: int = 1,
) -> torch.Tensor:
    """DEKD's feature-matching term: ``sum_j w_j KL_j / student_depth`` over j = Q, K, V.

    ``*_qkv`` are one block's packed ``[B, N, 3*H*dh]`` (``VisionTransformer.forward_tokens(...,
    qkv_block=i)``). The paper's code matches a single block and still divides by the student's
    number of blocks; so does this, so that its weights (0.2, 0.1, 0.3) mean what they mean there."""
    t = relation_tokens(teacher_qkv, teacher_prefix, student_prefix).chunk(3, dim=-1)
    s = relation_tokens(student_qkv, student_prefix, teacher_prefix).chunk(3, dim=-1)
    total = sum(w * relation_kl(tp, sp, teacher_heads=teacher_heads, student_heads=student_heads)
                for w, tp, sp in zip(weights, t, s, strict=True))
    return total / student_depth  # type: ignore[return-value]


def relation_block(depth: int) -> int:
    """The block whose Q/K/V are matched: ``floor(L/2) - 1`` (0-based), as in the paper's code."""
    return max(depth // 2 - 1, 0)


def feature_dropout_mask(batch: int, num_parts: int, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[B, num_parts]`` of 0/1: with probability ``p`` a sample loses exactly one random part."""
    keep = torch.ones(batch, num_parts)
    if num_parts < 2 or p <= 0:
        return keep
    drop = torch.rand(batch, generator=generator) < p
    which = torch.randint(num_parts, (batch,), generator=generator)
    keep[drop, which[drop]] = 0.0
    return keep


def fusion_loss_per_sample(
    logits: torch.Tensor, mapped: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor,
    teacher_tokens: torch.Tensor, mse_weight: float = 1.0, ce_weight: float = 0.5, kd_weight: float = 0.5,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``[B]``: token MSE + CE + hard KD over all classes, per sample.

    ``mapped`` ``[B, P, D]`` against ``teacher_tokens`` ``[B, P_t, D]`` (final-norm): a plain-ViT
    teacher's CLS token is the target for every mapped token; a DeiT teacher's CLS and DIST tokens map
    to the CLS and DIST branches. The token term is the *sum* over the P tokens of each token's MSE
    (mean over D), as the paper's code adds the CLS and DIST MSEs."""
    target = teacher_tokens[:, : mapped.shape[1]]
    if target.shape[1] < mapped.shape[1]:
        target = target[:, :1].expand(-1, mapped.shape[1], -1)
    return (
        mse_weight * (mapped.float() - target.float()).pow(2).mean(-1).sum(1)
        + ce_weight * F.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction="none")
        + kd_weight * F.cross_entropy(logits, teacher_logits.argmax(dim=-1), reduction="none")
    )


def fusion_loss(
    logits: torch.Tensor, mapped: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor,
    teacher_tokens: torch.Tensor, mse_weight: float = 1.0, ce_weight: float = 0.5, kd_weight: float = 0.5,
    label_smoothing: float = 0.0, sample_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fusion objective's batch mean; ``sample_weight`` ``[B]`` (0/1) leaves samples out of every
    term (mean over the kept ones)."""
    per_sample = fusion_loss_per_sample(logits, mapped, labels, teacher_logits, teacher_tokens, mse_weight,
                                        ce_weight, kd_weight, label_smoothing)
    if sample_weight is None:
        return per_sample.mean()
    return (per_sample * sample_weight).sum() / sample_weight.sum().clamp_min(1.0)


def orphan_mask(keep: torch.Tensor, labels: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """``[B]`` 1.0 where the sub-model owning the sample's class is present, 0.0 where it was dropped.

    ``keep`` ``[B, N]`` is the feature-dropout mask, ``owner`` ``[C]`` maps class -> owning sub-model."""
    return keep.gather(1, owner[labels].unsqueeze(1)).squeeze(1)
