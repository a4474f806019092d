"""MPI transport (mpi4py), buffer-based and non-blocking.

A message travels as one contiguous buffer, ``Isend`` as raw bytes: never mpi4py's pickle-based
lowercase calls. Framing (below the wire format, which the frames carry opaquely)::

    b"DM" | version u8 | pad u8 | n_frames u32 | n x frame length u64 | frame bytes...   (little endian)

Receiving is ``Iprobe`` + ``Get_count`` + ``Recv`` into a right-sized ``bytearray``. Waiting never
blocks inside MPI: a rank blocked in ``Recv`` busy-polls a whole core (measured: 3.0 s of CPU per
3 s of waiting), stealing the cores the edges compute on. Instead the waiter probes, then sleeps:
naps grow from ``first_nap`` (20 us: a quick reply, as in a ping-pong, is caught quickly) to
``poll_interval`` (200 us), and to ``idle_poll_interval`` (1 ms) after ``idle_after`` (50 ms)
without traffic. A busy rank reacts within ~0.2 ms. Each wake-up costs ~20 us of CPU (probe, Python,
syscall), and measured here an idle rank woken every 1 ms used 3-4% of a core (every 5 ms: 1.2-1.3%,
so a wake-up costs ~60 us on this VM). Once its node says it is idle (:meth:`set_idle`: nothing in
flight, no request traffic for a second) the rank naps ``deep_poll_interval`` (10 ms) without
spinning; the first message after such a pause waits at most that long (5 ms on average). After
``long_idle_after`` (10 s) of that it naps ``long_idle_poll_interval`` (50 ms): on this VM every
wake-up of a sleeping Python process is charged 80-140 us of CPU whatever it does (a bare
``time.sleep`` loop: 1.0% of a core at 10 ms naps, 0.6% at 20 ms), so only fewer wake-ups bring an
idle rank under 1% of a core. The price: a request after more than ~11 s of silence may wait up to
50 ms at each idle rank it passes (25 ms on average).
The thread's timer slack is cut to 1 us (Linux), or every nap would overshoot by the default 50 us.

Each ``Isend``'s buffer is kept until its request completes (pending requests are tested on every
call). At most ``limits.hwm`` sends may be pending per peer; a send that finds the peer's queue full
waits up to ``send_timeout`` for room, and a send to a peer whose oldest message has stayed unreceived
longer than ``send_timeout`` fails: both raise :class:`TransportError`.
"""

from __future__ import annotations

import ctypes
import logging
import struct
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from devit_mq.topology import Topology, TopologyError

from .base import Inbound, Peer, Transport, TransportError, check_frames

log = logging.getLogger(__name__)

TAG = 0x6D71  # one tag for all devit_mq traffic, so other users of the communicator are left alone
_MAGIC = b"DM"
_VERSION = 1
_HEAD = struct.Struct("<2sBxI")
LONG_IDLE_AFTER_S = 10.0  # idle (set_idle) this long: the longest naps
_LEN = struct.Struct("<Q")


def pack_frames(frames: Sequence[bytes]) -> bytearray:
    """One buffer: header, frame lengths, frames (a single copy of the payload)."""
    sizes = [memoryview(f).nbytes for f in frames]
    head = _HEAD.size + _LEN.size * len(frames)
    buf = bytearray(head + sum(sizes))
    _HEAD.pack_into(buf, 0, _MAGIC, _VERSION, len(frames))
    struct.pack_into(f"<{len(frames)}Q", buf, _HEAD.size, *sizes)
    pos = head
    for frame, size in zip(frames, sizes, strict=True):
        buf[pos:pos + size] = memoryview(frame).cast("B")
        pos += size
    return buf


def unpack_frames(buf: bytes | bytearray | memoryview) -> list[bytes]:
    """Inverse of :func:`pack_frames`; ``ValueError`` naming the defect for a malformed buffer."""
    view = memoryview(buf)
    if view.nbytes < _HEAD.size:
        raise ValueError(f"message of {view.nbytes} bytes is shorter than the {_HEAD.size}-byte header")
    magic, version, count = _HEAD.unpack_from(view, 0)
    if magic != _MAGIC:
        raise ValueError(f"bad magic {bytes(magic)!r}")
    if version != _VERSION:
        raise ValueError(f"framing version {version}, this build reads {_VERSION}")
    head = _HEAD.size + _LEN.size * count
    if view.nbytes < head:
        raise ValueError(f"{count} frames announced but the message is only {view.nbytes} bytes")
    sizes = struct.unpack_from(f"<{count}Q", view, _HEAD.size)
    if head + sum(sizes) != view.nbytes:
        raise ValueError(f"frame lengths add up to {head + sum(sizes)} bytes, message has {view.nbytes}")
    out, pos = [], head
    for size in sizes:
        out.append(bytes(view[pos:pos + size]))
        pos += size
    return out


@dataclass
class _Pending:
    request: Any  # MPI.Request
    buffer: bytearray  # must outlive the request
    started: float


class MpiTransport(Transport):
    """One rank of an MPI topology; ``comm`` defaults to ``MPI.COMM_WORLD``."""

    def __init__(self, topology: Topology, node: str, *, comm: Any = None, send_timeout: float = 5.0,
                 poll_interval: float = 200e-6, idle_poll_interval: float = 1e-3, idle_after: float = 0.05,
                 first_nap: float = 20e-6, spin: float = 100e-6, deep_poll_interval: float = 10e-3,
                 long_idle_after: float = LONG_IDLE_AFTER_S, long_idle_poll_interval: float = 50e-3) -> None:
        from mpi4py import MPI  # importing mpi4py.MPI initialises MPI: only when this transport is used

        self._MPI = MPI
        self.topology = topology
        self.node = node
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.send_timeout = send_timeout
        self.poll_interval = poll_interval
        self.idle_poll_interval = idle_poll_interval
        self.idle_after = idle_after
        self.first_nap = min(first_nap, poll_interval)
        # Probe without sleeping for this long at the start of each recv: a message that is already on
        # its way (a stream of them) is taken at once, instead of after a nap; measured here it lifted
        # the stream rate about 3x, and an idle node's caller waits in long recv calls, so the CPU cost
        # stays small (100 us per call).
        self.spin = spin
        self.deep_poll_interval = deep_poll_interval
        self.long_idle_after = long_idle_after
        self.long_idle_poll_interval = long_idle_poll_interval
        self._idle = False  # the node's hint (set_idle): nap deep_poll_interval, no spin
        self._idle_since = 0.0  # monotonic time of the hint
        reduce_timer_slack()
        self.dropped = 0  # malformed or oversized messages received and discarded
        try:
            self.ranks = topology.mpi_ranks(self.comm.Get_size())
        except TopologyError as exc:
            raise TransportError(str(exc)) from exc
        if node not in self.ranks:
            raise TransportError(f"{node!r} is not a node of topology {topology.name!r} "
                                 f"(nodes: {', '.join(self.ranks)})")
        self.rank = self.comm.Get_rank()
        if self.ranks[node] != self.rank:
            raise TransportError(f"{node} is rank {self.ranks[node]} in topology {topology.name!r}, "
                                 f"but this process is rank {self.rank}")
        self.names = {rank: name for name, rank in self.ranks.items()}
        self._peers = {rank: Peer(route=name, key=name) for rank, name in self.names.items()}
        self._pending: dict[int, deque[_Pending]] = {}
        self._status = MPI.Status()
        self._closed = False

    # -- sending ----------------------------------------------------------------------------------
    def _progress(self) -> None:
        """Retire completed sends (their buffers can then be freed), oldest first per peer."""
        for queue in self._pending.values():
            while queue and queue[0].request.Test():
                queue.popleft()

    def send(self, peer: str, frames: Sequence[bytes]) -> None:
        if self._closed:
            raise TransportError(f"{self.node}: transport is closed")
        dest = self.ranks.get(peer)
        if dest is None:
            raise TransportError(f"{self.node} -> {peer}: not a node of topology {self.topology.name!r} "
                                 f"(nodes: {', '.join(self.ranks)})")
        if dest == self.rank:
            raise TransportError(f"{self.node}: cannot send to itself")
        parts = check_frames(self.node, peer, frames, self.topology.limits.max_message_bytes)
        self._progress()
        queue = self._pending.setdefault(dest, deque())
        now = time.monotonic()
        if queue and now - queue[0].started > self.send_timeout:
            raise TransportError(f"{self.node} -> {peer} (rank {dest}): a message sent {now - queue[0].started:.1f} s "
                                 f"ago is still not received (send_timeout {self.send_timeout:g} s)")
        deadline = now + self.send_timeout
        while len(queue) >= self.topology.limits.hwm:
            if time.monotonic() >= deadline:
                raise TransportError(f"{self.node} -> {peer} (rank {dest}): {len(queue)} messages waiting, "
                                     f"queue full for {self.send_timeout:g} s")
            time.sleep(self.poll_interval)
            self._progress()
        buf = pack_frames(parts)
        request = self.comm.Isend([buf, self._MPI.BYTE], dest=dest, tag=TAG)
        queue.append(_Pending(request, buf, time.monotonic()))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every pending send has been received (``True``) or ``timeout`` passes (``False``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._progress()
            if not any(self._pending.values()):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(self.poll_interval)

    @property
    def pending(self) -> int:
        """Sends not yet completed."""
        self._progress()
        return sum(len(q) for q in self._pending.values())

    # -- receiving --------------------------------------------------------------------------------
    def _take(self) -> Inbound | None:
        """Receive the probed message; a malformed or oversized one is logged, counted and dropped
        (a peer's bug must not take down a long-running node)."""
        status = self._status
        source, count = status.Get_source(), status.Get_count(self._MPI.BYTE)
        buf = bytearray(count)
        self.comm.Recv([buf, self._MPI.BYTE], source=source, tag=TAG)
        sender = self.names.get(source, f"rank {source}")
        if count > self.topology.limits.max_message_bytes + 4096:  # headroom for the framing
            self.dropped += 1
            log.warning("%s: dropped a %d-byte message from %s (limits.max_message_bytes=%d)",
                        self.node, count, sender, self.topology.limits.max_message_bytes)
            return None
        try:
            frames = unpack_frames(buf)
        except ValueError as exc:
            self.dropped += 1
            log.warning("%s: dropped a malformed message from %s: %s", self.node, sender, exc)
            return None
        # the rank is the job's own word for who sent it: as authenticated as MPI makes it
        peer = self._peers.get(source) or Peer(route=None, key=None)
        return Inbound(frames, peer)

    def set_idle(self, idle: bool) -> None:
        if idle and not self._idle:
            self._idle_since = time.monotonic()
        self._idle = idle

    def _idle_nap(self, now: float) -> float:
        long = now - self._idle_since >= self.long_idle_after
        return self.long_idle_poll_interval if long else self.deep_poll_interval

    def recv(self, timeout: float | None = None) -> Inbound | None:
        if self._closed:
            raise TransportError(f"{self.node}: transport is closed")
        start = time.monotonic()
        deadline = None if timeout is None else start + max(0.0, timeout)
        last_traffic = start
        idle = self._idle
        nap = self._idle_nap(start) if idle else self.first_nap
        while True:
            if self.comm.Iprobe(source=self._MPI.ANY_SOURCE, tag=TAG, status=self._status):
                message = self._take()
                if message is not None:
                    return message
                last_traffic = time.monotonic()
                if deadline is not None and last_traffic >= deadline:
                    return None  # a stream of junk must not keep recv from timing out
                continue
            self._progress()
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return None
            if idle:
                nap = self._idle_nap(now)  # deep naps from the first one
            elif now - start < self.spin:
                continue
            elif now - last_traffic >= self.idle_after:
                nap = self.idle_poll_interval
            time.sleep(nap if deadline is None else min(nap, deadline - now))
            nap = min(2 * nap, self.poll_interval) if nap < self.poll_interval else nap

    def close(self) -> None:
        """Forget pending sends (MPI keeps their buffers alive via the module's graveyard, see below)
        and stop; MPI itself is finalised by mpi4py at exit."""
        if self._closed:
            return
        self._closed = True
        self._progress()
        for queue in self._pending.values():
            _GRAVEYARD.extend(queue)  # a buffer freed under an active Isend would be read after free
        self._pending.clear()


def reduce_timer_slack() -> None:
    """Linux lets a sleeping thread wake up to 50 us late (timer slack) to batch wake-ups; for
    200 us naps that is a 25% latency tax. 1 us is what a sleep of that size needs."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_TIMERSLACK, 1000, 0, 0, 0)  # nanoseconds
    except (OSError, AttributeError):  # not Linux: naps are as precise as the platform makes them
        pass


_PR_SET_TIMERSLACK = 29

# Sends still in flight when their transport closed: their buffers must stay alive until MPI is done.
_GRAVEYARD: list[_Pending] = []
