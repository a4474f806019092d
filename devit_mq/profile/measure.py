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
    repeats: int = 5  # forwards per shape and round (their median is the round's time)
    rounds: int = 5  # passes over the whole grid; a shape's time is the median of its rounds
    gap_ms: float = 3.0  # idle before each timed forward, as an edge waits between batch-1 requests

    @classmethod
    def quick(cls) -> Grid:
        return cls(widths=(32, 64, 96), heads=(1, 2), mlp_ratios=(2.0, 4.0), repeats=5, rounds=1, gap_ms=0.0)

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


def time_forward(forward: Callable[[np.ndarray], np.ndarray], image: np.ndarray, repeats: int,
                 gap_s: float = 0.0) -> float:
    """Median ms of ``repeats`` forwards after two warm-up calls (JIT, caches), each after ``gap_s``
    of idle: a serving edge's forward follows a wait for the request, and on this virtual machine a
    forward after a few ms of idle takes up to 45% longer than one run back to back."""
    for _ in range(2):
        forward(image)
    times = []
    for _ in range(repeats):
        if gap_s:
            time.sleep(gap_s)
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
    shapes = [(dim, heads, hidden, depth) for dim, heads, hidden in grid.shapes() for depth in DEPTHS]
    forwards = [make_forward(base.replace(embed_dim=dim, num_heads=heads, mlp_ratio=hidden / dim, depth=depth,
                                          block_heads=None, block_mlp=None), executor, threads, speed)
                for dim, heads, hidden, depth in shapes]
    ms = interleaved_ms(forwards, image, grid.repeats, grid.rounds, say, grid.gap_ms / 1e3)
    samples = [{"embed_dim": dim, "num_heads": heads, "mlp_hidden": hidden, "depth": depth, "ms": round(t, 4)}
               for (dim, heads, hidden, depth), t in zip(shapes, ms, strict=True)]
    by_shape = dict(zip(shapes, ms, strict=True))
    blocks = [{"embed_dim": dim, "num_heads": heads, "mlp_hidden": hidden,
               "ms_per_block": round((by_shape[dim, heads, hidden, DEPTHS[-1]] - by_shape[dim, heads, hidden, DEPTHS[0]])
                                     / (DEPTHS[-1] - DEPTHS[0]), 4)}
              for dim, heads, hidden in grid.shapes()]
    profile = DeviceProfile(device=device, executor=executor, threads=threads, input=input_of(base),
                            samples=samples, blocks=blocks, cpu_quota=cpu_quota, cfs_period_ms=cfs_period_ms, speed=speed,
                            gap_ms=grid.gap_ms,
                            host=host_info(), measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return profile.fit()


def interleaved_ms(forwards: Sequence[Callable[[np.ndarray], np.ndarray]], image: np.ndarray, repeats: int,
                   rounds: int, say: Callable[[str], None] | None = None, gap_s: float = 0.0) -> list[float]:
    """Median ms of each forward: ``rounds`` passes over all of them, ``repeats`` timed forwards each.

    A shared machine drifts by 20% and more over seconds; interleaving makes a slow spell touch every
    shape alike instead of the few timed during it, which would bend the fitted costs."""
    per_round: list[list[float]] = [[] for _ in forwards]
    for r in range(rounds):
        for i, forward in enumerate(forwards):
            per_round[i].append(time_forward(forward, image, repeats, gap_s))
        if say:
            say(f"round {r + 1}/{rounds}: {len(forwards)} shapes timed")
    return [statistics.median(t) for t in per_round]


def check_predictions(profile: DeviceProfile, configs: Sequence[ViTConfig], repeats: int = 5,
                      rounds: int = 5) -> list[dict[str, Any]]:
    """Predicted vs measured ms of each config on this device (e.g. a bundle's real sub-models)."""
    image = np.zeros((1, configs[0].img_size, configs[0].img_size, configs[0].in_chans), np.uint8)
    forwards = [make_forward(cfg, profile.executor, profile.threads, profile.speed) for cfg in configs]
    measured = interleaved_ms(forwards, image, repeats, rounds, gap_s=profile.gap_ms / 1e3)
    out = []
    for cfg, ms in zip(configs, measured, strict=True):
        predicted = profile.predict_ms(cfg)
        out.append({"embed_dim": cfg.embed_dim, "depth": cfg.depth, "pruned": cfg.pruned, "predicted_ms": predicted,
                    "measured_ms": ms, "rel_error": (predicted - ms) / ms})
    return out


def drift(profile: DeviceProfile, shapes: int = 6, repeats: int = 5, rounds: int = 3) -> dict[str, Any]:
    """How fast this device runs now against when ``profile`` was measured.

    Re-times ``shapes`` of the profile's own depth-3 grid forwards, spread over its range of times, with
    its executor, threads, speed and idle gap, in this process (pin it to the device's CPUs first).
    ``ratio`` is the median of now / then: multiplying a prediction by it carries the profile to this
    hour. A shared machine's speed drifts by 20% and more within an hour, which is not the cost model's
    error; the shapes timed are the grid's, never the model being predicted."""
    deep = sorted((s for s in profile.samples if s["depth"] == DEPTHS[-1]), key=lambda s: s["ms"])
    if not deep:
        raise ValueError(f"profile {profile.device!r} has no depth-{DEPTHS[-1]} samples to calibrate with")
    picked = [deep[round(i * (len(deep) - 1) / max(1, shapes - 1))] for i in range(min(shapes, len(deep)))]
    configs = [profile.sample_config(s) for s in picked]
    image = np.zeros((1, configs[0].img_size, configs[0].img_size, configs[0].in_chans), np.uint8)
    forwards = [make_forward(cfg, profile.executor, profile.threads, profile.speed) for cfg in configs]
    now = interleaved_ms(forwards, image, repeats, rounds, gap_s=profile.gap_ms / 1e3)
    ratios = [t / s["ms"] for t, s in zip(now, picked, strict=True)]
    return {"ratio": statistics.median(ratios), "ratios": [round(r, 4) for r in ratios],
            "shapes": [{k: s[k] for k in ("embed_dim", "num_heads", "mlp_hidden", "depth")} for s in picked]}
