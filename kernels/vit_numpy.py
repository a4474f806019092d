"""The ViT block's element-wise and attention ops in plain NumPy: the ``numpy`` executor's ops and
the reference the Numba ops (:mod:`.vit_numba`) are tested against.

Every op here and in :mod:`.vit_numba` has the same name and signature, so a forward written once
takes either module as its ``ops``. Activations are C-contiguous float32 matrices ``[rows, D]``
(rows = batch x tokens).

- ``linear(x, weight, bias=None) -> [R, out]``: ``x @ weight.T (+ bias)``, ``weight [out, in]`` as
  timm stores it (here NumPy's BLAS; the Numba ops call SciPy's).
- ``layernorm(x, weight, bias, eps) -> [R, D]``
- ``residual_layernorm(x, y, y_bias, weight, bias, eps) -> [R, D]``: ``x += y + y_bias`` *in place*
  (the residual stream), then the LayerNorm of the updated ``x``: one call where a block has two.
- ``bias_gelu(h, bias) -> h``: ``h = gelu(h + bias)`` in place, exact (erf) GELU.
- ``attention(qkv, num_heads) -> [B, N, D]`` from the packed ``[B, N, 3*D]`` projection.
"""

from __future__ import annotations

import numpy as np

__all__ = ["attention", "bias_gelu", "erfc", "gelu", "layernorm", "linear", "residual_layernorm"]

_f32 = np.float32
_SQRT_HALF = _f32(0.7071067811865476)
# Numerical Recipes' erfc (Chebyshev fit of erfc(z) = t exp(-z^2 + P(t)), t = 1 / (1 + z/2)):
# fractional error < 1.2e-7 for every z >= 0, i.e. at float32 rounding, also far in the tail where
# GELU(x) for negative x is tiny. NumPy has no erf; SciPy's would cost its import on small devices.
ERFC_COEFFS = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807, -1.13520398,
               1.48851587, -0.82215223, 0.17087277)


def erfc(z: np.ndarray) -> np.ndarray:
    """``erfc(z)`` for ``z >= 0`` (float32), with fractional error below 1.2e-7."""
    t = _f32(1.0) / (_f32(1.0) + _f32(0.5) * z)
    poly = np.full_like(z, _f32(ERFC_COEFFS[-1]))
    for c in ERFC_COEFFS[-2::-1]:
        poly *= t
        poly += _f32(c)
    poly -= z * z
    return t * np.exp(poly)


def gelu(h: np.ndarray) -> np.ndarray:
    """Exact GELU ``x * Phi(x) = x/2 * erfc(-x / sqrt 2)``, in place."""
    tail = erfc(np.abs(h) * _SQRT_HALF)  # erfc(|z|); erfc(-|z|) = 2 - erfc(|z|)
    np.subtract(_f32(2.0), tail, out=tail, where=h >= 0)
    h *= _f32(0.5)
    h *= tail
    return h


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    out = x @ weight.T
    if bias is not None:
        out += bias
    return out


def bias_gelu(h: np.ndarray, bias: np.ndarray) -> np.ndarray:
    h += bias
    return gelu(h)


def layernorm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=1, keepdims=True)
    out = x - mean
    var = np.einsum("ij,ij->i", out, out)[:, None] / _f32(x.shape[1])  # biased, as torch's LayerNorm
    out *= _f32(1.0) / np.sqrt(var + _f32(eps))
    out *= weight
    out += bias
    return out


def residual_layernorm(x: np.ndarray, y: np.ndarray, y_bias: np.ndarray, weight: np.ndarray, bias: np.ndarray,
                       eps: float) -> np.ndarray:
    x += y
    x += y_bias
    return layernorm(x, weight, bias, eps)


def attention(qkv: np.ndarray, num_heads: int, queries: int | None = None) -> np.ndarray:
    """``softmax(q k^T / sqrt(head_dim)) v`` per head -> ``[B, queries, D]``; ``queries`` (default:
    all N) keeps only the first query rows, which is all the last block needs for the prefix tokens."""
    batch, tokens, three_d = qkv.shape
    dim = three_d // 3
    head_dim = dim // num_heads
    n_q = tokens if queries is None else queries
    split = qkv.reshape(batch, tokens, 3, num_heads, head_dim)
    q = split[:, :n_q, 0].transpose(0, 2, 1, 3)  # [B, H, n_q, hd]
    k = split[:, :, 1].transpose(0, 2, 3, 1)     # [B, H, hd, N]
    v = split[:, :, 2].transpose(0, 2, 1, 3)     # [B, H, N, hd]
    scores = (q * _f32(1.0 / np.sqrt(head_dim))) @ k  # [B, H, n_q, N]
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return (scores @ v).transpose(0, 2, 1, 3).reshape(batch, n_q, dim)
