"""The transport interface: the node loops send and receive opaque multipart messages through it and
never learn whether ZeroMQ, MPI or a queue carries them.

A message is a list of frames (``bytes``). Transports do not look inside frames (that is
``devit_mq.wire``'s job); they only enforce the topology's size limit and bounded waits.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from types import TracebackType


class TransportError(RuntimeError):
    """A send or receive could not be done: the message names the node, the peer or endpoint, and why."""


class Transport(ABC):
    """One endpoint of a topology (a node, or an implicit ZeroMQ client).

    Not thread-safe, like the sockets underneath: use one transport from one thread at a time (a node
    loop that receives with a timeout and sends between receives needs nothing else).
    """

    node: str

    @abstractmethod
    def send(self, peer: str, frames: Sequence[bytes]) -> None:
        """Deliver one message to ``peer`` (a topology node name, or on the aggregator the name of a
        client that has sent it at least one message). Never blocks forever: if the peer's queue stays
        full for ``send_timeout`` seconds, or the peer is unknown or gone, raise :class:`TransportError`."""

    @abstractmethod
    def recv(self, timeout: float | None = None) -> list[bytes] | None:
        """One message from any peer, or ``None`` after ``timeout`` seconds (``None``: wait forever)."""

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
        if not isinstance(frame, (bytes, bytearray, memoryview)):
            raise TransportError(f"{node} -> {peer}: frame {i} is {type(frame).__name__}, not bytes")
        total += memoryview(frame).nbytes
    if total > max_message_bytes:
        raise TransportError(f"{node} -> {peer}: message of {total} bytes exceeds limits.max_message_bytes="
                             f"{max_message_bytes}")
    return out
