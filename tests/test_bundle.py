import json

import numpy as np
import pytest
import torch

from devit_mq.model import (
    BundleError,
    DeViTEnsemble,
    FusionConfig,
    FusionHead,
    InputSpec,
    Manifest,
    VisionTransformer,
    ViTConfig,
    load_ensemble,
    load_fusion,
    load_manifest,
    load_submodel,
    load_teacher,
    save_bundle,
)

SUB = ViTConfig(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2, num_classes=2)


def make_bundle(tmp_path, widths=(32, 48), storage="float32", teacher=True):
    torch.manual_seed(0)
    subs = [VisionTransformer(SUB.replace(embed_dim=w)).eval() for w in widths]
    groups = [[0, 2], [1, 3]] if len(widths) == 2 else [[i] for i in range(len(widths))]
    n_classes = sum(len(g) for g in groups)
    fusion = FusionHead(FusionConfig(in_dims=widths, hidden_dim=64, num_classes=n_classes)).eval()
    manifest = Manifest(
        classes=["a", "b", "c", "d"][:n_classes],
        class_groups=groups,
        submodels=[m.config for m in subs],
        fusion=fusion.config,
        input=InputSpec(16, 1, (0.5,), (0.25,)),
        storage_dtype=storage,
        metadata={"note": "test"},
    )
    t = VisionTransformer(SUB.replace(embed_dim=64, num_classes=n_classes)).eval() if teacher else None
    ens = DeViTEnsemble(subs, fusion).eval()
    save_bundle(tmp_path / "b", manifest, ens, teacher=t)
    return tmp_path / "b", ens, t


def test_round_trip_is_exact_in_fp32(tmp_path):
    path, ens, teacher = make_bundle(tmp_path)
    loaded, manifest = load_ensemble(path)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ens(x), rtol=0, atol=0)
        torch.testing.assert_close(load_teacher(path)(x), teacher(x), rtol=0, atol=0)
    assert manifest.class_groups == [[0, 2], [1, 3]]
    assert manifest.metadata == {"note": "test"}
    assert set(json.loads((path / "manifest.json").read_text())["files"]) == {
        "submodel_0", "submodel_1", "fusion", "teacher"}


def test_fp16_storage_is_close_and_smaller(tmp_path):
    p32, ens, _ = make_bundle(tmp_path / "a")
    p16, _, _ = make_bundle(tmp_path / "b", storage="float16")
    assert (p16 / "submodel_0.safetensors").stat().st_size < 0.6 * (p32 / "submodel_0.safetensors").stat().st_size
    loaded, _ = load_ensemble(p16)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ens(x), rtol=1e-2, atol=1e-2)


def test_partial_load_reads_only_its_own_file(tmp_path):
    path, ens, _ = make_bundle(tmp_path)
    (path / "submodel_0.safetensors").unlink()
    (path / "fusion.safetensors").rename(path / "fusion.bak")
    sub1 = load_submodel(path, 1)  # an edge needs nothing but its own part
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(sub1.forward_prefix(x), ens.submodels[1].forward_prefix(x))
    (path / "fusion.bak").rename(path / "fusion.safetensors")
    assert load_fusion(path).config.in_dims == (32, 48)  # the aggregator only needs the fusion head
    with pytest.raises(BundleError, match="submodel_0.*missing"):
        load_submodel(path, 0)


def test_heterogeneous_widths(tmp_path):
    path, _, _ = make_bundle(tmp_path, widths=(32, 48, 64), teacher=False)
    loaded, manifest = load_ensemble(path)
    assert [m.config.embed_dim for m in loaded.submodels] == [32, 48, 64]
    with pytest.raises(BundleError, match="ships no teacher"):
        load_teacher(path)


def test_attention_backend_override_on_load(tmp_path):
    path, _, _ = make_bundle(tmp_path)
    assert load_submodel(path, 0, attention_backend="naive").attention_backend == "naive"


@pytest.mark.parametrize("mutate, match", [
    (lambda m: m.update(version=99), "unknown bundle version 99"),
    (lambda m: m.update(format="other"), "not a devit-mq bundle"),
    (lambda m: m.pop("fusion"), "missing required key 'fusion'"),
    (lambda m: m["submodels"][0].update(embd_dim=3), r"submodels\[0\]: unknown key"),
    (lambda m: m.update(class_groups=[[0, 1], [1, 3]]), "partition"),
    (lambda m: m["fusion"].update(in_dims=[32, 50]), "do not match fusion.in_dims"),
    (lambda m: m.update(storage_dtype="int4"), "storage_dtype"),
])
def test_bad_manifest_errors_name_the_problem(tmp_path, mutate, match):
    path, _, _ = make_bundle(tmp_path)
    data = json.loads((path / "manifest.json").read_text())
    mutate(data)
    (path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match=match):
        load_ensemble(path)


def test_missing_bundle_and_bad_json(tmp_path):
    with pytest.raises(BundleError, match="no bundle at"):
        load_manifest(tmp_path / "nowhere")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_manifest(tmp_path)


def test_corrupt_weights_fail_checksum(tmp_path):
    path, _, _ = make_bundle(tmp_path)
    f = path / "submodel_1.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-5] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="SHA-256"):
        load_submodel(path, 1)


def test_wrong_shape_in_weights(tmp_path):
    path, _, _ = make_bundle(tmp_path)
    data = json.loads((path / "manifest.json").read_text())
    data["submodels"][1]["mlp_ratio"] = 2.0  # config no longer matches the stored weights
    (path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"blocks\.0\.mlp\.fc1\.\w+ has shape \(192.*needs \(96"):
        load_submodel(path, 1)
    with pytest.raises(BundleError, match="out of range"):
        load_submodel(path, 5)


def test_input_spec_normalises_uint8_images():
    spec = InputSpec(4, 1, (0.5,), (0.25,))
    imgs = np.full((2, 4, 4), 255, dtype=np.uint8)
    x = spec.to_tensor(imgs)
    assert x.shape == (2, 1, 4, 4)
    assert torch.allclose(x, torch.full_like(x, 2.0))
    with pytest.raises(ValueError, match=r"expected images \[B, 4, 4, 1\]"):
        spec.to_tensor(np.zeros((2, 5, 5, 1), np.uint8))
