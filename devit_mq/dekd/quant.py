"""The reference for what the wire does to features, and its straight-through training simulation.

int8: symmetric, per vector (last axis): ``scale = max|x| / 127``, ``q = clip(round(x / scale), -127,
127)`` with round-half-to-even (``torch.round``/``numpy.round``), and ``x' = q * scale``; an all-zero
vector has scale 0 and decodes to zeros. fp16: a cast. The wire codec implements the same math; the
fusion head is trained through this simulation (codec-aware training) so the wire costs no accuracy.
"""

from __future__ import annotations

import torch

INT8_MAX = 127.0


def int8_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q int8 [..., D], scale float32 [..., 1])`` per vector along the last axis."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True) / INT8_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(x / safe), -INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def int8_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


def simulate_codec(x: torch.Tensor, codec: str) -> torch.Tensor:
    """Encode then decode ``x`` as the wire would (no gradient through the rounding)."""
    if codec == "fp32":
        return x
    if codec == "fp16":
        return x.half().to(x.dtype)
    if codec == "int8":
        return int8_dequantize(*int8_quantize(x)).to(x.dtype)
    raise ValueError(f"unknown codec {codec!r}; use fp32, fp16 or int8")


def codec_ste(x: torch.Tensor, codec: str) -> torch.Tensor:
    """Straight-through estimator: the forward value is the decoded feature, the gradient is identity."""
    if codec == "fp32":
        return x
    return x + (simulate_codec(x.detach(), codec) - x.detach())
