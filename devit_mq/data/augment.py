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


def affine_theta(batch: int, cfg: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor | None:
    """``[batch, 2, 3]`` random affine matrices (``affine_grid`` form), or None when disabled.

    Drawn apart from the images so that data-parallel ranks can draw a whole global batch's
    parameters from one stream and each apply its own shard's."""
    if not cfg.enabled:
        return None

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(batch, generator=generator) * (hi - lo) + lo

    angle = uniform(-cfg.rotate, cfg.rotate) * (math.pi / 180.0)
    scale = uniform(1.0 - cfg.scale, 1.0 + cfg.scale)
    # translation in pixels of the configured shift; affine_grid works in [-1, 1] coordinates, so it
    # is applied per image size in apply_affine
    tx, ty = uniform(-cfg.shift, cfg.shift), uniform(-cfg.shift, cfg.shift)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    if cfg.hflip:
        flip = torch.rand(batch, generator=generator) < 0.5
        theta[flip, 0, :2] *= -1
    return theta


def apply_affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Warp float images ``[B, C, H, W]`` in [0, 1] by ``theta`` (translation in pixels); the border
    fills with 0 (black)."""
    _, _, h, w = x.shape
    theta = theta.to(x.device, x.dtype).clone()
    theta[:, 0, 2] *= 2.0 / w
    theta[:, 1, 2] *= 2.0 / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random affine of float images ``[B, C, H, W]`` in [0, 1]: shift, rotation, scale, optional flip."""
    theta = affine_theta(x.shape[0], cfg, generator)
    return x if theta is None else apply_affine(x, theta)
