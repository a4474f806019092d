"""Transports: send opaque multipart messages to named peers, receive with a timeout, close.

``open_transport(topology, node)`` picks the implementation the topology names (``zmq`` or ``mpi``);
``hub=InprocHub()`` gives the in-process one whatever the topology says (for tests of node loops).
The ZeroMQ and MPI modules are imported only when used: importing ``mpi4py.MPI`` initialises MPI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Inbound, Peer, PeerGone, Transport, TransportError, check_frames
from .faulty import FaultyTransport
from .inproc import InprocHub, InprocTransport

if TYPE_CHECKING:
    from devit_mq.topology import Topology

__all__ = [
    "FaultyTransport", "Inbound", "InprocHub", "InprocTransport", "Peer", "PeerGone", "Transport", "TransportError", "check_frames",
    "open_transport",
]


def open_transport(topology: Topology, node: str, *, comm: Any = None, send_timeout: float = 5.0,
                   hub: InprocHub | None = None) -> Transport:
    """Open ``node``'s endpoint of ``topology``.

    ``node`` is a topology node name; with ZeroMQ any other string opens an implicit client of that
    name. ``comm`` is the MPI communicator (default ``COMM_WORLD``). Errors (address in use, rank
    mismatch, missing keys) are :class:`TransportError`.
    """
    if hub is not None:
        return InprocTransport(hub, node, send_timeout=send_timeout)
    if topology.transport == "zmq":
        from .zmq import ZmqTransport

        return ZmqTransport(topology, node, send_timeout=send_timeout)
    if topology.transport == "mpi":
        from .mpi import MpiTransport

        return MpiTransport(topology, node, comm=comm, send_timeout=send_timeout)
    raise TransportError(f"unknown transport {topology.transport!r}")
