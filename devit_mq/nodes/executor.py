"""Executors: the compute a node runs, behind one small interface per role.

An edge's executor maps a batch of images to its sub-model's prefix tokens; the aggregator's maps
the concatenated tokens of all parts to class probabilities. Node loops only call these methods, so
an executor that runs without torch (NumPy, Numba) or on a GPU plugs in without touching the loops.
torch is imported only by the torch executors. :func:`build_edge_executor` makes an edge's executor
from its topology settings (``executor: auto | torch | numba | numpy``).
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from devit_mq.metrics import process_age_s

log = logging.getLogger("devit_mq.nodes.executor")

# attention backends that only the torch executor runs (the torch-free ones have their own)
TORCH_ONLY_ATTENTION = ("torch", "naive", "cuda")


class ExecutorError(RuntimeError):
    """The executor a node asks for cannot run here (a library is missing); the message says why."""


class EdgeExecutor(Protocol):
    """``forward_prefix(uint8 [B, H, W, C]) -> float32 [B, P, D]``: the sub-model's final-norm prefix
    (CLS, DIST) tokens, what an edge sends. ``backend`` names the executor."""

    backend: str

    def forward_prefix(self, images: np.ndarray) -> np.ndarray: ...

    def warm_up(self) -> None: ...

    def describe(self) -> dict[str, Any]: ...


class FusionExecutor(Protocol):
    """``fuse(float32 [B, P, sum(D_i)]) -> float32 [B, C]`` class probabilities."""

    def fuse(self, features: np.ndarray) -> np.ndarray: ...


class _Chunked:
    """What every edge executor shares: batches split into chunks of at most ``max_batch`` images
    (the batch the topology sized memory for), a warm-up that runs once."""

    backend = ""

    def __init__(self, input_spec: Any, max_batch: int) -> None:
        self.input_spec = input_spec
        self.max_batch = max(1, max_batch)
        self._warm = False
        self.import_s: float | None = None  # process age once its compute libraries were imported

    def _started(self) -> dict[str, Any]:
        return {} if self.import_s is None else {"import_s": round(self.import_s, 2)}

    def _forward_chunk(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def forward_prefix(self, images: np.ndarray) -> np.ndarray:
        out = [self._forward_chunk(images[lo: lo + self.max_batch]) for lo in range(0, len(images), self.max_batch)]
        return out[0] if len(out) == 1 else np.concatenate(out, axis=0)

    def warm_up(self) -> None:
        """One batch-1 forward (JIT code loaded, buffers touched); later calls do nothing."""
        if not self._warm:
            self.forward_prefix(np.zeros((1, *self.input_spec.image_shape), np.uint8))
            self._warm = True


class TorchEdgeExecutor(_Chunked):
    """The sub-model's ``forward_prefix`` under torch (with any attention backend, CUDA included)."""

    backend = "torch"

    def __init__(self, model: Any, input_spec: Any, max_batch: int = 8) -> None:
        import torch

        super().__init__(input_spec, max_batch)
        self._torch = torch
        self.model = model.eval()

    def _forward_chunk(self, images: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return self.model.forward_prefix(self.input_spec.to_tensor(images)).float().numpy()

    def describe(self) -> dict[str, Any]:
        return {"executor": "torch", "attention": self.model.attention_backend,
                "threads": self._torch.get_num_threads(), **self._started()}


class ArrayEdgeExecutor(_Chunked):
    """The sub-model forward without torch: :class:`~devit_mq.model.numpy_vit.ArrayViT` with the
    Numba ops (``numba``) or the NumPy ops (``numpy``)."""

    def __init__(self, model: Any, input_spec: Any, max_batch: int = 8) -> None:
        super().__init__(input_spec, max_batch)
        self.model = model
        self.backend = model.ops.__name__.rsplit("_", 1)[-1]  # vit_numba -> numba, vit_numpy -> numpy

    def _forward_chunk(self, images: np.ndarray) -> np.ndarray:
        return self.model.forward_prefix(self.input_spec.to_array(images))

    def describe(self) -> dict[str, Any]:
        return {"executor": self.backend, "attention": self.backend, "threads": compute_threads(self.backend),
                **self._started()}


class EmulatedSpeed:
    """An edge executor on an emulated slower device: every forward is stretched to ``1 / speed``
    of its wall time (``speed`` 0.25: a core a quarter as fast).

    Why not a CPU quota: a CFS quota (or sharing the core with busier processes) caps throughput,
    but the kernel lets a task that wakes for a 1-3 ms batch-1 forward run at full speed (measured
    in the README), so it never makes such a forward slower. The stretch spins rather than sleeps,
    as a slower core would stay busy: a core left idle for the stretch runs the next forward up to
    2x slower here (caches and the virtual CPU go cold), which made profiles disagree with nodes."""

    def __init__(self, inner: EdgeExecutor, speed: float) -> None:
        if not 0 < speed <= 1:
            raise ExecutorError(f"speed must be in (0, 1], got {speed}")
        self.inner, self.speed = inner, speed
        self.backend = inner.backend

    def forward_prefix(self, images: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        out = self.inner.forward_prefix(images)
        done = time.perf_counter()
        until = done + (done - start) * (1 / self.speed - 1)
        while time.perf_counter() < until:
            pass
        return out

    def warm_up(self) -> None:
        self.inner.warm_up()

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "speed": self.speed}


def compute_threads(backend: str) -> int:
    """The threads a torch-free executor computes on: Numba's pool for ``numba`` (attention, and
    the row split of its matrix products), the BLAS pool for ``numpy``."""
    if backend == "numba":
        import numba

        return numba.get_num_threads()
    from threadpoolctl import threadpool_info

    return max((p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"), default=1)


# -- choosing an edge's executor ------------------------------------------------------------------
def auto_candidates(attention: str) -> tuple[str, ...]:
    """What ``executor: auto`` chooses among. Only torch-free executors: importing torch just to time
    it would cost the edge its 200+ MB and 1.2 s even when it loses. An attention backend that only
    torch runs (``torch``, ``naive``, ``cuda``: the GPU path) asks for the torch executor."""
    if attention in TORCH_ONLY_ATTENTION:
        return ("torch",)
    return ("numba",) if attention == "numba" else ("numba", "numpy")


def build_edge_executor(kind: str, bundle: str | Path, index: int, manifest: Any, *, threads: int = 1,
                        attention: str = "auto", max_batch: int = 8, speed: float = 1.0) -> EdgeExecutor:
    """The executor ``kind`` (``auto``, ``torch``, ``numba``, ``numpy``) for sub-model ``index``,
    warmed up. ``auto`` times its candidates on this node at batch 1 and keeps the fastest; a
    ``speed`` under 1 emulates a slower device (:class:`EmulatedSpeed`).
    ExecutorError if a requested executor's libraries are missing; BundleError for a bad bundle."""
    if kind == "torch":
        executor = _torch_executor(bundle, index, manifest, threads, attention, max_batch)
    elif kind in ("numba", "numpy"):
        executor = _array_executors((kind,), bundle, index, manifest, threads, max_batch, required=True)[kind]
    elif kind == "auto":
        executor = _auto_executor(bundle, index, manifest, threads, attention, max_batch)
    else:
        raise ExecutorError(f"unknown executor {kind!r}; choose one of auto, torch, numba, numpy")
    executor.warm_up()
    return executor if speed == 1 else EmulatedSpeed(executor, speed)


def _torch_executor(bundle: str | Path, index: int, manifest: Any, threads: int, attention: str,
                    max_batch: int) -> TorchEdgeExecutor:
    try:
        import torch  # noqa: F401  (only to say clearly that it is missing)
    except ImportError as exc:
        raise ExecutorError(f"executor 'torch' needs torch, which is not installed here ({exc}); install "
                            "devit-mq[torch] or use executor: numba | numpy | auto") from None
    from devit_mq.model import load_submodel, select_backend

    from .base import configure_torch_threads

    imported = process_age_s()
    configure_torch_threads(threads)
    model = load_submodel(bundle, index, manifest, attention_backend="torch" if attention == "auto" else attention)
    if attention == "auto":
        log.info("attention backend calibrated: %s", select_backend(model, batch_size=1))
    executor = TorchEdgeExecutor(model, manifest.input, max_batch)
    executor.import_s = imported
    return executor


def _array_executors(kinds: tuple[str, ...], bundle: str | Path, index: int, manifest: Any, threads: int,
                     max_batch: int, required: bool) -> dict[str, ArrayEdgeExecutor]:
    """One torch-free executor per kind that can run here, sharing one copy of the weights. A kind
    whose libraries are missing is an ExecutorError if ``required``, else left out (logged)."""
    from devit_mq.model.numpy_vit import ArrayViT

    loaded = {}
    for kind in kinds:
        try:
            loaded[kind] = _ops(kind, threads)
        except ImportError as exc:
            if required:
                raise ExecutorError(f"executor {kind!r} cannot run here: {exc}") from None
            log.info("executor %r skipped: %s", kind, exc)
    imported = process_age_s()
    model = ArrayViT.from_bundle(bundle, index, manifest)
    executors = {kind: ArrayEdgeExecutor(model.with_ops(ops), manifest.input, max_batch) for kind, ops in loaded.items()}
    for executor in executors.values():
        executor.import_s = imported
    return executors


def _ops(kind: str, threads: int) -> Any:
    from threadpoolctl import threadpool_limits

    threadpool_limits(max(1, threads), user_api="blas")  # NumPy's BLAS spawns one thread per core
    if kind == "numpy":
        from devit_mq.kernels import vit_numpy

        return vit_numpy
    import numba  # ImportError: not installed

    from devit_mq.kernels import vit_numba  # ImportError: no SciPy (its BLAS)

    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    return vit_numba


def _auto_executor(bundle: str | Path, index: int, manifest: Any, threads: int, attention: str,
                   max_batch: int) -> EdgeExecutor:
    candidates = auto_candidates(attention)
    if candidates == ("torch",):
        return _torch_executor(bundle, index, manifest, threads, attention, max_batch)
    executors = _array_executors(candidates, bundle, index, manifest, threads, max_batch, required=False)
    if not executors:
        raise ExecutorError(f"executor 'auto': none of {', '.join(candidates)} can run here (see the log)")
    timings = time_executors(executors, manifest.input.image_shape)
    best = min(timings, key=timings.__getitem__)
    log.info("executor %r selected at batch 1 (median ms: %s)", best,
             {k: round(v * 1e3, 3) for k, v in timings.items()})
    return executors[best]


def time_executors(executors: dict[str, EdgeExecutor], image_shape: tuple[int, int, int], rounds: int = 5,
                   budget_s: float = 0.5) -> dict[str, float]:
    """Median seconds of a batch-1 forward per executor, in interleaved rounds (a noisy machine hurts
    all alike), after a warm-up each; at least 2 rounds, more while within ``budget_s``."""
    image = np.zeros((1, *image_shape), np.uint8)
    samples: dict[str, list[float]] = {name: [] for name in executors}
    for executor in executors.values():
        executor.warm_up()
    deadline = time.perf_counter() + budget_s
    for r in range(rounds):
        for name, executor in executors.items():
            start = time.perf_counter()
            executor.forward_prefix(image)
            samples[name].append(time.perf_counter() - start)
        if r >= 1 and time.perf_counter() > deadline:
            break
    return {name: statistics.median(ts) for name, ts in samples.items()}


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

        from devit_mq.model.manifest import part_path

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
