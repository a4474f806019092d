"""Fused multi-head self-attention as a Numba-CUDA kernel (flash-attention style).

Same interface as :mod:`.attention_cpu`: ``fused_attention(qkv, num_heads, out=None)`` with the packed
``[B, N, 3*D]`` projection (timm's layout) in, the head-merged ``[B, N, D]`` float32 out.

Schedule: one thread block per (batch*head, block of ``block_q`` query rows), one thread per query
row. The block walks the keys in tiles of ``block_k``: its threads copy the tile's K and V rows
into shared memory together (converting fp16 input to fp32 on the way), then each thread folds the
tile into its row's running softmax (running max, running sum, unnormalised output in fp32) and the
block moves on. Scores never touch global memory, and nothing assumes a multiple of the tile size.

The per-tile arithmetic is :func:`.attention_reference.load_tile` /
:func:`.attention_reference.online_softmax_tile`, compiled here unchanged as device functions,
so the CPU tests of ``tiled_attention_reference`` cover it; Numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``, set before ``numba.cuda`` is imported) runs this very module on
tiny shapes in CI. Nothing here is simulator-specific: the same code runs on a GPU.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import cuda

from .attention_reference import load_tile, online_softmax_tile

__all__ = ["DEFAULT_BLOCK_K", "DEFAULT_BLOCK_Q", "MAX_HEAD_DIM", "KernelUnavailable", "available",
           "fused_attention"]

DEFAULT_BLOCK_Q = 64   # query rows (= threads) per block
DEFAULT_BLOCK_K = 32   # keys per shared-memory tile: 2 * 32 * MAX_HEAD_DIM * 4 B = 32 KiB of smem
MAX_HEAD_DIM = 128     # per-thread q/acc arrays are sized at compile time

_load_tile = cuda.jit(device=True)(load_tile)
_tile_update = cuda.jit(device=True)(online_softmax_tile)


class KernelUnavailable(RuntimeError):
    """No CUDA device (and no simulator) to run the kernel on."""


def available() -> bool:
    """A CUDA device, or Numba's simulator, is there to run the kernel."""
    try:
        return bool(cuda.is_available())
    except Exception:  # a broken driver install reports through exceptions, not False
        return False


_kernels: dict[tuple[int, int, int], Any] = {}


def _kernel(block_q: int, block_k: int, max_hd: int) -> Any:
    """The kernel for one tile configuration (tile sizes are compile-time constants)."""
    key = (block_q, block_k, max_hd)
    if key in _kernels:
        return _kernels[key]

    @cuda.jit
    def attention_kernel(qkv, out, num_heads, head_dim, scale):  # type: ignore[no-untyped-def]
        n_tokens = qkv.shape[1]
        dim = num_heads * head_dim
        bh = cuda.blockIdx.y
        b = bh // num_heads
        h = bh - b * num_heads
        tid = cuda.threadIdx.x
        row = cuda.blockIdx.x * block_q + tid
        valid = row < n_tokens

        k_tile = cuda.shared.array((block_k, max_hd), np.float32)
        v_tile = cuda.shared.array((block_k, max_hd), np.float32)
        q = cuda.local.array(max_hd, np.float32)
        acc = cuda.local.array(max_hd, np.float32)
        scores = cuda.local.array(block_k, np.float32)
        row_max = np.float32(-math.inf)
        row_sum = np.float32(0.0)
        for c in range(head_dim):
            acc[c] = np.float32(0.0)
            q[c] = np.float32(0.0)
            if valid:
                q[c] = np.float32(qkv[b, row, h * head_dim + c]) * scale

        for key0 in range(0, n_tokens, block_k):
            _load_tile(qkv, b, key0, n_tokens, dim + h * head_dim, 2 * dim + h * head_dim, head_dim,
                       k_tile, v_tile, tid, block_q)
            cuda.syncthreads()
            if valid:  # no early return: every thread must reach both barriers
                # (not min(): Numba's CUDA target cannot compile the builtin's *args overload)
                n_keys = n_tokens - key0 if n_tokens - key0 < block_k else block_k
                row_max, row_sum = _tile_update(q, k_tile, v_tile, n_keys, head_dim, row_max, row_sum,
                                                acc, scores)
            cuda.syncthreads()  # the tile is overwritten next round

        if valid:
            inv = np.float32(1.0) / row_sum
            for c in range(head_dim):
                out[b, row, h * head_dim + c] = acc[c] * inv

    _kernels[key] = attention_kernel
    return attention_kernel


def _is_device_array(x: Any) -> bool:
    """A Numba device array, or a foreign one (torch, CuPy) exposing ``__cuda_array_interface__``.
    (The simulator has neither ``cuda.is_cuda_array`` nor ``cuda.as_cuda_array``.)"""
    if isinstance(x, np.ndarray):
        return False
    return cuda.devicearray.is_cuda_ndarray(x) or hasattr(x, "__cuda_array_interface__")


def _as_device_array(x: Any) -> Any:
    if cuda.devicearray.is_cuda_ndarray(x):
        return x
    return cuda.as_cuda_array(x)  # zero-copy view of a foreign device array


def fused_attention(qkv: Any, num_heads: int, out: Any = None, *, block_q: int = DEFAULT_BLOCK_Q,
                    block_k: int = DEFAULT_BLOCK_K, stream: Any = 0) -> Any:
    """Multi-head attention from the packed projection ``[B, N, 3*D]`` (float32 or float16).

    ``qkv`` is a numpy array (copied to the device; the result comes back as numpy, into ``out`` if
    given) or a CUDA device array / any object with ``__cuda_array_interface__`` (the result stays
    on the device, in ``out`` if given). Accumulation is fp32 and the output is float32.
    ``stream`` is the CUDA stream to launch on (e.g. ``cuda.external_stream`` of torch's current
    stream, so the kernel is ordered with the torch ops around it).
    """
    if not available():
        raise KernelUnavailable("no CUDA device found (set NUMBA_ENABLE_CUDASIM=1 before importing "
                                "numba.cuda to use Numba's simulator)")
    on_device = _is_device_array(qkv)
    if on_device:
        qkv = _as_device_array(qkv)
    elif not isinstance(qkv, np.ndarray):
        raise TypeError(f"qkv must be a numpy array or a CUDA array, got {type(qkv).__name__}")
    if qkv.ndim != 3:
        raise ValueError(f"qkv must be [B, N, 3*D], got shape {tuple(qkv.shape)}")
    if np.dtype(qkv.dtype) not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise TypeError(f"qkv must be float32 or float16, got {qkv.dtype}")
    batch, tokens, three_d = (int(s) for s in qkv.shape)
    if not isinstance(num_heads, (int, np.integer)) or num_heads <= 0 or three_d == 0 \
            or three_d % (3 * num_heads):
        raise ValueError(f"qkv's last axis ({three_d}) is not 3 * num_heads ({num_heads!r}) * head_dim")
    if tokens == 0:  # a softmax over no keys is undefined (an empty batch is fine)
        raise ValueError(f"qkv has no tokens: shape {(batch, tokens, three_d)}")
    head_dim = three_d // (3 * num_heads)
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} exceeds the kernel's MAX_HEAD_DIM={MAX_HEAD_DIM}")
    if block_q <= 0 or block_k <= 0:
        raise ValueError(f"block_q and block_k must be positive, got {block_q}, {block_k}")
    if batch * num_heads > 65535:
        raise ValueError(f"batch*heads={batch * num_heads} exceeds the grid's y limit (65535)")
    shape = (batch, tokens, three_d // 3)
    if out is not None:
        if tuple(int(s) for s in out.shape) != shape or np.dtype(out.dtype) != np.dtype(np.float32):
            raise ValueError(f"out must be float32 of shape {shape}, got {out.dtype} {tuple(out.shape)}")
        if on_device != _is_device_array(out):
            raise TypeError("out must live where qkv lives (both host or both device arrays)")

    if batch == 0:  # nothing to launch (a grid dimension of 0 is an error)
        if out is not None:
            return out
        return cuda.device_array(shape, np.float32) if on_device else np.empty(shape, np.float32)
    d_qkv = qkv if on_device else cuda.to_device(np.ascontiguousarray(qkv), stream=stream)
    if on_device:
        d_out = _as_device_array(out) if out is not None else cuda.device_array(shape, np.float32)
    else:
        d_out = cuda.device_array(shape, np.float32)
    grid = ((tokens + block_q - 1) // block_q, batch * num_heads)
    scale = np.float32(1.0 / math.sqrt(head_dim))
    kernel = _kernel(block_q, block_k, MAX_HEAD_DIM)
    kernel[grid, block_q, stream](d_qkv, d_out, int(num_heads), head_dim, scale)
    if on_device:
        return d_out
    if out is None:
        return d_out.copy_to_host(stream=stream)
    d_out.copy_to_host(out, stream=stream)
    if stream:
        stream.synchronize()
    return out
