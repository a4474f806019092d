"""The demo workload: classify a bundle's test split through a running topology and compare with the
in-process reference. Shared by ``devit-mq demo`` (ZeroMQ launcher) and ``devit-mq mpi`` (rank 0)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from devit_mq.data import load_dataset
from devit_mq.model import Manifest, load_ensemble
from devit_mq.protocol import FeaturesMeta
from devit_mq.topology import Topology
from devit_mq.wire import Kind, Message, decode, encode

from .client import ClientNode, latency_breakdown


@dataclass
class TestSplit:
    images: np.ndarray  # uint8 [N,H,W,C]
    labels: np.ndarray
    source: str


def load_test_split(manifest: Manifest, limit: int | None = None) -> TestSplit:
    spec = dict(manifest.metadata.get("dataset") or {})
    if not spec:
        raise ValueError("the bundle's manifest records no dataset (metadata.dataset); pass images yourself")
    data = load_dataset(**spec)
    images, labels = data.test_images, data.test_labels
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return TestSplit(images, labels, str(spec.get("source", spec)))


def wire_roundtrip(features: torch.Tensor, codec: str) -> torch.Tensor:
    """What the aggregator sees of an edge's features after the wire codec."""
    msg = Message(Kind.FEATURES, "ref", request_ids=tuple(range(len(features))), array=features.numpy(),
                  codec=codec, meta=FeaturesMeta(part=0))
    return torch.from_numpy(np.array(decode(encode(msg)).array))


def reference_probabilities(topology: Topology, images: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """In-process ensemble probabilities: exact fp32, and through the topology's wire codec."""
    ensemble, manifest = load_ensemble(topology.bundle)
    exact, coded = [], []
    with torch.inference_mode():
        for lo in range(0, len(images), batch):
            x = manifest.input.to_tensor(images[lo: lo + batch])
            parts = ensemble.features(x)
            exact.append(ensemble.fuse(parts).softmax(-1).numpy())
            coded.append(ensemble.fuse([wire_roundtrip(p, topology.codec) for p in parts]).softmax(-1).numpy())
    return np.concatenate(exact), np.concatenate(coded)


def wire_bytes_per_image(topology: Topology, manifest: Manifest) -> dict[str, int]:
    """Bytes of one batch-1 message on each link (header + payload), measured by encoding one."""
    image = np.zeros((1, *manifest.input.image_shape), np.uint8)
    img_msg = Message(Kind.IMAGE, "client", request_ids=(1,), array=image, codec=topology.image_codec,
                      reply_to="client", quality=topology.image_quality)
    out = {"image (client->each edge)": sum(map(len, encode(img_msg)))}
    for part, cfg in enumerate(manifest.submodels):
        feats = np.random.default_rng(0).standard_normal((1, cfg.num_prefix_tokens, cfg.embed_dim)).astype(np.float32)
        msg = Message(Kind.FEATURES, f"edge{part}", request_ids=(1,), array=feats, codec=topology.codec,
                      meta=FeaturesMeta(part=part), reply_to="client")
        out[f"features part {part} ({topology.codec}, d={cfg.embed_dim})"] = sum(map(len, encode(msg)))
    return out


def node_table(status: dict[str, Any]) -> list[str]:
    """One line per node from the aggregator's status: what ran where, and what it cost."""
    lines = []
    for name, snap in sorted(status.get("nodes", {}).items()):
        info = snap.get("info", {})
        facts = ", ".join(f"{k}={v}" for k, v in info.items())
        lines.append(f"  {name}: pid {snap.get('pid')}, {facts + ', ' if facts else ''}"
                     f"cpu {snap.get('cpu_s', 0):.1f}s, rss {snap.get('rss_mb', 0):.0f} MB")
    return lines


def run_workload(client: ClientNode, split: TestSplit, latency_requests: int = 200, batch_size: int = 8,
                 window: int = 4) -> dict[str, Any]:
    """Batch-1 latency on sequential requests, then the whole split pipelined for accuracy/throughput."""
    n_lat = min(latency_requests, len(split.images))
    lat = client.predict(split.images[:n_lat], batch_size=1, window=1)
    start = time.perf_counter()
    bulk = client.predict(split.images, batch_size=batch_size, window=window)
    elapsed = time.perf_counter() - start
    return {
        **latency_breakdown(lat.answers),
        "throughput_img_s": len(split.images) / elapsed,
        "labels": bulk.labels,
        "probabilities": bulk.probabilities,
        "errors": len(bulk.errors) + len(lat.errors),
        "degraded": bulk.degraded + lat.degraded,
        "answered": len(bulk.answers),
        "error_examples": [a.error for a in (bulk.errors + lat.errors)[:3]],
        "nodes": node_table(client.query_status(10.0)),
    }


def summarize(result: dict[str, Any], split: TestSplit, reference: tuple[np.ndarray, np.ndarray],
              bytes_per_image: dict[str, int], processes: list[dict], topology: Topology,
              trained: bool = True) -> str:
    exact, coded = reference
    labels = result["labels"]
    n = len(split.labels)
    valid = labels >= 0
    dist_acc = float((labels == split.labels).mean()) if n else float("nan")
    lines = [f"== devit-mq demo: topology {topology.name!r} over {topology.transport}, "
             f"codec {topology.codec}, bundle {topology.bundle} =="]
    if not trained:
        lines.append("NOTE: this bundle is UNTRAINED (random weights): accuracies below are chance level.")
    lines.append(f"test split: {n} images from {split.source}")
    lines.append("processes:")
    for row in processes:
        lines.append("  " + ", ".join(f"{k}={v}" for k, v in row.items()))
    lines += [
        f"accuracy, distributed ({topology.codec} features): {dist_acc * 100:.2f}%",
        f"accuracy, in-process reference (fp32):            {(exact.argmax(1) == split.labels).mean() * 100:.2f}%",
        f"accuracy, in-process reference ({topology.codec} features): {(coded.argmax(1) == split.labels).mean() * 100:.2f}%",
        f"distributed == in-process({topology.codec}) predictions: "
        f"{(labels[valid] == coded.argmax(1)[valid]).mean() * 100:.2f}% of answered requests; "
        f"max |p_dist - p_ref| = {np.abs(result['probabilities'][valid] - coded[valid]).max():.2e}",
        f"answered {result['answered']}/{n}, errors {result['errors']}, degraded {result['degraded']}",
        f"latency at batch 1 (ms): p50 {result['latency_ms'].get('p50', float('nan')):.2f}  "
        f"p99 {result['latency_ms'].get('p99', float('nan')):.2f}  "
        f"(slowest edge's compute p50 {result['edge_compute_ms'].get('p50', float('nan')) * 1:.2f} ms, "
        f"framework overhead p50 {result['overhead_ms'].get('p50', float('nan')):.2f} ms)",
        f"throughput (batches of 8, 4 in flight): {result['throughput_img_s']:.1f} images/s",
        "bytes on the wire per image (batch-1 message, header included):",
    ]
    lines += [f"  {k}: {v} B" for k, v in bytes_per_image.items()]
    lines.append("what each node ran (from the nodes' own telemetry):")
    lines += result["nodes"]
    if result["error_examples"]:
        lines.append(f"first errors: {result['error_examples']}")
    return "\n".join(lines)
