"""DEKD building blocks on hand-computed cases: class split, losses, the wire quantization, config."""

import math

import pytest
import torch
import torch.nn.functional as F

from devit_mq.dekd import (
    codec_ste,
    feature_dropout_mask,
    fusion_loss,
    hard_kd,
    int8_dequantize,
    int8_quantize,
    qkv_relation_loss,
    relation_kl,
    simulate_codec,
    split_classes,
)
from devit_mq.dekd.config import config_from_dict
from devit_mq.dekd.loop import warmup_cosine
from devit_mq.dekd.losses import relation_block, restrict_logits
from devit_mq.model import ConfigError


@pytest.mark.parametrize("classes,groups", [(10, 2), (10, 3), (10, 4), (100, 7), (5, 5)])
def test_split_is_a_near_equal_partition(classes, groups):
    split = split_classes(classes, groups, seed=0)
    assert len(split) == groups
    assert sorted(c for g in split for c in g) == list(range(classes))
    sizes = [len(g) for g in split]
    assert max(sizes) - min(sizes) <= 1
    assert all(g == sorted(g) for g in split)


def test_split_is_seeded():
    assert split_classes(10, 2, seed=0) == split_classes(10, 2, seed=0)
    assert split_classes(10, 2, seed=0) != split_classes(10, 2, seed=1)
    with pytest.raises(ConfigError):
        split_classes(3, 4)


def _kl_to_uniform(p: float) -> float:
    """KL(row [p, 1-p] || [1/2, 1/2]) for one relation row of two tokens."""
    return p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p))


def test_relation_kl_hand_computed():
    teacher = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # one head of size 2: X Xᵀ/√2 = diag(1/√2)
    student = torch.zeros(1, 2, 3)                      # uniform relation, other width
    p = math.exp(1 / math.sqrt(2)) / (math.exp(1 / math.sqrt(2)) + 1)
    # summed over the 2 rows (each row's KL is the same here), averaged over a batch of 1
    expected = 2 * _kl_to_uniform(p)
    got = relation_kl(teacher, student, teacher_heads=1, student_heads=1)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert relation_kl(teacher, teacher, teacher_heads=1, student_heads=1).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="same"):
        relation_kl(teacher, torch.zeros(1, 3, 2), teacher_heads=1, student_heads=1)


def test_relation_kl_scales_by_the_head_size_not_the_width():
    teacher = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # two heads of size 1: X Xᵀ/√1 = I
    student = torch.zeros(1, 2, 4)
    p = math.e / (math.e + 1)
    got = relation_kl(teacher, student, teacher_heads=2, student_heads=4)
    assert got.item() == pytest.approx(2 * _kl_to_uniform(p), rel=1e-6)
    with pytest.raises(ValueError, match="divisible"):
        relation_kl(teacher, student, teacher_heads=3, student_heads=1)


def test_relation_kl_sums_rows_and_averages_the_batch():
    torch.manual_seed(0)
    t, s = torch.randn(1, 5, 6), torch.randn(1, 5, 4)
    one = relation_kl(t, s, teacher_heads=2, student_heads=2)
    # a batch of two copies: the same value (mean over the batch)
    assert relation_kl(t.repeat(2, 1, 1), s.repeat(2, 1, 1), teacher_heads=2, student_heads=2).item() == \
        pytest.approx(one.item(), rel=1e-6)
    # the row-wise KLs add up to it (sum over rows)
    log_t = F.log_softmax(t @ t.transpose(-1, -2) / math.sqrt(3), -1)
    log_s = F.log_softmax(s @ s.transpose(-1, -2) / math.sqrt(2), -1)
    rows = [F.kl_div(log_s[0, i], log_t[0, i], log_target=True, reduction="sum").item() for i in range(5)]
    assert one.item() == pytest.approx(sum(rows), rel=1e-6)


def test_qkv_relation_loss_weights_q_k_v_and_divides_by_student_blocks():
    torch.manual_seed(0)
    t = torch.randn(2, 5, 12)  # packed [q | k | v], width 4 = 2 heads of 2
    s = t.clone()
    s[..., 8:] = torch.randn(2, 5, 4)  # only V differs
    loss = qkv_relation_loss(t, s, (0.2, 0.1, 0.3), teacher_heads=2, student_heads=2, student_depth=6)
    kl_v = relation_kl(t[..., 8:], s[..., 8:], teacher_heads=2, student_heads=2).item()
    assert loss.item() == pytest.approx(0.3 * kl_v / 6, rel=1e-6)
    s2 = torch.randn(2, 5, 18)  # a wider student (width 6) is compared through its relations
    assert qkv_relation_loss(t, s2, teacher_heads=2, student_heads=3, student_depth=1).item() > 0


def test_qkv_relation_loss_tokens():
    torch.manual_seed(1)
    t = torch.randn(1, 4, 6)
    s = torch.cat([t[:, :1], torch.randn(1, 1, 6), t[:, 1:]], dim=1)  # DeiT student: extra DIST token
    # plain-ViT teacher, DeiT student: the DIST token has no counterpart and is left out
    assert qkv_relation_loss(t, s, teacher_heads=1, student_heads=1, student_depth=1,
                             student_prefix=2).item() == pytest.approx(0.0, abs=1e-6)
    # DeiT on both sides: every token counts, the DIST token included
    t2 = torch.cat([t[:, :1], torch.randn(1, 1, 6), t[:, 1:]], dim=1)
    both = qkv_relation_loss(t2, s, teacher_heads=1, student_heads=1, student_depth=1, teacher_prefix=2,
                             student_prefix=2)
    assert both.item() > 1e-3


@pytest.mark.parametrize("depth,block", [(1, 0), (2, 0), (4, 1), (6, 2), (12, 5), (24, 11)])
def test_relation_block_is_floor_half_minus_one(depth, block):
    assert relation_block(depth) == block


def test_hard_kd_and_restriction_hand_computed():
    student = torch.tensor([[1.0, 2.0, 3.0]])
    teacher = torch.tensor([[0.0, 5.0, 1.0]])
    expected = math.log(math.e + math.e ** 2 + math.e ** 3) - 2.0
    assert hard_kd(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert restrict_logits(logits, [3, 1]).tolist() == [[3.0, 1.0]]


def test_fusion_loss_terms():
    logits = torch.tensor([[2.0, 0.0]])
    mapped = torch.tensor([[[1.0, 1.0]]])
    t_tok = torch.tensor([[[0.0, 3.0]]])
    y = torch.tensor([1])
    t_logits = torch.tensor([[0.0, 1.0]])
    only_mse = fusion_loss(logits, mapped, y, t_logits, t_tok, 1.0, 0.0, 0.0)
    assert only_mse.item() == pytest.approx((1 + 4) / 2)
    ce = F.cross_entropy(logits, y).item()
    full = fusion_loss(logits, mapped, y, t_logits, t_tok, 1.0, 0.5, 0.5)
    assert full.item() == pytest.approx(2.5 + ce)  # teacher argmax = label here, so KD = CE
    # two mapped tokens (DeiT sub-models) both match a plain-ViT teacher's CLS token: the two token
    # MSEs add up (as the paper's code adds the CLS and DIST MSEs)
    two = fusion_loss(logits, mapped.repeat(1, 2, 1), y, t_logits, t_tok, 1.0, 0.0, 0.0)
    assert two.item() == pytest.approx(2.5 + 2.5)


def test_deit_token_loss_is_the_sum_of_the_cls_and_dist_mses():
    logits, y, t_logits = torch.tensor([[2.0, 0.0]]), torch.tensor([1]), torch.tensor([[0.0, 1.0]])
    mapped = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])   # [B=1, CLS/DIST, D=2]
    t_tok = torch.tensor([[[0.0, 3.0], [2.0, 0.0]]])    # a DeiT teacher's CLS and DIST tokens
    # CLS: ((1-0)² + (1-3)²)/2 = 2.5; DIST: ((0-2)² + 0²)/2 = 2.0
    assert fusion_loss(logits, mapped, y, t_logits, t_tok, 1.0, 0.0, 0.0).item() == pytest.approx(4.5)


def test_fusion_loss_sample_weight_and_orphan_mask():
    from devit_mq.dekd.losses import orphan_mask

    keep = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # sample 0 lost part 1, sample 1 lost part 0
    owner = torch.tensor([0, 0, 1, 1])                          # classes 0,1 -> part 0; 2,3 -> part 1
    labels = torch.tensor([2, 3, 0])
    assert orphan_mask(keep, labels, owner).tolist() == [0.0, 1.0, 1.0]  # sample 0's owner (part 1) is gone
    torch.manual_seed(0)
    logits, mapped, t_tok = torch.randn(3, 4), torch.randn(3, 1, 2), torch.randn(3, 1, 2)
    t_logits = torch.randn(3, 4)
    weighted = fusion_loss(logits, mapped, labels, t_logits, t_tok, sample_weight=torch.tensor([0.0, 1.0, 1.0]))
    kept = fusion_loss(logits[1:], mapped[1:], labels[1:], t_logits[1:], t_tok[1:])
    assert weighted.item() == pytest.approx(kept.item(), rel=1e-6)


def test_int8_reference_hand_computed():
    x = torch.tensor([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0], [-2.54, 0.01, 1.27]])
    q, scale = int8_quantize(x)
    assert q.dtype == torch.int8 and scale.shape == (3, 1)
    assert q[0].tolist() == [127, -64, 32]  # -63.5 rounds half to even -> -64; 31.75 -> 32
    assert q[1].tolist() == [0, 0, 0] and scale[1].item() == 0.0
    assert q[2].tolist() == [-127, 0, 64]   # 1.27 / 0.02 = 63.5 -> 64 (half to even)
    back = int8_dequantize(q, scale)
    assert torch.all((back - x).abs() <= scale / 2 + 1e-7)
    assert torch.equal(simulate_codec(x, "int8"), back)


def test_fp16_codec_and_unknown():
    x = torch.tensor([1 / 3, 70000.0])
    y = simulate_codec(x, "fp16")
    assert y[0].item() == torch.tensor(1 / 3).half().item() and math.isinf(y[1].item())
    assert simulate_codec(x, "fp32") is x
    with pytest.raises(ValueError, match="codec"):
        simulate_codec(x, "int4")


@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_codec_ste_forward_is_decoded_and_gradient_is_identity(codec):
    x = torch.randn(3, 1, 8, requires_grad=True)
    y = codec_ste(x, codec)
    torch.testing.assert_close(y.detach(), simulate_codec(x.detach(), codec))
    (y * torch.arange(8.0)).sum().backward()
    torch.testing.assert_close(x.grad, torch.arange(8.0).expand(3, 1, 8))


def test_feature_dropout_mask():
    g = torch.Generator().manual_seed(0)
    assert torch.equal(feature_dropout_mask(5, 3, 0.0, g), torch.ones(5, 3))
    always = feature_dropout_mask(200, 3, 1.0, g)
    assert torch.equal(always.sum(1), torch.full((200,), 2.0))  # exactly one part dropped, never all
    assert set(always.argmin(1).tolist()) == {0, 1, 2}
    assert torch.equal(feature_dropout_mask(4, 1, 1.0, g), torch.ones(4, 1))  # a single part is never dropped


def test_warmup_cosine():
    assert warmup_cosine(0, 100, 10, 1.0, 0.0) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("bad,match", [
    ({"teacher": {"trian": {}}}, r"teacher\.trian"),
    ({"fusion": {"train": {"epochs": "ten"}}}, r"fusion\.train\.epochs: expected an integer"),
    ({"students": {"models": {"embed_dim": 8}}}, r"students\.models: expected a list"),
    ({"fusion": {"finetune": "partial"}}, "finetune"),
    ({"seed": 1.5}, "seed: expected an integer"),
    ({"ablation": {"enabled": "yes"}}, r"ablation\.enabled: expected true/false"),
    ({"students": {"relation_weights": [1, 2]}}, "relation_weights"),
    ([1, 2], "expected a mapping"),
])
def test_bad_config_errors_name_the_key(bad, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(bad)


def test_model_sections_are_checked_against_the_data():
    cfg = config_from_dict({"teacher": {"model": {"patch_size": 7, "embed_dim": 32, "depth": 2, "num_heads": 2}},
                            "students": {"models": [{"patch_size": 7, "embed_dim": 16, "depth": 1, "num_heads": 1}]}})
    t = cfg.teacher_config((28, 28, 1), 10)
    assert (t.img_size, t.in_chans, t.num_classes) == (28, 1, 10)
    subs = cfg.student_configs((28, 28, 1), [[0, 1, 2], [3, 4]])
    assert [s.num_classes for s in subs] == [3, 2]
    with pytest.raises(ConfigError, match="2 models for 3 groups"):
        config_from_dict({"students": {"models": [{}, {}]}}).student_configs((28, 28, 1), [[0], [1], [2]])
    with pytest.raises(ConfigError, match="contradicts the data"):
        config_from_dict({"teacher": {"model": {"img_size": 32}}}).teacher_config((28, 28, 1), 10)
    with pytest.raises(ConfigError, match=r"teacher\.model.*unknown"):
        config_from_dict({"teacher": {"model": {"width": 3}}}).teacher_config((28, 28, 1), 10)


def test_training_config_refuses_duplicate_keys(tmp_path):
    """Plain YAML keeps the last of two equal keys silently; a training run must not."""
    from devit_mq.dekd.config import load_config

    path = tmp_path / "dup.yaml"
    path.write_text("name: dup\nteacher:\n  epochs: 2\n  epochs: 20\n")
    with pytest.raises(ConfigError, match=r"line 4: duplicate key 'epochs' \(first on line 3\)"):
        load_config(path)


def _val_result(int8: float, drop: float) -> dict:
    return {"fused_accuracy": {"int8": int8},
            "missing_edge": [{"full_model_remaining_classes_accuracy": 0.98,
                              "remaining_classes_accuracy": 0.98 - drop}]}


def test_fusion_variant_choice_on_validation():
    from devit_mq.dekd.select import choose_variant

    # the best int8 accuracy among variants that keep the missing-edge drop within 2 points
    assert choose_variant([_val_result(0.97, 0.01), _val_result(0.99, 0.05), _val_result(0.98, 0.02)]) == 2
    assert choose_variant([_val_result(0.97, 0.01), _val_result(0.97, 0.0)]) == 0  # ties: the earlier
    # none qualifies: the smallest drop
    assert choose_variant([_val_result(0.99, 0.08), _val_result(0.90, 0.03)]) == 1
    with pytest.raises(ValueError):
        choose_variant([])


def test_fusion_variants_build_candidates_and_name_bad_keys():
    cfg = config_from_dict({"fusion": {"feature_dropout": 0.3, "variants": [{"orphan_loss": False},
                                                                           {"feature_dropout": 0.5}]}})
    got = [(c.feature_dropout, c.orphan_loss) for c in cfg.fusion.candidates()]
    assert got == [(0.3, False), (0.5, True)]
    assert config_from_dict({}).fusion.candidates() == [config_from_dict({}).fusion]
    with pytest.raises(ConfigError, match=r"variants\[0\]: unknown key\(s\) \['dropout'\]"):
        config_from_dict({"fusion": {"variants": [{"dropout": 0.5}]}})
    with pytest.raises(ConfigError, match=r"fusion\.variants\[1\]\.feature_dropout: expected a number"):
        config_from_dict({"fusion": {"variants": [{}, {"feature_dropout": "x"}]}})


def test_choices_on_validation_need_a_validation_split():
    from devit_mq.dekd.pipeline import _check_validation

    cfg = config_from_dict({"students": {"train": {"val_every": 5}}})
    with pytest.raises(ConfigError, match=r"students\.train\.val_every.*data\.val_size is 0"):
        _check_validation(cfg, 0)
    _check_validation(cfg, 10)
