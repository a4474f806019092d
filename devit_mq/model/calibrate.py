"""Pick the fastest attention backend for a model's real shapes, at start-up.

Which implementation wins depends on the machine, the thread count, the batch size and the token
count (the Numba kernel wins at ViT-Tiny shapes on the cores it was tuned on; torch's SDPA may win
elsewhere), so an edge measures instead of guessing: a short, interleaved timing of each candidate
on a ``qkv`` of the model's shape, after a warm-up call that also pays any JIT compilation.
A candidate that cannot run here, or whose output disagrees with torch's, is skipped.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence

import torch

from .attention import BackendUnavailable, get_backend, torch_attention
from .vit import VisionTransformer

log = logging.getLogger(__name__)

# a candidate further than this from torch's output (max abs, fp32) is not trusted
AGREEMENT_TOLERANCE = 1e-4


def time_backends(
    num_heads: int, qkv: torch.Tensor, candidates: Sequence[str], reps: int = 25
) -> dict[str, float]:
    """Median seconds per call of each runnable, agreeing candidate on ``qkv``. Rounds are
    interleaved (each round times every candidate once) so that a noisy machine hurts all alike."""
    reference = torch_attention(qkv, num_heads)
    fns = {}
    for name in dict.fromkeys(candidates):
        try:
            fn = get_backend(name)
            out = fn(qkv, num_heads)  # warm-up: JIT compilation, scratch allocation
        except (BackendUnavailable, TypeError, ValueError) as exc:
            log.info("attention backend %r skipped: %s", name, exc)
            continue
        diff = (out.float() - reference).abs().max().item()
        if not diff <= AGREEMENT_TOLERANCE:
            log.warning("attention backend %r skipped: max abs diff %.3g from torch", name, diff)
            continue
        fns[name] = fn
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, reps)):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(qkv, num_heads)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in samples.items()}


def select_backend(
    model: VisionTransformer,
    batch_size: int = 1,
    candidates: Sequence[str] = ("torch", "numba"),
    reps: int = 25,
    *,
    apply: bool = True,
) -> str:
    """The fastest of ``candidates`` for ``model`` at ``batch_size`` with torch's current thread
    count; also installed on the model unless ``apply=False``. Falls back to ``torch``."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    cfg = model.config
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(batch_size, cfg.num_tokens, 3 * cfg.embed_dim, generator=generator)
    with torch.inference_mode():
        timings = time_backends(cfg.num_heads, qkv, candidates, reps)
    best = min(timings, key=timings.__getitem__) if timings else "torch"
    log.info("attention backend %r selected for batch %d, %d threads (median us: %s)", best, batch_size,
             torch.get_num_threads(), {k: round(v * 1e6, 1) for k, v in timings.items()})
    if apply:
        model.set_attention_backend(best)
    return best
