"""Edge executors against the torch forward: every shipped bundle on its test split, random timm
configurations, timm's own model; executor selection (auto) and its errors; topology validation."""

import sys
import time

import numpy as np
import pytest
import torch
from devit_mq.kernels import vit_numba, vit_numpy

from devit_mq.model import BundleError, VisionTransformer, ViTConfig, load_manifest, load_submodel, preset
from devit_mq.model.numpy_vit import ArrayViT, expected_shapes
from devit_mq.nodes.demo import load_test_split
from devit_mq.nodes.executor import (
    ArrayEdgeExecutor,
    EmulatedSpeed,
    ExecutorError,
    NumpyFusionExecutor,
    auto_candidates,
    build_edge_executor,
)
from devit_mq.topology import TopologyError, load_topology
from devit_mq.topology.load import PACKAGE_BUNDLES

from .runtime_helpers import images, make_bundle
from .timm_reference import import_timm

TOLERANCE = 1e-4  # max |difference| of the prefix tokens, the bound
SHIPPED = ["default", "hetero", "n4", "balanced", "default-pruned"]
TORCH_FREE = ["numba", "numpy"]


def _torch_prefix(model: VisionTransformer, x_nchw: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return model.forward_prefix(x_nchw).numpy()


def _perturbed(cfg: ViTConfig, seed: int = 0) -> VisionTransformer:
    """A model with non-trivial values in every parameter, as a trained checkpoint would have."""
    torch.manual_seed(seed)
    model = VisionTransformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def test_split():
    return load_test_split(load_manifest(PACKAGE_BUNDLES / "default"))


@pytest.mark.parametrize("bundle_name", SHIPPED)
def test_every_executor_matches_torch_on_shipped_bundles_and_predicts_identically(bundle_name, test_split):
    bundle = PACKAGE_BUNDLES / bundle_name
    manifest = load_manifest(bundle)
    imgs = test_split.images
    x = manifest.input.to_tensor(imgs)
    fusion = NumpyFusionExecutor.from_bundle(bundle, manifest)
    reference = [_torch_prefix(load_submodel(bundle, i, manifest), x) for i in range(manifest.num_parts)]
    ref_labels = fusion.fuse(np.concatenate(reference, axis=-1)).argmax(1)
    for kind in ["torch", *TORCH_FREE]:
        parts = []
        for i in range(manifest.num_parts):
            executor = build_edge_executor(kind, bundle, i, manifest, max_batch=256)
            assert executor.backend == kind
            prefix = executor.forward_prefix(imgs)
            assert prefix.shape == reference[i].shape and prefix.dtype == np.float32
            assert np.abs(prefix - reference[i]).max() <= TOLERANCE, (kind, i)
            parts.append(prefix)
        labels = fusion.fuse(np.concatenate(parts, axis=-1)).argmax(1)
        np.testing.assert_array_equal(labels, ref_labels, err_msg=kind)
    assert (ref_labels == test_split.labels).mean() > 0.9  # trained bundles: the split is real


RANDOM_CONFIGS = {
    "vit learned patch": ViTConfig(img_size=32, patch_size=8, in_chans=3, embed_dim=48, depth=2, num_heads=3,
                                   num_classes=5),
    "deit sincos conv": ViTConfig(img_size=28, patch_size=4, in_chans=1, embed_dim=64, depth=3, num_heads=2,
                                  num_classes=10, distilled=True, pos_embed="sincos", stem="conv", stem_channels=16),
    "vit sincos conv 3ch": ViTConfig(img_size=24, patch_size=6, in_chans=3, embed_dim=32, depth=2, num_heads=4,
                                     num_classes=0, pos_embed="sincos", stem="conv", stem_channels=8),
    "deit learned, no qkv bias": ViTConfig(img_size=16, patch_size=4, in_chans=2, embed_dim=24, depth=1,
                                           num_heads=2, num_classes=3, distilled=True, qkv_bias=False,
                                           mlp_ratio=2.5, norm_eps=1e-5),
    "vit-ti/16 depth 2": preset("vit_tiny_patch16_224", depth=2),
    "deit-ti/16 depth 2": preset("deit_tiny_distilled_patch16_224", depth=2),
}


@pytest.mark.parametrize("name", list(RANDOM_CONFIGS))
def test_torch_free_forward_matches_torch_on_random_configs(name):
    cfg = RANDOM_CONFIGS[name]
    model = _perturbed(cfg)
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    assert expected_shapes(cfg) == {k: tuple(v.shape) for k, v in weights.items()}
    x = torch.randn(3, cfg.in_chans, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(1))
    reference = _torch_prefix(model, x)
    x_nhwc = np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())
    for ops in (vit_numpy, vit_numba):
        out = ArrayViT(cfg, weights, ops).forward_prefix(x_nhwc)
        assert out.shape == (3, cfg.num_prefix_tokens, cfg.embed_dim)
        assert np.abs(out - reference).max() <= TOLERANCE, ops.__name__


def test_torch_free_forward_matches_timm_itself():
    timm = import_timm()
    if timm is None:
        pytest.skip("timm (test-only reference) is not installed")
    torch.manual_seed(0)
    reference = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, depth=2).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    weights = {k: v.numpy() for k, v in reference.state_dict().items()}
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference.forward_features(x)[:, :2].numpy()
    out = ArrayViT(preset("deit_tiny_distilled_patch16_224", depth=2), weights, vit_numba).forward_prefix(
        np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy()))
    assert np.abs(out - expected).max() <= TOLERANCE


# -- bad input -----------------------------------------------------------------------------------


def test_wrong_weights_name_the_key(tmp_path):
    cfg = RANDOM_CONFIGS["vit learned patch"]
    weights = {k: v.numpy() for k, v in VisionTransformer(cfg).state_dict().items()}
    bad = dict(weights, **{"blocks.1.mlp.fc1.weight": np.zeros((7, 48), np.float32)})
    with pytest.raises(BundleError, match=r"blocks\.1\.mlp\.fc1\.weight has shape \(7, 48\).*needs \(192, 48\)"):
        ArrayViT(cfg, bad)
    missing = {k: v for k, v in weights.items() if k != "norm.bias"}
    with pytest.raises(BundleError, match=r"missing keys \['norm\.bias'\]"):
        ArrayViT(cfg, missing)


def test_missing_or_corrupt_bundle_file_is_a_bundle_error(tmp_path):
    bundle = make_bundle(tmp_path / "b")
    manifest = load_manifest(bundle)
    (bundle / "submodel_0.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(BundleError, match="submodel_0.*SHA-256"):
        build_edge_executor("numpy", bundle, 0, manifest)
    (bundle / "submodel_1.safetensors").unlink()
    with pytest.raises(BundleError, match="submodel_1.*missing"):
        build_edge_executor("numba", bundle, 1, manifest)
    with pytest.raises(BundleError, match="index 5 out of range"):
        ArrayViT.from_bundle(bundle, 5, manifest)


@pytest.mark.parametrize("kind", TORCH_FREE)
def test_wrong_image_shape_names_the_expected_shape(tmp_path, kind):
    bundle = make_bundle(tmp_path / "b")
    executor = build_edge_executor(kind, bundle, 0, load_manifest(bundle))
    with pytest.raises(ValueError, match=r"expected images \[B, 16, 16, 1\], got \(2, 8, 8, 1\)"):
        executor.forward_prefix(np.zeros((2, 8, 8, 1), np.uint8))
    with pytest.raises(ValueError, match=r"expected float32 images \[B, 16, 16, 1\]"):
        executor.model.forward_prefix(np.zeros((1, 16, 16, 1), np.float64))


def test_unknown_executor_is_refused(tmp_path):
    bundle = make_bundle(tmp_path / "b")
    with pytest.raises(ExecutorError, match="unknown executor 'tensorflow'"):
        build_edge_executor("tensorflow", bundle, 0, load_manifest(bundle))


class _SleepyExecutor:
    """A stand-in edge executor whose forward takes 20 ms of wall time."""

    backend = "numpy"

    def forward_prefix(self, images):
        time.sleep(0.02)
        return np.zeros((len(images), 1, 4), np.float32)

    def warm_up(self):
        pass

    def describe(self):
        return {"executor": "numpy"}


def test_an_emulated_slower_device_stretches_every_forward_and_says_so(tmp_path):
    slow = EmulatedSpeed(_SleepyExecutor(), 0.25)
    start = time.perf_counter()
    out = slow.forward_prefix(np.zeros((2, 8, 8, 1), np.uint8))
    assert time.perf_counter() - start >= 0.08  # 20 ms of forward at a quarter speed: at least 80 ms
    assert out.shape == (2, 1, 4) and slow.backend == "numpy" and slow.describe()["speed"] == 0.25
    for bad in (0, 1.5, -1):
        with pytest.raises(ExecutorError, match="speed must be in"):
            EmulatedSpeed(_SleepyExecutor(), bad)
    bundle = make_bundle(tmp_path / "b")
    built = build_edge_executor("numpy", bundle, 0, load_manifest(bundle), speed=0.5)
    assert isinstance(built, EmulatedSpeed) and built.describe()["executor"] == "numpy"
    assert not isinstance(build_edge_executor("numpy", bundle, 0, load_manifest(bundle)), EmulatedSpeed)


def test_torch_executor_without_torch_says_what_to_install(tmp_path, monkeypatch):
    bundle = make_bundle(tmp_path / "b")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(ExecutorError, match=r"needs torch.*devit-mq\[torch\]"):
        build_edge_executor("torch", bundle, 0, load_manifest(bundle))


# -- auto ------------------------------------------------------------------------------------------


def test_auto_times_the_torch_free_executors_unless_attention_needs_torch(tmp_path):
    assert auto_candidates("auto") == ("numba", "numpy")
    assert auto_candidates("numba") == ("numba",)
    assert all(auto_candidates(a) == ("torch",) for a in ("torch", "naive", "cuda"))
    bundle = make_bundle(tmp_path / "b")
    manifest = load_manifest(bundle)
    chosen = build_edge_executor("auto", bundle, 0, manifest)
    assert isinstance(chosen, ArrayEdgeExecutor) and chosen.backend in TORCH_FREE
    info = chosen.describe()
    assert info["executor"] == chosen.backend and info["threads"] >= 1 and info["import_s"] > 0
    assert build_edge_executor("auto", bundle, 0, manifest, attention="naive").backend == "torch"
    ref = _torch_prefix(load_submodel(bundle, 0, manifest), manifest.input.to_tensor(images(4)))
    assert np.abs(chosen.forward_prefix(images(4)) - ref).max() <= TOLERANCE


def test_auto_falls_back_to_numpy_without_numba(tmp_path, monkeypatch):
    import devit_mq.kernels

    bundle = make_bundle(tmp_path / "b")
    monkeypatch.setitem(sys.modules, "devit_mq.kernels.vit_numba", None)  # `import` raises ImportError
    monkeypatch.delattr(devit_mq.kernels, "vit_numba", raising=False)
    assert build_edge_executor("auto", bundle, 0, load_manifest(bundle)).backend == "numpy"
    with pytest.raises(ExecutorError, match="executor 'numba' cannot run here"):
        build_edge_executor("numba", bundle, 0, load_manifest(bundle))


# -- topology ----------------------------------------------------------------------------------------

BASE = {
    "name": "t", "bundle": "b",
    "aggregator": {"name": "aggregator", "port": 5600},
    "edges": [{"name": "edge0", "submodel": 0, "port": 5610}, {"name": "edge1", "submodel": 1, "port": 5611}],
}


def _problems(**changes) -> str:
    data = {**BASE, **changes}
    with pytest.raises(TopologyError) as info:
        load_topology(data, check_bundle=False)
    return str(info.value)


def test_topology_executor_defaults_to_auto_and_takes_defaults_and_per_edge_values():
    t = load_topology(BASE, check_bundle=False)
    assert [e.executor for e in t.edges] == ["auto", "auto"] and t.aggregator.executor is None
    t = load_topology({**BASE, "defaults": {"executor": "numpy"},
                       "edges": [BASE["edges"][0], {**BASE["edges"][1], "executor": "torch"}]}, check_bundle=False)
    assert [e.executor for e in t.edges] == ["numpy", "torch"]
    assert load_topology(t.to_dict(), check_bundle=False).edges == t.edges  # the key survives to_dict


def test_topology_executor_mistakes_are_named():
    edges = [{**BASE["edges"][0], "executor": "numbaa"}, BASE["edges"][1]]
    assert "edges[0].executor: 'numbaa' is not one of auto, torch, numba, numpy; did you mean 'numba'?" \
        in _problems(edges=edges)
    edges = [{**BASE["edges"][0], "executor": "numpy", "attention": "cuda"}, BASE["edges"][1]]
    assert "edges[0].attention: 'cuda' does not run in executor 'numpy'" in _problems(edges=edges)
    assert "aggregator.executor: 'executor' is not a setting of an aggregator (only of: edge)" \
        in _problems(aggregator={**BASE["aggregator"], "executor": "numba"})
    edges = [{**BASE["edges"][0], "executor": "numba", "attention": "numba"}, BASE["edges"][1]]
    assert load_topology({**BASE, "edges": edges}, check_bundle=False).edges[0].attention == "numba"


def test_topology_edge_speed_defaults_to_full_and_bad_values_are_named():
    assert [e.speed for e in load_topology(BASE, check_bundle=False).edges] == [1.0, 1.0]
    edges = [{**BASE["edges"][0], "speed": 0.25}, BASE["edges"][1]]
    topo = load_topology({**BASE, "edges": edges}, check_bundle=False)
    assert topo.edges[0].speed == 0.25 and load_topology(topo.to_dict(), check_bundle=False).edges == topo.edges
    for bad, message in ((0, "must be > 0, got 0.0"), (1.5, "must be <= 1, got 1.5"), ("slow", "expected a number")):
        edges = [{**BASE["edges"][0], "speed": bad}, BASE["edges"][1]]
        assert "edges[0].speed: " + message in _problems(edges=edges), bad
    assert "aggregator.speed: 'speed' is not a setting of an aggregator (only of: edge)" \
        in _problems(aggregator={**BASE["aggregator"], "speed": 0.5})
