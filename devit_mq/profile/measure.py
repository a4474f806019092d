"""Measuring a device: batch-1 forwards of random-weight sub-models over a grid of shapes.

What is timed is what an edge times as its compute: the executor's ``forward_prefix`` on one uint8
image (input conversion included), with the executor and threads the edge will use, in this
process -- so a profile taken inside a CPU cap (``devit-mq profile --cpu-quota``, or a testbed
host) measures the capped device. Each shape is timed at depth 1 and depth 3; the difference is
the time of one block (what ``blocks`` in the profile lists), and both forwards are samples of
the cost model (:class:`~devit_mq.profile.device.DeviceProfile`).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

from devit_mq.model import ViTConfig

from .device import DeviceProfile, input_of

DEPTHS = (1, 3)


@dataclass(frozen=True)
class Grid:
    """The shapes timed: every width x head count x MLP ratio (head counts that do not divide a
    width are skipped), each at :data:`DEPTHS`."""

    widths: tuple[int, ...] = (32, 48, 64, 96, 128)
    heads: tuple[int, ...] = (1, 2, 4)
    mlp_ratios: tuple[float, ...] = (1.0, 2.0, 4.0)
    repeats: int = 15

    @classmethod
    def quick(cls) -> Grid:
        return cls(widths=(32, 64, 96), heads=(1, 2), mlp_ratios=(2.0, 4.0), repeats=5)

    def shapes(self) -> list[tuple[int, int, int]]:
        """``(embed_dim, num_heads, mlp_hidden)`` of every grid point."""
        return [(w, h, int(w * r)) for w in self.widths for h in self.heads for r in self.mlp_ratios
                if w % h == 0 and int(w * r) > 0]


def random_weights(cfg: ViTConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Weights of the right shapes (latency does not depend on their values)."""
    from devit_mq.model.numpy_vit import expected_shapes

    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s) * 0.02).astype(np.float32) for k, s in expected_shapes(cfg).items()}


def _input_spec(cfg: ViTConfig):
    from devit_mq.model.manifest import InputSpec

    return InputSpec(cfg.img_size, cfg.in_chans, (0.5,) * cfg.in_chans, (0.25,) * cfg.in_chans)


def make_forward(cfg: ViTConfig, executor: str, threads: int, speed: float = 1.0) -> Callable[[np.ndarray], np.ndarray]:
    """The edge executor ``executor`` for a random-weight ``cfg`` (at an emulated ``speed``, as an
    edge's ``speed:``): uint8 ``[1, H, W, C]`` -> tokens."""
    from devit_mq.nodes.executor import ArrayEdgeExecutor, EmulatedSpeed, TorchEdgeExecutor, _ops

    spec = _input_spec(cfg)
    if executor == "torch":
        import torch

        from devit_mq.model import VisionTransformer

        torch.set_num_threads(max(1, threads))
        edge = TorchEdgeExecutor(VisionTransformer(cfg), spec, max_batch=1)
    else:
        from devit_mq.model.numpy_vit import ArrayViT

        edge = ArrayEdgeExecutor(ArrayViT(cfg, random_weights(cfg), _ops(executor, threads)), spec, max_batch=1)
    return (edge if speed == 1 else EmulatedSpeed(edge, speed)).forward_prefix


def time_forward(forward: Callable[[np.ndarray], np.ndarray], image: np.ndarray, repeats: int) -> float:
    """Median ms of ``repeats`` forwards after two warm-up calls (JIT, caches)."""
    for _ in range(2):
        forward(image)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward(image)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def host_info() -> dict[str, Any]:
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu_model": model, "logical_cpus": os.cpu_count(), "machine": platform.machine(),
            "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}


def measure(base: ViTConfig, device: str, executor: str = "numba", threads: int = 1, grid: Grid | None = None,
            cpu_quota: float | None = None, cfs_period_ms: float | None = None, speed: float = 1.0,
            say: Callable[[str], None] | None = None) -> DeviceProfile:
    """Time the grid around ``base`` (its input side: image size, channels, patch, stem) on this
    device, fit the cost model, and return the profile. ``cpu_quota`` / ``cfs_period_ms`` only
    record the cap the caller runs under."""
    grid = grid or Grid()
    image = np.zeros((1, base.img_size, base.img_size, base.in_chans), np.uint8)
    samples, blocks = [], []
    shapes = grid.shapes()
    for n, (dim, heads, hidden) in enumerate(shapes, 1):
        ms = {}
        for depth in DEPTHS:
            cfg = base.replace(embed_dim=dim, num_heads=heads, mlp_ratio=hidden / dim, depth=depth,
                               block_heads=None, block_mlp=None)
            ms[depth] = time_forward(make_forward(cfg, executor, threads, speed), image, grid.repeats)
            samples.append({"embed_dim": dim, "num_heads": heads, "mlp_hidden": hidden, "depth": depth,
                            "ms": round(ms[depth], 4)})
        per_block = (ms[DEPTHS[-1]] - ms[DEPTHS[0]]) / (DEPTHS[-1] - DEPTHS[0])
        blocks.append({"embed_dim": dim, "num_heads": heads, "mlp_hidden": hidden, "ms_per_block": round(per_block, 4)})
        if say:
            say(f"[{n}/{len(shapes)}] dim {dim}, {heads} heads, MLP {hidden}: "
                f"{ms[DEPTHS[0]]:.3f} ms at depth 1, {per_block:.3f} ms per block")
    profile = DeviceProfile(device=device, executor=executor, threads=threads, input=input_of(base),
                            samples=samples, blocks=blocks, cpu_quota=cpu_quota, cfs_period_ms=cfs_period_ms, speed=speed,
                            host=host_info(), measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return profile.fit()


def check_predictions(profile: DeviceProfile, configs: Sequence[ViTConfig], repeats: int = 15) -> list[dict[str, Any]]:
    """Predicted vs measured ms of each config on this device (e.g. a bundle's real sub-models)."""
    out = []
    for cfg in configs:
        image = np.zeros((1, cfg.img_size, cfg.img_size, cfg.in_chans), np.uint8)
        measured = time_forward(make_forward(cfg, profile.executor, profile.threads, profile.speed), image, repeats)
        predicted = profile.predict_ms(cfg)
        out.append({"embed_dim": cfg.embed_dim, "depth": cfg.depth, "pruned": cfg.pruned, "predicted_ms": predicted,
                    "measured_ms": measured, "rel_error": (predicted - measured) / measured})
    return out
