"""What every node loop shares: receive -> decode -> authorize -> handle, send, count, stop.

A node is a thin loop: the transport gives frames and who sent them, the protocol (:mod:`devit_mq.wire`
with :mod:`devit_mq.protocol`'s schemas) turns frames into a typed :class:`Message` or a
:class:`WireError`, the :class:`~devit_mq.nodes.auth.Authorizer` decides whether that peer may send
it, and only then does a handler see it. Nothing a peer sends can stop the loop: decode and
authorization failures are counted and dropped, and :meth:`NodeBase.handle_safely` is the last-resort
guard around every handler (``handler_errors``). Every log line a peer can provoke is rate-limited.
Node logic never knows which transport carries its messages.
"""

from __future__ import annotations

import enum
import logging
import os
import sys
import time

from devit_mq.logs import RateLimitedLog
from devit_mq.metrics import Metrics
from devit_mq.protocol import OTHER, ControlOp, Kind
from devit_mq.transport import Peer, PeerGone, Transport, TransportError
from devit_mq.wire import Limits, Message, WireError, decode, encode

from .auth import Authorizer, Roster

HEARTBEAT_INTERVAL_S = 0.5
# A node with nothing in flight and no request traffic for this long tells its transport it is idle
# (a polling transport then naps longer: see Transport.set_idle). Heartbeats and status do not count.
IDLE_AFTER_S = 1.0
_WORK_KINDS = frozenset({Kind.IMAGE, Kind.FEATURES, Kind.RESULT, Kind.ERROR})
# An edge silent for this long is treated as down: requests stop waiting for it.
EDGE_SILENCE_S = 3.0

log = logging.getLogger("devit_mq.nodes")

# Metric names built once, not per message
_RECV_KEY = {kind: f"recv.{kind.name.lower()}" for kind in Kind}
_SENT_KEY = {kind: f"sent.{kind.name.lower()}" for kind in Kind}


class Sent(enum.Enum):
    """What became of a send; true only for ``OK``. ``GONE``: the connection no longer exists."""

    OK = "ok"
    FAILED = "failed"
    GONE = "gone"

    def __bool__(self) -> bool:
        return self is Sent.OK


def configure_threads(threads: int) -> None:
    """Pin the compute libraries to the topology's thread count: under mpirun torch starts with 1
    thread, elsewhere every library takes every core, and edges sharing a host must not fight over
    cores. Numba reads its count when it starts; torch is set here only if something already
    imported it (a torch-free node never does: the torch executor calls
    :func:`configure_torch_threads` itself)."""
    os.environ.setdefault("NUMBA_NUM_THREADS", str(max(1, threads)))
    if "torch" in sys.modules:
        configure_torch_threads(threads)


def configure_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass


class NodeBase:
    """A node: a name, a transport, who is who (``roster``), metrics and a ``running`` flag.

    Subclasses set ``accepts`` (the kinds they handle) and implement ``run``; they receive with
    :meth:`receive` (which only returns authorized, typed messages) and handle each through
    :meth:`handle_safely`."""

    role = "node"
    accepts: frozenset[Kind] = frozenset()

    def __init__(self, name: str, transport: Transport, roster: Roster, limits: Limits | None = None) -> None:
        self.name = name
        self.transport = transport
        self.roster = roster
        self.limits = limits or Limits()
        self.auth = Authorizer(roster, self.role, self.accepts)
        self.metrics = Metrics(name)
        self.running = True
        self.log = RateLimitedLog(log)
        self._peer_names = frozenset({roster.aggregator, *roster.owners.values()})
        # byte-counter names per link, in both directions (bounded: the topology's peers and OTHER)
        self._bytes_out = {p: f"{name}->{p}" for p in (*self._peer_names, OTHER)}
        self._bytes_in = {p: f"{p}->{name}" for p in (*self._peer_names, OTHER)}
        self.last_peer: Peer | None = None  # who sent the message :meth:`receive` returned last
        self._last_work = time.monotonic()  # when the last request-carrying message arrived
        self._idle = False  # what the transport was last told (set_idle)
        self.metrics_server = None  # a Prometheus endpoint (devit_mq.metrics.prometheus), when one serves

    # -- messaging -----------------------------------------------------------------------------
    def link_name(self, peer: str) -> str:
        """``peer`` if the topology names it, else the one shared bucket (metrics stay bounded)."""
        return peer if peer in self._peer_names else OTHER

    def send(self, peer: str | Peer, msg: Message, expect_failure: bool = False) -> Sent:
        """Encode and send to a node (by name) or back over a connection (a :class:`Peer`); a
        message that cannot be encoded or sent is counted and logged, never raised: a dead peer or
        an oversized reply must not crash a long-running node. ``expect_failure`` logs it at debug
        level (e.g. hellos sent before the peer is up)."""
        frames = self._encode(msg, peer)
        return Sent.FAILED if frames is None else self.send_frames(peer, frames, msg.kind, expect_failure)

    def broadcast(self, peers: list[str], msg: Message) -> dict[str, Sent]:
        """The same message to several nodes, encoded once (a client's image to every edge)."""
        frames = self._encode(msg, peers)
        return {p: Sent.FAILED if frames is None else self.send_frames(p, frames, msg.kind) for p in peers}

    def _encode(self, msg: Message, to: str | Peer | list[str]) -> list[bytes] | None:
        try:
            return encode(msg)
        except WireError as exc:
            self.metrics.count("encode_failed")
            who = ", ".join(to) if isinstance(to, list) else to  # named only when it is logged
            self.log.warning(f"encode.{msg.kind.name}", "%s: cannot encode %s for %s: %s", self.name,
                             msg.kind.name, who, exc)
            return None

    def send_frames(self, peer: str | Peer, frames: list[bytes], kind: Kind, expect_failure: bool = False) -> Sent:
        """Send already encoded frames (see :meth:`send`)."""
        name = peer if isinstance(peer, str) else (peer.key or OTHER)
        link = self.link_name(name)
        try:
            if isinstance(peer, str):
                self.transport.send(peer, frames)
            else:
                self.transport.reply(peer, frames)
        except TransportError as exc:
            self.metrics.count(f"send_failed.{link}")
            if not expect_failure:
                self.log.warning(f"send.{link}", "%s: cannot send %s to %s: %s", self.name, kind.name, name, exc)
            return Sent.GONE if isinstance(exc, PeerGone) else Sent.FAILED
        self.metrics.add_bytes(self._bytes_out[link], len(frames[0]) + len(frames[1]))
        self.metrics.count(_SENT_KEY[kind])
        return Sent.OK

    def in_flight(self) -> bool:
        """Whether this node holds work it expects more messages for (a subclass says)."""
        return False

    def queue_depth(self) -> int:
        """Requests this node holds right now (a subclass says): the ``queue_depth`` gauge."""
        return 0

    def _hint_idle(self) -> None:
        idle = not self.in_flight() and time.monotonic() - self._last_work > IDLE_AFTER_S
        if idle is not self._idle:
            self._idle = idle
            self.transport.set_idle(idle)

    def receive(self, timeout: float | None) -> Message | None:
        """One decoded, authorized message, or None on timeout or for a message that was dropped
        (malformed: ``wire_errors``; not allowed from that peer: ``unauthorized``)."""
        if timeout != 0:  # about to wait: tell the transport whether a late wake-up would cost anyone
            self._hint_idle()
        inbound = self.transport.recv(timeout)
        if inbound is None:
            return None
        frames = inbound.frames
        try:
            msg = decode(frames, self.limits)
        except WireError as exc:
            self.metrics.count("wire_errors")
            self.log.warning("wire", "%s: dropped malformed message (%s)", self.name, exc)
            return None
        refusal = self.auth.check(msg, inbound.peer)
        if refusal is not None:
            self.metrics.count("unauthorized")
            self.log.warning("auth", "%s: refused %s from %r: %s", self.name, msg.kind.name, msg.source, refusal)
            return None
        if msg.kind in _WORK_KINDS:
            self._last_work = time.monotonic()
        self.metrics.count(_RECV_KEY[msg.kind])
        self.metrics.add_bytes(self._bytes_in[self.link_name(msg.source)], len(frames[0]) + len(frames[1]))
        self.last_peer = inbound.peer
        return msg

    def handle_safely(self, handler, msg: Message) -> None:
        """The last-resort guard: a handler's bug on one message is counted (``handler_errors``)
        and logged (rate-limited, with the traceback once per interval), and the loop goes on."""
        try:
            handler(msg)
        except Exception:  # noqa: BLE001 -- whatever it was, the node must keep serving
            self.metrics.count("handler_errors")
            self.log.log(logging.ERROR, "handler", "%s: error handling %s from %r", self.name, msg.kind.name,
                         msg.source, exc_info=True)

    def step_safely(self, step, *args) -> None:
        """The same guard for a loop's own steps (fusing, expiring, heartbeats): state that
        messages built up must not be able to stop the loop either (``loop_errors``)."""
        try:
            step(*args)
        except Exception:  # noqa: BLE001
            self.metrics.count("loop_errors")
            self.log.log(logging.ERROR, f"step.{getattr(step, '__name__', 'step')}", "%s: error in %s", self.name,
                         getattr(step, "__name__", step), exc_info=True)

    def control(self, peer: str | Peer, op: ControlOp, expect_failure: bool = False) -> Sent:
        return self.send(peer, Message(Kind.CONTROL, self.name, meta=op, timestamps={"sent": time.time()}),
                         expect_failure)

    def stop(self) -> None:
        self.running = False

    def close(self) -> None:
        self.running = False
        if self.metrics_server is not None:
            self.metrics_server.close()
        self.transport.close()
