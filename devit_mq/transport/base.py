"""The transport interface: the node loops send and receive opaque multipart messages through it and
never learn whether ZeroMQ, MPI or a queue carries them.

A message is a list of frames (``bytes``). Transports do not look inside frames (that is
``devit_mq.wire``'s job); they only enforce the topology's size limit and bounded waits, and say who
sent each message (:class:`Peer`), as far as they can tell: that is what authorization binds to.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType


class TransportError(RuntimeError):
    """A send or receive could not be done: the message names the node, the peer or endpoint, and why."""


class PeerGone(TransportError):
    """The connection a reply was meant for no longer exists (as opposed to a full queue or a
    refused message): the one failure that says a peer is gone."""


@dataclass(frozen=True, slots=True)
class Peer:
    """The sender of a received message.

    ``route`` answers that very connection (:meth:`Transport.reply`): a ZeroMQ ROUTER identity (a
    random secret per connection, never a claimed name), or a node name where names route (MPI,
    in-process); ``None`` when the message came in on a socket that cannot answer (a PULL inbox).
    ``key`` is the *authenticated* name of the sender: the CURVE key's name under ZeroMQ CURVE, the
    node of the sending rank under MPI, the endpoint's name in-process; ``None`` when the transport
    authenticates nobody (ZeroMQ without CURVE: claimed names are all there is)."""

    route: bytes | str | None = None
    key: str | None = None


@dataclass(slots=True)
class Inbound:
    """One received message and who sent it."""

    frames: list[bytes]
    peer: Peer


class Transport(ABC):
    """One endpoint of a topology (a node, or an implicit ZeroMQ client).

    Not thread-safe, like the sockets underneath: use one transport from one thread at a time (a node
    loop that receives with a timeout and sends between receives needs nothing else).
    """

    node: str

    @abstractmethod
    def send(self, peer: str, frames: Sequence[bytes]) -> None:
        """Deliver one message to ``peer``, a node of the topology (the route plan says how). Never
        blocks forever: if the peer's queue stays
        full for ``send_timeout`` seconds, or the peer is unknown or gone, raise :class:`TransportError`."""

    @abstractmethod
    def recv(self, timeout: float | None = None) -> Inbound | None:
        """One message from any peer, or ``None`` after ``timeout`` seconds (``None``: wait forever)."""

    def set_idle(self, idle: bool) -> None:  # noqa: B027 -- a hint: ignoring it is a valid choice
        """A hint from the node: nothing is in flight and no work came for a while, so the next
        message may be picked up a little later in exchange for near-zero CPU while waiting. Only
        transports that poll (MPI) use it; one that blocks in the kernel (ZeroMQ) is free when idle."""

    def reply(self, peer: Peer, frames: Sequence[bytes]) -> None:
        """Deliver one message over the connection ``peer`` came in on (how the aggregator answers a
        client: never by a name the client merely claims). Never waits: a connection whose queue is
        full loses the message (:class:`TransportError`), so a client that stops reading cannot stall
        the node; a connection that is gone raises :class:`PeerGone`. Where names route, that is
        :meth:`send`."""
        if not isinstance(peer.route, str):
            raise TransportError(f"{self.node}: cannot answer a peer without a route")
        self.send(peer.route, frames)

    @abstractmethod
    def close(self) -> None:
        """Release everything; idempotent and never hangs (unsent messages are dropped)."""

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def check_frames(node: str, peer: str, frames: Sequence[bytes], max_message_bytes: int) -> list[bytes]:
    """Frames as a list, refused with :class:`TransportError` before anything is sent if they are
    not bytes-like or add up to more than the topology's limit (the receiver would drop them)."""
    out = list(frames)
    if not out:
        raise TransportError(f"{node} -> {peer}: a message needs at least one frame")
    total = 0
    for i, frame in enumerate(out):
        if type(frame) is bytes:  # the common case, without building a memoryview
            total += len(frame)
            continue
        if not isinstance(frame, (bytes, bytearray, memoryview)):
            raise TransportError(f"{node} -> {peer}: frame {i} is {type(frame).__name__}, not bytes")
        total += memoryview(frame).nbytes
    if total > max_message_bytes:
        raise TransportError(f"{node} -> {peer}: message of {total} bytes exceeds limits.max_message_bytes="
                             f"{max_message_bytes}")
    return out
