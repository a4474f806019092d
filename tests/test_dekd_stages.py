"""Stage functions on random tiny models: frozen fusion, per-group teacher fine-tuning, group data."""

import dataclasses

import numpy as np
import pytest
import torch

from devit_mq.data import AugmentConfig
from devit_mq.dekd.batches import Batches
from devit_mq.dekd.config import FusionSection, StudentsSection, TrainSection
from devit_mq.dekd.stages import distill_student, finetune_group_teacher, group_data, train_fusion
from devit_mq.model import InputSpec, VisionTransformer, ViTConfig

TRAIN = TrainSection(epochs=1, batch_size=8, warmup_epochs=0.0, augment=AugmentConfig(enabled=False))
T_CFG = ViTConfig(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=2, num_heads=2, num_classes=4)


@pytest.fixture(autouse=True)
def one_thread():
    # tiny ops: a second thread only adds synchronisation (and contention on a shared machine)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8)
    labels = np.arange(16, dtype=np.int64) % 4
    return Batches(images, labels, InputSpec(8, 1, (0.5,), (0.25,)), seed=0)


def test_group_data_reindexes_labels(data):
    sub = group_data(data, [1, 3])
    assert len(sub) == 8 and sub.labels.tolist() == [0, 1] * 4


@pytest.mark.timeout(60)
def test_frozen_fusion_leaves_the_students_unchanged(data):
    torch.manual_seed(0)
    teacher = VisionTransformer(T_CFG).eval()
    students = [VisionTransformer(T_CFG.replace(embed_dim=8, num_classes=2)) for _ in range(2)]
    before = [{k: v.clone() for k, v in s.state_dict().items()} for s in students]
    section = FusionSection(finetune="frozen", train=TRAIN)
    ensemble, stats = train_fusion(teacher, students, section, data, num_classes=4, seed=0)
    assert stats["steps"] == 2
    for sub, ref in zip(ensemble.submodels, before, strict=True):
        for k, v in sub.state_dict().items():
            assert torch.equal(v, ref[k]), k
    joint, _ = train_fusion(teacher, students, dataclasses.replace(section, finetune="joint"), data, 4, seed=0)
    changed = [not torch.equal(v, before[0][k]) for k, v in joint.submodels[0].state_dict().items()
               if v.is_floating_point() and k != "pos_embed"]
    assert any(changed)


@pytest.mark.timeout(60)
def test_group_teacher_finetune_copies_the_teacher(data):
    torch.manual_seed(0)
    teacher = VisionTransformer(T_CFG).eval()
    ref = {k: v.clone() for k, v in teacher.state_dict().items()}
    section = StudentsSection(group_teacher_epochs=1, train=TRAIN)
    teacher.requires_grad_(False)  # as a distillation stage leaves the shared teacher
    group_teacher, stats = finetune_group_teacher(teacher, [0, 2], section, data, seed=0, desc="t")
    assert all(p.requires_grad for p in group_teacher.parameters())  # T_CFG has learned positions
    fixed = VisionTransformer(T_CFG.replace(pos_embed="sincos")).requires_grad_(False).unfreeze()
    assert not fixed.pos_embed.requires_grad and fixed.cls_token.requires_grad
    assert stats["steps"] == 1  # 8 samples of classes 0 and 2, batch 8
    assert all(torch.equal(v, ref[k]) for k, v in teacher.state_dict().items())  # the shared teacher is untouched
    assert any(not torch.equal(v, ref[k]) for k, v in group_teacher.state_dict().items() if k != "pos_embed")
    student, stats = distill_student(group_teacher, T_CFG.replace(embed_dim=8, num_classes=2), [0, 2], section,
                                     data, seed=0, desc="s", relation_weight=1.0)
    assert stats["steps"] == 1 and student(torch.zeros(1, 1, 8, 8)).shape == (1, 2)


@pytest.mark.timeout(60)
def test_epochs_are_chosen_on_the_validation_score(data):
    """The weights kept are those of the best-scoring evaluation, not the last epoch's."""
    teacher = VisionTransformer(T_CFG).eval()
    scores = iter([0.5, 0.9, 0.1])  # epochs 1, 2, 3: the second is best
    snapshots = []

    def score(model):
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(scores)

    train = dataclasses.replace(TRAIN, epochs=3, val_every=1)
    student, stats = distill_student(teacher, T_CFG.replace(embed_dim=8, num_classes=2), [0, 2],
                                     StudentsSection(train=train), data, 0, "s", 1.0, score=score)
    assert stats["best_epoch"] == 2 and stats["val_score"] == 0.9
    assert [e for e, _ in stats["val_history"]] == [1, 2, 3]
    for k, v in student.state_dict().items():
        assert torch.equal(v, snapshots[1][k]), k


@pytest.mark.timeout(60)
def test_deit_student_distills(data):
    teacher = VisionTransformer(T_CFG).eval()
    cfg = T_CFG.replace(embed_dim=8, num_classes=2, distilled=True)
    student, _ = distill_student(teacher, cfg, [1, 3], StudentsSection(train=TRAIN), data, 0, "s", 1.0)
    assert student.distilled_training is False and student(torch.zeros(2, 1, 8, 8)).shape == (2, 2)


def test_shards_of_a_global_batch_are_what_one_process_sees(data):
    """Each rank augments its shard with the global batch's draws: the shards put together are the
    single-process batch, image for image."""
    from devit_mq.dekd.distributed import Context

    idx = torch.tensor([5, 0, 9, 3, 14, 7, 1])
    augment = AugmentConfig(shift=2, rotate=10, scale=0.1)
    data.reseed(3)
    whole, labels = data.get(idx, augment)
    parts = []
    for rank in range(2):
        data.reseed(3)
        parts.append(data.get(idx, augment, Context(rank=rank, world=2).shard(len(idx))))
    assert [len(p[1]) for p in parts] == [3, 4]
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), whole)
    assert torch.equal(torch.cat([p[1] for p in parts]), labels)
