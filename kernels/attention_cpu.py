"""Fused multi-head self-attention on the CPU with Numba.

``fused_attention(qkv, num_heads)`` takes timm's packed projection ``qkv: [B, N, 3*D]`` (float32,
last axis laid out as ``[3, heads, head_dim]``) and returns the head-merged ``[B, N, D]`` =
``softmax(q k^T / sqrt(head_dim)) v`` per head, with no permute copies on either side.

How it is fast (one work item = one (batch, head, block of query rows)):

1. ``S^T = K Q^T`` with one BLAS sgemm straight from the packed array: a head's q/k/v are the
   matrices at offsets ``h*hd``, ``D + h*hd``, ``2D + h*hd`` with leading dimension ``3D``. The
   scale ``1/sqrt(hd)`` rides on sgemm's ``alpha``. S is stored key-major (``[keys, queries]``).
2. Softmax over the keys. Key-major storage makes every step an element-wise loop over the query
   columns (running max, then ``exp`` and running sum), so LLVM vectorises all of it with no
   reduction reassociation: ``fastmath`` is only ``contract`` (FMA), and results do not depend on
   summation order. ``exp`` is a Cephes-style polynomial written out so that it vectorises (Numba
   without Intel's SVML would otherwise call scalar ``expf``, which alone was slower than SDPA).
3. ``O = P V`` with a second sgemm writing straight into the head's columns of the ``[B, N, D]``
   output (leading dimension ``D``), then each output row is scaled by ``1/sum`` (``hd`` multiplies
   per row instead of ``N``).

Work items are spread over ``numba.get_num_threads()`` threads, each with its own scratch (no
allocation inside the kernel). The BLAS must not add threads of its own: on first use, the
BLAS behind SciPy is set to one thread for the whole process (see ``_blas``).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from ._blas import NO_TRANS, TRANS, i32_bits_as_f32, limit_scipy_blas_threads, sgemm

__all__ = ["fused_attention", "plan_query_blocks"]

_f32 = np.float32
# Largest query block: keeps a block's scores (block x N floats) within L2 for long sequences.
MAX_QUERY_BLOCK = 256


@njit(inline="always", fastmath={"contract"})
def _exp_nonpositive(x):  # type: ignore[no-untyped-def]
    """float32 ``exp(x)`` for ``x <= 0`` (softmax after the max is subtracted); measured max relative
    error 8e-8 on [-87, 0] (numpy's float32 exp: 2e-7).

    ``exp(x) = 2**k * exp(r)`` with ``k = round(x / ln 2)`` and ``|r| <= ln2/2``; ``exp(r)`` by a
    degree-7 polynomial; ``2**k`` assembled directly in the float's exponent bits. Below -87 the
    result would be subnormal: clamp (``exp(-87) ~ 1.6e-38`` is zero next to a row sum >= 1).
    A NaN passes the clamp and the polynomial unchanged, so NaN inputs give NaN rows, as in torch.
    """
    x = _f32(-87.0) if x < _f32(-87.0) else x
    k = np.int32(x * _f32(1.4426950408889634) - _f32(0.5))  # truncation == round for x <= 0
    t = _f32(k)
    r = x - t * _f32(0.693359375)        # ln2 split in two for an exact first product
    r = r - t * _f32(-2.12194440e-4)
    p = _f32(1.9875691500e-4)
    p = p * r + _f32(1.3981999507e-3)
    p = p * r + _f32(8.3334519073e-3)
    p = p * r + _f32(4.1665795894e-2)
    p = p * r + _f32(1.6666665459e-1)
    p = p * r + _f32(5.0000001201e-1)
    p = p * r * r + r + _f32(1.0)
    return p * i32_bits_as_f32((k + np.int32(127)) << np.int32(23))


@njit(fastmath={"contract"}, cache=True)
def _softmax_key_major(st, n_keys, m, col_max, inv_sum):  # type: ignore[no-untyped-def]
    """``st`` holds scores key-major (``st[j*m + i]`` = query i, key j). Replace them in place by
    ``exp(s - max_j s)`` per query column and put ``1/sum`` of each column in ``inv_sum``."""
    for i in range(m):
        col_max[i] = st[i]
        inv_sum[i] = _f32(0.0)
    for j in range(1, n_keys):
        row = st[j * m:(j + 1) * m]
        for i in range(m):
            v = row[i]
            col_max[i] = v if v > col_max[i] else col_max[i]
    for j in range(n_keys):
        row = st[j * m:(j + 1) * m]
        for i in range(m):
            e = _exp_nonpositive(row[i] - col_max[i])
            row[i] = e
            inv_sum[i] += e
    for i in range(m):
        inv_sum[i] = _f32(1.0) / inv_sum[i]


@njit(cache=True)
def _attend(qkv, out, num_heads, q_block, item, st, col_max, inv_sum, scalars):  # type: ignore[no-untyped-def]
    """One work item: query rows ``[r0, r0 + q_block)`` of one (batch, head)."""
    n, three_d = qkv.shape[1], qkv.shape[2]
    dim = three_d // 3
    hd = dim // num_heads
    n_qblocks = (n + q_block - 1) // q_block
    per_batch = num_heads * n_qblocks
    b = item // per_batch
    h = (item % per_batch) // n_qblocks
    r0 = (item % n_qblocks) * q_block
    m = min(n, r0 + q_block) - r0
    base = qkv[b].ctypes.data
    q_addr = base + 4 * (r0 * three_d + h * hd)
    k_addr = base + 4 * (dim + h * hd)
    v_addr = base + 4 * (2 * dim + h * hd)
    o_addr = out[b].ctypes.data + 4 * (r0 * dim + h * hd)
    scale = _f32(1.0 / np.sqrt(np.float64(hd)))
    # key-major scores: row-major [n, m] == column-major [m, n] = scale * Q K^T
    sgemm(TRANS, NO_TRANS, m, n, hd, scale, q_addr, three_d, k_addr, three_d, 0.0,
          st.ctypes.data, m, scalars)
    _softmax_key_major(st, n, m, col_max, inv_sum)
    # O row-major [m, hd] (ld dim) == column-major O^T [hd, m] = V^T P^T
    sgemm(NO_TRANS, TRANS, hd, m, n, 1.0, v_addr, three_d, st.ctypes.data, m, 0.0,
          o_addr, dim, scalars)
    for i in range(m):
        o = out[b, r0 + i, h * hd:(h + 1) * hd]
        s = inv_sum[i]
        for j in range(hd):
            o[j] *= s


@njit(inline="always")
def _run_chunk(qkv, out, num_heads, q_block, scores, vectors, c, items):  # type: ignore[no-untyped-def]
    chunks = scores.shape[0]
    st = scores[c]
    col_max = vectors[c, 0:q_block]
    inv_sum = vectors[c, q_block:2 * q_block]
    scalars = vectors[c, 2 * q_block:2 * q_block + 2]
    for item in range(c * items // chunks, (c + 1) * items // chunks):
        _attend(qkv, out, num_heads, q_block, item, st, col_max, inv_sum, scalars)


@njit(parallel=True, cache=True)
def _attention_parallel(qkv, out, num_heads, q_block, scores, vectors, items):  # type: ignore[no-untyped-def]
    for c in prange(scores.shape[0]):
        _run_chunk(qkv, out, num_heads, q_block, scores, vectors, c, items)


@njit(cache=True)
def _attention_serial(qkv, out, num_heads, q_block, scores, vectors, items):  # type: ignore[no-untyped-def]
    # one chunk: skips the parallel launch, about 1 us of a 30 us call at 50 tokens
    _run_chunk(qkv, out, num_heads, q_block, scores, vectors, 0, items)


def plan_query_blocks(batch: int, num_heads: int, tokens: int, threads: int) -> tuple[int, int]:
    """``(query_block, chunks)`` for a call: one block per head when that already gives every
    thread an equal share (and the block fits ``MAX_QUERY_BLOCK``), otherwise heads are split into
    query blocks until the work items divide evenly over the threads (or there are plenty)."""
    pairs = batch * num_heads
    n_blocks = -(-tokens // MAX_QUERY_BLOCK)
    if threads > 1:
        while (pairs * n_blocks) % threads and pairs * n_blocks < 4 * threads and n_blocks < tokens:
            n_blocks += 1
    q_block = -(-tokens // n_blocks)
    n_blocks = -(-tokens // q_block)
    return q_block, max(1, min(threads, pairs * n_blocks))


def _check(qkv: np.ndarray, num_heads: int, out: np.ndarray | None) -> tuple[int, int, int]:
    if not isinstance(qkv, np.ndarray) or qkv.ndim != 3:
        raise ValueError(f"qkv must be a 3-d numpy array [B, N, 3*D], got {type(qkv).__name__} "
                         f"of shape {getattr(qkv, 'shape', None)}")
    if qkv.dtype != np.float32:
        raise TypeError(f"qkv must be float32, got {qkv.dtype}")
    if not qkv.flags.c_contiguous:
        raise ValueError("qkv must be C-contiguous (the packed qkv projection)")
    batch, tokens, three_d = qkv.shape
    if not isinstance(num_heads, (int, np.integer)) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if three_d % (3 * num_heads) or three_d == 0:
        raise ValueError(f"qkv's last axis ({three_d}) is not 3 * num_heads ({num_heads}) * head_dim")
    if tokens == 0:  # a softmax over no keys is undefined (an empty batch is fine)
        raise ValueError(f"qkv has no tokens: shape {qkv.shape}")
    dim = three_d // 3
    if out is not None:
        if not isinstance(out, np.ndarray) or out.shape != (batch, tokens, dim) \
                or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous float32 array of shape {(batch, tokens, dim)}, "
                             f"got {getattr(out, 'dtype', None)} {getattr(out, 'shape', None)}")
        if np.may_share_memory(out, qkv):  # both contiguous: overlapping bounds is overlap
            raise ValueError("out must not overlap qkv")
    return batch, tokens, dim


def fused_attention(qkv: np.ndarray, num_heads: int, out: np.ndarray | None = None) -> np.ndarray:
    """Multi-head attention from the packed projection: ``[B, N, 3*D]`` -> ``[B, N, D]`` (float32).

    Runs on ``numba.get_num_threads()`` threads. ``out``, if given, receives the result. The first
    call sets SciPy's BLAS to one thread process-wide (the kernel parallelises by itself).
    """
    batch, tokens, dim = _check(qkv, num_heads, out)
    if out is None:
        out = np.empty((batch, tokens, dim), np.float32)
    if batch == 0:
        return out
    q_block, chunks = plan_query_blocks(batch, int(num_heads), tokens, numba.get_num_threads())
    # per-thread scratch, allocated per call: caching it across calls measured no faster
    scores = np.empty((chunks, q_block * tokens), np.float32)
    vectors = np.empty((chunks, 2 * q_block + 2), np.float32)
    limit_scipy_blas_threads()
    items = batch * int(num_heads) * -(-tokens // q_block)
    run = _attention_serial if chunks == 1 else _attention_parallel
    run(qkv, out, int(num_heads), q_block, scores, vectors, items)
    return out
