"""The ViT block's element-wise ops as Numba kernels, plus the fused attention kernel: the ``numba``
executor's ops. Same names and signatures as :mod:`.vit_numpy` (their reference), so one forward
takes either module.

What fusing buys (each is one pass over the activations where NumPy makes several, each with a
temporary the size of the activations):

- ``residual_layernorm``: the residual add, the bias of the layer before it (``attn.proj`` or
  ``mlp.fc2``, whose matrix product ran without bias) and the next LayerNorm.
- ``bias_gelu``: ``fc1``'s bias and the exact GELU. ``erfc`` is the same Chebyshev fit as the NumPy
  reference, with the vectorisable polynomial ``exp`` of the attention kernel, so the loop
  vectorises (a call to libm's scalar ``erff`` per element would cost more than the matrix product).

- ``linear``: the matrix products call SciPy's BLAS ``sgemm`` from ``@njit`` (the binding the
  attention kernel uses) rather than NumPy's ``@``: on this project's machine SciPy's OpenBLAS build
  was 1.1-1.7x faster than NumPy's on ViT-Ti/16's shapes (qkv 197x192x576: 397 vs 659 us, 1 thread).
  The bias is written first and accumulated into (``beta = 1``). That BLAS runs on one thread
  (the attention kernel's process-wide setting), so with more threads the rows are split over
  Numba's threads, one ``sgemm`` each.

The element-wise kernels are serial: at these sizes a parallel launch costs more than the loop, and the matrix
products and attention, where the time goes, use the threads. ``fastmath`` lets the row sums of the
LayerNorm be reassociated (vectorised); no ``nnan``/``ninf``, so a NaN still propagates.
``error_model="numpy"``: Python's zero-division check on every float division kept the GELU loop
scalar (1.7 ms instead of 0.19 ms for 197 x 768 values).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from ._blas import NO_TRANS, TRANS, limit_scipy_blas_threads, sgemm
from .attention_cpu import _exp_nonpositive, fused_attention
from .vit_numpy import ERFC_COEFFS

__all__ = ["attention", "bias_gelu", "layernorm", "linear", "residual_layernorm"]

_f32 = np.float32
_FAST = {"reassoc", "contract", "arcp", "nsz"}
_C0, _C1, _C2, _C3, _C4, _C5, _C6, _C7, _C8, _C9 = (_f32(c) for c in ERFC_COEFFS)


@njit(inline="always", fastmath=_FAST, error_model="numpy")
def _gelu(x):  # type: ignore[no-untyped-def]
    z = abs(x) * _f32(0.7071067811865476)
    t = _f32(1.0) / (_f32(1.0) + _f32(0.5) * z)
    p = _C9
    for c in (_C8, _C7, _C6, _C5, _C4, _C3, _C2, _C1, _C0):
        p = p * t + c
    # the exponent is <= 3e-8 for z >= 0: inside the polynomial exp's range (|r| <= ln2/2)
    tail = t * _exp_nonpositive(p - z * z)  # erfc(|z|)
    return _f32(0.5) * x * (_f32(2.0) - tail if x >= 0 else tail)


@njit(fastmath=_FAST, error_model="numpy", cache=True)
def _bias_gelu(h, bias):  # type: ignore[no-untyped-def]
    rows, cols = h.shape
    for r in range(rows):
        row = h[r]
        for j in range(cols):
            row[j] = _gelu(row[j] + bias[j])


@njit(inline="always", fastmath=_FAST, error_model="numpy")
def _normalise_row(row, weight, bias, eps, out):  # type: ignore[no-untyped-def]
    d = row.shape[0]
    s = _f32(0.0)
    for j in range(d):
        s += row[j]
    mean = s / _f32(d)
    v = _f32(0.0)
    for j in range(d):
        c = row[j] - mean
        v += c * c
    rstd = _f32(1.0) / np.sqrt(v / _f32(d) + eps)
    for j in range(d):
        out[j] = (row[j] - mean) * rstd * weight[j] + bias[j]


@njit(fastmath=_FAST, error_model="numpy", cache=True)
def _layernorm(x, weight, bias, eps, out):  # type: ignore[no-untyped-def]
    for r in range(x.shape[0]):
        _normalise_row(x[r], weight, bias, eps, out[r])


@njit(fastmath=_FAST, error_model="numpy", cache=True)
def _residual_layernorm(x, y, y_bias, weight, bias, eps, out):  # type: ignore[no-untyped-def]
    for r in range(x.shape[0]):
        row, add = x[r], y[r]
        for j in range(row.shape[0]):
            row[j] += add[j] + y_bias[j]
        _normalise_row(row, weight, bias, eps, out[r])


@njit(inline="always")
def _linear_rows(x, weight, bias, out, r0, r1, scalars):  # type: ignore[no-untyped-def]
    """Rows ``[r0, r1)`` of ``out = x @ weight.T (+ bias)``. Row-major ``out [m, n]`` is the
    column-major ``[n, m] = weight @ x^T``: ``weight [n, k]`` row-major is column-major ``[k, n]``
    (so transposed), ``x`` rows are column-major ``[k, m]``."""
    n, k = weight.shape
    beta = 0.0
    if bias.shape[0] == n:
        for r in range(r0, r1):
            out[r] = bias
        beta = 1.0
    sgemm(TRANS, NO_TRANS, n, r1 - r0, k, 1.0, weight.ctypes.data, k, x.ctypes.data + 4 * r0 * k, k, beta,
          out.ctypes.data + 4 * r0 * n, n, scalars)


@njit(cache=True)
def _linear_serial(x, weight, bias, out, scalars):  # type: ignore[no-untyped-def]
    _linear_rows(x, weight, bias, out, 0, x.shape[0], scalars)


@njit(parallel=True, cache=True)
def _linear_parallel(x, weight, bias, out, scalars, chunks):  # type: ignore[no-untyped-def]
    rows = x.shape[0]
    for c in prange(chunks):
        _linear_rows(x, weight, bias, out, c * rows // chunks, (c + 1) * rows // chunks, scalars[c])


_NO_BIAS = np.empty(0, _f32)


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """``x [R, in] @ weight[out, in].T (+ bias)`` -> ``[R, out]``; every array C-contiguous float32."""
    x = np.ascontiguousarray(x)  # sgemm reads raw rows: a strided view would be read wrong
    out = np.empty((x.shape[0], weight.shape[0]), _f32)
    limit_scipy_blas_threads()
    bias = _NO_BIAS if bias is None else bias
    chunks = min(numba.get_num_threads(), max(1, x.shape[0] // 16))  # at least 16 rows per sgemm
    if chunks == 1:
        _linear_serial(x, weight, bias, out, np.empty(2, _f32))
    else:
        _linear_parallel(x, weight, bias, out, np.empty((chunks, 2), _f32), chunks)
    return out


def layernorm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    out = np.empty_like(x)
    _layernorm(x, weight, bias, _f32(eps), out)
    return out


def residual_layernorm(x: np.ndarray, y: np.ndarray, y_bias: np.ndarray, weight: np.ndarray, bias: np.ndarray,
                       eps: float) -> np.ndarray:
    out = np.empty_like(x)
    _residual_layernorm(x, y, y_bias, weight, bias, _f32(eps), out)
    return out


def bias_gelu(h: np.ndarray, bias: np.ndarray) -> np.ndarray:
    _bias_gelu(h, bias)
    return h


def attention(qkv: np.ndarray, num_heads: int) -> np.ndarray:
    return fused_attention(qkv, num_heads)
