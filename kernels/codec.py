"""Codec kernels for feature vectors (int8, fp16, bf16, finiteness), with their numpy references.

int8 layout shared by every function here: ``x`` is a C-contiguous float32 matrix ``[N, D]`` (N vectors of
width D); it is split along D into blocks of ``block`` elements (the last block may be shorter), and
each block gets one scale ``max|x| / 127`` stored in ``scales[N, nb]`` with ``nb = ceil(D / block)``.
``block == D`` is the per-vector codec. ``q = rint(x / scale)`` (round half to even) clipped to
[-127, 127]; dequantisation is ``q * scale``, so the error per element is at most ``scale / 2`` plus
float32 rounding.

Blocks whose scale is zero (all-zero vectors, or values so small the scale underflows) or not finite
(the block holds a NaN or an infinity) quantise to all-zero ``q``; the non-finite scale is kept so a
receiver can reject the block instead of silently reading zeros.

fp16 and bf16 conversions work on the IEEE bit patterns (uint16 arrays), rounding to nearest even;
numpy has no bfloat16 and casts float16 one element at a time (measured 85 us each way for 49,152
values, against about 10 us for these kernels), which is why they exist.

The numpy functions are the reference; the Numba functions must produce bit-identical output (the
tests check this; NaN payload bits excepted, a NaN stays a NaN). Numba is imported on first use only, and every jitted function is compiled lazily
with ``cache=True``, so importing this module costs nothing and a second process loads the compiled
code from the on-disk cache instead of compiling again (about 1 s per kernel).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "num_blocks",
    "quantize_int8_ref",
    "dequantize_int8_ref",
    "quantize_int8_numba",
    "dequantize_int8_numba",
    "f32_to_f16_ref",
    "f16_to_f32_ref",
    "f32_to_bf16_ref",
    "bf16_to_f32_ref",
    "finite_bits_ref",
    "f32_to_f16_numba",
    "f16_to_f32_numba",
    "f32_to_bf16_numba",
    "bf16_to_f32_numba",
    "finite_bits_numba",
]

_QMAX = np.float32(127.0)


def num_blocks(width: int, block: int) -> int:
    """Number of scales per vector of ``width`` elements with blocks of ``block``."""
    if block < 1:
        raise ValueError(f"block size must be >= 1, got {block}")
    return -(-width // block)


def _check_matrix(x: np.ndarray, dtype: type) -> None:
    if x.ndim != 2 or x.dtype != dtype or not x.flags.c_contiguous:
        raise ValueError(f"expected a C-contiguous {np.dtype(dtype).name} [N, D] matrix, got {x.dtype} {x.shape}")


# ----------------------------------------------------------------------------------------------
# numpy reference
# ----------------------------------------------------------------------------------------------


def _blocked(x: np.ndarray, block: int) -> np.ndarray:
    """``x [N, D]`` zero-padded to ``[N, nb, block]`` (a view when D is a multiple of block)."""
    n, d = x.shape
    nb = num_blocks(d, block)
    pad = nb * block - d
    if pad:
        x = np.pad(x, ((0, 0), (0, pad)))
    return x.reshape(n, nb, block)


def quantize_int8_ref(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference: ``x float32 [N, D]`` -> ``(q int8 [N, D], scales float32 [N, nb])``."""
    _check_matrix(x, np.float32)
    n, d = x.shape
    xb = _blocked(x, block)
    scale = np.abs(xb).max(axis=2, initial=np.float32(0)) / _QMAX  # NaN propagates through max
    ok = np.isfinite(scale) & (scale > 0)
    divisor = np.where(ok, scale, np.float32(1))[:, :, None]
    q = np.where(ok[:, :, None], np.rint(xb / divisor), np.float32(0))
    q = np.clip(q, -_QMAX, _QMAX).astype(np.int8)
    return np.ascontiguousarray(q.reshape(n, -1)[:, :d]), scale.astype(np.float32, copy=False)


def dequantize_int8_ref(q: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    """Reference: ``(q int8 [N, D], scales float32 [N, nb])`` -> float32 ``[N, D]``."""
    _check_matrix(q, np.int8)
    n, d = q.shape
    if scales.shape != (n, num_blocks(d, block)):
        raise ValueError(f"scales shape {scales.shape} does not match q {q.shape} with block {block}")
    if scales.shape[1] != 1:  # per-block: one scale per element (per-vector broadcasts as is)
        scales = np.repeat(scales, block, axis=1)[:, :d]
    # 0 * inf in a non-finite block gives NaN and 127 * a scale within an ulp of max/127 can round to
    # inf, exactly as in the kernel; receivers reject such scales before dequantising
    with np.errstate(invalid="ignore", over="ignore"):
        return q.astype(np.float32) * scales


def f32_to_f16_ref(x: np.ndarray) -> np.ndarray:
    """Reference: float32 -> IEEE half bit patterns (uint16), numpy's cast (round to nearest even)."""
    with np.errstate(over="ignore"):  # values beyond +-65504 become inf, as IEEE says
        return x.astype(np.float16).view(np.uint16)


def f16_to_f32_ref(bits: np.ndarray) -> np.ndarray:
    """Reference: IEEE half bit patterns (uint16) -> float32 (exact)."""
    return bits.view(np.float16).astype(np.float32)


def f32_to_bf16_ref(x: np.ndarray) -> np.ndarray:
    """Reference: float32 -> bfloat16 bit patterns (uint16), the top 16 bits rounded to nearest even.
    A NaN becomes the quiet NaN 0x7fc0 (with its sign): plain rounding could carry its low mantissa
    bits into the exponent and turn it into inf."""
    u = x.view(np.uint32)
    bits = ((u + ((u >> 16) & 1) + np.uint32(0x7FFF)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        bits[nan] = ((u[nan] >> 16) & 0x8000).astype(np.uint16) | np.uint16(0x7FC0)
    return bits


def bf16_to_f32_ref(bits: np.ndarray) -> np.ndarray:
    """Reference: bfloat16 bit patterns (uint16) -> float32 (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def finite_bits_ref(bits: np.ndarray, exponent_mask: int) -> bool:
    """Reference: no element of ``bits`` (IEEE bit patterns as unsigned ints) has every exponent bit
    set, i.e. no NaN and no infinity. Masks: float32 ``0x7F800000`` (uint32), float16 ``0x7C00`` and
    bfloat16 ``0x7F80`` (uint16). Checking the bits lets a receiver vet a payload before decoding it."""
    mask = bits.dtype.type(exponent_mask)
    return bool(((bits & mask) != mask).all())


# ----------------------------------------------------------------------------------------------
# Numba kernels (one pass over the data, no temporaries)
# ----------------------------------------------------------------------------------------------

_jitted: dict[str, Callable[..., Any]] = {}


def _kernels() -> dict[str, Callable[..., Any]]:
    """Import Numba and build the jitted kernels on first use (compilation itself happens on first
    call per signature, served from the on-disk cache after the first process)."""
    if _jitted:
        return _jitted
    from numba import njit

    # Loops run from 0 over per-block slices: with a non-zero range start Numba cannot prove the
    # index non-negative, keeps its wraparound check and LLVM does not vectorise (measured 25x slower).
    # error_model="numpy" keeps float division free of zero checks for the same reason. The max|x|
    # reduction works on the IEEE bit patterns: ``bits & 0x7fffffff`` orders non-negative floats like
    # their values and puts NaN above inf, and an integer max vectorises where a NaN-aware float max
    # does not.
    @njit(cache=True, nogil=True, error_model="numpy")
    def quantize(x, block, q, scales):  # pragma: no cover - runs compiled
        n, d = x.shape
        nb = scales.shape[1]
        bits = x.view(np.uint32)
        word = np.empty(1, dtype=np.uint32)
        as_float = word.view(np.float32)
        for r in range(n):
            for j in range(nb):
                lo = j * block
                hi = min(lo + block, d)
                xb = x[r, lo:hi]
                bb = bits[r, lo:hi]
                qb = q[r, lo:hi]
                m = np.uint32(0)
                for i in range(bb.shape[0]):
                    a = bb[i] & np.uint32(0x7FFFFFFF)
                    if a > m:
                        m = a
                word[0] = m
                scale = as_float[0] / np.float32(127.0)
                scales[r, j] = scale
                if scale > 0 and scale < np.float32(np.inf):
                    for i in range(xb.shape[0]):
                        t = np.rint(xb[i] / scale)
                        if t > np.float32(127.0):
                            t = np.float32(127.0)
                        if t < np.float32(-127.0):
                            t = np.float32(-127.0)
                        qb[i] = np.int8(t)
                else:
                    for i in range(qb.shape[0]):
                        qb[i] = 0

    @njit(cache=True, nogil=True, error_model="numpy")
    def dequantize(q, scales, block, out):  # pragma: no cover - runs compiled
        n, d = q.shape
        nb = scales.shape[1]
        for r in range(n):
            for j in range(nb):
                lo = j * block
                hi = min(lo + block, d)
                s = scales[r, j]
                qb = q[r, lo:hi]
                ob = out[r, lo:hi]
                for i in range(qb.shape[0]):
                    ob[i] = np.float32(qb[i]) * s

    u32 = np.uint32

    @njit(cache=True, nogil=True, error_model="numpy")
    def f32_to_f16(x, bits, out):  # pragma: no cover - runs compiled
        # Branch-free (selects only) so the loop vectorises. Normal range: re-bias the exponent by
        # 127 - 15 = 112 and round the 13 dropped mantissa bits to nearest even; the carry walks into
        # the exponent as it should. Below 2**-14 the half is subnormal: k * 2**-24 with k = rint(|x| *
        # 2**24), exact in float32. From 65520 (half-way to the next power of two) up: inf.
        for i in range(x.shape[0]):
            u = bits[i]
            sign = (u >> u32(16)) & u32(0x8000)
            a = u & u32(0x7FFFFFFF)
            m = a - u32(0x38000000)
            h = (m + u32(0xFFF) + ((m >> u32(13)) & u32(1))) >> u32(13)
            small = a < u32(0x38800000)
            tiny = abs(x[i]) if small else np.float32(0.0)
            h = u32(np.rint(tiny * np.float32(16777216.0))) if small else h
            h = u32(0x7C00) if a >= u32(0x477FF000) else h
            h = (u32(0x7E00) | ((a >> u32(13)) & u32(0x3FF))) if a > u32(0x7F800000) else h
            out[i] = np.uint16(sign | h)

    @njit(cache=True, nogil=True, error_model="numpy")
    def f16_to_f32(h, out_bits, out):  # pragma: no cover - runs compiled
        # Three vectorised passes over one output: (1) move exponent and mantissa into float32
        # position, (2) multiply by 2**112 to re-bias the exponent (exact, and it normalises half
        # subnormals for free), (3) restore the sign and turn exponent 31 into inf/NaN.
        n = h.shape[0]
        for i in range(n):
            out_bits[i] = (u32(h[i]) & u32(0x7FFF)) << u32(13)
        for i in range(n):
            out[i] = out[i] * np.float32(5.192296858534828e33)
        for i in range(n):
            v = u32(h[i])
            special = (v & u32(0x7C00)) == u32(0x7C00)
            body = (u32(0x7F800000) | ((v & u32(0x3FF)) << u32(13))) if special else out_bits[i]
            out_bits[i] = ((v & u32(0x8000)) << u32(16)) | body

    @njit(cache=True, nogil=True, error_model="numpy")
    def f32_to_bf16(bits, out):  # pragma: no cover - runs compiled
        for i in range(bits.shape[0]):
            u = bits[i]
            r = (u + u32(0x7FFF) + ((u >> u32(16)) & u32(1))) >> u32(16)
            nan = (u & u32(0x7FFFFFFF)) > u32(0x7F800000)
            r = (((u >> u32(16)) & u32(0x8000)) | u32(0x7FC0)) if nan else r
            out[i] = np.uint16(r)

    @njit(cache=True, nogil=True, error_model="numpy")
    def bf16_to_f32(h, out_bits):  # pragma: no cover - runs compiled
        for i in range(h.shape[0]):
            out_bits[i] = u32(h[i]) << u32(16)

    @njit(cache=True, nogil=True, error_model="numpy")
    def finite_bits(bits, mask):  # pragma: no cover - runs compiled
        # exponent all ones <=> NaN or inf; an integer max over the exponents vectorises
        m = mask ^ mask  # zero of the bits' own type
        for i in range(bits.shape[0]):
            e = bits[i] & mask
            if e > m:
                m = e
        return m != mask

    _jitted["f32_to_f16"] = f32_to_f16
    _jitted["f16_to_f32"] = f16_to_f32
    _jitted["f32_to_bf16"] = f32_to_bf16
    _jitted["bf16_to_f32"] = bf16_to_f32
    _jitted["finite_bits"] = finite_bits
    _jitted["quantize"] = quantize
    _jitted["dequantize"] = dequantize
    return _jitted


def quantize_int8_numba(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Numba version of :func:`quantize_int8_ref`."""
    _check_matrix(x, np.float32)
    n, d = x.shape
    q = np.empty((n, d), dtype=np.int8)
    scales = np.empty((n, num_blocks(d, block)), dtype=np.float32)
    _kernels()["quantize"](x, block, q, scales)
    return q, scales


def dequantize_int8_numba(q: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    """Numba version of :func:`dequantize_int8_ref`."""
    _check_matrix(q, np.int8)
    n, d = q.shape
    if scales.shape != (n, num_blocks(d, block)) or scales.dtype != np.float32:
        raise ValueError(f"scales shape {scales.shape} does not match q {q.shape} with block {block}")
    out = np.empty((n, d), dtype=np.float32)
    _kernels()["dequantize"](q, scales, block, out)
    return out


def _flat(x: np.ndarray, dtype: type) -> np.ndarray:
    """``x`` as a 1-D array (a view when contiguous, else a copy)."""
    if x.dtype != dtype:
        raise ValueError(f"expected a {np.dtype(dtype).name} array, got {x.dtype}")
    return x.reshape(-1)


def f32_to_f16_numba(x: np.ndarray) -> np.ndarray:
    """Numba version of :func:`f32_to_f16_ref` (same shape, uint16)."""
    flat = _flat(x, np.float32)
    out = np.empty(flat.shape[0], dtype=np.uint16)
    _kernels()["f32_to_f16"](flat, flat.view(np.uint32), out)
    return out.reshape(x.shape)


def f16_to_f32_numba(bits: np.ndarray) -> np.ndarray:
    """Numba version of :func:`f16_to_f32_ref` (same shape, float32)."""
    flat = _flat(bits, np.uint16)
    out = np.empty(flat.shape[0], dtype=np.float32)
    _kernels()["f16_to_f32"](flat, out.view(np.uint32), out)
    return out.reshape(bits.shape)


def f32_to_bf16_numba(x: np.ndarray) -> np.ndarray:
    """Numba version of :func:`f32_to_bf16_ref` (same shape, uint16)."""
    flat = _flat(x, np.float32)
    out = np.empty(flat.shape[0], dtype=np.uint16)
    _kernels()["f32_to_bf16"](flat.view(np.uint32), out)
    return out.reshape(x.shape)


def bf16_to_f32_numba(bits: np.ndarray) -> np.ndarray:
    """Numba version of :func:`bf16_to_f32_ref` (same shape, float32)."""
    flat = _flat(bits, np.uint16)
    out = np.empty(flat.shape[0], dtype=np.float32)
    _kernels()["bf16_to_f32"](flat, out.view(np.uint32))
    return out.reshape(bits.shape)


def finite_bits_numba(bits: np.ndarray, exponent_mask: int) -> bool:
    """Numba version of :func:`finite_bits_ref` (``bits`` 1-D uint16 or uint32)."""
    return bool(_kernels()["finite_bits"](bits, bits.dtype.type(exponent_mask)))
