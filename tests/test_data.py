"""Data loaders: the shipped MNIST subset's split, ImageFolder and CIFAR binary files, augmentation."""

import numpy as np
import pytest
import torch

from devit_mq.data import AugmentConfig, DataError, augment_batch, load_dataset, stratified_split


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist5k")


def test_mnist5k_split_is_stratified(mnist):
    assert mnist.train_images.shape == (4000, 28, 28, 1) and mnist.test_images.shape == (1000, 28, 28, 1)
    assert mnist.train_images.dtype == np.uint8 and mnist.train_labels.dtype == np.int64
    assert np.bincount(mnist.test_labels).tolist() == [100] * 10
    assert np.bincount(mnist.train_labels).tolist() == [400] * 10
    assert mnist.classes == [str(d) for d in range(10)]


def test_mnist5k_split_is_deterministic_and_rebuilt_from_spec(mnist):
    again = load_dataset(**mnist.spec)
    np.testing.assert_array_equal(again.test_images, mnist.test_images)
    np.testing.assert_array_equal(again.train_labels, mnist.train_labels)
    other = load_dataset("mnist5k", seed=1)
    assert not np.array_equal(other.test_images, mnist.test_images)
    # no image is in both splits (compare raw bytes of each row)
    train_rows = {r.tobytes() for r in mnist.train_images.reshape(4000, -1)}
    assert sum(r.tobytes() in train_rows for r in mnist.test_images.reshape(1000, -1)) < 5  # MNIST has a few duplicates


def test_limits_keep_a_stratified_subset():
    d = load_dataset("mnist5k", max_train=50, max_test=20)
    assert len(d.train_labels) == 50 and len(d.test_labels) == 20
    assert np.bincount(d.train_labels).tolist() == [5] * 10
    assert d.spec["max_train"] == 50


def test_stratified_split_exact_size_with_uneven_classes():
    labels = np.array([0] * 7 + [1] * 3 + [2] * 5)
    tr, te = stratified_split(labels, 5, seed=3)
    assert len(te) == 5 and len(tr) == 10 and not set(tr) & set(te)
    assert sorted(np.bincount(labels[te], minlength=3).tolist()) == [1, 2, 2]
    with pytest.raises(DataError, match="test_size"):
        stratified_split(labels, 15, seed=0)


def test_digits():
    pytest.importorskip("sklearn")
    d = load_dataset("digits", test_size=0.2)
    assert d.train_images.shape[1:] == (8, 8, 1) and d.train_images.max() == 255
    assert len(d.test_labels) == round(0.2 * 1797)


def _write_png(path, array):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_imagefolder_with_val(tmp_path):
    rng = np.random.default_rng(0)
    expect = {}
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("cat", "dog"):
            for i in range(n):
                img = rng.integers(0, 256, (6, 6), dtype=np.uint8)
                _write_png(tmp_path / split / cls / f"{i}.png", img)
                expect[(split, cls, i)] = img
    d = load_dataset(f"imagefolder:{tmp_path}")
    assert d.classes == ["cat", "dog"]
    assert d.train_images.shape == (6, 6, 6, 1) and d.test_images.shape == (4, 6, 6, 1)
    assert d.train_labels.tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(d.test_images[2, ..., 0], expect[("val", "dog", 0)])
    d2 = load_dataset("imagefolder", root=str(tmp_path), image_size=4)
    assert d2.train_images.shape == (6, 4, 4, 1)


def test_imagefolder_rgb_without_val_is_split(tmp_path):
    for cls in ("a", "b"):
        for i in range(5):
            _write_png(tmp_path / "train" / cls / f"{i}.jpg", np.full((5, 5, 3), 40 * i, dtype=np.uint8))
    d = load_dataset(f"imagefolder:{tmp_path}", test_size=4)
    assert d.train_images.shape == (6, 5, 5, 3) and np.bincount(d.test_labels).tolist() == [2, 2]


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="train"):
        load_dataset(f"imagefolder:{tmp_path}")
    _write_png(tmp_path / "train" / "a" / "0.png", np.zeros((4, 4), np.uint8))
    _write_png(tmp_path / "train" / "b" / "0.png", np.zeros((5, 5), np.uint8))
    _write_png(tmp_path / "train" / "b" / "1.png", np.zeros((5, 5), np.uint8))
    with pytest.raises(DataError, match="image_size"):
        load_dataset(f"imagefolder:{tmp_path}")
    with pytest.raises(DataError, match="needs a local path"):
        load_dataset("imagefolder")


def _cifar_records(labels, label_bytes):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8)
    rows = []
    for lab, img in zip(labels, images, strict=True):
        head = [lab // 5, lab] if label_bytes == 2 else [lab]
        rows.append(np.concatenate([np.array(head, np.uint8), img.transpose(2, 0, 1).ravel()]))
    return np.stack(rows).tobytes(), images


def test_cifar10_binary(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    blob, train_imgs = _cifar_records([3, 7, 1], 1)
    (folder / "data_batch_1.bin").write_bytes(blob)
    blob, test_imgs = _cifar_records([9, 0], 1)
    (folder / "test_batch.bin").write_bytes(blob)
    (folder / "batches.meta.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n")
    d = load_dataset(f"cifar10:{tmp_path}")
    assert d.train_labels.tolist() == [3, 7, 1] and d.test_labels.tolist() == [9, 0]
    np.testing.assert_array_equal(d.train_images, train_imgs)  # CHW records -> HWC
    np.testing.assert_array_equal(d.test_images, test_imgs)
    assert d.classes[3] == "c3"


def test_cifar100_binary_uses_fine_labels(tmp_path):
    blob, _ = _cifar_records([42, 99], 2)
    (tmp_path / "train.bin").write_bytes(blob)
    (tmp_path / "test.bin").write_bytes(blob)
    d = load_dataset(f"cifar100:{tmp_path}")
    assert d.train_labels.tolist() == [42, 99] and len(d.classes) == 100


def test_cifar_errors(tmp_path):
    with pytest.raises(DataError, match="data_batch_1.bin"):
        load_dataset(f"cifar10:{tmp_path}")
    (tmp_path / "data_batch_1.bin").write_bytes(b"\x00" * 100)
    (tmp_path / "test_batch.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(DataError, match="record size"):
        load_dataset(f"cifar10:{tmp_path}")


def test_unknown_source():
    with pytest.raises(DataError, match="unknown data source"):
        load_dataset("mnist60k")


def test_augment_identity_and_shift():
    x = torch.zeros(2, 1, 8, 8)
    x[:, :, 3, 3] = 1.0
    assert torch.equal(augment_batch(x, AugmentConfig(enabled=False)), x)
    still = augment_batch(x, AugmentConfig(shift=0, rotate=0, scale=0))
    torch.testing.assert_close(still, x, atol=1e-5, rtol=0)
    moved = augment_batch(x, AugmentConfig(shift=2, rotate=0, scale=0), torch.Generator().manual_seed(0))
    assert moved.shape == x.shape and not torch.allclose(moved, x)
    assert abs(moved.sum().item() - 2.0) < 1e-4  # a sub-pixel shift keeps the mass inside the image


def test_validation_split_is_carved_from_training_data(mnist):
    d = load_dataset("mnist5k", val_size=500)
    assert (len(d.train_labels), len(d.val_labels), len(d.test_labels)) == (3500, 500, 1000)
    assert np.bincount(d.val_labels).tolist() == [50] * 10  # stratified
    np.testing.assert_array_equal(d.test_images, mnist.test_images)  # the test split is unchanged
    rows = lambda a: {r.tobytes() for r in a.reshape(len(a), -1)}  # noqa: E731
    assert rows(d.val_images) | rows(d.train_images) == rows(mnist.train_images)
    assert len(rows(d.val_images) & rows(d.train_images)) < 5  # MNIST has a few duplicate digits
    again = load_dataset(**d.spec)  # rebuilt exactly from the recorded spec
    np.testing.assert_array_equal(again.val_images, d.val_images)
    with pytest.raises(DataError, match="data.val_size"):
        load_dataset("mnist5k", val_size=4000)
