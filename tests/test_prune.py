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


# -- HSIC ---------------------------------------------------------------------------------------------

from devit_mq.prune.hsic import center, gaussian_kernel, hsic, linear_kernel  # noqa: E402
from devit_mq.prune.importance import (  # noqa: E402
    ImportanceSettings,
    estimate_importance,
    head_scores,
    minmax,
)


def test_hsic_three_samples_by_hand():
    x = torch.tensor([[0.0], [1.0], [2.0]])
    # linear kernels: H K H = xc xc^T with xc = x - mean; trace(HKH HLH) = (xc . yc)^2; / (n-1)^2 = 4
    assert float(hsic(linear_kernel(x), linear_kernel(x))) == pytest.approx(4.0 / 4)  # xc = (-1, 0, 1)
    y = torch.tensor([[0.0], [2.0], [1.0]])  # yc = (-1, 1, 0): xc . yc = 1
    assert float(hsic(linear_kernel(x), linear_kernel(y))) == pytest.approx(1.0 / 4)
    # Gaussian kernel, one sigma: distances 1, 1, 2 between the three points
    k = gaussian_kernel(x, sigmas=(1.0,))
    a, b = np.exp(-0.5), np.exp(-2.0)
    expected = torch.tensor([[1, a, b], [a, 1, a], [b, a, 1]], dtype=torch.float32)
    torch.testing.assert_close(k, expected)
    # HSIC(K, L) with L = x x^T: sum_ij (HKH)_ij xc_i xc_j / 4 = ((HKH)_00 - 2 (HKH)_02 + (HKH)_22) / 4
    kc = center(expected).numpy()
    by_hand = (kc[0, 0] - kc[0, 2] - kc[2, 0] + kc[2, 2]) / 4
    assert float(hsic(k, linear_kernel(x))) == pytest.approx(float(by_hand), rel=1e-5)
    # the mean of the five sigmas' kernels
    five = gaussian_kernel(x)
    assert float(five[0, 1]) == pytest.approx(np.mean([np.exp(-1 / (2 * s * s)) for s in (1, 2, 4, 8, 16)]), rel=1e-6)


def test_hsic_matches_the_matrix_formula_and_separates_dependence():
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(200, 3, generator=g), torch.randn(200, 3, generator=g)
    n = 200
    h = torch.eye(n) - torch.ones(n, n) / n
    k, l_ = gaussian_kernel(x), gaussian_kernel(noise)
    formula = torch.trace(k @ h @ l_ @ h) / (n - 1) ** 2
    assert float(hsic(k, l_)) == pytest.approx(float(formula), rel=1e-3, abs=1e-7)
    identical, independent = float(hsic(k, k)), float(hsic(k, l_))
    assert independent < 0.1 * identical  # the biased estimator: O(1/n) above 0 for independent data
    assert float(hsic(k, torch.ones(n, n))) == pytest.approx(0.0, abs=1e-6)  # a constant is independent
    # batched over a leading axis = one at a time
    stacked = torch.stack([k, l_])
    torch.testing.assert_close(hsic(stacked, k), torch.stack([hsic(k, k), hsic(l_, k)]))


# -- importance ----------------------------------------------------------------------------------------

def test_head_score_is_relevance_minus_mean_redundancy():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(40, 6, 1, 4, generator=g)
    other = torch.randn(40, 6, 1, 4, generator=g)
    out = torch.cat([base, base, other], dim=2).reshape(40, 6, 12)  # heads 0 and 1 identical
    pred = linear_kernel(torch.randn(40, 3, generator=g).softmax(-1))
    s = ImportanceSettings()
    scores = head_scores(out, 3, pred, s)
    feats = out.reshape(40, 6, 3, 4).mean(-1).permute(2, 0, 1)
    kern = [gaussian_kernel(f) for f in feats]
    for h in range(3):
        red = np.mean([float(hsic(kern[h], kern[o])) for o in range(3) if o != h])
        assert float(scores[h]) == pytest.approx(float(hsic(kern[h], pred)) - 0.1 * red, rel=1e-4, abs=1e-7)


def test_neuron_importance_ranks_a_dead_neuron_last_and_averages_over_batches():
    model = _perturbed(CFG)
    with torch.no_grad():  # neuron 5 of block 1 never fires: GELU(-30) ~ 0
        model.blocks[1].mlp.fc1.weight[5] = 0.0
        model.blocks[1].mlp.fc1.bias[5] = -30.0
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(16, 1, 16, 16, generator=g) for _ in range(3)]
    imp = estimate_importance(model, batches)
    assert imp.batches == 3 and imp.samples == 48
    assert [len(n) for n in imp.neurons] == [128] * 3 and [len(h) for h in imp.heads] == [4] * 3
    assert int(imp.neurons[1].argmin()) == 5 and float(imp.neurons[1].min()) == 0.0
    assert all(0.0 <= float(n.min()) and float(n.max()) <= 1.0 for n in imp.neurons)
    singles = [estimate_importance(model, [b]) for b in batches]
    torch.testing.assert_close(imp.neurons[0], sum(s.neurons[0] for s in singles) / 3)
    heads, neurons = imp.keep([2, 4, 1], [10, 127, 3])
    assert 5 not in neurons[1] and len(neurons[1]) == 127 and heads[1] == [0, 1, 2, 3]
    assert float(minmax(torch.tensor([3.0, 3.0])).abs().sum()) == 0.0


# -- search --------------------------------------------------------------------------------------------

from devit_mq.prune.search import sample_candidates, search  # noqa: E402


def test_candidates_are_distinct_and_within_the_macs_band():
    target = vit_macs(CFG) // 2
    cands = sample_candidates(CFG, target, 100, 0.02, seed=0)
    assert len(cands) == 100 and len({(c.heads, c.neurons) for c in cands}) == 100
    for c in cands:
        assert abs(c.macs - target) <= 0.02 * target
        assert c.macs == vit_macs(CFG.replace(block_heads=c.heads, block_mlp=c.neurons))
    assert cands[0].heads == (4, 4, 4)  # the uniform candidate first
    with pytest.raises(ValueError, match="no per-layer sparsity reaches"):
        sample_candidates(CFG, vit_macs(CFG) // 100, 5)


def test_search_keeps_the_best_scoring_candidate():
    model = _perturbed(CFG)
    imp = estimate_importance(model, [torch.randn(8, 1, 16, 16)])
    cands = sample_candidates(CFG, vit_macs(CFG) // 2, 5)
    result = search(model, imp, cands, lambda m: (float(sum(m.config.block_mlp)),))
    assert result.best.neurons == max(cands, key=lambda c: sum(c.neurons)).neurons
    assert result.summary()["candidates"] == 5


# -- the command ---------------------------------------------------------------------------------------

from devit_mq.cli import main as devit_main  # noqa: E402

DIGITS_SUB = ViTConfig(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=2, num_heads=2, num_classes=5,
                       pos_embed="sincos")


def _digits_bundle(path):
    subs = [_perturbed(DIGITS_SUB, seed=s) for s in (1, 2)]
    fusion = dm.FusionHead(dm.FusionConfig(in_dims=(16, 16), hidden_dim=16, num_classes=10)).eval()
    manifest = dm.Manifest(classes=[str(i) for i in range(10)], class_groups=[[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]],
                           submodels=[m.config for m in subs], fusion=fusion.config,
                           input=dm.InputSpec(8, 1, (0.3,), (0.3,)),
                           metadata={"dataset": {"source": "digits", "seed": 0, "test_size": 300}})
    dm.save_bundle(path, manifest, dm.DeViTEnsemble(subs, fusion))
    return path


def test_prune_command_writes_a_smaller_bundle_every_executor_runs(tmp_path, capsys):
    src = _digits_bundle(tmp_path / "src")
    before = (src / "manifest.json").read_text()
    out = tmp_path / "pruned"
    code = devit_main(["prune", str(src), "--part", "1", "--macs", "0.5", "--out", str(out), "--quick",
                       "--val-size", "200", "--log-level", "warning"])
    assert code == 0, capsys.readouterr().err
    assert (src / "manifest.json").read_text() == before  # the source bundle is untouched
    manifest = dm.load_manifest(out)
    assert manifest.submodels[0] == DIGITS_SUB and manifest.submodels[1].pruned
    (record,) = manifest.metadata["pruning"]
    assert record["part"] == 1 and record["target_macs_fraction"] == 0.5
    assert abs(record["achieved_macs"] - record["target_macs"]) <= 0.02 * record["target_macs"]
    assert record["achieved_macs"] == vit_macs(manifest.submodels[1]) < vit_macs(DIGITS_SUB)
    assert record["block_heads"] == list(manifest.submodels[1].block_heads)
    assert record["params_after"] < record["params_before"] and record["val_seen_in_training"]
    assert record["importance"]["sigmas"] == [1.0, 2.0, 4.0, 8.0, 16.0] and record["importance"]["batches"] == 2
    assert len(record["val_score_of_choice"]) == 2
    report = json.loads((out / "report.json").read_text())["pruning"][0]
    assert set(report["fused"]) == {"unpruned", "pruned", "recovered"} and report["recovery"]["epochs"] == 1
    for executor in ("numba", "numpy"):  # both shapes timed in each torch-free executor
        lat = report["latency_ms"][executor]
        assert lat["unpruned"] > 0 and lat["pruned"] > 0
        assert lat["speedup"] == pytest.approx(lat["unpruned"] / lat["pruned"])
    assert "batch-1 forward, 1 thread: numba" in capsys.readouterr().out
    imgs = np.random.default_rng(0).integers(0, 256, size=(3, 8, 8, 1), dtype=np.uint8)
    with torch.inference_mode():
        reference = dm.load_submodel(out, 1, manifest).forward_prefix(manifest.input.to_tensor(imgs)).numpy()
    for kind in ("torch", "numpy", "numba"):
        got = build_edge_executor(kind, out, 1, manifest).forward_prefix(imgs)
        assert np.abs(got - reference).max() <= TOLERANCE, kind


def test_prune_command_refuses_bad_arguments(tmp_path, capsys):
    src = _digits_bundle(tmp_path / "src")
    assert devit_main(["prune", str(src), "--part", "2", "--out", str(tmp_path / "o"), "--quick"]) == 2
    assert "--part 2 out of range" in capsys.readouterr().err
    assert devit_main(["prune", str(src), "--part", "0", "--out", str(src), "--quick"]) == 2
    assert "--out must differ" in capsys.readouterr().err
    assert devit_main(["prune", str(src), "--part", "0", "--macs", "1.5", "--out", str(tmp_path / "o")]) == 2
    assert "--macs must be a fraction" in capsys.readouterr().err


def test_nodes_serve_a_pruned_bundle_like_the_in_process_ensemble(tmp_path):
    from .test_nodes import Cluster, reference

    bundle, _ = _pruned_bundle(tmp_path / "b")
    with Cluster(bundle) as cluster:
        client = cluster.client()
        assert client.connect(20)["ready"] == [0, 1]
        imgs = images(7)
        pred = client.predict(imgs, batch_size=3, window=2)
        assert not pred.errors and pred.degraded == 0
        ref = reference(bundle, imgs, "fp32")
        np.testing.assert_array_equal(pred.labels, ref.argmax(1))
        np.testing.assert_allclose(pred.probabilities, ref, atol=1e-5)


def test_recovery_labels_other_groups_images_minus_one():
    from devit_mq.dekd.batches import Batches
    from devit_mq.dekd.stages import _group_labels

    imgs = np.zeros((6, 4, 4, 1), np.uint8)
    data = Batches(imgs, np.array([0, 3, 5, 2, 3, 9]), dm.InputSpec(4, 1, (0.5,), (0.25,)), 0)
    assert _group_labels(data, [2, 3, 7]).labels.tolist() == [-1, 1, -1, 0, 1, -1]
    assert data.labels.tolist() == [0, 3, 5, 2, 3, 9]  # the source split is unchanged
