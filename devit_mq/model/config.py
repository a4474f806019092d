"""Typed, explicit model configurations (serialised verbatim into the bundle manifest)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from devit_mq.protocol import ATTENTION_BACKENDS  # one list for the model and the topology

POS_EMBEDS = ("learn", "sincos")
STEMS = ("patch", "conv")


class ConfigError(ValueError):
    """A model/fusion configuration is invalid; the message names the offending field."""


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(known)}")
    try:
        return cls(**data)
    except TypeError as exc:  # missing required field
        raise ConfigError(f"{where}: {exc}") from exc


@dataclass(frozen=True)
class ViTConfig:
    """A ViT/DeiT encoder. Defaults are ViT-Tiny/16 at 224x224 (timm ``vit_tiny_patch16_224``).

    ``pos_embed='sincos'``, ``stem='conv'`` and ``init='xavier'`` are options that pay on small data
    sets trained from scratch; they change no key of the timm layout except that a conv stem adds
    ``patch_embed.stem.*`` parameters in front of ``patch_embed.proj``.

    A structurally pruned model has per-block shapes: ``block_heads`` (attention heads kept in each
    block) and ``block_mlp`` (MLP hidden neurons kept in each block). A head keeps the width
    ``head_dim = embed_dim // num_heads`` of the unpruned model, so block ``i``'s ``attn.qkv`` has
    ``3 * block_heads[i] * head_dim`` rows and ``attn.proj`` that many columns / 3; ``mlp.fc1`` has
    ``block_mlp[i]`` rows and ``mlp.fc2`` as many columns. ``None`` means uniform (``num_heads``
    heads and ``int(embed_dim * mlp_ratio)`` neurons everywhere), as every unpruned model.
    """

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    distilled: bool = False
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    pos_embed: str = "learn"
    stem: str = "patch"
    stem_channels: int = 32
    init: str = "timm"
    drop_path_rate: float = 0.0
    attention_backend: str = "torch"
    block_heads: tuple[int, ...] | None = None
    block_mlp: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        positive = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"ViTConfig.{name} must be a positive int, got {value!r}")
        if self.num_classes < 0:
            raise ConfigError(f"ViTConfig.num_classes must be >= 0, got {self.num_classes}")
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"ViTConfig.embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}"
            )
        if self.img_size % self.patch_size:
            raise ConfigError(
                f"ViTConfig.img_size={self.img_size} is not divisible by patch_size={self.patch_size}"
            )
        if self.mlp_ratio <= 0:
            raise ConfigError(f"ViTConfig.mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.pos_embed not in POS_EMBEDS:
            raise ConfigError(f"ViTConfig.pos_embed must be one of {POS_EMBEDS}, got {self.pos_embed!r}")
        if self.stem not in STEMS:
            raise ConfigError(f"ViTConfig.stem must be one of {STEMS}, got {self.stem!r}")
        if self.init not in ("timm", "xavier"):
            raise ConfigError(f"ViTConfig.init must be 'timm' or 'xavier', got {self.init!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(
                f"ViTConfig.attention_backend must be one of {ATTENTION_BACKENDS}, "
                f"got {self.attention_backend!r}"
            )
        self._check_block_shapes()

    def _check_block_shapes(self) -> None:
        limits = {"block_heads": self.num_heads, "block_mlp": self.mlp_hidden}
        for name, limit in limits.items():
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
                raise ConfigError(f"ViTConfig.{name} must be a list of {self.depth} ints or null, got {value!r}")
            if len(value) != self.depth:
                raise ConfigError(f"ViTConfig.{name} has {len(value)} entries, the model has depth={self.depth}")
            for i, v in enumerate(value):
                if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= limit:
                    raise ConfigError(f"ViTConfig.{name}[{i}] must be an int in 1..{limit} (the unpruned "
                                      f"size), got {v!r}")
            object.__setattr__(self, name, tuple(value))  # a JSON list becomes a hashable tuple

    @property
    def mlp_hidden(self) -> int:
        """The unpruned MLP hidden size ``int(embed_dim * mlp_ratio)``."""
        return int(self.embed_dim * self.mlp_ratio)

    def heads_at(self, block: int) -> int:
        """Attention heads of block ``block`` (``num_heads`` unless pruned)."""
        return self.num_heads if self.block_heads is None else self.block_heads[block]

    def mlp_at(self, block: int) -> int:
        """MLP hidden neurons of block ``block``."""
        return self.mlp_hidden if self.block_mlp is None else self.block_mlp[block]

    def attn_width(self, block: int) -> int:
        """Width of block ``block``'s attention output before ``attn.proj``: heads x head_dim."""
        return self.heads_at(block) * self.head_dim

    @property
    def pruned(self) -> bool:
        return self.block_heads is not None or self.block_mlp is not None

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_prefix_tokens(self) -> int:
        """CLS, plus DIST for a distilled (DeiT) model: the tokens an edge sends."""
        return 2 if self.distilled else 1

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_prefix_tokens

    def replace(self, **changes: Any) -> ViTConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for name in ("block_heads", "block_mlp"):
            if data[name] is None:
                del data[name]  # an unpruned model's manifest stays exactly as before
            else:
                data[name] = list(data[name])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "ViTConfig") -> ViTConfig:
        return _from_dict(cls, data, where)


# Named presets with timm's shapes (patch 16, 224x224, ImageNet-1k heads).
PRESETS: dict[str, ViTConfig] = {
    "vit_tiny_patch16_224": ViTConfig(embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16_224": ViTConfig(embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": ViTConfig(embed_dim=768, depth=12, num_heads=12),
    "deit_tiny_distilled_patch16_224": ViTConfig(embed_dim=192, depth=12, num_heads=3, distilled=True),
    "deit_small_distilled_patch16_224": ViTConfig(embed_dim=384, depth=12, num_heads=6, distilled=True),
    "deit_base_distilled_patch16_224": ViTConfig(embed_dim=768, depth=12, num_heads=12, distilled=True),
}


def preset(name: str, **overrides: Any) -> ViTConfig:
    """A named timm-shaped configuration, optionally with fields overridden."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)


@dataclass(frozen=True)
class FusionConfig:
    """The aggregator's fusion head.

    The N sub-models' prefix tokens are concatenated (widths ``in_dims``), mapped by a Linear layer to
    ``hidden_dim`` (the teacher's width, so the mapped token can be matched to the teacher's token)
    and classified by a Linear layer into ``num_classes``. With ``num_prefix_tokens=2`` (DeiT-style
    sub-models) the DIST tokens take a parallel branch and the two branches' logits are averaged.
    """

    in_dims: tuple[int, ...] = field(default_factory=tuple)
    hidden_dim: int = 192
    num_classes: int = 10
    num_prefix_tokens: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "in_dims", tuple(int(d) for d in self.in_dims))
        if not self.in_dims or any(d <= 0 for d in self.in_dims):
            raise ConfigError(f"FusionConfig.in_dims must be non-empty positive widths, got {self.in_dims}")
        if self.hidden_dim <= 0 or self.num_classes <= 0:
            raise ConfigError("FusionConfig.hidden_dim and num_classes must be positive")
        if self.num_prefix_tokens not in (1, 2):
            raise ConfigError(f"FusionConfig.num_prefix_tokens must be 1 or 2, got {self.num_prefix_tokens}")

    @property
    def num_parts(self) -> int:
        return len(self.in_dims)

    @property
    def concat_dim(self) -> int:
        return sum(self.in_dims)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["in_dims"] = list(self.in_dims)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "FusionConfig") -> FusionConfig:
        return _from_dict(cls, data, where)
