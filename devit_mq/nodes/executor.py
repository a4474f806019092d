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
    """The sub-model's ``forward_prefix`` under torch, in chunks of at most ``max_batch``."""

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
                out.append(self.model.forward_prefix(x).float().numpy())
        return out[0] if len(out) == 1 else np.concatenate(out, axis=0)

    def warm_up(self) -> None:
        h, w, c = self.input_spec.image_shape
        self.forward(np.zeros((1, h, w, c), np.uint8))

    def describe(self) -> dict[str, Any]:
        return {"executor": "torch", "attention": self.model.attention_backend,
                "threads": self._torch.get_num_threads()}


class NumpyFusionExecutor:
    """The fusion head in NumPy: per prefix token ``softmax(x W1 + b1) W2 + b2``, DIST branch
    averaged in, exactly as :class:`~devit_mq.model.FusionHead` computes it, with no torch call.

    The head is two Linear layers with nothing between them, so each branch folds into one affine
    map ``x (W1 W2) + (b1 W2 + b2)`` at load time: one small GEMM per request batch instead of two
    torch calls (at batch 1 the torch dispatch cost more than the arithmetic). Folding changes the
    rounding, not the function: probabilities agree with the torch head to about 1e-7."""

    def __init__(self, weights: dict[str, np.ndarray], num_prefix_tokens: int) -> None:
        self.branches = [self._fold(weights, "cls")]
        if num_prefix_tokens == 2:
            self.branches.append(self._fold(weights, "dist"))

    @staticmethod
    def _fold(w: dict[str, np.ndarray], branch: str) -> tuple[np.ndarray, np.ndarray]:
        w1, b1 = w[f"{branch}_proj.weight"].astype(np.float64), w[f"{branch}_proj.bias"].astype(np.float64)
        w2, b2 = w[f"{branch}_head.weight"].astype(np.float64), w[f"{branch}_head.bias"].astype(np.float64)
        weight = (w1.T @ w2.T).astype(np.float32)  # [concat, C], folded in float64
        bias = (b1 @ w2.T + b2).astype(np.float32)  # [C]
        return np.ascontiguousarray(weight), bias

    @classmethod
    def from_bundle(cls, directory: Any, manifest: Any) -> NumpyFusionExecutor:
        from safetensors.numpy import load_file

        from devit_mq.model.bundle import part_path

        return cls(load_file(str(part_path(directory, manifest, "fusion"))), manifest.fusion.num_prefix_tokens)

    def fuse(self, features: np.ndarray) -> np.ndarray:
        logits = None
        for p, (weight, bias) in enumerate(self.branches):
            branch = features[:, p] @ weight + bias  # [B, C]
            logits = branch if logits is None else (logits + branch) / 2
        logits -= logits.max(axis=1, keepdims=True)  # stable softmax
        np.exp(logits, out=logits)
        logits /= logits.sum(axis=1, keepdims=True)
        return logits


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
