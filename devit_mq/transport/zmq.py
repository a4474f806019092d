"""ZeroMQ transport (tcp:// and ipc://).

Socket layout (one :class:`zmq.Context` per transport)::

    client ──PUSH (one per edge)──────────────▶ PULL  edge_i   (images)
    client ──DEALER id=client ─┐
    edge_i ──DEALER id=edge_i ─┴─────────────▶ ROUTER aggregator (features, hellos, control)
    aggregator ──ROUTER (by identity)─────────▶ client / edge DEALERs (answers)
    aggregator ──PUSH (one per edge, lazily)──▶ PULL  edge_i   (control)

Why this shape: a ROUTER lets the aggregator answer a client by name over the connection the client
opened (clients need no address); ``ROUTER_MANDATORY`` turns a send to an unknown or vanished client
into an error instead of a silent drop. Every outgoing link is its own socket with its own
high-water mark, so one slow edge fills only its own queue: fan-out to the other edges and fan-in to
the aggregator go on. ``IMMEDIATE`` on connecting sockets keeps messages from queueing towards a peer
that is not connected, so a dead edge shows up as a send timeout rather than as memory growth.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence

import zmq

from devit_mq.topology import NodeSpec, Topology, TopologyError

from . import security
from .base import Transport, TransportError, check_frames

HEARTBEAT_IVL_MS = 1000  # ZMTP pings detect a peer that vanished without closing its TCP connection
HEARTBEAT_TIMEOUT_MS = 5000
ZERO_COPY_BYTES = 64 * 1024


class ZmqTransport(Transport):
    """One node (or an implicit client) of a ZeroMQ topology."""

    def __init__(self, topology: Topology, node: str, *, send_timeout: float = 5.0) -> None:
        if send_timeout <= 0:
            raise ValueError(f"send_timeout must be > 0, got {send_timeout}")
        self.topology = topology
        self.node = node
        self.send_timeout = send_timeout
        self.spec: NodeSpec | None = self._lookup(node)
        self.role = self.spec.role if self.spec is not None else "client"
        self._closed = False
        self._ctx = zmq.Context()
        self._auth = None
        self._inbox: zmq.Socket | None = None   # bound: PULL on an edge, ROUTER on the aggregator
        self._upstream: zmq.Socket | None = None  # DEALER to the aggregator (edges, clients)
        self._pushers: dict[str, zmq.Socket] = {}  # per-edge PUSH sockets
        self._recv_socks: list[zmq.Socket] = []
        self._poller = zmq.Poller()
        self._ready: deque[list[bytes]] = deque()
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    # -- setup ------------------------------------------------------------------------------------
    def _lookup(self, node: str) -> NodeSpec | None:
        try:
            return self.topology.node(node)
        except TopologyError:
            encoded = node.encode()
            if not encoded or len(encoded) > 255 or encoded[0] == 0:
                raise TransportError(f"{node!r} is not a usable client name (1-255 bytes, not starting "
                                     "with a NUL byte)") from None
            return None

    def _socket(self, kind: int) -> zmq.Socket:
        limits = self.topology.limits
        sock = self._ctx.socket(kind)
        sock.linger = 0
        sock.sndhwm = limits.hwm
        sock.rcvhwm = limits.hwm
        sock.maxmsgsize = limits.max_message_bytes  # a larger frame disconnects its sender
        sock.sndtimeo = max(1, int(self.send_timeout * 1000))
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        return sock

    def _connect(self, kind: int, peer: NodeSpec) -> zmq.Socket:
        sock = self._socket(kind)
        sock.immediate = True
        if kind == zmq.DEALER:
            sock.identity = self.node.encode()
        if self.topology.security.curve:
            assert self.topology.security.keys_dir is not None
            security.make_client(sock, self.topology.security.keys_dir, self.node, server=peer.name)
        endpoint = peer.connect_endpoint
        if endpoint is None:
            raise TransportError(f"{self.node}: peer {peer.name} has no address in topology {self.topology.name!r}")
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            raise TransportError(f"{self.node}: cannot connect to {peer.name} at {endpoint}: {exc}") from exc
        return sock

    def _watch(self, sock: zmq.Socket) -> None:
        self._recv_socks.append(sock)
        self._poller.register(sock, zmq.POLLIN)

    def _setup(self) -> None:
        sec = self.topology.security
        if self.spec is not None and self.role in ("edge", "aggregator"):
            if sec.curve:
                assert sec.keys_dir is not None
                self._auth = security.start_authenticator(self._ctx, sec.keys_dir)
            inbox = self._socket(zmq.ROUTER if self.role == "aggregator" else zmq.PULL)
            if self.role == "aggregator":
                inbox.setsockopt(zmq.ROUTER_MANDATORY, 1)
                inbox.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted client takes its name back
            if sec.curve:
                assert sec.keys_dir is not None
                security.make_server(inbox, sec.keys_dir, self.node)
            endpoint = self.spec.bind_endpoint
            try:
                inbox.bind(endpoint)
            except zmq.ZMQError as exc:
                raise TransportError(f"{self.node}: cannot bind {endpoint}: {exc}") from exc
            self._inbox = inbox
            self._watch(inbox)
        if self.role in ("edge", "client"):
            self._upstream = self._connect(zmq.DEALER, self.topology.aggregator)
            self._watch(self._upstream)
        if self.role == "client":
            for edge in self.topology.edges:  # connect early: the handshakes overlap the caller's setup
                self._pushers[edge.name] = self._connect(zmq.PUSH, edge)

    # -- interface --------------------------------------------------------------------------------
    def _route(self, peer: str) -> tuple[zmq.Socket, list[bytes]]:
        if peer == self.node:
            raise TransportError(f"{self.node}: cannot send to itself")
        if peer == self.topology.aggregator.name:
            if self._upstream is None:
                raise TransportError(f"{self.node}: cannot send to {peer}")
            return self._upstream, []
        target = next((e for e in self.topology.edges if e.name == peer), None)
        if target is not None:
            sock = self._pushers.get(peer)
            if sock is None:
                sock = self._pushers[peer] = self._connect(zmq.PUSH, target)
            return sock, []
        if self.role == "aggregator":
            assert self._inbox is not None
            return self._inbox, [peer.encode()]
        raise TransportError(f"{self.node} -> {peer}: no route (only the aggregator can send to clients; "
                             f"nodes: {', '.join(n.name for n in self.topology.nodes)})")

    def send(self, peer: str, frames: Sequence[bytes]) -> None:
        if self._closed:
            raise TransportError(f"{self.node}: transport is closed")
        parts = check_frames(self.node, peer, frames, self.topology.limits.max_message_bytes)
        sock, prefix = self._route(peer)
        # Zero-copy pays only for large frames (pyzmq's Frame setup costs more than copying a small
        # one), and is safe only for immutable bytes: a bytearray the caller may reuse is copied.
        copy = not all(isinstance(p, bytes) and len(p) >= ZERO_COPY_BYTES for p in parts)
        try:
            sock.send_multipart(prefix + parts, copy=copy)
        except zmq.Again:
            raise TransportError(f"{self.node} -> {peer}: not accepted within {self.send_timeout:g} s "
                                 "(peer not connected, or its queue is full)") from None
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                raise TransportError(f"{self.node} -> {peer}: unknown or disconnected peer (a client must "
                                     "send to the aggregator before it can be answered)") from None
            raise TransportError(f"{self.node} -> {peer}: {exc}") from exc

    def recv(self, timeout: float | None = None) -> list[bytes] | None:
        if self._closed:
            raise TransportError(f"{self.node}: transport is closed")
        if self._ready:
            return self._ready.popleft()
        if not self._recv_socks:
            raise TransportError(f"{self.node}: has no inbound socket")
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        while True:
            wait_ms = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000 + 0.999))
            events = dict(self._poller.poll(wait_ms))
            # take one message from every ready socket so a busy one cannot starve the others
            for sock in self._recv_socks:
                if events.get(sock, 0) & zmq.POLLIN:
                    try:
                        msg = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        continue
                    if sock.type == zmq.ROUTER:
                        msg = msg[1:]  # the sender's identity
                    if msg:
                        self._ready.append(msg)
            if self._ready:
                return self._ready.popleft()
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def close(self, linger: float = 0.0) -> None:
        """Drop unsent messages (default), or give them up to ``linger`` seconds to leave."""
        if self._closed:
            return
        self._closed = True
        if self._auth is not None:
            try:
                self._auth.stop()
            except zmq.ZMQError:
                pass
            self._auth = None
        # destroy closes every socket first; ctx.term() alone would wait on open sockets forever
        self._ctx.destroy(linger=int(linger * 1000))
