"""The floor of one DeViT request: a bare fan-out/fan-in with the topology's hops and message sizes.

One request is what a batch-1 client costs the transport and nothing else: the client sends
``[header, image]`` to each of N edges, every edge at once sends ``[header, feature]`` to the
aggregator, and the aggregator, once it holds all N parts of a request id, answers the client with
``[header, 10 x fp32]``. No model, no validation, no wire codec, no devit_mq transport: raw pyzmq
(client PUSH -> edge PULL, edge DEALER -> aggregator ROUTER, aggregator ROUTER -> client DEALER, as
the real ZeroMQ transport wires them) or raw mpi4py ``Isend``/``Send``/``Recv`` of bytearrays
(rank 0 client, 1 aggregator, 2.. edges). ``devit-mq bench`` divides the framework's batch-1 latency
by this floor, per transport, to report its overhead.

With ``edge_work_ms`` > 0 every raw edge also keeps its core busy with BLAS for that long per
request before it answers (a working set of several MB, like a sub-model's weights): the *busy
floor*. An edge process that has just computed for tens of milliseconds, and a client and aggregator
that slept meanwhile, run their next few hundred microseconds of Python on cold caches (measured
here: a 26 us encode+decode takes 300-430 us right after a 40 ms forward or a 40 ms sleep), so the
idle floor understates what any process pipeline around real compute costs on the same machine. The
busy floor's overhead is its latency minus ``edge_work_ms`` (each edge overshoots by at most one small
GEMM, ~10 us).

Requests are sequential (one in flight); the client times each one end to end with ``perf_counter``
after a warm-up and reports p50/p99/mean over all of them and the p50 of each of ``rounds``
consecutive slices (their spread says how noisy the machine was).

``python -m devit_mq.bench.floor`` is the command line (``devit-mq bench floor``); with ``--role`` it
is what runs inside the child processes and MPI ranks. This module imports neither torch nor the
node code, so that its children start fast and measure only the transport.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

from devit_mq.transport.mpi import reduce_timer_slack  # one copy of the timer-slack tweak

HEADER_BYTES = 60  # about what the real wire header of a one-image message weighs
RESULT_BYTES = 10 * 4  # ten fp32 logits
RID_BYTES = 8  # the request id at the start of every header
# Below this size copying a frame is cheaper than ZeroMQ's zero-copy bookkeeping (the real
# transport uses the same threshold).
ZERO_COPY_BYTES = 64 * 1024
REPLY_TIMEOUT_S = 10.0  # one loopback reply slower than this means a peer is gone, not slow
CHILD_EXIT_TIMEOUT_S = 10.0
STOP = b"S"  # one-frame message (zmq) that ends a child
HELLO_EDGE, HELLO_CLIENT, READY = b"E", b"C", b"R"
DATA_TAG, STOP_TAG = 0x464C, 0x4653  # MPI tags
# The busy edges' BLAS working set: 8 weight matrices of a 192-d ViT block's MLP shape (4.7 MB of
# fp32, past the caches like a sub-model's weights) and a 16-row activation (one GEMM is ~0.1 ms).
WORK_DIM, WORK_HIDDEN, WORK_MATRICES, WORK_ROWS = 192, 768, 8, 16


class FloorError(RuntimeError):
    """A floor run failed (a child died, or an answer did not come in time); says which."""


# -- arguments and statistics ---------------------------------------------------------------------
def _check_args(image_bytes: int, feature_bytes: Sequence[int], requests: int, warmup: int, rounds: int,
                timeout_s: float, edge_work_ms: float = 0.0) -> list[int]:
    """The feature sizes as a list, or ValueError naming the bad argument (before any process starts)."""
    sizes = list(feature_bytes)
    if not sizes:
        raise ValueError("feature_bytes must list one size per edge; got an empty list")
    for name, value in [("image_bytes", image_bytes), *((f"feature_bytes[{i}]", s) for i, s in enumerate(sizes))]:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    for name, value, low in (("requests", requests, 1), ("warmup", warmup, 0), ("rounds", rounds, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if rounds > requests:
        raise ValueError(f"rounds ({rounds}) must not exceed requests ({requests})")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    if not 0 <= edge_work_ms <= 10_000:  # also refuses NaN
        raise ValueError(f"edge_work_ms must be in [0, 10000], got {edge_work_ms!r}")
    return sizes


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), without importing numpy."""
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(transport: str, latencies_us: Sequence[float], rounds: int, image_bytes: int,
              feature_bytes: Sequence[int], edge_work_ms: float = 0.0) -> dict[str, Any]:
    """The result dict of a run: percentiles over all requests and the p50 of each round, of the
    latency minus the edges' work (so with ``edge_work_ms`` it is the busy floor's overhead)."""
    work_us = edge_work_ms * 1e3
    over = [x - work_us for x in latencies_us]
    ordered = sorted(over)
    n = len(over)
    bounds = [n * i // rounds for i in range(rounds + 1)]
    return {"transport": transport, "p50_us": _percentile(ordered, 50), "p99_us": _percentile(ordered, 99),
            "mean_us": statistics.fmean(over), "n": n,
            "rounds_p50_us": [statistics.median(over[a:b]) for a, b in pairwise(bounds)],
            "image_bytes": image_bytes, "feature_bytes": list(feature_bytes), "edge_work_ms": edge_work_ms}


def busy_work(work_ms: float):
    """A function that keeps this core busy with BLAS for ``work_ms`` per call (None for 0): what a
    raw edge of the busy floor does instead of a forward. numpy is imported (single-threaded) only
    here, so that the idle floor's children stay as bare as before."""
    if work_ms <= 0:
        return None
    import os

    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    import numpy as np

    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((WORK_DIM, WORK_HIDDEN), np.float32) for _ in range(WORK_MATRICES)]
    x = rng.standard_normal((WORK_ROWS, WORK_DIM), np.float32)
    work_s = work_ms / 1e3

    def work() -> None:
        end, i = time.perf_counter() + work_s, 0
        while time.perf_counter() < end:
            x @ weights[i % WORK_MATRICES]
            i += 1

    work()  # the first GEMM pays BLAS's set-up
    return work


def _header(rid: int) -> bytes:
    return rid.to_bytes(RID_BYTES, "little") + bytes(HEADER_BYTES - RID_BYTES)


# -- child processes ------------------------------------------------------------------------------
class _Children:
    """Child processes that are always stopped: leaving the ``with`` block kills whatever still runs
    (with its descendants: an ``mpirun``'s ranks) and reaps it, with bounded waits only."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.stderr: dict[int, str] = {}

    def __enter__(self) -> _Children:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def spawn(self, args: Sequence[str]) -> subprocess.Popen[str]:
        proc = subprocess.Popen(list(args), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        return proc

    def check_alive(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                raise FloorError(f"a child exited early (code {proc.returncode}): {self._cmd(proc)}"
                                 f"{self.report()}")

    def wait(self, deadline: float) -> None:
        """Wait for every child to end by itself (after its stop message); FloorError if one fails."""
        for proc in self.procs:
            try:
                self.collect(proc, max(0.1, min(deadline - time.monotonic(), CHILD_EXIT_TIMEOUT_S)))
            except subprocess.TimeoutExpired:
                raise FloorError(f"a child did not stop: {self._cmd(proc)}") from None
            if proc.returncode:
                raise FloorError(f"a child failed (code {proc.returncode}): {self._cmd(proc)}{self.report()}")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                _kill_tree(proc.pid, 5.0)
            with contextlib.suppress(subprocess.TimeoutExpired):  # (not even SIGKILL ends it: give up)
                self.collect(proc, 5.0)

    def report(self) -> str:
        """The stderr tails of the children that have ended."""
        for proc in self.procs:
            if proc.poll() is not None:
                # an ended mpirun's pipe stays open while a rank lives: read what is there, briefly
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.collect(proc, 2.0)
        return "".join(f"\n--- stderr of {self._cmd(p)}:\n{self.stderr[p.pid][-2000:]}"
                       for p in self.procs if self.stderr.get(p.pid, "").strip())

    def collect(self, proc: subprocess.Popen[str], timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for ``proc`` to end, reading its stderr meanwhile (a full pipe
        would block it); TimeoutExpired may be retried without losing output."""
        if proc.pid not in self.stderr:
            self.stderr[proc.pid] = proc.communicate(timeout=timeout_s)[1] or ""

    @staticmethod
    def _cmd(proc: subprocess.Popen[str]) -> str:
        args = [str(a) for a in proc.args] if isinstance(proc.args, list) else [str(proc.args)]
        return " ".join(args[args.index("--role"):] if "--role" in args else args)


def _kill_tree(pid: int, timeout_s: float) -> None:
    """SIGKILL ``pid`` and all its descendants, then wait (bounded) until none is alive.

    Not a process-group kill: MPICH's mpirun puts every proxy and rank in a session of its own, and
    its ranks outlive a killed mpirun for a while. The tree is frozen (SIGSTOP) and listed again until
    the listing is stable, so no process forks unseen, and is listed before anything dies (the
    children of a dead process are re-parented and no longer found)."""
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    tree = {pid: root}
    for _ in range(10):
        for proc in tree.values():
            with contextlib.suppress(psutil.Error):
                proc.suspend()
        with contextlib.suppress(psutil.Error):
            found = {p.pid: p for p in root.children(recursive=True)}
            if found.keys() <= tree.keys():
                break
            tree.update(found)
    for proc in tree.values():
        with contextlib.suppress(psutil.Error):
            proc.kill()
    deadline = time.monotonic() + timeout_s
    while any(_alive(p) for p in tree.values()) and time.monotonic() < deadline:
        time.sleep(0.01)


def _alive(proc: Any) -> bool:
    """Not yet dead; a zombie counts as dead (whoever inherited it reaps it)."""
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _role_command(role: str, *args: object) -> list[str]:
    return [sys.executable, "-m", "devit_mq.bench.floor", "--role", role, *(str(a) for a in args)]


# -- ZeroMQ ---------------------------------------------------------------------------------------
def zmq_floor(image_bytes: int, feature_bytes: list[int], requests: int, warmup: int = 50, rounds: int = 5,
              timeout_s: float = 120, edge_work_ms: float = 0.0) -> dict[str, Any]:
    """The floor over raw pyzmq on TCP loopback: one process per edge and one aggregator process;
    this process is the client. Every child is stopped before this returns or raises."""
    sizes = _check_args(image_bytes, feature_bytes, requests, warmup, rounds, timeout_s, edge_work_ms)
    from .transport_rates import _free_ports  # (that module imports the wire codecs: only here)

    deadline = time.monotonic() + timeout_s
    agg_port, *edge_ports = _free_ports(len(sizes) + 1)
    with _Children() as children:
        sizes_arg = ",".join(map(str, sizes))
        children.spawn(_role_command("zmq-aggregator", "--port", agg_port, "--feature-bytes", sizes_arg,
                                     "--timeout", timeout_s))
        for port, size in zip(edge_ports, sizes, strict=True):
            children.spawn(_role_command("zmq-edge", "--port", port, "--agg-port", agg_port, "--feature-bytes",
                                         size, "--image-bytes", image_bytes, "--timeout", timeout_s,
                                         "--edge-work-ms", edge_work_ms))
        latencies_us = _zmq_client(agg_port, edge_ports, image_bytes, warmup + requests, deadline, children)
    return summarize("zmq", latencies_us[warmup:], rounds, image_bytes, sizes, edge_work_ms)


def _zmq_client(agg_port: int, edge_ports: Sequence[int], image_bytes: int, total: int, deadline: float,
                children: _Children) -> list[float]:
    import zmq

    ctx = zmq.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(f"tcp://127.0.0.1:{agg_port}")
        _zmq_await_ready(dealer, deadline, children)
        # connected only now, when every edge has bound its port: no connect retry delays the warm-up
        pushes = [ctx.socket(zmq.PUSH) for _ in edge_ports]
        for sock, port in zip(pushes, edge_ports, strict=True):
            sock.connect(f"tcp://127.0.0.1:{port}")
        latencies_us = _zmq_requests(dealer, pushes, image_bytes, total, deadline, children)
        for sock in pushes:
            sock.send(STOP)
        children.wait(deadline)  # they exit once the stops are through, so linger 0 below loses nothing
        return latencies_us
    finally:
        ctx.destroy(linger=0)


def _zmq_await_ready(dealer: Any, deadline: float, children: _Children) -> None:
    """Say hello to the aggregator and wait for its READY (it has heard from every edge), watching
    that no child died meanwhile."""
    dealer.send(HELLO_CLIENT)
    while time.monotonic() < deadline:
        if dealer.poll(100):
            if dealer.recv() != READY:
                raise FloorError("zmq floor: the aggregator answered the hello with something else")
            return
        children.check_alive()
    raise FloorError(f"zmq floor: the aggregator and edges were not ready in time{children.report()}")


def _zmq_requests(dealer: Any, pushes: Sequence[Any], image_bytes: int, total: int, deadline: float,
                  children: _Children) -> list[float]:
    import zmq

    image, copy = bytes(image_bytes), image_bytes < ZERO_COPY_BYTES
    dealer.rcvtimeo = int(min(REPLY_TIMEOUT_S, max(deadline - time.monotonic(), 0.001)) * 1000)
    latencies_us = []
    for rid in range(total):
        header = _header(rid)
        start = time.perf_counter()
        for sock in pushes:
            sock.send_multipart((header, image), copy=copy)
        try:
            reply = dealer.recv_multipart()
        except zmq.Again:
            raise FloorError(f"zmq floor: no answer to request {rid}{children.report()}") from None
        latencies_us.append((time.perf_counter() - start) * 1e6)
        if reply[0] != header:
            raise FloorError(f"zmq floor: the answer to request {rid} carries another request's header")
        if time.monotonic() > deadline:
            raise FloorError(f"zmq floor: {rid + 1} of {total} requests done when the time-out came")
    return latencies_us


def _zmq_edge(port: int, agg_port: int, feature_bytes: int, image_bytes: int, timeout_s: float,
              edge_work_ms: float = 0.0) -> None:
    """Forward every image's header with a feature payload to the aggregator (after ``edge_work_ms``
    of BLAS), until STOP."""
    work = busy_work(edge_work_ms)
    import zmq

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.rcvtimeo = int(timeout_s * 1000)  # an orphaned edge (its client was killed) ends by itself
    pull.bind(f"tcp://127.0.0.1:{port}")
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{agg_port}")
    dealer.send(HELLO_EDGE)  # after the bind: the aggregator's READY means this edge can take images
    feature, copy = bytes(feature_bytes), image_bytes < ZERO_COPY_BYTES
    while True:
        frames = pull.recv_multipart(copy=copy)
        if len(frames) == 1:
            dealer.send(STOP)
            break
        if work is not None:
            work()
        dealer.send_multipart((frames[0], feature))
    ctx.destroy(linger=int(CHILD_EXIT_TIMEOUT_S * 1000))  # the STOP must reach the aggregator


def _zmq_aggregator(port: int, n_edges: int, timeout_s: float) -> None:
    """Count the parts of each request id; when all N are in, answer the client; end after N STOPs."""
    import zmq

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a vanished client is an error, not a silent drop
    router.rcvtimeo = int(timeout_s * 1000)
    router.bind(f"tcp://127.0.0.1:{port}")
    client = _zmq_gather_hellos(router, n_edges)
    router.send_multipart((client, READY))
    parts: dict[bytes, int] = {}
    result, stopped = bytes(RESULT_BYTES), 0
    while stopped < n_edges:
        msg = router.recv_multipart()  # features are a few hundred bytes: copying is cheapest
        if len(msg) == 2:
            stopped += msg[1] == STOP
            continue
        count = parts.pop(msg[1], 0) + 1
        if count == n_edges:
            router.send_multipart((client, msg[1], result))
        else:
            parts[msg[1]] = count
    ctx.destroy(linger=0)


def _zmq_gather_hellos(router: Any, n_edges: int) -> bytes:
    """The client's routing id, once the client and every edge have said hello."""
    client, edges = None, set()
    while client is None or len(edges) < n_edges:
        routing_id, kind = router.recv_multipart()
        if kind == HELLO_CLIENT:
            client = routing_id
        elif kind == HELLO_EDGE:
            edges.add(routing_id)
    return client


# -- MPI ------------------------------------------------------------------------------------------
def mpi_floor(image_bytes: int, feature_bytes: list[int], requests: int, warmup: int = 50, rounds: int = 5,
              timeout_s: float = 120, edge_work_ms: float = 0.0) -> dict[str, Any]:
    """The floor over raw mpi4py under ``mpirun -n N+2`` (rank 0 client, 1 aggregator, 2.. edges);
    mpirun and its ranks are killed if they run past ``timeout_s``."""
    sizes = _check_args(image_bytes, feature_bytes, requests, warmup, rounds, timeout_s, edge_work_ms)
    with tempfile.TemporaryDirectory(prefix="devit-floor-") as tmp, _Children() as children:
        out = Path(tmp) / "floor.json"
        # the ranks' own time-out is a backstop for when this process is gone: later than ours, so that
        # a slow run is reported as one rather than as a failed mpirun
        rank_timeout_s = timeout_s + CHILD_EXIT_TIMEOUT_S
        cmd = [_mpirun(), "-n", str(len(sizes) + 2)] + _role_command(
            "mpi", "--image-bytes", image_bytes, "--feature-bytes", ",".join(map(str, sizes)), "--requests",
            requests, "--warmup", warmup, "--rounds", rounds, "--timeout", rank_timeout_s, "--json", out,
            "--edge-work-ms", edge_work_ms)
        proc = children.spawn(cmd)
        try:
            children.collect(proc, timeout_s)
        except subprocess.TimeoutExpired:
            raise FloorError(f"mpi floor: mpirun did not finish within {timeout_s:g}s (killed)") from None
        if proc.returncode or not out.is_file():
            raise FloorError(f"mpi floor: mpirun failed (code {proc.returncode}){children.report()}")
        return json.loads(out.read_text())


def _mpirun() -> str:
    # the mpich wheel installs mpirun next to the environment's python
    found = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")
    if found is None:
        raise FloorError("mpirun not found: install the 'mpich' wheel (pip install mpich)")
    return found


def _mpi_wait(comm: Any, source: int, tag: int, status: Any, deadline: float) -> None:
    """Return once a message from ``source`` with ``tag`` can be received.

    ``Iprobe``, then a 5 us nap, with the timer slack cut to 1 us (:func:`devit_mq.transport.mpi.reduce_timer_slack`). The
    ranks (N+2) outnumber the cores of a small machine, and a rank that spins (or blocks in ``Recv``,
    which spins inside MPICH) holds a core that the rank with work needs. Measured here (2 shared
    cores, 4 ranks, 849/142 B, load ~6), p50 per request: pure spin ~20 ms, ``os.sched_yield`` 2.6-7
    ms, ``sleep(0)`` with the default 50 us slack ~360 us, 20 us naps 210-260 us, 5 us naps 140-220
    us; naps of 1-2 us often do not deschedule and then behave like a spin. So 5 us is the floor's
    choice; on a machine with a core per rank a pure spin would beat it."""
    probe, nap_s = comm.Iprobe, 5e-6
    while not probe(source=source, tag=tag, status=status):
        if time.monotonic() > deadline:
            raise FloorError(f"mpi floor: rank {comm.Get_rank()} waited past the time-out")
        time.sleep(nap_s)




def _mpi_role(args: argparse.Namespace) -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    deadline = time.monotonic() + args.timeout
    reduce_timer_slack()
    try:
        if comm.Get_size() != len(args.feature_bytes) + 2:
            raise FloorError(f"mpi floor: {len(args.feature_bytes)} edges need {len(args.feature_bytes) + 2} "
                             f"ranks, this job has {comm.Get_size()}")
        rank = comm.Get_rank()
        if rank == 0:
            _mpi_client(comm, args, deadline)
        elif rank == 1:
            _mpi_aggregator(comm, len(args.feature_bytes), max(args.feature_bytes), deadline)
        else:
            _mpi_edge(comm, args.image_bytes, args.feature_bytes[rank - 2], deadline, busy_work(args.edge_work_ms))
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        comm.Abort(1)  # the other ranks would wait for this one until their own time-out


def _mpi_client(comm: Any, args: argparse.Namespace, deadline: float) -> None:
    from mpi4py import MPI

    edges = range(2, comm.Get_size())
    image = bytearray(HEADER_BYTES + args.image_bytes)
    reply, status = bytearray(HEADER_BYTES + RESULT_BYTES), MPI.Status()
    latencies_us = []
    for rid in range(args.warmup + args.requests):
        image[:RID_BYTES] = rid.to_bytes(RID_BYTES, "little")
        start = time.perf_counter()
        # Isend to all, not Send in turn: a large image (rendezvous protocol) would otherwise reach
        # the edges one after the other
        sends = [comm.Isend([image, MPI.BYTE], dest=edge, tag=DATA_TAG) for edge in edges]
        _mpi_wait(comm, 1, DATA_TAG, status, deadline)
        comm.Recv([reply, MPI.BYTE], source=1, tag=DATA_TAG)
        latencies_us.append((time.perf_counter() - start) * 1e6)
        MPI.Request.Waitall(sends)  # already done: the answer proves every edge has its image
        if reply[:RID_BYTES] != image[:RID_BYTES]:
            raise FloorError(f"mpi floor: the answer to request {rid} carries another request id")
    for edge in edges:
        comm.Send([bytearray(0), MPI.BYTE], dest=edge, tag=STOP_TAG)
    result = summarize("mpi", latencies_us[args.warmup:], args.rounds, args.image_bytes, args.feature_bytes,
                       args.edge_work_ms)
    Path(args.json).write_text(json.dumps(result))


def _mpi_edge(comm: Any, image_bytes: int, feature_bytes: int, deadline: float, work=None) -> None:
    from mpi4py import MPI

    image, feature = bytearray(HEADER_BYTES + image_bytes), bytearray(HEADER_BYTES + feature_bytes)
    status = MPI.Status()
    while True:
        _mpi_wait(comm, 0, MPI.ANY_TAG, status, deadline)
        if status.Get_tag() == STOP_TAG:
            comm.Recv([bytearray(0), MPI.BYTE], source=0, tag=STOP_TAG)
            comm.Send([bytearray(0), MPI.BYTE], dest=1, tag=STOP_TAG)
            return
        comm.Recv([image, MPI.BYTE], source=0, tag=DATA_TAG)
        if work is not None:
            work()
        feature[:HEADER_BYTES] = image[:HEADER_BYTES]
        comm.Send([feature, MPI.BYTE], dest=1, tag=DATA_TAG)


def _mpi_aggregator(comm: Any, n_edges: int, max_feature_bytes: int, deadline: float) -> None:
    from mpi4py import MPI

    part, result = bytearray(HEADER_BYTES + max_feature_bytes), bytearray(HEADER_BYTES + RESULT_BYTES)
    status, parts, stopped = MPI.Status(), {}, 0
    while stopped < n_edges:
        _mpi_wait(comm, MPI.ANY_SOURCE, MPI.ANY_TAG, status, deadline)
        source, tag = status.Get_source(), status.Get_tag()
        comm.Recv([part, MPI.BYTE], source=source, tag=tag)
        if tag == STOP_TAG:
            stopped += 1
            continue
        rid = bytes(part[:RID_BYTES])
        count = parts.pop(rid, 0) + 1
        if count == n_edges:
            result[:HEADER_BYTES] = part[:HEADER_BYTES]
            comm.Send([result, MPI.BYTE], dest=0, tag=DATA_TAG)
        else:
            parts[rid] = count


# -- command line ---------------------------------------------------------------------------------
def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of byte counts: {text!r}") from None
    if not sizes or min(sizes) < 0:
        raise argparse.ArgumentTypeError(f"need one byte count >= 0 per edge, got {text!r}")
    return sizes


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="devit-mq bench floor", description=__doc__.split("\n\n")[0])
    p.add_argument("--transport", choices=("zmq", "mpi", "both"), default="both")
    p.add_argument("--image-bytes", type=int, default=849, help="image payload per edge (default 849)")
    p.add_argument("--feature-bytes", type=_sizes, default=[142, 142],
                   help="feature payload of each edge, comma-separated; N = their count (default 142,142)")
    p.add_argument("--requests", type=int, default=500, help="timed requests (default 500)")
    p.add_argument("--warmup", type=int, default=50, help="untimed requests first (default 50)")
    p.add_argument("--rounds", type=int, default=5, help="slices the timed requests are reported in")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per transport before giving up")
    p.add_argument("--edge-work-ms", type=float, default=0.0,
                   help="each edge keeps its core busy with BLAS this long per request (the busy floor; "
                        "latencies are reported minus this)")
    p.add_argument("--json", metavar="FILE", help="also write the results to FILE")
    # what the children are told: not for users
    p.add_argument("--role", choices=("zmq-edge", "zmq-aggregator", "mpi"), help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--agg-port", type=int, help=argparse.SUPPRESS)
    return p


def _table(results: Sequence[dict[str, Any]]) -> str:
    lines = [f"{'transport':<10} {'p50 us':>9} {'p99 us':>9} {'mean us':>9} {'n':>6}  rounds p50 us"]
    for r in results:
        spread = " ".join(f"{x:.1f}" for x in r["rounds_p50_us"])
        lines.append(f"{r['transport']:<10} {r['p50_us']:>9.1f} {r['p99_us']:>9.1f} {r['mean_us']:>9.1f} "
                     f"{r['n']:>6}  {spread}")
    return "\n".join(lines)


def _run_role(args: argparse.Namespace) -> None:
    if args.role == "zmq-edge":
        _zmq_edge(args.port, args.agg_port, args.feature_bytes[0], args.image_bytes, args.timeout, args.edge_work_ms)
    elif args.role == "zmq-aggregator":
        _zmq_aggregator(args.port, len(args.feature_bytes), args.timeout)
    else:
        _mpi_role(args)


def main(argv: Sequence[str] | None = None) -> int:
    """``devit-mq bench floor``: run the floor per transport and print a table (and JSON if asked)."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.role:
        _run_role(args)
        return 0
    runs = {"zmq": zmq_floor, "mpi": mpi_floor}
    chosen = ("zmq", "mpi") if args.transport == "both" else (args.transport,)
    try:
        results = [runs[t](args.image_bytes, args.feature_bytes, args.requests, args.warmup, args.rounds,
                           args.timeout, args.edge_work_ms) for t in chosen]
    except (ValueError, FloorError) as exc:
        print(f"devit-mq bench floor: {exc}", file=sys.stderr)
        return 1
    print(f"floor of one request: image {args.image_bytes} B to each of {len(args.feature_bytes)} edges, "
          f"features {','.join(map(str, args.feature_bytes))} B, header {HEADER_BYTES} B, "
          f"answer {RESULT_BYTES} B")
    print(_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({r["transport"]: r for r in results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
