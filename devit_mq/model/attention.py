"""Attention backends: one function signature, several implementations.

Every backend computes multi-head self-attention from the *packed* qkv projection
``qkv: [B, N, 3*D]`` (timm's ``attn.qkv`` output, laid out as ``[3, heads, head_dim]`` along the last
axis) and returns the head-merged output ``[B, N, D]`` (before ``attn.proj``).

- ``torch``: ``scaled_dot_product_attention``; differentiable; the reference.
- ``numba``: the fused CPU kernel from ``devit_mq.kernels`` (inference only).
- ``cuda``:  the Numba-CUDA kernel from ``devit_mq.kernels`` (inference only).

Kernel backends register themselves lazily, on first use, so importing the model never compiles
anything.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, int], torch.Tensor]

_BACKENDS: dict[str, AttentionFn] = {}
# name -> module whose import registers the backend (kept here so the model never imports numba early)
_LAZY: dict[str, str] = {
    "numba": "devit_mq.model.kernel_backends",
    "cuda": "devit_mq.model.kernel_backends",
}


# name -> why the module that provides it could not register it here (e.g. "no CUDA device")
_UNAVAILABLE: dict[str, str] = {}


class BackendUnavailable(RuntimeError):
    """The requested attention backend cannot run here (e.g. no CUDA device)."""


def split_qkv(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[B, N, 3*D]`` -> three ``[B, heads, N, head_dim]`` views, exactly as timm splits them."""
    batch, tokens, three_dim = qkv.shape
    head_dim = three_dim // (3 * num_heads)
    qkv = qkv.reshape(batch, tokens, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    return qkv.unbind(0)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, heads, N, head_dim]`` -> ``[B, N, heads*head_dim]``."""
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


def torch_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    q, k, v = split_qkv(qkv, num_heads)
    return merge_heads(F.scaled_dot_product_attention(q, k, v))


def naive_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Plain softmax(QK^T/sqrt(d))V in torch ops: the textbook formula, a benchmark baseline."""
    q, k, v = split_qkv(qkv, num_heads)
    scale = q.shape[-1] ** -0.5
    attn = (q * scale) @ k.transpose(-2, -1)
    return merge_heads(attn.softmax(dim=-1) @ v)


def register_backend(name: str, fn: AttentionFn) -> None:
    _BACKENDS[name] = fn
    _UNAVAILABLE.pop(name, None)


def mark_unavailable(name: str, reason: str) -> None:
    """Record why a lazily provided backend cannot run here, for ``get_backend``'s error."""
    _UNAVAILABLE[name] = reason


def get_backend(name: str) -> AttentionFn:
    if name not in _BACKENDS and name in _LAZY:
        import importlib

        importlib.import_module(_LAZY[name])
    try:
        return _BACKENDS[name]
    except KeyError:
        if name in _UNAVAILABLE:
            raise BackendUnavailable(
                f"attention backend {name!r} cannot run here: {_UNAVAILABLE[name]}"
            ) from None
        raise BackendUnavailable(
            f"attention backend {name!r} is not available; registered: {sorted(_BACKENDS)}"
        ) from None


def available_backends() -> list[str]:
    return sorted(set(_BACKENDS) | set(_LAZY))


register_backend("torch", torch_attention)
register_backend("naive", naive_attention)
