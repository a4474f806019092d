"""What every node loop shares: sending/receiving wire messages over *some* transport, counting what
happens, and a stop flag. Node logic never knows which transport carries its messages."""

from __future__ import annotations

import logging
import os
import time

from devit_mq.metrics import Metrics
from devit_mq.transport import Transport, TransportError
from devit_mq.wire import Kind, Limits, Message, WireError, decode, encode

HEARTBEAT_INTERVAL_S = 0.5
# An edge silent for this long is treated as down: requests stop waiting for it.
EDGE_SILENCE_S = 3.0

log = logging.getLogger("devit_mq.nodes")


def configure_threads(threads: int) -> None:
    """Pin torch (and numba) to the topology's thread count: under mpirun torch starts with 1 thread,
    elsewhere with every core, and edges sharing a host must not fight over cores."""
    import torch

    torch.set_num_threads(max(1, threads))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass
    os.environ.setdefault("NUMBA_NUM_THREADS", str(max(1, threads)))


class NodeBase:
    """A node: a name, a transport, metrics and a ``running`` flag."""

    role = "node"

    def __init__(self, name: str, transport: Transport, limits: Limits | None = None) -> None:
        self.name = name
        self.transport = transport
        self.limits = limits or Limits()
        self.metrics = Metrics(name)
        self.running = True

    # -- messaging -----------------------------------------------------------------------------
    def send(self, peer: str, msg: Message, expect_failure: bool = False) -> bool:
        """Encode and send; a failed send is counted and logged, never raised (a dead peer must not
        crash a long-running node). ``expect_failure`` logs it at debug level (e.g. hellos sent
        before the peer is up)."""
        frames = encode(msg)
        try:
            self.transport.send(peer, frames)
        except TransportError as exc:
            self.metrics.count(f"send_failed.{peer}")
            log.log(logging.DEBUG if expect_failure else logging.WARNING,
                    "%s: cannot send %s to %s: %s", self.name, msg.kind.name, peer, exc)
            return False
        self.metrics.add_bytes(f"{self.name}->{peer}", sum(len(f) for f in frames))
        self.metrics.count(f"sent.{msg.kind.name.lower()}")
        return True

    def receive(self, timeout: float | None) -> Message | None:
        """One decoded message, or None on timeout or on a malformed message (counted and dropped)."""
        frames = self.transport.recv(timeout)
        if frames is None:
            return None
        try:
            msg = decode(frames, self.limits)
        except WireError as exc:
            self.metrics.count("wire_errors")
            log.warning("%s: dropped malformed message (%s)", self.name, exc)
            return None
        self.metrics.count(f"recv.{msg.kind.name.lower()}")
        self.metrics.add_bytes(f"{msg.source}->{self.name}", sum(len(f) for f in frames))
        return msg

    def control(self, peer: str, op: str, expect_failure: bool = False, **meta: object) -> bool:
        return self.send(peer, Message(Kind.CONTROL, self.name, meta={"op": op, **meta},
                                       timestamps={"sent": time.time()}), expect_failure)

    def stop(self) -> None:
        self.running = False

    def close(self) -> None:
        self.running = False
        self.transport.close()
