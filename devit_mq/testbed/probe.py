"""The client side of a testbed phase, run on the client host (inside its namespace).

``python -m devit_mq.testbed.probe CONFIG.json`` connects (DeViT: a :class:`ClientNode` of the
testbed topology; pipeline/monolith: a :class:`~devit_mq.testbed.pipeline.ChainClient`), warms up,
then talks to the runner over stdin/stdout so that the runner can read every link's interface
counters exactly around the measured part::

    probe -> "ready"      runner reads counters, -> "go"
    probe -> "done"       runner reads counters, -> "report"
    probe -> one JSON line (latencies, probabilities, throughput)

The images are real photographs (:func:`photo_crops`), because random noise does not compress like
a camera frame.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def photo_crops(n: int, size: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """``n`` random square crops (a side of 40-100% of the photo's height, resized to ``size``) of
    scikit-learn's two sample photographs, uint8 ``[n, size, size, channels]``."""
    from PIL import Image

    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        raise RuntimeError("the testbed's photos come from scikit-learn: pip install scikit-learn "
                           "(the 'dev' extra has it)") from None

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, channels), np.uint8)
    for i in range(n):
        photo = photos[int(rng.integers(len(photos)))]
        h, w = photo.shape[:2]
        side = int(rng.integers(int(0.4 * h), h + 1))
        y, x = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
        crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size), Image.BILINEAR)
        if channels == 1:
            crop = crop.convert("L")
        out[i] = np.asarray(crop).reshape(size, size, channels)
    return out


def _handshake(line: str, expect: str) -> None:
    print(line, flush=True)
    got = sys.stdin.readline().strip()
    if got != expect:
        raise SystemExit(f"probe: expected {expect!r} from the runner, got {got!r}")


def _devit_client(cfg: dict[str, Any]):
    from devit_mq.bench.faults import FaultSpec
    from devit_mq.nodes.client import CLIENT_SEND_TIMEOUT_S
    from devit_mq.nodes.runtime import client_name, make_client
    from devit_mq.topology import load_topology
    from devit_mq.transport import open_transport

    topology = load_topology(cfg["topology"])
    name = client_name(topology)
    transport = open_transport(topology, name, send_timeout=CLIENT_SEND_TIMEOUT_S)
    if cfg.get("delay_ms") or cfg.get("jitter_ms"):
        transport = FaultSpec(delay_ms=cfg["delay_ms"], jitter_ms=cfg["jitter_ms"]).wrap(transport, seed=cfg["seed"])
    client = make_client(topology, transport, name, timeout_s=cfg["timeout_s"])
    client.connect(cfg["connect_timeout_s"])

    def run(images: np.ndarray, window: int) -> tuple[list[float], np.ndarray]:
        if window == 1:  # timed one by one, as the chain client does
            lat, probs = [], []
            for i in range(len(images)):
                t0 = time.perf_counter()
                pred = client.predict(images[i:i + 1], batch_size=1, window=1)
                lat.append(time.perf_counter() - t0)
                if pred.errors:
                    raise RuntimeError(f"DeViT request failed: {pred.errors[0].error}")
                probs.append(pred.probabilities[0])
            return lat, np.stack(probs)
        pred = client.predict(images, batch_size=1, window=window)
        if pred.errors:
            raise RuntimeError(f"DeViT request failed: {pred.errors[0].error}")
        return [], pred.probabilities

    return run, client.close


def _chain_client(cfg: dict[str, Any]):
    from .pipeline import ChainClient

    client = ChainClient(cfg["first"], cfg["result_bind"], cfg["image_codec"], cfg["delay_ms"] / 1e3,
                         cfg["jitter_ms"] / 1e3, cfg["seed"], cfg["image_quality"])

    def run(images: np.ndarray, window: int) -> tuple[list[float], np.ndarray]:
        return client.run(images, window=window, timeout_s=cfg["connect_timeout_s"])

    return run, client.close


def probe(cfg: dict[str, Any]) -> dict[str, Any]:
    images = np.load(cfg["images"])
    run, close = (_devit_client if cfg["system"] == "devit" else _chain_client)(cfg)
    try:
        t0 = time.perf_counter()
        run(images[: cfg["warmup"]], 1)  # the first answer also waits for the nodes to load
        ready_s = time.perf_counter() - t0
        n_lat, n_thr = cfg["latency_requests"], cfg["throughput_images"]
        lat_images = images[np.arange(n_lat) % len(images)]
        thr_images = images[np.arange(n_thr) % len(images)]
        _handshake("ready", "go")
        latencies, probs = run(lat_images, 1)
        t1 = time.perf_counter()
        run(thr_images, cfg["window"])
        elapsed = time.perf_counter() - t1
        _handshake("done", "report")
    finally:
        close()
    return {"latencies_ms": [x * 1e3 for x in latencies], "probabilities": probs.tolist(),
            "images_per_s": n_thr / elapsed, "throughput_images": n_thr, "window": cfg["window"],
            "images_measured": n_lat + n_thr, "warmup_s": ready_s}


def main(argv: list[str]) -> int:
    cfg = json.loads(Path(argv[0]).read_text())
    result = probe(cfg)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
