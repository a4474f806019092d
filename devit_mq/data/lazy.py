"""Images kept as file paths and decoded when a batch asks for them (ImageNet does not fit in memory).

:class:`LazyImages` stands where an ``uint8 [N, H, W, C]`` array would: it has ``shape``, ``dtype``
and ``ndim``, indexing (a slice, an index array or a boolean mask) gives another view of paths, and
``np.asarray`` (or :meth:`decode`) decodes. Every image passes the same fixed-size transform, so the
shape is known without decoding them all."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

# PIL releases the GIL while it decodes and resizes: a few threads keep a batch's decode off the
# critical path of a GPU step without worker processes
DECODE_THREADS = min(8, os.cpu_count() or 1)


class LazyImages:
    def __init__(self, paths: list[Path], decode_one: Callable[[Path], np.ndarray], image_shape: tuple[int, ...]):
        self.paths = list(paths)
        self._decode_one = decode_one
        self.image_shape = tuple(image_shape)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 4

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.paths), *self.image_shape)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index) -> LazyImages:
        if isinstance(index, (int, np.integer)):
            index = [int(index)]
        picked = np.asarray(self.paths, dtype=object)[np.asarray(index) if not isinstance(index, slice) else index]
        return LazyImages(list(np.atleast_1d(picked)), self._decode_one, self.image_shape)

    def decode(self) -> np.ndarray:
        """``uint8 [n, H, W, C]`` of these images."""
        out = np.empty(self.shape, np.uint8)
        if len(self.paths) == 1 or DECODE_THREADS == 1:
            for i, p in enumerate(self.paths):
                out[i] = self._decode_one(p)
            return out
        with ThreadPoolExecutor(DECODE_THREADS) as pool:
            for i, arr in enumerate(pool.map(self._decode_one, self.paths)):
                out[i] = arr
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        arr = self.decode()
        return arr if dtype is None else arr.astype(dtype)
