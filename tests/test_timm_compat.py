"""Checkpoint compatibility with timm: same keys, strict load, same logits in eval mode."""

import pytest
import torch

from devit_mq.model import VisionTransformer, preset

from .timm_reference import import_timm

timm = import_timm()
pytestmark = pytest.mark.skipif(timm is None, reason="timm (test-only reference) is not installed")


@pytest.mark.parametrize("name", [
    "vit_tiny_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "vit_small_patch16_224",
])
def test_timm_state_dict_loads_strictly_and_gives_same_logits(name):
    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False).eval()
    # give every parameter a non-trivial value, as a trained checkpoint would have
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours = VisionTransformer(preset(name)).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-5)
        # forward_features: every final-norm token, as timm returns them (a timm-style caller's
        # forward_features(x)[:, P:] gets the patch tokens); forward_prefix: the ones an edge sends
        tokens = reference.forward_features(x)
        assert tokens.shape == (2, 197 + ours.num_prefix_tokens - 1, ours.config.embed_dim)
        torch.testing.assert_close(ours.forward_features(x), tokens, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.forward_prefix(x), tokens[:, : ours.num_prefix_tokens], rtol=1e-5, atol=1e-5)
        patches = ours.forward_features(x)[:, ours.num_prefix_tokens:]
        assert patches.shape == (2, 196, ours.config.embed_dim)


def test_our_state_dict_loads_into_timm():
    ours = VisionTransformer(preset("deit_tiny_distilled_patch16_224", depth=2)).eval()
    reference = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, depth=2).eval()
    reference.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-5)
