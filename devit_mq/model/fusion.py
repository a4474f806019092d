"""The aggregator's fusion head and the in-process reference ensemble."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .config import FusionConfig
from .vit import VisionTransformer


class FusionHead(nn.Module):
    """concat(N prefix tokens) -> Linear(sum widths, hidden) -> Linear(hidden, C), per prefix token.

    Input ``[B, P, sum(in_dims)]``: the sub-models' tokens concatenated along the last axis in
    sub-model order, a missing sub-model's slice zero-filled. With P=2 the DIST branch runs in
    parallel and the branches' logits are averaged (as DeiT's heads are).
    """

    def __init__(self, config: FusionConfig) -> None:
        super().__init__()
        self.config = config
        self.cls_proj = nn.Linear(config.concat_dim, config.hidden_dim)
        self.cls_head = nn.Linear(config.hidden_dim, config.num_classes)
        self.dist_proj: nn.Linear | None = None
        self.dist_head: nn.Linear | None = None
        if config.num_prefix_tokens == 2:
            self.dist_proj = nn.Linear(config.concat_dim, config.hidden_dim)
            self.dist_head = nn.Linear(config.hidden_dim, config.num_classes)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def _check(self, features: torch.Tensor) -> None:
        cfg = self.config
        expected = (cfg.num_prefix_tokens, cfg.concat_dim)
        if features.ndim != 3 or tuple(features.shape[1:]) != expected:
            raise ValueError(f"fusion expects features [B, {expected[0]}, {expected[1]}], got {tuple(features.shape)}")

    def forward_mapped(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Averaged logits ``[B, C]`` and the mapped tokens ``[B, P, hidden]`` (matched to the teacher's
        final-norm tokens by DEKD's MSE term)."""
        self._check(features)
        mapped = [self.cls_proj(features[:, 0])]
        logits = self.cls_head(mapped[0])
        if self.dist_proj is not None and self.dist_head is not None:
            mapped.append(self.dist_proj(features[:, 1]))
            logits = (logits + self.dist_head(mapped[1])) / 2
        return logits, torch.stack(mapped, dim=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.forward_mapped(features)[0]


def concat_features(
    parts: Sequence[torch.Tensor | None], in_dims: Sequence[int], num_prefix_tokens: int
) -> torch.Tensor:
    """Concatenate per-sub-model tokens ``[B, P, D_i]`` in order; ``None`` (a missing edge) becomes
    zeros, which the fusion head is trained to tolerate (feature dropout)."""
    if len(parts) != len(in_dims):
        raise ValueError(f"expected {len(in_dims)} feature parts, got {len(parts)}")
    present = [p for p in parts if p is not None]
    if not present:
        raise ValueError("cannot fuse: every sub-model's features are missing")
    ref = present[0]
    out = []
    for i, (part, dim) in enumerate(zip(parts, in_dims, strict=True)):
        if part is None:
            out.append(ref.new_zeros(ref.shape[0], num_prefix_tokens, dim))
            continue
        if tuple(part.shape[1:]) != (num_prefix_tokens, dim) or part.shape[0] != ref.shape[0]:
            raise ValueError(
                f"features of sub-model {i}: expected [{ref.shape[0]}, {num_prefix_tokens}, {dim}], "
                f"got {tuple(part.shape)}"
            )
        out.append(part.to(ref.dtype))
    return torch.cat(out, dim=-1)


class DeViTEnsemble(nn.Module):
    """N sub-models + fusion in one process: the reference the distributed runtime must match."""

    def __init__(self, submodels: Sequence[VisionTransformer], fusion: FusionHead) -> None:
        super().__init__()
        dims = tuple(m.config.embed_dim for m in submodels)
        if dims != fusion.config.in_dims:
            raise ValueError(f"sub-model widths {dims} do not match fusion in_dims {fusion.config.in_dims}")
        prefix = {m.num_prefix_tokens for m in submodels}
        if prefix != {fusion.config.num_prefix_tokens}:
            raise ValueError(
                f"sub-models send {sorted(prefix)} prefix token(s); fusion expects {fusion.config.num_prefix_tokens}"
            )
        self.submodels = nn.ModuleList(submodels)
        self.fusion = fusion

    @property
    def num_parts(self) -> int:
        return len(self.submodels)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """What each edge would send: ``[B, P, D_i]`` per sub-model."""
        return [m.forward_prefix(x) for m in self.submodels]

    def fuse(self, parts: Sequence[torch.Tensor | None]) -> torch.Tensor:
        cfg = self.fusion.config
        return self.fusion(concat_features(parts, cfg.in_dims, cfg.num_prefix_tokens))

    def forward(self, x: torch.Tensor, missing: Sequence[int] = ()) -> torch.Tensor:
        parts: list[torch.Tensor | None] = list(self.features(x))
        for i in missing:
            parts[i] = None
        return self.fuse(parts)
