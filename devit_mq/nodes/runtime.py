"""Glue between a topology and the node loops: build the node a name refers to, run it, or open a
client. The same functions serve ``devit-mq node`` (ZeroMQ, one process per node) and
``devit-mq mpi`` (one rank per node)."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import numpy as np

from devit_mq.metrics import process_age_s
from devit_mq.protocol import ADMIN_KEY, ENV_ADMIN_TOKEN, ENV_INSTANCE
from devit_mq.topology import Topology, TopologyError, check_against_bundle, load_topology
from devit_mq.transport import Transport, TransportError, open_transport
from devit_mq.wire import Limits, use_kernels, warmup

from .aggregator import AggregatorNode
from .auth import Roster
from .base import NodeBase, configure_threads
from .client import CLIENT_SEND_TIMEOUT_S, ClientNode, Prediction, default_client_name
from .edge import EdgeNode

log = logging.getLogger("devit_mq.nodes")


def wire_limits(topology: Topology) -> Limits:
    return Limits(max_message_bytes=topology.limits.max_message_bytes)


def roster(topology: Topology, admin_token: str | None = None) -> Roster:
    """Who is who in ``topology``, and who may stop its nodes: the ``admin`` key under CURVE, the
    job's own client rank under MPI, else whoever holds ``admin_token`` (the launch's secret)."""
    if topology.security.curve:
        admins = frozenset({ADMIN_KEY})
    elif topology.transport == "mpi" and topology.client is not None:
        admins = frozenset({topology.client.name})
    else:
        admins = frozenset()
    return Roster(topology.aggregator.name, {e.submodel: e.name for e in topology.edges}, admins, admin_token)


def pin_cpus(topology: Topology, spec) -> None:
    """Pin this process to the node's ``cpus`` (co-located edges then do not migrate between cores
    and fight over caches); a CPU this host does not have is the topology's error, named by key."""
    if not spec.cpus:
        return
    available = sorted(os.sched_getaffinity(0))
    missing = [c for c in spec.cpus if c not in available]
    if missing:
        raise TopologyError([(f"{spec.key_path}.cpus", f"CPU(s) {missing} are not available to this process on "
                              f"this host (available: {available})")], topology.source)
    os.sched_setaffinity(0, spec.cpus)
    log.info("%s: pinned to CPU(s) %s", spec.name, list(spec.cpus))


def _edge_executor(topology: Topology, spec, manifest):
    """The edge's executor, built and warmed up. Its telemetry says which one ran and what starting
    it cost: ``import_s`` (process start until its compute libraries were imported) and, set by
    :func:`build_node`, ``ready_s`` (process start until warmed up, just before the edge says ready)."""
    from .executor import build_edge_executor

    executor = build_edge_executor(spec.executor, topology.bundle, spec.submodel, manifest, threads=spec.threads,
                                   attention=spec.attention, max_batch=spec.max_batch, speed=spec.speed)
    log.info("%s: executor %s (%s)", spec.name, executor.backend, executor.describe())
    if spec.profile is not None:
        _log_prediction(spec, manifest, executor)
    return executor


def _log_prediction(spec, manifest, executor) -> None:
    """What the edge's device profile predicts for its sub-model beside a few measured forwards, so a
    profile that no longer describes the host shows in the log at start."""
    from devit_mq.profile.device import load_profile

    from .executor import time_executors

    profile = load_profile(spec.profile)
    predicted = profile.predict_ms(manifest.submodels[spec.submodel])
    measured = time_executors({"edge": executor}, manifest.input.image_shape, rounds=15)["edge"] * 1e3
    log.info("%s: profile %r predicts %.3f ms per batch-1 forward; measured %.3f ms (%+.0f%%)", spec.name,
             profile.device, predicted, measured, (predicted - measured) / measured * 100)


def build_node(topology: Topology, name: str, transport: Transport) -> NodeBase:
    """Load only what node ``name`` needs from the bundle and wire it to ``transport``, and serve its
    Prometheus metrics if the topology gives it a ``metrics_port``. A node started by a launcher
    takes the launch's admin token and instance id from its environment."""
    spec = topology.node(name)
    node = _build(topology, spec, transport)
    if spec.metrics_address is not None:
        from devit_mq.metrics.prometheus import serve_metrics

        host, port = spec.metrics_address
        try:
            serve_metrics(node, host, port)
        except OSError as exc:
            raise TransportError(f"{spec.key_path}.metrics_port: cannot serve /metrics on {host}:{port}: "
                                 f"{exc.strerror or exc}") from None
        log.info("%s: Prometheus metrics on http://%s:%d/metrics", name, host, port)
    return node


def _build(topology: Topology, spec, transport: Transport) -> NodeBase:
    from devit_mq.model import load_manifest

    name = spec.name
    pin_cpus(topology, spec)
    configure_threads(spec.threads)
    if spec.executor == "numpy":
        use_kernels(False)  # the NumPy codecs: a numpy edge never imports Numba (its RSS is the point)
    warmup()  # load the codec kernels now, not on the first request
    manifest = load_manifest(topology.bundle)
    check_against_bundle(topology, manifest)
    limits = wire_limits(topology)
    who = roster(topology, os.environ.get(ENV_ADMIN_TOKEN) or None)
    if spec.role == "edge":
        node = EdgeNode(name, transport, _edge_executor(topology, spec, manifest), manifest.input.image_shape,
                        spec.submodel, who, codec=topology.codec, max_batch=spec.max_batch,
                        max_wait_ms=spec.max_wait_ms, max_queue_ms=spec.max_queue_ms, limits=limits)
        node.metrics.info.update(executor_requested=spec.executor, attention_requested=spec.attention,
                                 ready_s=round(process_age_s(), 2))
        return node
    if spec.role == "aggregator":
        from .executor import NumpyFusionExecutor

        cfg = manifest.fusion
        return AggregatorNode(
            name, transport, NumpyFusionExecutor.from_bundle(topology.bundle, manifest), cfg.in_dims,
            cfg.num_prefix_tokens, who,
            deadline_ms=spec.deadline_ms, missing_policy=spec.missing_policy, max_pending=spec.max_pending,
            limits=limits, info={"classes": manifest.classes, "codec": topology.codec,
                                 "image_shape": list(manifest.input.image_shape),
                                 "instance": os.environ.get(ENV_INSTANCE, "")})
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
    only a client that holds it may ask them to shut down (where CURVE does not authenticate)."""
    warmup()
    return ClientNode(name, transport, roster(topology), image_codec=topology.image_codec, timeout_s=timeout_s,
                      limits=wire_limits(topology), admin_token=admin_token, image_quality=topology.image_quality)


def client_name(topology: Topology, requested: str | None = None, *, admin: bool = False) -> str:
    """The name a client of ``topology`` goes by. Under CURVE it must be the name of the key pair it
    holds, or ``KEY.suffix`` for a shared pair (the aggregator binds the claimed name to the
    authenticated key): ``requested``, else the ``admin`` pair for an operator's tool, else a random
    name under the shared ``client`` pair; without CURVE a fresh random name unless one is requested."""
    if topology.security.curve:
        from devit_mq.transport.security import CLIENT_KEY

        # holders of the shared pair go by "client.<random>": one key, distinct names
        return requested or (ADMIN_KEY if admin else f"{CLIENT_KEY}.{default_client_name()}")
    return requested or default_client_name()


class Client:
    """The user-facing client of a running ZeroMQ topology.

    >>> with Client("topologies/local-2edge.yaml") as client:      # doctest: +SKIP
    ...     labels = client.predict(images).labels
    """

    def __init__(self, topology: Topology | str | Path, name: str | None = None, timeout_s: float = 30.0,
                 connect_timeout_s: float = 60.0) -> None:
        self.topology = topology if isinstance(topology, Topology) else load_topology(topology)
        self.name = client_name(self.topology, name)
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


def precompile() -> None:
    """Compile and cache every Numba kernel a node runs: the wire codecs and the ``numba``
    executor's (on the shipped default bundle: kernels are compiled per element type, not per
    model size). What a container image runs at build time, so that its nodes start warm (about
    1 s to ready instead of 14 s); needs a writable ``NUMBA_CACHE_DIR`` or package folder."""
    from devit_mq.model import load_manifest
    from devit_mq.topology import resolve_bundle

    from .executor import build_edge_executor

    warmup()
    bundle = resolve_bundle("default", Path.cwd())
    build_edge_executor("numba", bundle, 0, load_manifest(bundle))
