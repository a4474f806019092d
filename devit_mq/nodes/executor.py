"""Executors: the compute a node runs, behind one small interface per role.

An edge's executor maps a batch of images to its sub-model's prefix tokens; the aggregator's maps
the concatenated tokens of all parts to class probabilities. Node loops only call these methods, so
an executor that runs without torch (NumPy, Numba) or on a GPU plugs in without touching the loops.
torch is imported only by the torch executors.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class EdgeExecutor(Protocol):
    """``forward(uint8 [B, H, W, C]) -> float32 [B, P, D]`` (P prefix tokens of width D)."""

    backend: str

    def forward(self, images: np.ndarray) -> np.ndarray: ...

    def warm_up(self) -> None: ...

    def describe(self) -> dict[str, Any]: ...


class FusionExecutor(Protocol):
    """``fuse(float32 [B, P, sum(D_i)]) -> float32 [B, C]`` class probabilities."""

    def fuse(self, features: np.ndarray) -> np.ndarray: ...


class TorchEdgeExecutor:
    """The sub-model's ``forward_features`` under torch, in chunks of at most ``max_batch``."""

    backend = "torch"

    def __init__(self, model: Any, input_spec: Any, max_batch: int = 8) -> None:
        import torch

        self._torch = torch
        self.model = model.eval()
        self.input_spec = input_spec
        self.max_batch = max(1, max_batch)

    def forward(self, images: np.ndarray) -> np.ndarray:
        torch = self._torch
        out = []
        with torch.inference_mode():
            for lo in range(0, len(images), self.max_batch):
                x = self.input_spec.to_tensor(images[lo: lo + self.max_batch])
                out.append(self.model.forward_features(x).float().numpy())
        return out[0] if len(out) == 1 else np.concatenate(out, axis=0)

    def warm_up(self) -> None:
        h, w, c = self.input_spec.image_shape
        self.forward(np.zeros((1, h, w, c), np.uint8))

    def describe(self) -> dict[str, Any]:
        return {"executor": "torch", "attention": self.model.attention_backend,
                "threads": self._torch.get_num_threads()}


class TorchFusionExecutor:
    """The bundle's fusion head under torch (softmax over its logits)."""

    def __init__(self, fusion: Any) -> None:
        import torch

        self._torch = torch
        self.fusion = fusion.eval()
        self.config = fusion.config

    def fuse(self, features: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            return self.fusion(torch.from_numpy(features)).softmax(dim=-1).numpy()
