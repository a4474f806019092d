"""The Hilbert-Schmidt independence criterion (biased estimator) and the kernels of DeViT's pruning.

``HSIC(K, L) = trace(K H L H) / (n - 1)^2`` with ``H = I - 11^T / n`` (Gretton et al. 2005). Both
kernel matrices are centred (``H K H``); ``trace(HKH HLH) = trace(K H L H)`` since ``H`` is
idempotent, so centring one side or both gives the same value. Everything is batched over a leading
axis: one HSIC per feature (neuron or head) in one call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

SIGMAS = (1.0, 2.0, 4.0, 8.0, 16.0)


def center(k: torch.Tensor) -> torch.Tensor:
    """``H K H`` for ``[..., n, n]`` kernel matrices (row and column means removed, grand mean added)."""
    return k - k.mean(-1, keepdim=True) - k.mean(-2, keepdim=True) + k.mean((-2, -1), keepdim=True)


def squared_distances(x: torch.Tensor) -> torch.Tensor:
    """``[..., n, d]`` -> ``[..., n, n]`` pairwise squared Euclidean distances (clamped at 0)."""
    sq = (x * x).sum(-1)
    return (sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2 * x @ x.transpose(-1, -2)).clamp_min(0)


def gaussian_kernel(x: torch.Tensor, sigmas: Sequence[float] = SIGMAS) -> torch.Tensor:
    """The mean of Gaussian kernels ``exp(-|xi - xj|^2 / (2 sigma^2))`` over ``sigmas``: ``[..., n, n]``."""
    dist = squared_distances(x)
    return torch.stack([torch.exp(-dist / (2.0 * s * s)) for s in sigmas]).mean(0)


def linear_kernel(y: torch.Tensor) -> torch.Tensor:
    """``Y Y^T``: ``[..., n, c]`` -> ``[..., n, n]``."""
    return y @ y.transpose(-1, -2)


def hsic(k: torch.Tensor, l_: torch.Tensor) -> torch.Tensor:
    """Biased HSIC of kernel matrices ``[..., n, n]`` (broadcast over the leading axes)."""
    n = k.shape[-1]
    if n < 2:
        raise ValueError("HSIC needs at least 2 samples")
    return (center(k) * center(l_).transpose(-1, -2)).sum((-2, -1)) / (n - 1) ** 2
