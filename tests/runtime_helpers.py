"""Small random-weight bundles and topology files for runtime tests (latency and routing do not
depend on trained weights; accuracy is the DEKD report's business)."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import torch
import yaml

from devit_mq.model import (
    DeViTEnsemble,
    FusionConfig,
    FusionHead,
    InputSpec,
    Manifest,
    VisionTransformer,
    ViTConfig,
    save_bundle,
)

SUB = ViTConfig(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2, num_classes=2)


def make_bundle(path: Path, widths=(32, 48), prefix: int = 1, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    n = len(widths)
    classes = [f"c{i}" for i in range(2 * n)]
    subs = [VisionTransformer(SUB.replace(embed_dim=w, distilled=prefix == 2)).eval() for w in widths]
    fusion = FusionHead(FusionConfig(in_dims=widths, hidden_dim=64, num_classes=2 * n,
                                     num_prefix_tokens=prefix)).eval()
    manifest = Manifest(classes=classes, class_groups=[[2 * i, 2 * i + 1] for i in range(n)],
                        submodels=[m.config for m in subs], fusion=fusion.config,
                        input=InputSpec(16, 1, (0.5,), (0.25,)), metadata={"trained": False})
    save_bundle(path, manifest, DeViTEnsemble(subs, fusion))
    return path


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 16, 16, 1), dtype=np.uint8)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def reference(bundle: Path, imgs: np.ndarray, codec: str, missing=()) -> np.ndarray:
    """In-process ensemble probabilities through the wire codec (``missing`` parts zero-filled)."""
    from devit_mq.model import load_ensemble
    from devit_mq.nodes.demo import wire_roundtrip

    ens, manifest = load_ensemble(bundle)
    with torch.inference_mode():
        parts = ens.features(manifest.input.to_tensor(imgs))
        parts = [None if i in missing else wire_roundtrip(p, codec) for i, p in enumerate(parts)]
        return ens.fuse(parts).softmax(-1).numpy()


def write_topology(path: Path, bundle: Path, n_edges: int = 2, transport: str = "zmq", codec: str = "fp32",
                   attention: str = "auto", security: dict | None = None, executor: str | None = "numpy",
                   **aggregator) -> Path:
    """A topology of ``n_edges`` edges on free local ports. Edges run the ``numpy`` executor unless
    told otherwise: it is ready in ~2 s where a torch edge takes ~6 s (most tests start topologies
    for what happens around the model); ``executor=None`` lets ``auto`` calibrate."""
    ports = free_ports(n_edges + 1)
    data = {
        "name": path.stem,
        "bundle": str(bundle),
        "transport": transport,
        "codec": codec,
        "defaults": {"threads": 1, "attention": attention, "max_batch": 8, "max_wait_ms": 2.0,
                     **({"executor": executor} if executor else {})},
        "aggregator": {"name": "aggregator", "host": "127.0.0.1", "port": ports[0],
                       "deadline_ms": 2000, **aggregator},
        "edges": [{"name": f"edge{i}", "submodel": i, "host": "127.0.0.1", "port": ports[i + 1]}
                  for i in range(n_edges)],
    }
    if security is not None:
        data["security"] = security
    if transport == "mpi":
        data["client"] = {"name": "client"}
        for node in [data["aggregator"], *data["edges"]]:
            node.pop("host"), node.pop("port")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def one_error_line(out, *needles: str) -> str:
    """A command's stderr is exactly one ``devit-mq: error: ...`` line (no traceback) holding ``needles``."""
    assert "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("devit-mq: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
