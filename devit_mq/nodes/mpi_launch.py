"""Running a topology under ``mpirun``: the command line, and what every rank does around its node.

What MPICH (hydra) does when a rank dies: by default it SIGKILLs every other rank at once and prints
its generic "BAD TERMINATION" text, so nobody can say which node died or report what it already
has. Its fault-tolerance switch (``MPIR_CVAR_ENABLE_FT=1``) makes ``MPI_Init`` fail an assertion in
the ``mpich`` wheel used here, so it is not an option. What works: ``-disable-auto-cleanup``, which
:func:`mpirun_command` adds for hydra; the other ranks then keep running, and this module does the
rest:

- **Start-up agreement** (:func:`agree`): every rank checks the topology (transport ``mpi``, the
  rank count, the ``--run`` plug-in on rank 0) and all ranks exchange the outcome with their pid and
  host in one non-blocking allgather. A problem on any rank makes every rank exit 2 at once, and rank
  0 prints it (so a ZeroMQ topology under ``mpirun`` no longer serves forever with no client).
- **Liveness** (:class:`RankWatch`): a thread per rank watches its peers, by pid for ranks on the
  same host and by small heartbeats on a separate tag for remote ones. A rank that dies is named on
  every surviving rank; the client goes on without a dead edge (degraded answers) and stops early
  when the aggregator is gone; servers stop when the client is gone.
- **Ending** (:func:`finish`): a rank that saw a peer die must not call ``MPI_Finalize`` (it waits
  for the dead rank forever); it flushes its output and leaves with ``os._exit``. Otherwise the
  ranks meet in a barrier (with a time-out) and finalise normally.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("devit_mq.mpi")

WATCH_TAG = 0x6D72  # liveness traffic; the transport uses 0x6D71 and only probes for its own tag
HEARTBEAT_S = 0.25
REMOTE_SILENCE_S = 30.0  # generous: a remote rank compiling kernels may hold its GIL for seconds
AGREE_TIMEOUT_S = 120.0
FINISH_TIMEOUT_S = 60.0

# Test-only hook: "NAME@SECONDS" makes that node's rank exit (os._exit(1)) SECONDS after its transport
# opens; "NAME#N" when it receives its N-th message. Read by `devit-mq mpi`; not a user option.
ENV_TEST_EXIT = "DEVIT_MQ_TEST_EXIT"


# -- the command line -----------------------------------------------------------------------------
def _mpirun_base() -> list[str]:
    wrapper = Path(__file__).resolve().parents[2] / "launch" / "mpirun.sh"
    if wrapper.is_file():
        return ["bash", str(wrapper)]
    mpirun = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")
    if mpirun is None:
        raise FileNotFoundError("mpirun not found: install the 'mpich' wheel (pip install mpich)")
    return [mpirun]


@functools.lru_cache(maxsize=4)
def _is_hydra(base: tuple[str, ...]) -> bool:
    try:
        out = subprocess.run([*base, "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    text = (out.stdout + out.stderr).lower()
    return "hydra" in text or "mpich" in text


def mpirun_command(nprocs: int, keep_going: bool = True) -> list[str]:
    """The mpirun of this environment (the mpich wheel puts one next to python), via the launch/
    wrapper when present (it adds Open MPI's root/oversubscribe flags). ``keep_going`` asks MPICH
    not to kill every rank when one dies (``-disable-auto-cleanup``), so the survivors can name the
    dead node and the client can report what it has."""
    base = _mpirun_base()
    extra = ["-disable-auto-cleanup"] if keep_going and _is_hydra(tuple(base)) else []
    return [*base, *extra, "-n", str(nprocs)]


# -- start-up agreement ---------------------------------------------------------------------------
_RECORD = struct.Struct("<iq64s440s")  # status, pid, host, problem (utf-8, truncated)


@dataclass(frozen=True)
class Peer:
    rank: int
    pid: int
    host: str
    problem: str  # "" when the rank is fine


class StartupError(RuntimeError):
    """Some rank cannot start (or never arrived); ``peers`` holds what every rank reported."""

    def __init__(self, message: str, peers: list[Peer] | None = None) -> None:
        super().__init__(message)
        self.peers = peers or []


def _wait(request: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    nap = 1e-4
    while not request.Test():
        if time.monotonic() >= deadline:
            raise StartupError(f"{what} did not complete within {timeout_s:g}s: a rank died or never started")
        time.sleep(nap)
        nap = min(2 * nap, 0.01)


def agree(comm: Any, problem: str | None, timeout_s: float = AGREE_TIMEOUT_S) -> list[Peer]:
    """Every rank's pid, host and start-up problem, or StartupError if any rank has a problem."""
    from mpi4py import MPI

    host = MPI.Get_processor_name()
    mine = _RECORD.pack(1 if problem else 0, os.getpid(), host.encode()[:64],
                        (problem or "").encode()[:440])
    out = bytearray(_RECORD.size * comm.Get_size())
    _wait(comm.Iallgather([mine, MPI.BYTE], [out, MPI.BYTE]), timeout_s, "the start-up exchange between ranks")
    peers = []
    for rank in range(comm.Get_size()):
        status, pid, h, text = _RECORD.unpack_from(out, rank * _RECORD.size)
        peers.append(Peer(rank, pid, h.rstrip(b"\0").decode(errors="replace"),
                          text.rstrip(b"\0").decode(errors="replace") if status else ""))
    bad = [p for p in peers if p.problem]
    if bad:
        distinct = list(dict.fromkeys(p.problem for p in bad))
        if len(distinct) == 1:
            message = distinct[0]
        else:
            message = "\n".join(f"rank {p.rank}: {p.problem}" for p in bad)
        raise StartupError(message, peers)
    return peers


# -- liveness -------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    """Whether local process ``pid`` runs (a zombie does not). Four times a second per peer, so on
    Linux one read of ``/proc/PID/stat`` (psutil built a Process and read it twice: a third of an
    idle rank's CPU went to this); psutil elsewhere."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    except OSError:
        return _pid_alive_psutil(pid)
    return stat[stat.rfind(b")") + 2: stat.rfind(b")") + 3] not in (b"Z", b"X")  # the state after "(comm) "


def _pid_alive_psutil(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True


class RankWatch:
    """Watch the other ranks; ``on_death(rank, reason)`` runs (in the watch thread) once per rank
    that dies. A rank that announced it is done (:meth:`done`) is not reported when it exits."""

    def __init__(self, comm: Any, peers: list[Peer], on_death: Callable[[int, str], None] | None = None,
                 interval_s: float = HEARTBEAT_S, remote_silence_s: float = REMOTE_SILENCE_S) -> None:
        from mpi4py import MPI

        self._MPI = MPI
        self.comm = comm
        self.rank = comm.Get_rank()
        me = peers[self.rank]
        self.local = {p.rank: p.pid for p in peers if p.host == me.host and p.rank != self.rank}
        self.remote = [p.rank for p in peers if p.host != me.host]
        self.others = [p.rank for p in peers if p.rank != self.rank]
        self.on_death = on_death
        self.interval_s = interval_s
        self.remote_silence_s = remote_silence_s
        self.dead: dict[int, str] = {}
        self.left: set[int] = set()
        self._mpi_ok = MPI.Query_thread() == MPI.THREAD_MULTIPLE
        self._started = time.monotonic()
        self._last_seen: dict[int, float] = {}
        self._sends: list[tuple[Any, bytes]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()  # for the dead set, and so that "B" is the last message sent
        self._send_lock = threading.Lock()
        self._quiet = False  # set by done(): no heartbeat after the goodbye
        self._thread = threading.Thread(target=self._run, name="rank-watch", daemon=True)

    def start(self) -> RankWatch:
        self._thread.start()
        return self

    def _send(self, rank: int, payload: bytes) -> None:
        try:
            request = self.comm.Isend([payload, self._MPI.BYTE], dest=rank, tag=WATCH_TAG)
        except self._MPI.Exception:
            return
        self._sends.append((request, payload))  # the buffer must outlive the request

    def _progress(self) -> None:
        still = []
        for request, payload in self._sends:
            try:
                if not request.Test():
                    still.append((request, payload))
            except self._MPI.Exception:
                pass
        self._sends = still

    def _drain(self, now: float) -> None:
        status = self._MPI.Status()
        while self.comm.Iprobe(source=self._MPI.ANY_SOURCE, tag=WATCH_TAG, status=status):
            source = status.Get_source()
            buf = bytearray(max(1, status.Get_count(self._MPI.BYTE)))
            self.comm.Recv([buf, self._MPI.BYTE], source=source, tag=WATCH_TAG)
            self._last_seen[source] = now
            if bytes(buf[:1]) == b"B":
                self.left.add(source)

    def _declare(self, rank: int, reason: str) -> None:
        with self._lock:
            if rank in self.dead or rank in self.left:
                return
            self.dead[rank] = reason
        if self.on_death is not None:
            try:
                self.on_death(rank, reason)
            except Exception:  # a reporting problem must not end the watch
                log.exception("rank watch: on_death failed")

    def _tick(self) -> None:
        now = time.monotonic()
        if self._mpi_ok:
            try:
                with self._send_lock:
                    self._progress()
                    if not self._quiet:
                        for rank in self.remote:
                            if rank not in self.dead and rank not in self.left:
                                self._send(rank, b"H")
                self._drain(now)
            except self._MPI.Exception as exc:
                log.debug("rank watch: %s", exc)
        for rank, pid in self.local.items():
            if rank not in self.dead and rank not in self.left and not _pid_alive(pid):
                self._declare(rank, f"its process (pid {pid}) is gone")
        if self._mpi_ok:
            for rank in self.remote:
                seen = self._last_seen.get(rank, self._started)
                if rank not in self.left and now - seen > self.remote_silence_s:
                    self._declare(rank, f"no heartbeat for {self.remote_silence_s:g}s")

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._tick()

    def done(self) -> None:
        """Tell every peer this rank has finished its work (its exit is not a death). The goodbye is
        the last message this rank sends on the watch tag."""
        if not self._mpi_ok:
            return
        with self._send_lock:
            self._quiet = True
            for rank in self.others:
                if rank not in self.dead:
                    self._send(rank, b"B")

    def stop(self, drain_s: float = 0.0) -> None:
        """Stop watching. With ``drain_s``, first receive every peer's goodbye (for up to that
        long): MPI_Finalize fails on a communicator with unreceived messages."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2.0)
        deadline = time.monotonic() + max(drain_s, 1.0)
        while self._mpi_ok and time.monotonic() < deadline:
            try:
                self._progress()
                if drain_s > 0:
                    self._drain(time.monotonic())
            except self._MPI.Exception:
                break
            pending = drain_s > 0 and any(r not in self.left and r not in self.dead for r in self.others)
            if not self._sends and not pending:
                break
            time.sleep(0.002)


def _drain_tag(comm: Any, tag: int, quiet_s: float = 0.1, limit_s: float = 1.0) -> int:
    """Receive and drop what is still queued for this rank on ``tag`` (e.g. a last heartbeat sent to
    a node that had already stopped) until ``quiet_s`` passes without any: MPI_Finalize fails on a
    communicator that holds unreceived messages."""
    from mpi4py import MPI

    status = MPI.Status()
    dropped, start = 0, time.monotonic()
    last = start
    while time.monotonic() - last < quiet_s and time.monotonic() - start < limit_s:
        if comm.Iprobe(source=MPI.ANY_SOURCE, tag=tag, status=status):
            buf = bytearray(status.Get_count(MPI.BYTE))
            comm.Recv([buf, MPI.BYTE], source=status.Get_source(), tag=tag)
            dropped += 1
            last = time.monotonic()
        else:
            time.sleep(0.002)
    return dropped


def _leave(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def finish(comm: Any, watch: RankWatch | None, code: int, timeout_s: float = FINISH_TIMEOUT_S,
           transport_tag: int | None = None) -> int:
    """End this rank: finalise when every rank is alive and arrives in a final barrier, else flush
    and leave without ``MPI_Finalize`` (which would wait for a dead rank forever). Before
    finalising, leftover messages are received (``transport_tag``: the transport's tag)."""
    from mpi4py import MPI

    sys.stdout.flush()
    sys.stderr.flush()
    if watch is None:
        _leave(code)
    watch.done()
    if watch.dead:
        watch.stop()
        _leave(code)
    request = comm.Ibarrier()
    deadline = time.monotonic() + timeout_s
    while not request.Test():
        if watch.dead or time.monotonic() >= deadline:
            watch.stop()
            _leave(code)
        time.sleep(0.01)
    watch.stop(drain_s=5.0)
    try:
        if transport_tag is not None:
            _drain_tag(comm, transport_tag)
        MPI.Finalize()
    except MPI.Exception as exc:  # never hang the job over a failed finalisation
        print(f"devit-mq mpi: rank {comm.Get_rank()}: MPI_Finalize failed: {exc}".splitlines()[0],
              file=sys.stderr)
        _leave(code or 1)
    return code


# -- the test-only exit hook ----------------------------------------------------------------------
class _ExitAfterMessages:
    """A transport proxy that ends the process when its N-th message arrives (a crash mid-run)."""

    def __init__(self, inner: Any, count: int) -> None:
        self._inner = inner
        self._left = count

    def recv(self, timeout: float | None = None):
        frames = self._inner.recv(timeout)
        if frames is not None:
            self._left -= 1
            if self._left <= 0:
                print(f"test hook: {ENV_TEST_EXIT} ends this rank now", file=sys.stderr, flush=True)
                os._exit(1)
        return frames

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def apply_exit_hook(node: str, transport: Any) -> Any:
    """Apply ``DEVIT_MQ_TEST_EXIT`` to node ``node``: returns the transport to use."""
    spec = os.environ.get(ENV_TEST_EXIT, "")
    for sep in ("@", "#"):
        name, found, value = spec.partition(sep)
        if found and name == node:
            if sep == "#":
                return _ExitAfterMessages(transport, int(value))
            timer = threading.Timer(float(value), lambda: (print(f"test hook: {ENV_TEST_EXIT} ends this rank now",
                                                                  file=sys.stderr, flush=True), os._exit(1)))
            timer.daemon = True
            timer.start()
    return transport
