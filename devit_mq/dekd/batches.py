"""Training data held as tensors; batches are augmented (uint8 -> [0, 1] -> affine) then normalised."""

from __future__ import annotations

import numpy as np
import torch

from ..data import AugmentConfig, ImageDataset, augment_batch
from ..model import InputSpec


def input_spec(data: ImageDataset) -> InputSpec:
    """Per-channel mean/std of the training images (recorded in the manifest; edges apply it)."""
    x = data.train_images.reshape(-1, data.train_images.shape[-1]).astype(np.float64) / 255.0
    h, _, c = data.image_shape
    return InputSpec(h, c, tuple(x.mean(0)), tuple(np.maximum(x.std(0), 1e-6)))


class Batches:
    """Images ``uint8 [N, C, H, W]`` + labels, indexed by the training loop."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, spec: InputSpec, seed: int) -> None:
        self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
        self.labels = torch.from_numpy(labels)
        self.mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(spec.std).view(1, -1, 1, 1)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.labels)

    def reseed(self, seed: int) -> None:
        """Restart the augmentation stream: each stage's draws then depend on its own seed only, not
        on which stages ran (or were resumed) before it."""
        self.generator.manual_seed(seed)

    def get(self, idx: torch.Tensor, augment: AugmentConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[idx].float().div_(255.0)
        if augment is not None:
            x = augment_batch(x, augment, self.generator)
        return (x - self.mean) / self.std, self.labels[idx]

    def subset(self, mask: torch.Tensor | np.ndarray) -> Batches:
        out = Batches.__new__(Batches)
        mask = torch.as_tensor(mask)
        out.images, out.labels = self.images[mask], self.labels[mask]
        out.mean, out.std, out.generator = self.mean, self.std, self.generator
        return out

    def chunks(self, batch_size: int = 256):
        """Un-augmented batches in order (evaluation)."""
        for start in range(0, len(self), batch_size):
            yield self.get(torch.arange(start, min(start + batch_size, len(self))))
