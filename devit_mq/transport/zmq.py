"""ZeroMQ transport (tcp:// and ipc://), wired by the topology's route plan.

Socket layout (one :class:`zmq.Context` per transport), as :meth:`Topology.route_plan` says::

    client ──PUSH (one per edge)──────────────▶ PULL  edge_i   (images)          "receiving" inbox
    client ──DEALER ─┐
    edge_i ──DEALER ─┴────────────────────────▶ ROUTER aggregator (features, hellos, control)
    aggregator ──ROUTER (by connection)───────▶ client / edge DEALERs (answers)  "answering" inbox
    aggregator ──PUSH (one per edge, lazily)──▶ PULL  edge_i   (control)

Why this shape: a ROUTER lets the aggregator answer a client over the connection the client opened
(clients need no address). Every DEALER takes a random 16-byte routing id, never its name: the
aggregator answers the connection a hello came in on (:meth:`reply`), so a peer that merely claims a
client's name cannot receive that client's answers. ``ROUTER_MANDATORY`` turns a send to a vanished
connection into an error instead of a silent drop. Every outgoing link is its own socket with its
own high-water mark, so one slow edge fills only its own queue. ``IMMEDIATE`` on connecting sockets
keeps messages from queueing towards a peer that is not connected, so a dead edge shows up as a send
timeout rather than as memory growth.

With CURVE, the ZAP handler names every admitted connection by its key (``User-Id``, see
:mod:`devit_mq.transport.security`); :class:`~devit_mq.transport.Peer` carries that name as ``key``.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Sequence

import zmq

from devit_mq.topology import Link, RoutePlan, Topology

from . import security
from .base import Inbound, Peer, PeerGone, Transport, TransportError, check_frames

# Kernel TCP keepalives, not ZMTP heartbeats (HEARTBEAT_IVL), detect a peer that vanished without
# closing its connection: libzmq 4.3.5 (unfixed on master) aborts the process with "Assertion failed:
# !_io_error (stream_engine_base.cpp:310)" when a connection whose receive queue is full (input stopped
# at the high-water mark) is reset by its peer (a flood, then close with linger 0) and the engine
# writes before the queue drains: the reset only sets _io_error, and the heartbeat timer's ping asserts
# on it. Any peer can do that to a bound inbox. (A pong to a PING inside the flood asserts the same way:
# our sockets send no PINGs; a hand-written ZMTP peer still can.)
TCP_KEEPALIVE_IDLE_S, TCP_KEEPALIVE_INTVL_S, TCP_KEEPALIVE_CNT = 5, 1, 5  # ~10 s on an idle link
ZERO_COPY_BYTES = 64 * 1024
ROUTING_ID_BYTES = 16  # random, so no peer can guess (and take over) another's connection
DRAIN_PER_POLL = 16  # messages taken from one ready socket per poll (see recv)
# Flags as plain ints: pyzmq's are enum members, and every `|` or `&` on them is a Python-level call
_SNDMORE, _NOBLOCK, _POLLIN = int(zmq.SNDMORE), int(zmq.NOBLOCK), int(zmq.POLLIN)

_PATTERN_SOCKET = {"request": zmq.DEALER, "push": zmq.PUSH}


class ZmqTransport(Transport):
    """One node (or an implicit client) of a ZeroMQ topology."""

    def __init__(self, topology: Topology, node: str, *, send_timeout: float = 5.0,
                 plan: RoutePlan | None = None) -> None:
        """``plan`` (default: the topology's for ``node``) may narrow the wiring, e.g. a status
        probe that talks to the aggregator only and opens no connection to the edges."""
        if send_timeout <= 0:
            raise ValueError(f"send_timeout must be > 0, got {send_timeout}")
        self.topology = topology
        self.node = node
        self.send_timeout = send_timeout
        self.plan = plan or topology.route_plan(node)
        self.curve = topology.security.curve
        self._closed = False
        self._ctx = zmq.Context()
        self._auth = None
        self._inbox: zmq.Socket | None = None  # bound: ROUTER ("answering") or PULL ("receiving")
        self._links: dict[str, zmq.Socket] = {}  # peer name -> connected socket
        self._link_peer: dict[zmq.Socket, Peer] = {}  # who answers on a connected socket
        self._recv_socks: list[zmq.Socket] = []
        self._poller = zmq.Poller()
        self._ready: deque[Inbound] = deque()
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    # -- setup ------------------------------------------------------------------------------------
    def _socket(self, kind: int) -> zmq.Socket:
        limits = self.topology.limits
        sock = self._ctx.socket(kind)
        sock.linger = 0
        sock.sndhwm = limits.hwm
        sock.rcvhwm = limits.hwm
        sock.maxmsgsize = limits.max_message_bytes  # a larger frame disconnects its sender
        sock.sndtimeo = max(1, int(self.send_timeout * 1000))
        sock.setsockopt(zmq.TCP_KEEPALIVE, 1)  # no HEARTBEAT_IVL: see TCP_KEEPALIVE_IDLE_S (libzmq abort)
        sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, TCP_KEEPALIVE_IDLE_S)
        sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, TCP_KEEPALIVE_INTVL_S)
        sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, TCP_KEEPALIVE_CNT)
        return sock

    def _connect(self, link: Link) -> zmq.Socket:
        sock = self._socket(_PATTERN_SOCKET[link.pattern])
        sock.immediate = True
        if link.pattern == "request":
            sock.identity = os.urandom(ROUTING_ID_BYTES)
        if self.curve:
            assert self.topology.security.keys_dir is not None
            security.make_client(sock, self.topology.security.keys_dir, security.key_name(self.node),
                                 server=link.peer)
        if link.endpoint is None:
            raise TransportError(f"{self.node}: peer {link.peer} has no address in topology {self.topology.name!r}")
        try:
            sock.connect(link.endpoint)
        except zmq.ZMQError as exc:
            raise TransportError(f"{self.node}: cannot connect to {link.peer} at {link.endpoint}: {exc}") from exc
        if link.pattern == "request":  # answers come back on it
            self._link_peer[sock] = Peer(route=None, key=link.peer if self.curve else None)
            self._watch(sock)
        return sock

    def _watch(self, sock: zmq.Socket) -> None:
        self._recv_socks.append(sock)
        self._poller.register(sock, zmq.POLLIN)

    def _setup(self) -> None:
        plan, sec = self.plan, self.topology.security
        if plan.inbox is not None:
            if sec.curve:
                assert sec.keys_dir is not None
                self._auth = security.start_authenticator(self._ctx, sec.keys_dir)
            inbox = self._socket(zmq.ROUTER if plan.inbox == "answering" else zmq.PULL)
            if plan.inbox == "answering":
                inbox.setsockopt(zmq.ROUTER_MANDATORY, 1)
            if sec.curve:
                assert sec.keys_dir is not None
                security.make_server(inbox, sec.keys_dir, self.node)
            try:
                inbox.bind(plan.bind)
            except zmq.ZMQError as exc:
                raise TransportError(f"{self.node}: cannot bind {plan.bind}: {exc}") from exc
            self._inbox = inbox
            self._watch(inbox)
        for link in plan.links:
            if link.eager:  # connect early: the handshakes overlap the caller's setup
                self._links[link.peer] = self._connect(link)

    # -- interface --------------------------------------------------------------------------------
    def _link(self, peer: str) -> zmq.Socket:
        sock = self._links.get(peer)
        if sock is not None:
            return sock
        if peer == self.node:
            raise TransportError(f"{self.node}: cannot send to itself")
        link = self.plan.link(peer)
        if link is None:
            known = ", ".join(link.peer for link in self.plan.links) or "none"
            raise TransportError(f"{self.node} -> {peer}: no route (this node sends to: {known}; the "
                                 "aggregator answers clients over their own connection)")
        sock = self._links[peer] = self._connect(link)
        return sock

    def _send(self, sock: zmq.Socket, parts: list, peer: str, flags: int = 0) -> None:
        # Zero-copy pays only for large frames (pyzmq's Frame setup costs more than copying a small
        # one), and is safe only for immutable bytes: a bytearray the caller may reuse is copied.
        copy = not all(isinstance(p, bytes) and len(p) >= ZERO_COPY_BYTES for p in parts)
        try:
            # send_multipart's own type checks repeat check_frames': send the parts directly (a
            # multipart message is atomic: once its first part is queued, the rest are too)
            more = flags | _SNDMORE
            for part in parts[:-1]:
                sock.send(part, more, copy=copy)
            sock.send(parts[-1], flags, copy=copy)
        except zmq.Again:
            waited = "its queue is full" if flags else f"not accepted within {self.send_timeout:g} s"
            raise TransportError(f"{self.node} -> {peer}: {waited} (peer not connected, or not reading)") from None
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                raise PeerGone(f"{self.node} -> {peer}: that connection is gone") from None
            raise TransportError(f"{self.node} -> {peer}: {exc}") from exc

    def send(self, peer: str, frames: Sequence[bytes]) -> None:
        if self._closed:
            raise TransportError(f"{self.node}: transport is closed")
        parts = check_frames(self.node, peer, frames, self.topology.limits.max_message_bytes)
        self._send(self._link(peer), parts, peer)

    def reply(self, peer: Peer, frames: Sequence[bytes]) -> None:
        if self._closed:
            raise TransportError(f"{self.node}: transport is closed")
        if type(peer.route) is not bytes or self._inbox is None or self.plan.inbox != "answering":
            raise TransportError(f"{self.node}: cannot answer that peer (no connection to answer over)")
        name = peer.key or "client"
        parts = check_frames(self.node, name, frames, self.topology.limits.max_message_bytes)
        self._send(self._inbox, [peer.route, *parts], name, _NOBLOCK)  # never stall on one reader

    def _take(self, sock: zmq.Socket) -> Inbound | None | bool:
        """One message from ``sock``: an :class:`Inbound`, None for one to ignore, False if empty."""
        inbox = sock is self._inbox
        try:
            if self.curve and inbox:  # frames as zmq.Frame, to read the User-Id the ZAP handler set
                frames = sock.recv_multipart(_NOBLOCK, copy=False)
                key = frames[-1].get("User-Id") or None
                if key is None:  # admitted but unnamed: cannot happen with our handler; never trust it
                    return None
                parts = [f.bytes for f in frames]
            else:
                parts, key = sock.recv_multipart(_NOBLOCK), None
        except zmq.Again:
            return False
        if not inbox:
            # an answer on one of our own links: the peer is the server that link reaches (under
            # CURVE we authenticated its key when connecting)
            return Inbound(parts, self._link_peer[sock])
        route: bytes | None = None
        if sock.type == zmq.ROUTER:
            route, parts = parts[0], parts[1:]  # the connection's routing id
        if not parts:
            return None
        return Inbound(parts, Peer(route=route, key=key))

    def recv(self, timeout: float | None = None) -> Inbound | None:
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
            # Up to DRAIN_PER_POLL messages from every ready socket: one poll (a syscall) serves a
            # burst, and no busy socket can starve the others for more than that many messages.
            for sock in self._recv_socks:
                if events.get(sock, 0) & _POLLIN:
                    for _ in range(DRAIN_PER_POLL):
                        inbound = self._take(sock)
                        if inbound is False:
                            break
                        if inbound is not None:
                            self._ready.append(inbound)
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
