"""The Numba kernels as attention backends: ``numba`` (fused CPU kernel) and ``cuda`` (Numba-CUDA).

``devit_mq.model.attention.get_backend`` imports this module on first use of either name, so that
importing the model never imports Numba. Both backends take the packed ``qkv [B, N, 3*D]`` tensor
that ``attn.qkv`` produced and hand its memory to the kernel as is (``.numpy()`` / the CUDA array
interface: no copy, no permute), and the kernel writes into a fresh ``[B, N, D]`` tensor.
They are inference-only: ``vit.Attention`` uses torch whenever autograd needs a graph.
"""

from __future__ import annotations

import numba
import torch

from devit_mq.kernels import attention_cpu

from .attention import mark_unavailable, register_backend

__all__ = ["cuda_attention", "numba_attention", "sync_numba_threads"]


def _launch_numba_threads_keeping_torch_threads() -> None:
    """Start Numba's thread pool now, without letting it change torch's thread count.

    With the OpenMP threading layer (shared with torch's libgomp), starting Numba's pool resets the
    calling thread's OpenMP thread count to ``NUMBA_NUM_THREADS``, which torch reads back as its own
    thread count: an edge pinned to one thread would silently run torch on all cores after its first
    attention call (and, on a loaded machine, every torch op would wait for a second thread)."""
    threads = torch.get_num_threads()
    numba.get_num_threads()  # launches the pool (once per process)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def sync_numba_threads() -> int:
    """Give the kernel as many threads as torch has (capped by Numba's pool); returns the count.

    ``numba.set_num_threads`` is per calling thread, so it is checked on every call (cheap)."""
    wanted = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != wanted:
        numba.set_num_threads(wanted)
    return wanted


def _output_like(qkv: torch.Tensor) -> torch.Tensor:
    batch, tokens, three_d = qkv.shape
    return torch.empty(batch, tokens, three_d // 3, dtype=torch.float32, device=qkv.device)


def numba_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Fused CPU attention on a float32 CPU tensor ``[B, N, 3*D]`` -> ``[B, N, D]``."""
    if qkv.device.type != "cpu" or qkv.dtype != torch.float32:
        raise TypeError(f"the numba attention backend runs float32 CPU tensors, got {qkv.dtype} on "
                        f"{qkv.device}; use the torch or cuda backend for this model")
    x = qkv.detach()
    if not x.is_contiguous():
        x = x.contiguous()
    out = _output_like(x)
    sync_numba_threads()
    attention_cpu.fused_attention(x.numpy(), num_heads, out=out.numpy())
    return out


def cuda_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Numba-CUDA attention. A CUDA tensor stays on its device (zero-copy through the CUDA array
    interface); a CPU tensor is copied to the device and back. fp16 input is accepted (fp32
    accumulation); the result has the input's dtype, as the following ``attn.proj`` expects."""
    from devit_mq.kernels import attention_cuda

    x = qkv.detach()
    if not x.is_contiguous():
        x = x.contiguous()
    if x.dtype not in (torch.float32, torch.float16):
        raise TypeError(f"the cuda attention backend takes float32 or float16, got {x.dtype}")
    out = _output_like(x)
    if x.is_cuda:
        from numba import cuda

        # launch on torch's current stream: ordered after the qkv projection, before attn.proj
        stream = cuda.external_stream(torch.cuda.current_stream(x.device).cuda_stream)
        attention_cuda.fused_attention(x, num_heads, out=out, stream=stream)
    else:
        attention_cuda.fused_attention(x.numpy(), num_heads, out=out.numpy())
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def _cuda_unavailable_reason() -> str | None:
    try:
        from devit_mq.kernels import attention_cuda
    except ImportError as exc:  # numba.cuda missing from this Numba build
        return f"numba.cuda cannot be imported ({exc})"
    if not attention_cuda.available():
        return ("no CUDA device found and Numba's CUDA simulator is off "
                "(NUMBA_ENABLE_CUDASIM=1, set before numba.cuda is imported, turns it on)")
    return None


_launch_numba_threads_keeping_torch_threads()
register_backend("numba", numba_attention)
_reason = _cuda_unavailable_reason()
if _reason is None:
    register_backend("cuda", cuda_attention)
else:
    mark_unavailable("cuda", _reason)
