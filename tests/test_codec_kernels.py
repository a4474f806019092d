"""The Numba codec kernels against their numpy references (bit-identical), and the references
against the codec contracts (int8 error bound, round-to-nearest-even)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from devit_mq.kernels import codec as K
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

F32_MAX = float(np.finfo(np.float32).max)
SPECIALS = np.array(
    [0.0, -0.0, np.nan, -np.nan, np.inf, -np.inf, 1.0, -1.0, 65504.0, 65519.99, 65520.0, -65520.0, 1e-8, 2.98e-8,
     5.96e-8, 6.1e-5, 6.104e-5, 1e-40, -1e-45, F32_MAX, -F32_MAX, 1.00390625, 3.0e38],
    dtype=np.float32,
)

float32_arrays = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=70),
    elements=st.floats(width=32, allow_nan=True, allow_infinity=True),
)
finite_matrices = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=70),
    elements=st.floats(-(2.0**100), 2.0**100, width=32),
)


def wide_range(n: int, seed: int) -> np.ndarray:
    """Values spread over every binade from float32 subnormals to 1e38, both signs, plus specials."""
    rng = np.random.default_rng(seed)
    x = (rng.choice([-1, 1], n) * np.exp(rng.uniform(-103, 88, n))).astype(np.float32)
    return np.concatenate([SPECIALS, x])


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-identical, except that any NaN equals any NaN (payload bits are not part of the contract)."""
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    nan = np.isnan(a32)
    return bool(np.array_equal(nan, np.isnan(b32)) and np.array_equal(a[~nan], b[~nan]))


# ---------------------------------------------------------------------------------------------- int8


@pytest.mark.parametrize("block", [1, 7, 32, 64, 192, 384, 1000])
@pytest.mark.parametrize("shape", [(1, 192), (3, 384), (64, 192), (5, 100)])
def test_quantize_kernel_matches_reference(shape, block):
    rng = np.random.default_rng(shape[0] * 1000 + block)
    x = (rng.standard_normal(shape) * rng.uniform(0.01, 50, (shape[0], 1))).astype(np.float32)
    x[0, : min(3, shape[1])] = 0
    if shape[0] > 2:
        x[1] = 0  # a zero vector: scale 0, q 0
        x[2, -1] = np.nan
    q, s = K.quantize_int8_numba(x, block)
    q_ref, s_ref = K.quantize_int8_ref(x, block)
    assert q.dtype == np.int8 and s.dtype == np.float32
    assert s.shape == (shape[0], K.num_blocks(shape[1], block))
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(s, s_ref)  # NaN positions compare equal here
    np.testing.assert_array_equal(K.dequantize_int8_numba(q, s, block), K.dequantize_int8_ref(q_ref, s_ref, block))


@settings(max_examples=60, deadline=None)
@given(x=float32_arrays, block=st.integers(1, 80))
def test_quantize_kernel_matches_reference_on_any_values(x, block):
    q, s = K.quantize_int8_numba(x, block)
    q_ref, s_ref = K.quantize_int8_ref(x, block)
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(s, s_ref)
    assert same_bits(K.dequantize_int8_numba(q, s, block), K.dequantize_int8_ref(q, s, block))


@settings(max_examples=60, deadline=None)
@given(x=finite_matrices, block=st.integers(1, 80))
def test_int8_error_is_at_most_half_a_scale(x, block):
    q, s = K.quantize_int8_ref(x, block)
    y = K.dequantize_int8_ref(q, s, block)
    per_element_scale = np.repeat(s, block, axis=1)[:, : x.shape[1]].astype(np.float64)
    err = np.abs(y.astype(np.float64) - x.astype(np.float64))
    # scale/2 from rounding, plus float32 rounding of x/scale and q*scale, plus the scale's own
    # underflow for vectors below ~1e-36 (their scale is subnormal or zero)
    bound = per_element_scale / 2 * (1 + 1e-6) + 2 * np.finfo(np.float32).eps * np.abs(x) + 2e-36
    assert np.all(err <= bound)
    assert np.all(np.abs(q.astype(np.int16)) <= 127)


def test_int8_block_semantics():
    x = np.array([[1.0, -2.0, 0.5, 127.0, 0.0, 0.0]], np.float32)
    q, s = K.quantize_int8_ref(x, 3)
    np.testing.assert_array_equal(s, np.array([[2.0, 127.0]], np.float32) / np.float32(127))
    np.testing.assert_array_equal(q, [[64, -127, 32, 127, 0, 0]])  # 63.5 -> 64 and 31.75 -> 32
    q, s = K.quantize_int8_ref(np.zeros((2, 5), np.float32), 5)
    assert not q.any() and not s.any()
    q, s = K.quantize_int8_ref(np.array([[np.inf, 1.0], [np.nan, 1.0]], np.float32), 2)
    assert np.isinf(s[0, 0]) and np.isnan(s[1, 0]) and not q.any()


def test_round_half_to_even():
    # scale 1 (max 127): 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -0.5 -> 0
    x = np.array([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5]], np.float32)
    for fn in (K.quantize_int8_ref, K.quantize_int8_numba):
        q, _ = fn(x, 6)
        np.testing.assert_array_equal(q, [[127, 0, 2, 2, 0, -2]])


def test_kernels_reject_bad_input():
    with pytest.raises(ValueError):
        K.quantize_int8_numba(np.zeros((2, 3), np.float64), 3)
    with pytest.raises(ValueError):
        K.quantize_int8_numba(np.zeros((2, 6), np.float32)[:, ::2], 3)
    with pytest.raises(ValueError):
        K.dequantize_int8_numba(np.zeros((2, 4), np.int8), np.zeros((2, 1), np.float32), 2)
    with pytest.raises(ValueError):
        K.num_blocks(10, 0)
    with pytest.raises(ValueError):
        K.f32_to_f16_numba(np.zeros(3, np.float64))
    strided = np.arange(12, dtype=np.float32)[::3]  # non-contiguous input is fine for the converters
    np.testing.assert_array_equal(K.f32_to_f16_numba(strided), K.f32_to_f16_ref(strided))


# ---------------------------------------------------------------------------------------------- fp16 / bf16


def test_f16_encode_matches_numpy_everywhere():
    x = wide_range(50_000, 1)
    assert same_bits(K.f32_to_f16_numba(x).view(np.float16), K.f32_to_f16_ref(x).view(np.float16))
    np.testing.assert_array_equal(K.f32_to_f16_numba(x[~np.isnan(x)]), K.f32_to_f16_ref(x[~np.isnan(x)]))


def test_f16_encode_half_way_cases():
    # every float32 exactly half-way between two neighbouring halves, across all half exponents
    halves = np.arange(0, 0x7C00, 7, dtype=np.uint16)
    lo = K.f16_to_f32_ref(halves).astype(np.float64)
    hi = K.f16_to_f32_ref(halves + 1).astype(np.float64)
    mid = ((lo + hi) / 2).astype(np.float32)
    np.testing.assert_array_equal(K.f32_to_f16_numba(mid), K.f32_to_f16_ref(mid))
    np.testing.assert_array_equal(K.f32_to_f16_numba(-mid), K.f32_to_f16_ref(-mid))


def test_f16_and_bf16_decode_every_bit_pattern():
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    for fast, ref in ((K.f16_to_f32_numba, K.f16_to_f32_ref), (K.bf16_to_f32_numba, K.bf16_to_f32_ref)):
        np.testing.assert_array_equal(fast(bits).view(np.uint32), ref(bits).view(np.uint32))


def test_bf16_encode_matches_reference_and_rounds_to_nearest_even():
    x = wide_range(50_000, 2)
    np.testing.assert_array_equal(K.f32_to_bf16_numba(x), K.f32_to_bf16_ref(x))
    words = np.array([0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0x7F7FFFFF, 0xFF800000, 0x7F800001, 0xFFFFFFFF],
                     np.uint32)
    expected = [0x3F80, 0x3F82, 0x3F81, 0x3F80, 0x7F80, 0xFF80, 0x7FC0, 0xFFC0]
    for fn in (K.f32_to_bf16_ref, K.f32_to_bf16_numba):
        assert fn(words.view(np.float32)).tolist() == expected


@settings(max_examples=40, deadline=None)
@given(x=float32_arrays)
def test_half_precision_kernels_match_references_on_any_values(x):
    assert same_bits(K.f32_to_f16_numba(x).view(np.float16), K.f32_to_f16_ref(x).view(np.float16))
    np.testing.assert_array_equal(K.f32_to_bf16_numba(x), K.f32_to_bf16_ref(x))
    assert K.f32_to_f16_numba(x).shape == x.shape


F32_MASK, F16_MASK, BF16_MASK = 0x7F800000, 0x7C00, 0x7F80


@settings(max_examples=40, deadline=None)
@given(x=float32_arrays)
def test_finite_bits_matches_numpy_for_float32_float16_and_bfloat16(x):
    flat = x.reshape(-1)
    bits32 = flat.view(np.uint32)
    want = bool(np.isfinite(flat).all())
    assert K.finite_bits_numba(bits32, F32_MASK) == K.finite_bits_ref(bits32, F32_MASK) == want
    half = K.f32_to_f16_ref(flat)  # beyond +-65504 a finite float32 becomes inf: numpy must agree
    want16 = bool(np.isfinite(half.view(np.float16)).all())
    assert K.finite_bits_numba(half, F16_MASK) == K.finite_bits_ref(half, F16_MASK) == want16
    bf = K.f32_to_bf16_ref(flat)
    want_bf = bool(np.isfinite(K.bf16_to_f32_ref(bf)).all())
    assert K.finite_bits_numba(bf, BF16_MASK) == K.finite_bits_ref(bf, BF16_MASK) == want_bf


def test_finite_bits_finds_one_bad_value_anywhere():
    x = np.ones(1000, np.float32)
    assert K.finite_bits_numba(x.view(np.uint32), F32_MASK)
    for pos in (0, 517, 999):
        for bad in (np.nan, np.inf, -np.inf):
            y = x.copy()
            y[pos] = bad
            assert not K.finite_bits_numba(y.view(np.uint32), F32_MASK)
            assert not K.finite_bits_numba(y.astype(np.float16).view(np.uint16), F16_MASK)
            assert not K.finite_bits_numba(K.f32_to_bf16_ref(y), BF16_MASK)
    # the largest finite values and the smallest subnormals are finite
    edge = np.array([np.finfo(np.float32).max, -np.finfo(np.float32).max, 1e-45, -0.0], np.float32)
    assert K.finite_bits_numba(edge.view(np.uint32), F32_MASK)
    assert K.finite_bits_numba(np.array([65504, -65504, 1e-7], np.float16).view(np.uint16), F16_MASK)


def test_kernels_package_does_not_import_devit_mq_modules():
    code = ("import sys, devit_mq.kernels.codec as c, numpy as np; c.finite_bits_numba(np.ones(2, np.uint32), 0x7F800000);"
            "print(sorted(m for m in sys.modules if m.startswith('devit_mq')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "['devit_mq', 'devit_mq.kernels', 'devit_mq.kernels.codec']"
