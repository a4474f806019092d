"""Reference implementations the attention kernels are tested against (plain numpy / Python).

- :func:`attention_reference`: the textbook formula in float64, from the packed ``[B, N, 3*D]``
  projection (timm's layout) to the head-merged ``[B, N, D]``.
- :func:`tiled_attention_reference`: the CUDA kernel's algorithm step for step (query rows in
  blocks, one row per "thread", keys in tiles, online softmax) run on the CPU. The per-tile logic
  lives in the plain-Python functions :func:`load_tile` and :func:`online_softmax_tile`, which
  ``attention_cuda`` compiles *unchanged* as CUDA device functions: the CPU test of this reference
  is a test of the kernel's arithmetic, and the simulator only has to confirm the launch/indexing.

This module imports neither Numba nor anything from ``devit_mq``.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["attention_reference", "load_tile", "online_softmax_tile", "split_heads",
           "tiled_attention_reference"]


def split_heads(qkv: np.ndarray, num_heads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[B, N, 3*D]`` -> q, k, v as ``[B, heads, N, head_dim]`` views (timm's split)."""
    batch, tokens, three_d = qkv.shape
    if three_d % (3 * num_heads):
        raise ValueError(f"last axis {three_d} is not 3 * num_heads ({num_heads}) * head_dim")
    x = qkv.reshape(batch, tokens, 3, num_heads, three_d // (3 * num_heads)).transpose(2, 0, 3, 1, 4)
    return x[0], x[1], x[2]


def attention_reference(qkv: np.ndarray, num_heads: int) -> np.ndarray:
    """``softmax(q k^T / sqrt(hd)) v`` per head, merged to ``[B, N, D]``, computed in float64."""
    q, k, v = split_heads(np.asarray(qkv, dtype=np.float64), num_heads)
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1])
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = scores / scores.sum(axis=-1, keepdims=True)
    out = probs @ v  # [B, H, N, hd]
    batch, heads, tokens, hd = out.shape
    return out.transpose(0, 2, 1, 3).reshape(batch, tokens, heads * hd)


# -- the CUDA kernel's per-tile logic (plain Python; compiled as device functions by attention_cuda) --
def load_tile(qkv, b, key0, n_tokens, k_col, v_col, head_dim, k_tile, v_tile, first, stride):  # type: ignore[no-untyped-def]
    """Copy keys ``key0 ..`` of one head into the K/V tiles (as float32), cooperatively: the caller
    handles elements ``first, first + stride, ...`` of the tile (one thread's share on the GPU).
    Rows past the last token are left untouched: they are never read."""
    block_k = k_tile.shape[0]
    for idx in range(first, block_k * head_dim, stride):
        j = idx // head_dim
        c = idx - j * head_dim
        key = key0 + j
        if key < n_tokens:
            k_tile[j, c] = np.float32(qkv[b, key, k_col + c])
            v_tile[j, c] = np.float32(qkv[b, key, v_col + c])


def online_softmax_tile(q, k_tile, v_tile, n_keys, head_dim, row_max, row_sum, acc, scores):  # type: ignore[no-untyped-def]
    """Fold ``n_keys`` keys of a tile into one query row's running softmax; returns the new
    ``(row_max, row_sum)`` and updates ``acc`` (the unnormalised output row) in place.

    ``q`` is already scaled by ``1/sqrt(hd)``. When the maximum grows, what was accumulated so
    far is rescaled by ``exp(old_max - new_max)``; the first tile starts from ``row_max = -inf``
    (the rescale factor is then 0). ``scores`` is scratch of at least ``n_keys`` floats.
    """
    tile_max = row_max
    for j in range(n_keys):
        s = np.float32(0.0)
        for c in range(head_dim):
            s += q[c] * k_tile[j, c]
        scores[j] = s
        if s > tile_max:
            tile_max = s
    correction = np.float32(math.exp(row_max - tile_max))
    row_sum = row_sum * correction
    for c in range(head_dim):
        acc[c] = acc[c] * correction
    for j in range(n_keys):
        p = np.float32(math.exp(scores[j] - tile_max))
        row_sum += p
        for c in range(head_dim):
            acc[c] += p * v_tile[j, c]
    return tile_max, row_sum


def tiled_attention_reference(qkv: np.ndarray, num_heads: int, block_q: int = 4,
                              block_k: int = 4) -> np.ndarray:
    """The CUDA kernel's schedule on the CPU (slow: tiny shapes only). Returns float32 ``[B, N, D]``.

    One "block" per (batch, head, ``block_q`` query rows); it walks the keys in tiles of
    ``block_k`` held in "shared" K/V tiles, each "thread" keeping its row's running max, sum and
    unnormalised output, exactly as ``attention_cuda`` does.
    """
    batch, n_tokens, three_d = qkv.shape
    dim = three_d // 3
    head_dim = dim // num_heads
    scale = np.float32(1.0 / math.sqrt(head_dim))
    out = np.zeros((batch, n_tokens, dim), np.float32)
    k_tile = np.zeros((block_k, head_dim), np.float32)
    v_tile = np.zeros((block_k, head_dim), np.float32)
    scores = np.zeros(block_k, np.float32)
    for b in range(batch):
        for h in range(num_heads):
            for row0 in range(0, n_tokens, block_q):
                rows = range(row0, min(row0 + block_q, n_tokens))
                q = {r: np.float32(qkv[b, r, h * head_dim:(h + 1) * head_dim]) * scale for r in rows}
                acc = {r: np.zeros(head_dim, np.float32) for r in rows}
                state = {r: (np.float32(-np.inf), np.float32(0.0)) for r in rows}
                for key0 in range(0, n_tokens, block_k):
                    for t in range(block_q):  # every thread of the block loads its share
                        load_tile(qkv, b, key0, n_tokens, dim + h * head_dim, 2 * dim + h * head_dim,
                                  head_dim, k_tile, v_tile, t, block_q)
                    n_keys = min(block_k, n_tokens - key0)
                    for r in rows:
                        state[r] = online_softmax_tile(q[r], k_tile, v_tile, n_keys, head_dim,
                                                       state[r][0], state[r][1], acc[r], scores)
                for r in rows:
                    out[b, r, h * head_dim:(h + 1) * head_dim] = acc[r] / state[r][1]
    return out
