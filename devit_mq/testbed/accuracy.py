"""What JPEG images cost in fused accuracy: the bundle's test split classified in-process (the
ensemble through the topology's feature codec, as :func:`devit_mq.nodes.demo.reference_probabilities`
does) once from the raw images and once from the images after the wire's ``jpeg`` codec -- exactly
the pixels an edge decodes -- at each quality. ``devit-mq testbed --jpeg-accuracy`` prints it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def jpeg_roundtrip(images: np.ndarray, quality: int) -> tuple[np.ndarray, int]:
    """``images`` as an edge receives them under ``jpeg`` at ``quality``, and the payload bytes."""
    from devit_mq.wire import Kind, Message, decode, encode

    frames = encode(Message(Kind.IMAGE, "client", tuple(range(1, len(images) + 1)), images, "jpeg",
                            reply_to="client", quality=quality))
    return np.asarray(decode(frames).array), len(frames[1])


def jpeg_accuracy_cost(topology_path: str, qualities: Sequence[int], limit: int | None = None) -> dict[str, Any]:
    """Fused accuracy (percent) on the test split of ``topology_path``'s bundle: raw vs jpeg at each
    quality, with the mean payload bytes per image (raw: H*W*C)."""
    from devit_mq.model import load_manifest
    from devit_mq.nodes.demo import load_test_split, reference_probabilities
    from devit_mq.topology import load_topology

    topology = load_topology(topology_path)
    split = load_test_split(load_manifest(topology.bundle), limit)
    labels = split.labels

    def accuracy(images: np.ndarray) -> float:
        _exact, coded = reference_probabilities(topology, images)
        return float((coded.argmax(1) == labels).mean() * 100)

    raw = accuracy(split.images)
    out: dict[str, Any] = {"bundle": str(topology.bundle), "codec": topology.codec, "images": len(labels),
                           "source": split.source, "raw": {"accuracy_pct": raw,
                                                           "bytes_per_image": int(split.images[0].size)},
                           "jpeg": {}}
    for quality in qualities:
        decoded, nbytes = jpeg_roundtrip(split.images, quality)
        acc = accuracy(decoded)
        out["jpeg"][str(quality)] = {"accuracy_pct": acc, "cost_points": raw - acc,
                                     "bytes_per_image": (nbytes - 4 * len(labels)) / len(labels),
                                     "mean_abs_pixel_error": float(np.abs(decoded.astype(np.int16) - split.images).mean())}
    return out
