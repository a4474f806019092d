"""The three DEKD training stages: teacher, per-group sub-task distillation, fusion/ensemble."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ..model import ConfigError, DeViTEnsemble, FusionConfig, FusionHead, VisionTransformer, ViTConfig
from .batches import Batches
from .config import FusionSection, StudentsSection, TeacherSection, TrainSection
from .distributed import LOCAL, Context, StageForward
from .loop import fit, param_groups
from .losses import (
    feature_dropout_mask,
    fusion_loss_per_sample,
    hard_kd,
    orphan_mask,
    qkv_relation_loss,
    relation_block,
    restrict_logits,
)
from .quant import codec_ste

# A validation score of a model (higher is better); stages keep the best epoch's weights by it.
Score = Callable[[torch.nn.Module], float]


def _logits(model: VisionTransformer, tokens: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    return model.forward_head(tokens[:, : model.num_prefix_tokens])


def _mean_logits(out: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return (out[0] + out[1]) / 2 if isinstance(out, tuple) else out


def _checkpoint_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise ConfigError(f"teacher.checkpoint {path}: not a readable safetensors file ({exc})") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- torch raises many types for a bad file; all mean "unreadable"
        raise ConfigError(f"teacher.checkpoint {path}: not a readable torch checkpoint ({exc})") from None
    for key in ("model", "state_dict", "model_ema"):  # timm / DeiT training scripts nest the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"teacher.checkpoint {path}: expected a state dict of tensors")
    return state


def load_timm_checkpoint(model: VisionTransformer, path: str | Path, reset_head: bool = False) -> None:
    """Load timm-format weights (safetensors, or a torch file loaded with ``weights_only``), strictly.

    With ``reset_head`` a classifier of another class count (an ImageNet checkpoint for CIFAR-100) is
    left at its fresh initialisation, to be fine-tuned; every other key must match in name and shape."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"teacher.checkpoint: {path} does not exist")
    state = _checkpoint_state(path)
    own = model.state_dict()
    heads = {k for k in own if k.split(".")[0] in ("head", "head_dist")}
    if reset_head:
        state = {k: v for k, v in state.items() if k not in heads or v.shape == own[k].shape}
    missing = sorted(set(own) - set(state) - (heads if reset_head else set()))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in set(state) & set(own)
                    if state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        hint = " (teacher.reset_head: true re-initialises a classifier of another size)" if any(
            s.startswith("head") for s in shapes) else ""
        raise ConfigError(f"teacher.checkpoint {path} does not match teacher.model: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}, shape mismatch {shapes[:5]}{hint}")
    model.load_state_dict(state, strict=False)


def _supervised(model: VisionTransformer, data: Batches, train: TrainSection, seed: int, desc: str,
                classes: Sequence[int] | None = None, score: Score | None = None,
                ctx: Context = LOCAL) -> dict[str, float]:
    """Plain label-smoothed CE training (the teacher; a per-group teacher with ``classes``)."""
    forward = ctx.wrap(StageForward(model, lambda x: _mean_logits(model(x))))

    def loss_fn(idx: torch.Tensor, part: slice) -> tuple[torch.Tensor, int]:
        x, y = data.get(idx, train.augment, part)
        logits = forward(x)
        if classes is not None:
            logits = restrict_logits(logits, classes)
        return F.cross_entropy(logits, y, label_smoothing=train.label_smoothing, reduction="sum"), len(y)

    groups = param_groups(model.named_parameters(), train.weight_decay, train.lr)
    return fit(groups, loss_fn, len(data), train, seed, desc, [model], _bind(score, model), ctx)


def _bind(score: Score | None, model: torch.nn.Module) -> Callable[[], float] | None:
    return None if score is None else (lambda: score(model))


def train_teacher(cfg: ViTConfig, section: TeacherSection, data: Batches, seed: int,
                  score: Score | None = None, ctx: Context = LOCAL) -> tuple[VisionTransformer, dict]:
    torch.manual_seed(seed)
    data.reseed(seed)
    model = VisionTransformer(cfg)
    if section.checkpoint:
        load_timm_checkpoint(model, section.checkpoint, section.reset_head)
    model.to(ctx.device)
    stats = {"epochs": 0, "seconds": 0.0}
    if section.train.epochs:
        stats = _supervised(model, data, section.train, seed, "teacher", score=score, ctx=ctx)
    return model.eval(), stats


def _relation_block(model: VisionTransformer, block: int | None) -> int:
    return relation_block(len(model.blocks)) if block is None else block


def group_data(data: Batches, group: Sequence[int]) -> Batches:
    """The group's samples, with labels re-indexed to the group's local order."""
    group_t = torch.tensor(list(group))
    sub = data.subset(torch.isin(data.labels, group_t))
    sub.labels = torch.searchsorted(group_t, sub.labels)
    return sub


def _group_labels(data: Batches, group: Sequence[int]) -> Batches:
    """All of ``data``, labels re-indexed to the group's local order and -1 outside the group."""
    group_t = torch.tensor(list(group))
    out = data.subset(torch.ones(len(data), dtype=torch.bool))
    local = torch.searchsorted(group_t, out.labels).clamp_max(len(group_t) - 1)
    out.labels = torch.where(group_t[local] == out.labels, local, torch.full_like(local, -1))
    return out


def finetune_group_teacher(
    teacher: VisionTransformer, group: Sequence[int], section: StudentsSection, data: Batches, seed: int,
    desc: str, score: Score | None = None, ctx: Context = LOCAL,
) -> tuple[VisionTransformer, dict]:
    """The paper's first stage: a copy of the large model fine-tuned on one class group (its logits
    restricted to the group), which then teaches that group's sub-model. ``teacher`` is unchanged."""
    torch.manual_seed(seed)
    data.reseed(seed)
    model = copy.deepcopy(teacher)
    train = dataclasses.replace(section.train, epochs=section.group_teacher_epochs, lr=section.group_teacher_lr,
                                warmup_epochs=min(section.train.warmup_epochs, section.group_teacher_epochs))
    model.unfreeze()  # the shared teacher may have been frozen by a previous stage
    stats = _supervised(model, group_data(data, group), train, seed, desc, classes=group, score=score, ctx=ctx)
    return model.eval(), stats


def distill_student(
    teacher: VisionTransformer, cfg: ViTConfig, group: Sequence[int], section: StudentsSection,
    data: Batches, seed: int, desc: str, relation_weight: float, score: Score | None = None,
    ctx: Context = LOCAL, init: VisionTransformer | None = None, teacher_classes: Sequence[int] | None = None,
    token_weight: float = 0.0, all_images: bool = False,
) -> tuple[VisionTransformer, dict]:
    """Sub-task distillation: 0.5 CE + 0.5 hard KD (teacher logits restricted to the group) + the
    relation term (published weights, one block at floor(L/2)-1 on each side, / student blocks).

    Recovery after pruning uses the same objective with ``init`` (the pruned model, trained further
    instead of a fresh ``cfg`` model), the unpruned sub-model as teacher (its logits are already the
    group's: ``teacher_classes = range(len(group))``) and ``token_weight`` > 0: the MSE of the
    student's final-norm prefix tokens to the teacher's, which keeps them what the fusion head reads.
    The fusion reads them on every class's images, so recovery passes ``all_images``: the epoch runs
    over all of ``data``, the token and relation terms on every image, CE and KD on the group's."""
    torch.manual_seed(seed)
    data.reseed(seed)
    sub = group_data(data, group) if not all_images else _group_labels(data, group)
    teacher.eval().requires_grad_(False)
    student = (VisionTransformer(cfg) if init is None else copy.deepcopy(init).unfreeze()).to(ctx.device)
    cfg = student.config
    teacher_classes = group if teacher_classes is None else teacher_classes
    student.distilled_training = cfg.distilled
    t_block = _relation_block(teacher, section.teacher_relation_block)
    s_block = _relation_block(student, section.relation_block)
    train = section.train

    def student_forward(x: torch.Tensor):
        tokens, qkv = student.forward_tokens(x, qkv_block=s_block if relation_weight else None)
        return (_logits(student, tokens), tokens[:, : student.num_prefix_tokens]), qkv

    forward = ctx.wrap(StageForward(student, student_forward))

    def loss_fn(idx: torch.Tensor, part: slice) -> tuple[torch.Tensor, int]:
        x, y = sub.get(idx, train.augment, part)
        with torch.no_grad():
            t_tokens, t_qkv = teacher.forward_tokens(x, qkv_block=t_block if relation_weight else None)
            t_logits = restrict_logits(_mean_logits(_logits(teacher, t_tokens)), teacher_classes)
        (out, s_prefix), s_qkv = forward(x)
        cls_logits, kd_logits = out if isinstance(out, tuple) else (out, out)  # DeiT: KD on the DIST head
        own = y >= 0  # all_images: -1 marks another group's image (no CE or KD on it)
        # sums over the shard: the loop divides by the global batch size
        loss = section.ce_weight * F.cross_entropy(cls_logits[own], y[own], label_smoothing=train.label_smoothing,
                                                   reduction="sum")
        loss = loss + section.kd_weight * hard_kd(kd_logits[own], t_logits[own], reduction="sum")
        if relation_weight:
            loss = loss + relation_weight * len(y) * qkv_relation_loss(
                t_qkv, s_qkv, section.relation_weights, teacher_heads=teacher.config.heads_at(t_block),
                student_heads=cfg.heads_at(s_block), student_depth=cfg.depth,
                teacher_prefix=teacher.num_prefix_tokens, student_prefix=student.num_prefix_tokens)
        if token_weight:
            target = t_tokens[:, : s_prefix.shape[1]]
            loss = loss + token_weight * (s_prefix.float() - target.float()).pow(2).mean(-1).sum()
        return loss, len(y)

    groups = param_groups(student.named_parameters(), train.weight_decay, train.lr)
    stats = fit(groups, loss_fn, len(sub), train, seed, desc, [student], _bind(score, student), ctx)
    student.distilled_training = False
    return student.eval(), stats


def apply_wire(parts: list[torch.Tensor], keep: torch.Tensor | None, codec: str) -> list[torch.Tensor]:
    """Feature dropout (zero a whole part per sample) then the codec simulation, per part."""
    out = []
    for i, part in enumerate(parts):
        if keep is not None:
            part = part * keep[:, i].view(-1, 1, 1)
        out.append(codec_ste(part, codec))
    return out


def build_ensemble(students: Sequence[VisionTransformer], teacher_cfg: ViTConfig, num_classes: int) -> DeViTEnsemble:
    prefix = students[0].num_prefix_tokens
    fusion = FusionHead(FusionConfig(tuple(s.config.embed_dim for s in students), teacher_cfg.embed_dim,
                                     num_classes, prefix))
    return DeViTEnsemble(list(students), fusion)


def train_fusion(
    teacher: VisionTransformer, students: Sequence[VisionTransformer], section: FusionSection,
    data: Batches, num_classes: int, seed: int, desc: str = "fusion",
    groups: Sequence[Sequence[int]] | None = None, score: Score | None = None, ctx: Context = LOCAL,
) -> tuple[DeViTEnsemble, dict]:
    """Ensemble stage: MSE(mapped token, teacher token) + 0.5 CE + 0.5 hard KD, with feature dropout
    and codec-aware training; students fine-tuned jointly or frozen."""
    torch.manual_seed(seed)
    data.reseed(seed)
    teacher.eval().requires_grad_(False)
    ensemble = build_ensemble([copy.deepcopy(s) for s in students], teacher.config, num_classes).to(ctx.device)
    joint = section.finetune == "joint"
    ensemble.submodels.requires_grad_(joint)
    for sub in ensemble.submodels:  # the sub-models' own heads take no part in the fusion (nor its gradient)
        for head in (sub.head, sub.head_dist):
            if head is not None:
                head.requires_grad_(False)
    train = section.train
    generator = torch.Generator().manual_seed(seed + 1)
    codecs = section.codecs
    owner = None
    if not section.orphan_loss:
        if groups is None:
            raise ValueError("fusion.orphan_loss=false needs the class groups")
        owner = torch.empty(num_classes, dtype=torch.long)
        for i, g in enumerate(groups):
            owner[list(g)] = i
        owner = owner.to(ctx.device)

    def ensemble_forward(x: torch.Tensor, keep: torch.Tensor, codec: str):
        if not joint:
            ensemble.submodels.eval()
        with torch.set_grad_enabled(joint and torch.is_grad_enabled()):
            parts = ensemble.features(x)
        return ensemble.fusion.forward_mapped(torch.cat(apply_wire(parts, keep, codec), dim=-1))

    forward = ctx.wrap(StageForward(ensemble, ensemble_forward))

    def loss_fn(idx: torch.Tensor, part: slice) -> tuple[torch.Tensor, torch.Tensor]:
        # drawn for the global batch on every rank (same generator), then cut to this rank's shard
        keep = feature_dropout_mask(len(idx), ensemble.num_parts, section.feature_dropout, generator)[part]
        codec = codecs[int(torch.randint(len(codecs), (1,), generator=generator))]
        x, y = data.get(idx, train.augment, part)
        keep = keep.to(x.device)
        with torch.no_grad():
            t_tokens = teacher.forward_tokens(x)[0]
            t_logits = _mean_logits(_logits(teacher, t_tokens))
        logits, mapped = forward(x, keep, codec)
        per_sample = fusion_loss_per_sample(logits, mapped, y, t_logits, t_tokens[:, : teacher.num_prefix_tokens],
                                            section.mse_weight, section.ce_weight, section.kd_weight,
                                            train.label_smoothing)
        weight = torch.ones_like(per_sample) if owner is None else orphan_mask(keep, y, owner)
        return (per_sample * weight).sum(), weight.sum()

    groups = param_groups(ensemble.fusion.named_parameters(), train.weight_decay, train.lr)
    if joint:
        for g in param_groups(ensemble.submodels.named_parameters(), train.weight_decay, train.lr):
            groups.append({**g, "lr_scale": section.student_lr_scale})
    modules = [ensemble] if joint else [ensemble.fusion]
    stats = fit(groups, loss_fn, len(data), train, seed, desc, modules, _bind(score, ensemble), ctx)
    return ensemble.eval(), stats
