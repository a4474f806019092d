"""ViT / DeiT encoder with timm's exact parameter names and shapes.

A timm ``VisionTransformer`` or distilled DeiT checkpoint loads into :class:`VisionTransformer` with
``load_state_dict(..., strict=True)`` and gives the same logits in eval mode. The module tree mirrors
timm's (``patch_embed.proj``, ``cls_token``, ``dist_token``, ``pos_embed``,
``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``, ``head``, ``head_dist``);
modules that timm keeps as ``Identity`` placeholders are simply absent, which leaves the state dict
unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import get_backend, torch_attention
from .config import ViTConfig


def sincos_2d_position_embedding(grid: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding ``[grid*grid, dim]`` (MAE / "simple ViT" form)."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4, got {dim}")
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                            torch.arange(grid, dtype=torch.float64), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ys = ys.flatten()[:, None] * omega[None, :]
    xs = xs.flatten()[:, None] * omega[None, :]
    return torch.cat([xs.sin(), xs.cos(), ys.sin(), ys.cos()], dim=1).float()


class PatchEmbed(nn.Module):
    """Image -> patch tokens. ``stem='conv'`` puts two 3x3 convolutions in front of the patchify conv
    (same token count); it helps a ViT trained from scratch on small images."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.img_size = cfg.img_size
        self.in_chans = cfg.in_chans
        proj_in = cfg.in_chans
        if cfg.stem == "conv":
            c = cfg.stem_channels
            self.stem = nn.Sequential(
                nn.Conv2d(cfg.in_chans, c, 3, padding=1), nn.GELU(),
                nn.Conv2d(c, c, 3, padding=1), nn.GELU(),
            )
            proj_in = c
        else:
            self.stem = None
        self.proj = nn.Conv2d(proj_in, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_chans or x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"expected images [B, {self.in_chans}, {self.img_size}, {self.img_size}], got {tuple(x.shape)}"
            )
        if self.stem is not None:
            x = self.stem(x)
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """``heads`` heads of width ``cfg.head_dim`` (fewer than ``cfg.num_heads`` in a pruned block)."""

    def __init__(self, cfg: ViTConfig, heads: int | None = None) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads if heads is None else heads
        inner = self.num_heads * cfg.head_dim
        self.qkv = nn.Linear(cfg.embed_dim, inner * 3, bias=cfg.qkv_bias)
        self.proj = nn.Linear(inner, cfg.embed_dim)
        self.backend = "torch"

    def forward(self, x: torch.Tensor, capture: list[torch.Tensor] | None = None) -> torch.Tensor:
        qkv = self.qkv(x)
        if capture is not None:
            capture.append(qkv)
        # Kernel backends are inference-only: whenever autograd needs a graph, use torch's SDPA.
        if self.backend == "torch" or (torch.is_grad_enabled() and qkv.requires_grad):
            out = torch_attention(qkv, self.num_heads)
        else:
            out = get_backend(self.backend)(qkv, self.num_heads)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth per sample (training only)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig, drop_path: float = 0.0, index: int = 0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg, cfg.heads_at(index))
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg.embed_dim, cfg.mlp_at(index))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, capture: list[torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), capture))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT (``distilled=False``) or DeiT with a distillation token (``distilled=True``)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.num_prefix_tokens = config.num_prefix_tokens
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim)) if config.distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, dim))
        # stochastic-depth rate grows linearly with depth (plain floats: also works on the meta device)
        rates = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.ModuleList(Block(config, r, i) for i, r in enumerate(rates))
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps)
        self.head = nn.Linear(dim, config.num_classes) if config.num_classes else nn.Identity()
        self.head_dist = None
        if config.distilled:
            self.head_dist = nn.Linear(dim, config.num_classes) if config.num_classes else nn.Identity()
        # timm's DeiT returns both heads' logits only in this mode (set by the training loop).
        self.distilled_training = False
        self._init_weights()
        self.set_attention_backend(config.attention_backend)

    # -- initialisation -------------------------------------------------------------------------
    def _init_weights(self) -> None:
        cfg = self.config
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02)
        if cfg.pos_embed == "sincos":
            grid = cfg.img_size // cfg.patch_size
            with torch.no_grad():
                self.pos_embed.zero_()
                self.pos_embed[0, self.num_prefix_tokens:] = sincos_2d_position_embedding(grid, cfg.embed_dim)
            self.pos_embed.requires_grad_(False)  # fixed, but kept as `pos_embed` for the timm layout
        else:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                if cfg.init == "xavier":
                    nn.init.xavier_uniform_(module.weight)
                else:
                    nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if cfg.init == "xavier":
            # as in "simple ViT"/MAE: the patch projection is initialised like a Linear layer
            w = self.patch_embed.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))

    # -- configuration --------------------------------------------------------------------------
    def set_attention_backend(self, name: str) -> None:
        """Switch every block's attention implementation (``torch``, ``numba``, ``cuda``).

        ``auto`` means "torch until calibrated": the edge calls ``devit_mq.model.select_backend``.
        """
        resolved = "torch" if name == "auto" else name
        if resolved != "torch":
            get_backend(resolved)  # fail now, with a clear error, if it cannot run here
        for block in self.blocks:
            block.attn.backend = resolved

    def unfreeze(self) -> VisionTransformer:
        """Make every parameter trainable again except the fixed sin-cos positions (after a stage
        froze the model to use it as a teacher)."""
        self.requires_grad_(True)
        if self.config.pos_embed == "sincos":
            self.pos_embed.requires_grad_(False)
        return self

    @property
    def attention_backend(self) -> str:
        return self.blocks[0].attn.backend

    # -- forward ----------------------------------------------------------------------------------
    def _prepend_prefix(self, x: torch.Tensor) -> torch.Tensor:
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(x.shape[0], -1, -1))
        return torch.cat(prefix + [x], dim=1) + self.pos_embed

    def forward_tokens(
        self, x: torch.Tensor, qkv_block: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """All final-norm tokens ``[B, P+N, D]`` and, if asked, block ``qkv_block``'s packed qkv
        ``[B, P+N, 3D]`` (what the DEKD relation loss compares)."""
        if qkv_block is not None and not 0 <= qkv_block < len(self.blocks):
            raise IndexError(f"qkv_block={qkv_block} out of range for depth {len(self.blocks)}")
        x = self._prepend_prefix(self.patch_embed(x))
        captured: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            x = block(x, captured if i == qkv_block else None)
        return self.norm(x), (captured[0] if captured else None)

    def forward_prefix(self, x: torch.Tensor) -> torch.Tensor:
        """Final-norm CLS (and DIST) tokens ``[B, P, D]``: exactly what an edge sends."""
        return self.forward_tokens(x)[0][:, : self.num_prefix_tokens]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Every final-norm token ``[B, P+N, D]`` (CLS, DIST if any, then the patches), as timm's
        ``forward_features`` returns them: a timm-style ``forward_features(x)[:, P:]`` gets the patches."""
        return self.forward_tokens(x)[0]

    def forward_head(self, prefix: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        logits = self.head(prefix[:, 0])
        if self.head_dist is None:
            return logits
        logits_dist = self.head_dist(prefix[:, 1])
        if self.distilled_training and self.training:
            return logits, logits_dist
        return (logits + logits_dist) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.forward_head(self.forward_prefix(x))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def vit_macs(cfg: ViTConfig) -> int:
    """Multiply-accumulates of one forward pass at batch 1 (matmuls, attention, patchify, heads),
    block by block, so a pruned block (fewer heads or MLP neurons) counts for what it computes.

    Counted analytically so that it is exact, cheap and independent of the attention backend."""
    return vit_flops(cfg) // 2


def block_macs(cfg: ViTConfig, heads: int, hidden: int) -> int:
    """MACs of one block with ``heads`` heads of ``cfg.head_dim`` and ``hidden`` MLP neurons."""
    n, d, inner = cfg.num_tokens, cfg.embed_dim, heads * cfg.head_dim
    # qkv, q k^T and attn v, proj, fc1 + fc2
    return n * d * 3 * inner + 2 * n * n * inner + n * inner * d + 2 * n * d * hidden


def vit_flops(cfg: ViTConfig) -> int:
    """2 x :func:`vit_macs` (multiply-accumulates counted as two operations)."""
    d = cfg.embed_dim
    blocks = sum(block_macs(cfg, cfg.heads_at(i), cfg.mlp_at(i)) for i in range(cfg.depth))
    patch_in = cfg.stem_channels if cfg.stem == "conv" else cfg.in_chans
    patch = cfg.num_patches * d * patch_in * cfg.patch_size ** 2
    stem = 0
    if cfg.stem == "conv":
        pixels = cfg.img_size ** 2
        stem = pixels * 9 * (cfg.in_chans * cfg.stem_channels + cfg.stem_channels ** 2)
    heads = cfg.num_prefix_tokens * d * cfg.num_classes
    return 2 * (blocks + patch + stem + heads)

