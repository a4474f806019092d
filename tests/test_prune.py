"""Structural pruning: per-block shapes in the config, slicing against masking, every executor on a
pruned bundle, the MACs counter, HSIC on hand-computed values, importance, the budgeted search and
the ``devit-mq prune`` command."""

import json

import numpy as np
import pytest
import torch

import devit_mq.model as dm
from devit_mq.model import ConfigError, ViTConfig, count_parameters, vit_macs
from devit_mq.model.numpy_vit import expected_shapes
from devit_mq.nodes.executor import build_edge_executor
from devit_mq.prune.slicing import masked, slice_model

from .runtime_helpers import images
from .test_executors import _perturbed

TOLERANCE = 1e-4  # as tests/test_executors.py: max |difference| of the prefix tokens
CFG = ViTConfig(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=3, num_heads=4, num_classes=2,
                pos_embed="sincos", stem="conv", stem_channels=4)
HEADS = [[0, 2], [1, 2, 3], [3]]
NEURONS = [list(range(0, 128, 3)), list(range(5, 60)), [7, 100, 127]]


# -- config ----------------------------------------------------------------------------------------

def test_block_shapes_default_to_uniform_and_old_manifests_load_unchanged():
    assert CFG.block_heads is None and not CFG.pruned
    assert "block_heads" not in CFG.to_dict() and "block_mlp" not in CFG.to_dict()
    assert [CFG.heads_at(i) for i in range(3)] == [4, 4, 4] and CFG.mlp_at(1) == 128
    pruned = CFG.replace(block_heads=(2, 3, 1), block_mlp=(43, 55, 3))
    data = json.loads(json.dumps(pruned.to_dict()))
    assert data["block_heads"] == [2, 3, 1]
    assert ViTConfig.from_dict(data) == pruned and ViTConfig.from_dict(data).block_mlp == (43, 55, 3)


@pytest.mark.parametrize("changes, message", [
    ({"block_heads": (2, 2)}, "block_heads has 2 entries, the model has depth=3"),
    ({"block_heads": (2, 0, 1)}, r"block_heads\[1\] must be an int in 1..4"),
    ({"block_heads": (2, 5, 1)}, r"block_heads\[1\] must be an int in 1..4"),
    ({"block_mlp": (1, 2, 129)}, r"block_mlp\[2\] must be an int in 1..128"),
    ({"block_mlp": (1, 2.0, 3)}, r"block_mlp\[1\]"),
    ({"block_mlp": "abc"}, "block_mlp must be a list of 3 ints"),
])
def test_bad_block_shapes_are_config_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        CFG.replace(**changes)


def test_macs_counter_counts_each_block_as_configured():
    n, d, hd = CFG.num_tokens, CFG.embed_dim, CFG.head_dim
    pruned = CFG.replace(block_heads=(2, 3, 1), block_mlp=(43, 55, 3))
    saved = sum(n * d * 4 * (4 - h) * hd + 2 * n * n * (4 - h) * hd + 2 * n * d * (128 - m)
                for h, m in zip((2, 3, 1), (43, 55, 3), strict=True))
    assert vit_macs(CFG) - vit_macs(pruned) == saved
    assert vit_macs(CFG.replace(block_heads=(4, 4, 4), block_mlp=(128, 128, 128))) == vit_macs(CFG)


# -- slicing: the smaller model is the masked model ------------------------------------------------

@pytest.mark.parametrize("distilled", [False, True])
def test_sliced_model_equals_the_masked_original_and_is_smaller(distilled):
    cfg = CFG.replace(distilled=distilled)
    model = _perturbed(cfg)
    small = slice_model(model, HEADS, NEURONS)
    assert small.config.block_heads == (2, 3, 1) and small.config.block_mlp == (43, 55, 3)
    assert count_parameters(small) < count_parameters(model)
    assert vit_macs(small.config) < vit_macs(cfg)
    assert expected_shapes(small.config) == {k: tuple(v.shape) for k, v in small.state_dict().items()}
    x = torch.randn(5, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        with masked(model, HEADS, NEURONS):
            reference = model.forward_prefix(x)
        unmasked = model.forward_prefix(x)
        out = small.forward_prefix(x)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    assert (unmasked - reference).abs().max() > 1e-3  # the mask did something
    # slicing a sliced model composes (indices into the current heads / neurons)
    again = slice_model(small, [[1], [0, 2], [0]], [[0, 1], list(range(55)), [2]])
    heads2 = [[2], [1, 3], [3]]
    neurons2 = [NEURONS[0][:2], NEURONS[1], [127]]
    with torch.inference_mode(), masked(model, heads2, neurons2):
        torch.testing.assert_close(again.forward_prefix(x), model.forward_prefix(x), atol=1e-5, rtol=1e-5)


def test_slicing_refuses_empty_or_out_of_range_indices():
    model = dm.VisionTransformer(CFG)
    with pytest.raises(ValueError, match=r"heads\[2\]"):
        slice_model(model, [[0], [1], []], NEURONS)
    with pytest.raises(ValueError, match=r"neurons\[0\]"):
        slice_model(model, HEADS, [[128], [0], [0]])


# -- a pruned bundle in every executor --------------------------------------------------------------

def _pruned_bundle(path):
    torch.manual_seed(0)
    subs = [slice_model(_perturbed(CFG, seed=1), HEADS, NEURONS), _perturbed(CFG, seed=2)]
    fusion = dm.FusionHead(dm.FusionConfig(in_dims=(32, 32), hidden_dim=32, num_classes=4)).eval()
    manifest = dm.Manifest(classes=["a", "b", "c", "d"], class_groups=[[0, 1], [2, 3]],
                           submodels=[m.config for m in subs], fusion=fusion.config,
                           input=dm.InputSpec(16, 1, (0.5,), (0.25,)))
    dm.save_bundle(path, manifest, dm.DeViTEnsemble(subs, fusion))
    return path, subs


def test_pruned_bundle_saves_loads_and_runs_in_every_executor(tmp_path):
    bundle, subs = _pruned_bundle(tmp_path / "b")
    manifest = dm.load_manifest(bundle)
    assert manifest.submodels[0].block_heads == (2, 3, 1) and manifest.submodels[1].block_heads is None
    stored = json.loads((bundle / "manifest.json").read_text())["submodels"]
    assert stored[0]["block_mlp"] == [43, 55, 3] and "block_mlp" not in stored[1]
    loaded = dm.load_submodel(bundle, 0, manifest)
    assert count_parameters(loaded) == count_parameters(subs[0]) < count_parameters(subs[1])
    imgs = images(6)
    x = manifest.input.to_tensor(imgs)
    with torch.inference_mode():
        reference = loaded.forward_prefix(x).numpy()
    for kind in ("torch", "numpy", "numba"):
        executor = build_edge_executor(kind, bundle, 0, manifest, max_batch=4)
        out = executor.forward_prefix(imgs)
        assert out.shape == reference.shape and np.abs(out - reference).max() <= TOLERANCE, kind
