"""Random-weight bundles of benchmark shapes.

Latency and throughput do not depend on the weights, only on the shapes, so the benchmarks build
bundles of the shapes they are about instead of needing a trained model: the issue's target is a
ViT-S/16-sized teacher (384 wide, 12 blocks, 224x224) against N edges whose sub-models split that
width (N=2: two ViT-Ti/16-sized sub-models, 192 wide). Accuracy is the DEKD report's business;
every bundle built here says ``random_weights`` in its manifest and the benchmarks print it.

Bundles are cached: building a ViT-S bundle writes ~130 MB, so a bundle whose manifest records the
same shapes is reused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from devit_mq.model import (
    DeViTEnsemble,
    FusionConfig,
    FusionHead,
    InputSpec,
    Manifest,
    VisionTransformer,
    ViTConfig,
    load_manifest,
    preset,
    save_bundle,
)

SHAPES = ("issue", "tiny")


@dataclass(frozen=True)
class BenchShapes:
    """The shapes of one benchmark bundle: a teacher and the N sub-models that replace it."""

    name: str
    teacher: ViTConfig
    submodels: tuple[ViTConfig, ...]
    num_classes: int

    @property
    def num_edges(self) -> int:
        return len(self.submodels)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "teacher": self.teacher.to_dict(),
                "submodels": [c.to_dict() for c in self.submodels], "num_classes": self.num_classes}

    def describe(self) -> str:
        t = self.teacher
        subs = ", ".join(f"{c.embed_dim}-d/{c.depth} blocks/{c.num_heads} heads" for c in self.submodels)
        return (f"{self.name}: teacher {t.embed_dim}-d/{t.depth} blocks/{t.num_heads} heads at {t.img_size}x"
                f"{t.img_size} vs {self.num_edges} sub-model(s) [{subs}], {self.num_classes} classes, "
                "RANDOM WEIGHTS (latency does not depend on them)")


def _heads_for(width: int, head_dim: int) -> int:
    """As many heads as keep ``head_dim`` (ViT-S and ViT-Ti both use 64), at least one."""
    heads = max(1, width // head_dim)
    while width % heads:
        heads -= 1
    return heads


def issue_shapes(num_edges: int = 2, num_classes: int = 1000) -> BenchShapes:
    """ViT-S/16 teacher at 224x224; each of ``num_edges`` sub-models gets 1/N of its width (N=2 gives
    ViT-Ti/16 exactly), the paper's decomposition of one wide model into N narrow ones."""
    teacher = preset("vit_small_patch16_224", num_classes=num_classes)
    if num_edges < 1 or teacher.embed_dim % num_edges:
        raise ValueError(f"num_edges must divide the teacher's width {teacher.embed_dim}, got {num_edges}")
    width = teacher.embed_dim // num_edges
    heads = 3 if width == 192 else _heads_for(width, 64 if width >= 128 else 32)
    sub = preset("vit_tiny_patch16_224", embed_dim=width, num_heads=heads,
                 num_classes=max(1, num_classes // num_edges))
    return BenchShapes(f"vit-s16-vs-{num_edges}x{width}d", teacher, (sub,) * num_edges, num_classes)


def tiny_shapes(num_edges: int = 2) -> BenchShapes:
    """Seconds-fast shapes for tests and ``--quick`` smoke runs (32x32 RGB, 2 blocks)."""
    teacher = ViTConfig(img_size=32, patch_size=8, in_chans=3, embed_dim=64, depth=2, num_heads=2, num_classes=4)
    sub = teacher.replace(embed_dim=32, num_classes=2)
    return BenchShapes(f"tiny-{num_edges}edge", teacher, (sub,) * num_edges, 2 * num_edges)


def shapes_named(name: str, num_edges: int = 2) -> BenchShapes:
    if name == "issue":
        return issue_shapes(num_edges)
    if name == "tiny":
        return tiny_shapes(num_edges)
    raise ValueError(f"unknown benchmark shapes {name!r}; known: {', '.join(SHAPES)}")


def _class_groups(num_classes: int, parts: int) -> list[list[int]]:
    """Disjoint, contiguous groups covering every class (sizes differ by at most one)."""
    bounds = [round(i * num_classes / parts) for i in range(parts + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(parts)]


def build_bundle(directory: str | Path, shapes: BenchShapes, seed: int = 0) -> Path:
    """Write a random-weight bundle of ``shapes`` (teacher included) to ``directory``."""
    torch.manual_seed(seed)
    subs = [VisionTransformer(cfg).eval() for cfg in shapes.submodels]
    teacher = VisionTransformer(shapes.teacher).eval()
    prefix = shapes.submodels[0].num_prefix_tokens
    fusion = FusionHead(FusionConfig(in_dims=tuple(c.embed_dim for c in shapes.submodels),
                                     hidden_dim=shapes.teacher.embed_dim, num_classes=shapes.num_classes,
                                     num_prefix_tokens=prefix)).eval()
    t = shapes.teacher
    manifest = Manifest(
        classes=[f"class{i}" for i in range(shapes.num_classes)],
        class_groups=_class_groups(shapes.num_classes, shapes.num_edges),
        submodels=list(shapes.submodels), fusion=fusion.config,
        input=InputSpec(t.img_size, t.in_chans, (0.5,) * t.in_chans, (0.5,) * t.in_chans),
        metadata={"trained": False, "random_weights": True, "bench_shapes": shapes.to_dict(), "seed": seed})
    return save_bundle(directory, manifest, DeViTEnsemble(subs, fusion), teacher=teacher)


def ensure_bundle(directory: str | Path, shapes: BenchShapes, seed: int = 0) -> Path:
    """The bundle at ``directory`` if it was built for the same shapes and seed, else a new one."""
    directory = Path(directory)
    try:
        meta = load_manifest(directory).metadata
        if meta.get("seed") == seed and json.dumps(meta.get("bench_shapes"), sort_keys=True) == json.dumps(
                shapes.to_dict(), sort_keys=True):
            return directory
    except (OSError, ValueError):  # no bundle yet, or an unreadable one: rebuild
        pass
    return build_bundle(directory, shapes, seed)
