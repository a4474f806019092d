"""In-process transport: bounded thread-safe queues, one per endpoint, for unit tests of node loops
(threads instead of processes, same interface, same failure modes: unknown peer, full queue)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence

from devit_mq.protocol import DEFAULT_MAX_MESSAGE_BYTES

from .base import Inbound, Peer, Transport, TransportError, check_frames


class InprocHub:
    """The shared 'network': a registry of endpoints' inboxes by name."""

    def __init__(self, maxsize: int = 1000, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 authenticate: bool = True) -> None:
        self.maxsize = maxsize
        self.authenticate = authenticate  # False: like ZeroMQ without CURVE, claimed names are all there is
        self.max_message_bytes = max_message_bytes
        self._inboxes: dict[str, queue.Queue[Inbound]] = {}
        self._lock = threading.Lock()

    def register(self, name: str) -> queue.Queue[Inbound]:
        with self._lock:
            if name in self._inboxes:
                raise TransportError(f"inproc: an endpoint named {name!r} is already open on this hub")
            inbox: queue.Queue[Inbound] = queue.Queue(self.maxsize)
            self._inboxes[name] = inbox
            return inbox

    def unregister(self, name: str) -> None:
        with self._lock:
            self._inboxes.pop(name, None)

    def inbox(self, name: str) -> queue.Queue[Inbound] | None:
        with self._lock:
            return self._inboxes.get(name)

    @property
    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._inboxes)


class InprocTransport(Transport):
    """An endpoint on an :class:`InprocHub`. Frames are copied to ``bytes`` on send, so a sender
    reusing its buffers cannot change a message in flight (as with a real socket). The hub knows
    which endpoint sent what, so a received message's :class:`Peer` is that endpoint's name (as
    authenticated as an MPI rank)."""

    def __init__(self, hub: InprocHub, node: str, send_timeout: float = 5.0) -> None:
        self.hub = hub
        self.node = node
        self.send_timeout = send_timeout
        self._inbox = hub.register(node)
        self._me = Peer(route=node, key=node if hub.authenticate else None)
        self._closed = False

    def send(self, peer: str, frames: Sequence[bytes]) -> None:
        if self._closed:
            raise TransportError(f"{self.node}: transport is closed")
        message = [bytes(f) for f in check_frames(self.node, peer, frames, self.hub.max_message_bytes)]
        inbox = self.hub.inbox(peer)
        if inbox is None:
            raise TransportError(f"{self.node} -> {peer}: no such endpoint (open: {', '.join(self.hub.names)})")
        try:
            inbox.put(Inbound(message, self._me), timeout=self.send_timeout)
        except queue.Full:
            raise TransportError(f"{self.node} -> {peer}: queue full for {self.send_timeout:g} s "
                                 f"({self.hub.maxsize} messages waiting)") from None

    def recv(self, timeout: float | None = None) -> Inbound | None:
        if self._closed:
            raise TransportError(f"{self.node}: transport is closed")
        try:
            return self._inbox.get(timeout=None if timeout is None else max(0.0, timeout))
        except queue.Empty:
            return None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.hub.unregister(self.node)
