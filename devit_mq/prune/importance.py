"""Importance of each MLP neuron and attention head of a sub-model, as DeViT defines it.

Per batch, with ``P = softmax(model(x))`` the sub-model's predictions (its own head, on its group's
classes) and a linear kernel on ``P``:

- **neuron** ``j`` of block ``i`` (its GELU output over the tokens, ``[B, N]`` per batch):
  ``hsic_weight * minmax(HSIC(G(a_j), P)) + l1_weight * minmax(sum |a_j|)``, where ``G`` is the mean
  of Gaussian kernels at ``sigmas`` and ``minmax`` rescales the block's values to [0, 1];
- **head** ``h`` of block ``i`` (its attention output before ``attn.proj``, averaged over the
  head's width: ``[B, N]``): ``HSIC(G(o_h), P) - redundancy_weight * mean_{h' != h} HSIC(G(o_h),
  G(o_h'))`` (relevance minus redundancy with the block's other heads).

Scores are averaged over the batches (several, not one: a single batch's ranking is noisy).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from ..model import VisionTransformer
from .hsic import SIGMAS, gaussian_kernel, hsic, linear_kernel


@dataclass(frozen=True)
class ImportanceSettings:
    sigmas: tuple[float, ...] = SIGMAS
    hsic_weight: float = 0.1        # neurons: weight of the normalised HSIC relevance
    l1_weight: float = 0.9          # neurons: weight of the normalised activation L1 norm
    redundancy_weight: float = 0.1  # heads: weight of the mean HSIC redundancy
    head_feature: str = "mean over head_dim"  # what a head's activation per token is
    chunk: int = 256                # neurons whose kernels are built at once (memory bound)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()
                if k != "chunk"}


@dataclass
class Importance:
    """Per block: a score per neuron ``[M_i]`` and per head ``[H_i]`` (higher = more important)."""

    neurons: list[torch.Tensor]
    heads: list[torch.Tensor]
    batches: int
    samples: int

    def keep(self, heads: Sequence[int], neurons: Sequence[int]) -> tuple[list[list[int]], list[list[int]]]:
        """The indices (sorted) of the ``heads[i]`` best heads and ``neurons[i]`` best neurons per block."""
        return _top(self.heads, heads), _top(self.neurons, neurons)


def _top(scores: list[torch.Tensor], counts: Sequence[int]) -> list[list[int]]:
    # stable descending order: ties keep the lower index
    return [sorted(torch.argsort(s, descending=True, stable=True)[:k].tolist()) for s, k in zip(scores, counts, strict=True)]


def minmax(v: torch.Tensor) -> torch.Tensor:
    """``(v - min) / (max - min)``; a constant vector maps to zeros."""
    span = v.max() - v.min()
    return torch.zeros_like(v) if span <= 0 else (v - v.min()) / span


def neuron_scores(act: torch.Tensor, pred_kernel: torch.Tensor, s: ImportanceSettings) -> torch.Tensor:
    """``act [B, N, M]`` (one block's GELU outputs) -> ``[M]`` neuron scores of one batch."""
    features = act.permute(2, 0, 1)  # [M, B, N]: neuron j's sample vectors
    relevance = torch.cat([hsic(gaussian_kernel(features[lo:lo + s.chunk], s.sigmas), pred_kernel)
                           for lo in range(0, len(features), s.chunk)])
    l1 = act.abs().sum((0, 1))
    return s.hsic_weight * minmax(relevance) + s.l1_weight * minmax(l1)


def head_scores(out: torch.Tensor, heads: int, pred_kernel: torch.Tensor, s: ImportanceSettings) -> torch.Tensor:
    """``out [B, N, heads*head_dim]`` (one block's head-merged attention output) -> ``[heads]``."""
    batch, tokens, _ = out.shape
    features = out.reshape(batch, tokens, heads, -1).mean(-1).permute(2, 0, 1)  # [H, B, N]
    kernels = gaussian_kernel(features, s.sigmas)  # [H, B, B]
    relevance = hsic(kernels, pred_kernel)
    if heads == 1:
        return relevance
    pair = hsic(kernels.unsqueeze(1), kernels.unsqueeze(0))  # [H, H]
    redundancy = (pair.sum(1) - pair.diagonal()) / (heads - 1)
    return relevance - s.redundancy_weight * redundancy


@torch.no_grad()
def estimate_importance(model: VisionTransformer, batches: Iterable[torch.Tensor],
                        settings: ImportanceSettings = ImportanceSettings()) -> Importance:
    """Scores averaged over ``batches`` (normalised images ``[B, C, H, W]``, B >= 2 each)."""
    model.eval()
    cfg = model.config
    captured: dict[tuple[str, int], torch.Tensor] = {}
    handles = []
    for i, block in enumerate(model.blocks):
        handles.append(block.mlp.act.register_forward_hook(
            lambda _m, _a, out, i=i: captured.__setitem__(("mlp", i), out)))
        handles.append(block.attn.proj.register_forward_pre_hook(
            lambda _m, args, i=i: captured.__setitem__(("attn", i), args[0])))
    neurons = [torch.zeros(cfg.mlp_at(i)) for i in range(cfg.depth)]
    heads = [torch.zeros(cfg.heads_at(i)) for i in range(cfg.depth)]
    count = samples = 0
    try:
        for x in batches:
            logits = model(x)
            pred_kernel = linear_kernel(logits.float().softmax(-1))
            for i in range(cfg.depth):
                neurons[i] += neuron_scores(captured["mlp", i].float(), pred_kernel, settings).cpu()
                heads[i] += head_scores(captured["attn", i].float(), cfg.heads_at(i), pred_kernel, settings).cpu()
            count += 1
            samples += len(x)
    finally:
        for h in handles:
            h.remove()
    if not count:
        raise ValueError("importance needs at least one batch")
    return Importance([n / count for n in neurons], [h / count for h in heads], count, samples)
