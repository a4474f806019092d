"""Training data held as tensors; batches are augmented (uint8 -> [0, 1] -> affine) then normalised."""

from __future__ import annotations

import numpy as np
import torch

from ..data import AugmentConfig, DataError, ImageDataset, affine_theta, apply_affine
from ..data.lazy import LazyImages
from ..model import InputSpec

STATS_SAMPLE = 2000  # images whose pixels give a streamed folder's mean/std

# the constants pretrained checkpoints expect (timm: IMAGENET_DEFAULT_*, IMAGENET_INCEPTION_*)
NORMALIZATIONS = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                  "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}


def input_spec(data: ImageDataset, normalize: str = "dataset") -> InputSpec:
    """Per-channel mean/std (recorded in the manifest; edges apply it): the training images' own, or
    the named constants a pretrained checkpoint was trained with."""
    h, _, c = data.image_shape
    if normalize != "dataset":
        mean, std = NORMALIZATIONS[normalize]
        if c != 3:
            raise DataError(f"data.normalize: {normalize} is for RGB images; the data has {c} channel(s)")
        return InputSpec(h, c, mean, std)
    images = data.train_images
    if isinstance(images, LazyImages):  # a streamed folder: the statistics of an even sample
        images = images[np.linspace(0, len(images) - 1, min(len(images), STATS_SAMPLE)).astype(int)].decode()
    x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return InputSpec(h, c, tuple(x.mean(0)), tuple(np.maximum(x.std(0), 1e-6)))


class Batches:
    """Images ``uint8 [N, C, H, W]`` + labels, indexed by the training loop. They stay in host memory
    as uint8; each batch goes to ``device`` and is augmented and normalised there."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, spec: InputSpec, seed: int,
                 device: torch.device | str = "cpu") -> None:
        # a streamed folder stays paths (decoded per batch); arrays become uint8 [N, C, H, W] tensors
        self.images = images if isinstance(images, LazyImages) else \
            torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
        self.labels = torch.from_numpy(labels)
        self.device = torch.device(device)
        self.mean = torch.tensor(spec.mean).view(1, -1, 1, 1).to(self.device)
        self.std = torch.tensor(spec.std).view(1, -1, 1, 1).to(self.device)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.labels)

    def reseed(self, seed: int) -> None:
        """Restart the augmentation stream: each stage's draws then depend on its own seed only, not
        on which stages ran (or were resumed) before it."""
        self.generator.manual_seed(seed)

    def get(self, idx: torch.Tensor, augment: AugmentConfig | None = None,
            part: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images ``[b, C, H, W]`` and labels ``[b]`` (on ``device``) of ``idx[part]``.

        The augmentation is drawn for all of ``idx`` (a global batch) and cut to ``part`` (this
        rank's shard), so data-parallel ranks together see exactly what one process would."""
        theta = None if augment is None else affine_theta(len(idx), augment, self.generator)
        idx = idx[part]
        x = self._pixels(idx).to(self.device).float().div_(255.0)
        if theta is not None:
            x = apply_affine(x, theta[part])
        return (x - self.mean) / self.std, self.labels[idx].to(self.device)

    def _pixels(self, idx: torch.Tensor) -> torch.Tensor:
        """uint8 ``[b, C, H, W]`` of ``idx`` (decoded here for a streamed folder)."""
        if isinstance(self.images, LazyImages):
            return torch.from_numpy(self.images[idx.numpy()].decode()).permute(0, 3, 1, 2)
        return self.images[idx]

    def subset(self, mask: torch.Tensor | np.ndarray) -> Batches:
        out = Batches.__new__(Batches)
        mask = torch.as_tensor(mask)
        out.images = self.images[mask.numpy()] if isinstance(self.images, LazyImages) else self.images[mask]
        out.labels = self.labels[mask]
        out.mean, out.std, out.generator, out.device = self.mean, self.std, self.generator, self.device
        return out

    def chunks(self, batch_size: int = 256):
        """Un-augmented batches in order (evaluation)."""
        for start in range(0, len(self), batch_size):
            yield self.get(torch.arange(start, min(start + batch_size, len(self))))
