"""The NumPy and Numba ops of the torch-free ViT forward against exact references."""

import math

import numpy as np
import pytest
from devit_mq.kernels import vit_numba, vit_numpy

RNG = np.random.default_rng(0)


def _exact_gelu(x: np.ndarray) -> np.ndarray:
    return np.array([0.5 * v * math.erfc(-v / math.sqrt(2.0)) for v in x.astype(np.float64).ravel()]).reshape(x.shape)


@pytest.mark.parametrize("ops", [vit_numpy, vit_numba], ids=["numpy", "numba"])
def test_bias_gelu_is_exact_gelu_to_float32_rounding(ops):
    x = np.linspace(-10, 10, 40001, dtype=np.float32).reshape(1, -1)
    bias = np.full(x.shape[1], 0.25, np.float32)
    out = ops.bias_gelu(x.copy(), bias)
    ref = _exact_gelu(x + bias)
    assert np.abs(out - ref).max() < 5e-7
    # relative in the negative tail too (GELU(-5) ~ -1.4e-6): the erfc fit is relative, not absolute
    tail = (x + bias) < -3
    assert np.max(np.abs(out[tail] - ref[tail]) / np.abs(ref[tail])) < 1e-4


def test_gelu_propagates_nan():
    out = vit_numba.bias_gelu(np.array([[np.nan, 1.0]], np.float32), np.zeros(2, np.float32))
    assert np.isnan(out[0, 0]) and np.isfinite(out[0, 1])


@pytest.mark.parametrize("rows,dim", [(1, 48), (50, 64), (197, 192)])
def test_layernorms_agree_with_float64_reference(rows, dim):
    x = RNG.standard_normal((rows, dim)).astype(np.float32) * 3 + 1
    y = RNG.standard_normal((rows, dim)).astype(np.float32)
    yb, w, b = (RNG.standard_normal(dim).astype(np.float32) for _ in range(3))
    x64 = x.astype(np.float64) + y + yb
    ref = (x64 - x64.mean(1, keepdims=True)) / np.sqrt(x64.var(1, keepdims=True) + 1e-6) * w + b
    for ops in (vit_numpy, vit_numba):
        np.testing.assert_allclose(ops.layernorm(x64.astype(np.float32), w, b, 1e-6), ref, atol=2e-5)
        stream = x.copy()
        np.testing.assert_allclose(ops.residual_layernorm(stream, y, yb, w, b, 1e-6), ref, atol=2e-5)
        np.testing.assert_allclose(stream, x64, atol=1e-5)  # the residual stream is updated in place


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_matches_numpy(threads, with_bias):
    import numba

    x = RNG.standard_normal((197, 192)).astype(np.float32)
    w = RNG.standard_normal((576, 192)).astype(np.float32)
    bias = RNG.standard_normal(576).astype(np.float32) if with_bias else None
    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        out = vit_numba.linear(x, w, bias)
        strided = vit_numba.linear(np.asfortranarray(x), w, bias)  # not C-contiguous: copied, not misread
    finally:
        numba.set_num_threads(before)
    ref = x.astype(np.float64) @ w.T.astype(np.float64) + (0 if bias is None else bias)
    np.testing.assert_allclose(out, ref, atol=1e-3, rtol=1e-5)
    np.testing.assert_array_equal(out, strided)
    np.testing.assert_allclose(vit_numpy.linear(x, w, bias), ref, atol=1e-3, rtol=1e-5)


def test_numpy_attention_matches_fused_kernel_and_prefix_queries():
    qkv = RNG.standard_normal((2, 50, 3 * 64)).astype(np.float32)
    full = vit_numpy.attention(qkv, 2)
    np.testing.assert_allclose(full, vit_numba.attention(qkv, 2), atol=1e-6)
    np.testing.assert_allclose(vit_numpy.attention(qkv, 2, queries=2), full[:, :2], atol=1e-6)
