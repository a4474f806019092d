"""Glue between a topology and the node loops: build the node a name refers to, run it, or open a
client. The same functions serve ``devit-mq node`` (ZeroMQ, one process per node) and
``devit-mq mpi`` (one rank per node)."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import numpy as np

from devit_mq.model import load_fusion, load_manifest, load_submodel
from devit_mq.topology import Topology, check_against_bundle, load_topology
from devit_mq.transport import Transport, open_transport
from devit_mq.wire import Limits, warmup

from .aggregator import AggregatorNode
from .base import NodeBase, configure_threads
from .client import CLIENT_SEND_TIMEOUT_S, ClientNode, Prediction, default_client_name
from .edge import EdgeNode

log = logging.getLogger("devit_mq.nodes")


def wire_limits(topology: Topology) -> Limits:
    return Limits(max_message_bytes=topology.limits.max_message_bytes)


def build_node(topology: Topology, name: str, transport: Transport) -> NodeBase:
    """Load only what node ``name`` needs from the bundle and wire it to ``transport``."""
    spec = topology.node(name)
    configure_threads(spec.threads)
    warmup()  # load the codec kernels now, not on the first request
    manifest = load_manifest(topology.bundle)
    check_against_bundle(topology, manifest)
    limits = wire_limits(topology)
    if spec.role == "edge":
        backend = spec.attention
        model = load_submodel(topology.bundle, spec.submodel, manifest,
                              attention_backend="torch" if backend == "auto" else backend)
        if backend == "auto":
            from devit_mq.model import select_backend  # calibration compiles kernels: only when asked

            chosen = select_backend(model, batch_size=1)
            model.set_attention_backend(chosen)
            log.info("%s: attention backend calibrated: %s", name, chosen)
        node = EdgeNode(name, transport, model, manifest.input, spec.submodel, topology.aggregator.name,
                        codec=topology.codec, max_batch=spec.max_batch, max_wait_ms=spec.max_wait_ms,
                        limits=limits)
        node.metrics.info["attention_requested"] = backend
        return node
    if spec.role == "aggregator":
        fusion = load_fusion(topology.bundle, manifest)
        return AggregatorNode(
            name, transport, fusion, {e.submodel: e.name for e in topology.edges},
            deadline_ms=spec.deadline_ms, missing_policy=spec.missing_policy, max_pending=spec.max_pending,
            limits=limits, info={"classes": manifest.classes, "codec": topology.codec,
                                 "image_shape": list(manifest.input.image_shape)})
    raise ValueError(f"node {name!r} has role {spec.role!r}: only edges and the aggregator run as servers")


def serve(node: NodeBase) -> None:
    """Run a node until it is told to stop (shutdown message, SIGTERM or SIGINT)."""

    def _stop(signum, _frame):
        log.info("%s: signal %d, stopping", node.name, signum)
        node.stop()

    previous = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        node.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        node.close()


def make_client(topology: Topology, transport: Transport, name: str, timeout_s: float = 30.0,
                admin_token: str | None = None) -> ClientNode:
    """A client of ``topology``. ``admin_token`` is the secret of the launch that started the nodes:
    only a client that holds it may ask them to shut down."""
    warmup()
    client = ClientNode(name, transport, [e.name for e in topology.edges], topology.aggregator.name,
                        image_codec=topology.image_codec, timeout_s=timeout_s, limits=wire_limits(topology))
    client.admin_token = admin_token
    return client


class Client:
    """The user-facing client of a running ZeroMQ topology.

    >>> with Client("topologies/local-2edge.yaml") as client:      # doctest: +SKIP
    ...     labels = client.predict(images).labels
    """

    def __init__(self, topology: Topology | str | Path, name: str | None = None, timeout_s: float = 30.0,
                 connect_timeout_s: float = 60.0) -> None:
        self.topology = topology if isinstance(topology, Topology) else load_topology(topology)
        self.name = name or default_client_name()
        transport = open_transport(self.topology, self.name, send_timeout=CLIENT_SEND_TIMEOUT_S)
        self.node = make_client(self.topology, transport, self.name, timeout_s)
        try:
            self.status = self.node.connect(connect_timeout_s)
        except BaseException:
            self.node.close()
            raise

    @property
    def classes(self) -> list[str]:
        return list(self.status.get("classes", []))

    def predict(self, images: np.ndarray, batch_size: int = 1, window: int = 4) -> Prediction:
        """Classify uint8 images ``[B,H,W,C]``; one answer per image, in order."""
        return self.node.predict(images, batch_size=batch_size, window=window)

    def close(self) -> None:
        self.node.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
