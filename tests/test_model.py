import pytest
import torch

from devit_mq.model import (
    ConfigError,
    DeViTEnsemble,
    FusionConfig,
    FusionHead,
    VisionTransformer,
    ViTConfig,
    concat_features,
    count_parameters,
    preset,
    vit_flops,
)

SMALL = ViTConfig(img_size=32, patch_size=8, in_chans=3, embed_dim=48, depth=2, num_heads=3, num_classes=5)

# timm's parameter counts for the ImageNet-1k models (from timm's model cards)
TIMM_PARAMS = {
    "vit_tiny_patch16_224": 5_717_416,
    "vit_small_patch16_224": 22_050_664,
    "vit_base_patch16_224": 86_567_656,
    "deit_tiny_distilled_patch16_224": 5_910_800,
    "deit_small_distilled_patch16_224": 22_436_432,
    "deit_base_distilled_patch16_224": 87_338_192,
}


def timm_keys(depth: int, distilled: bool) -> dict[str, int]:
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "norm.weight", "norm.bias", "head.weight", "head.bias"]
    if distilled:
        keys += ["dist_token", "head_dist.weight", "head_dist.bias"]
    for i in range(depth):
        for sub in ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]:
            keys += [f"blocks.{i}.{sub}.weight", f"blocks.{i}.{sub}.bias"]
    return set(keys)


@pytest.mark.parametrize("name", sorted(TIMM_PARAMS))
def test_timm_layout_keys_shapes_and_param_count(name):
    cfg = preset(name)
    with torch.device("meta"):
        model = VisionTransformer(cfg)
    sd = model.state_dict()
    assert set(sd) == timm_keys(cfg.depth, cfg.distilled)
    d = cfg.embed_dim
    assert sd["pos_embed"].shape == (1, 196 + cfg.num_prefix_tokens, d)
    assert sd["cls_token"].shape == (1, 1, d)
    assert sd["patch_embed.proj.weight"].shape == (d, 3, 16, 16)
    assert sd["blocks.0.attn.qkv.weight"].shape == (3 * d, d)
    assert sd["blocks.0.mlp.fc1.weight"].shape == (4 * d, d)
    assert sd["head.weight"].shape == (1000, d)
    assert count_parameters(model) == TIMM_PARAMS[name]


@pytest.mark.parametrize("distilled", [False, True])
def test_shapes_and_features(distilled):
    cfg = SMALL.replace(distilled=distilled)
    model = VisionTransformer(cfg).eval()
    x = torch.randn(4, 3, 32, 32)
    feats = model.forward_prefix(x)
    assert feats.shape == (4, cfg.num_prefix_tokens, 48)
    logits = model(x)
    assert logits.shape == (4, 5)
    tokens, qkv = model.forward_tokens(x, qkv_block=1)
    assert tokens.shape == (4, 16 + cfg.num_prefix_tokens, 48)
    assert qkv.shape == (4, 16 + cfg.num_prefix_tokens, 144)
    torch.testing.assert_close(tokens[:, : cfg.num_prefix_tokens], feats)
    # timm's contract: forward_features is every final-norm token, the patches after the prefix
    torch.testing.assert_close(model.forward_features(x), tokens)
    assert model.forward_features(x)[:, cfg.num_prefix_tokens:].shape == (4, 16, 48)


def test_distilled_training_mode_returns_both_heads():
    model = VisionTransformer(SMALL.replace(distilled=True)).train()
    x = torch.randn(2, 3, 32, 32)
    assert isinstance(model(x), torch.Tensor)
    model.distilled_training = True
    cls_logits, dist_logits = model(x)
    model.eval()
    torch.testing.assert_close(model(x), (model.head(model.forward_prefix(x)[:, 0]) +
                                          model.head_dist(model.forward_prefix(x)[:, 1])) / 2)
    assert cls_logits.shape == dist_logits.shape == (2, 5)


def test_options_sincos_conv_stem_xavier():
    cfg = SMALL.replace(pos_embed="sincos", stem="conv", init="xavier", stem_channels=8)
    model = VisionTransformer(cfg)
    assert not model.pos_embed.requires_grad
    assert torch.all(model.pos_embed[0, 0] == 0)  # prefix tokens get no position
    assert "patch_embed.stem.0.weight" in model.state_dict()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    assert vit_flops(cfg) > vit_flops(SMALL)


def test_wrong_input_shape_is_a_clear_error():
    model = VisionTransformer(SMALL)
    with pytest.raises(ValueError, match=r"expected images \[B, 3, 32, 32\]"):
        model(torch.randn(1, 3, 28, 28))


@pytest.mark.parametrize("bad, match", [
    (dict(embed_dim=50, num_heads=3), "not divisible by num_heads"),
    (dict(img_size=30), "not divisible by patch_size"),
    (dict(pos_embed="rope"), "pos_embed"),
    (dict(attention_backend="tpu"), "attention_backend"),
    (dict(depth=0), "depth"),
])
def test_config_errors_name_the_field(bad, match):
    with pytest.raises(ConfigError, match=match):
        SMALL.replace(**bad)


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="unknown key"):
        ViTConfig.from_dict({"embed_dim": 48, "depht": 2})
    assert ViTConfig.from_dict(SMALL.to_dict()) == SMALL


def test_vit_flops_matches_known_vit_tiny_figure():
    # ViT-Ti/16 at 224 is commonly quoted at ~1.26 GMACs (2.5 GFLOPs)
    flops = vit_flops(preset("vit_tiny_patch16_224"))
    assert 2.4e9 < flops < 2.6e9


@pytest.mark.parametrize("prefix", [1, 2])
def test_ensemble_equals_fusion_of_concatenated_features(prefix):
    subs = [VisionTransformer(SMALL.replace(embed_dim=w, distilled=prefix == 2, num_classes=2)).eval()
            for w in (48, 96)]
    fusion = FusionHead(FusionConfig(in_dims=(48, 96), hidden_dim=64, num_classes=5,
                                     num_prefix_tokens=prefix)).eval()
    ens = DeViTEnsemble(subs, fusion).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = fusion(torch.cat([m.forward_prefix(x) for m in subs], dim=-1))
        torch.testing.assert_close(ens(x), expected, rtol=0, atol=0)
        # a missing edge is zero-filled
        parts = [subs[0].forward_prefix(x), torch.zeros(3, prefix, 96)]
        torch.testing.assert_close(ens(x, missing=[1]), fusion(torch.cat(parts, -1)), rtol=0, atol=0)


def test_fusion_rejects_wrong_widths():
    fusion = FusionHead(FusionConfig(in_dims=(48, 96), hidden_dim=64, num_classes=5))
    with pytest.raises(ValueError, match=r"fusion expects features \[B, 1, 144\]"):
        fusion(torch.randn(2, 1, 100))
    with pytest.raises(ValueError, match="sub-model 1"):
        concat_features([torch.randn(2, 1, 48), torch.randn(2, 1, 95)], (48, 96), 1)
    with pytest.raises(ValueError, match="every sub-model"):
        concat_features([None, None], (48, 96), 1)
    with pytest.raises(ValueError, match="do not match fusion"):
        DeViTEnsemble([VisionTransformer(SMALL)], fusion)
