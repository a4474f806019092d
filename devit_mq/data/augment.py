"""Batch augmentation in plain torch ops (random affine: shift, rotation, scale; optional flip).

torchvision is deliberately not used: it does not work beside the pinned torch."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    enabled: bool = True
    shift: float = 2.0      # max translation, pixels
    rotate: float = 10.0    # max rotation, degrees
    scale: float = 0.1      # scale in [1 - scale, 1 + scale]
    hflip: bool = False     # never for digits


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random affine of float images ``[B, C, H, W]`` in [0, 1]; the border fills with 0 (black)."""
    if not cfg.enabled:
        return x
    b, _, h, w = x.shape

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(b, generator=generator) * (hi - lo) + lo

    angle = uniform(-cfg.rotate, cfg.rotate) * (math.pi / 180.0)
    scale = uniform(1.0 - cfg.scale, 1.0 + cfg.scale)
    tx = uniform(-cfg.shift, cfg.shift) * 2.0 / w  # affine_grid works in [-1, 1] coordinates
    ty = uniform(-cfg.shift, cfg.shift) * 2.0 / h
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    if cfg.hflip:
        flip = torch.rand(b, generator=generator) < 0.5
        theta[flip, 0, :2] *= -1
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
