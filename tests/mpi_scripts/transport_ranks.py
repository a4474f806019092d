"""Run under mpirun by tests/test_transport_mpi.py: ranks exchange frames through the MPI transport.

    mpirun -n 3 python tests/mpi_scripts/transport_ranks.py MODE TOPOLOGY.yaml

Modes:
  exchange  client -> edge0 -> aggregator -> client with frames of many sizes; a malformed message is
            dropped; the aggregator then idles in recv and prints its CPU use ("IDLE_CPU ...").
  timeout   a send to a rank that does not receive fails with TransportError after send_timeout.
  mismatch  the topology has another number of nodes than the world: TransportError naming both.
Each rank prints "OK <name>" when all its checks passed; any failure exits non-zero.
"""

import hashlib
import os
import sys
import time

from mpi4py import MPI

from devit_mq.topology import load_topology
from devit_mq.transport import Peer, TransportError, open_transport
from devit_mq.transport.mpi import TAG

COMM = MPI.COMM_WORLD
MESSAGES = [[b"x"], [b"", b"empty first"], [b"header", bytes(range(256)) * 4096], [b"a", b"b", b"c", b"d"],
            [bytes(3 * 1024 * 1024)]]


def say(line):
    """One write per line: mpirun merges the ranks' output and must not split a line."""
    os.write(1, (line + "\n").encode())


def digest(frames):
    return hashlib.sha256(b"".join(len(f).to_bytes(8, "little") + f for f in frames)).digest()


def expect(cond, what):
    if not cond:
        say(f"FAIL rank {COMM.Get_rank()}: {what}")
        COMM.Abort(1)


def exchange(topology):
    name = {r: n for n, r in topology.mpi_ranks().items()}[COMM.Get_rank()]
    t = open_transport(topology, name, send_timeout=10)
    if name == "client":
        try:
            t.send("nobody", [b"x"])
            expect(False, "send to an unknown peer did not raise")
        except TransportError as exc:
            expect("not a node of topology" in str(exc), str(exc))
        for frames in MESSAGES:
            t.send("edge0", frames)
        for frames in MESSAGES:
            answer = t.recv(timeout=30)
            expect(answer is not None and answer.frames == [b"digest", digest(frames)], f"answer {answer!r:.80}")
            expect(answer.peer.key == "aggregator", f"peer {answer.peer}")  # the rank names its sender
    elif name == "edge0":
        COMM.Send([b"garbage that is not framed", MPI.BYTE], dest=COMM.Get_rank(), tag=TAG)  # to itself
        for frames in MESSAGES:
            got = t.recv(timeout=30)
            expect(got is not None and got.frames == frames, f"edge got {got!r:.80}")
            t.send("aggregator", got.frames)
        # the garbage may still be queued: MPI does not order messages from different sources
        expect(t.recv(timeout=1.0) is None, "unexpected extra message")
        expect(t.dropped == 1, f"dropped {t.dropped}")
    else:
        for _ in MESSAGES:
            got = t.recv(timeout=30)
            expect(got is not None, "aggregator timed out")
            t.reply(Peer(route="client"), [b"digest", digest(got.frames)])  # by name: MPI routes names
        expect(t.flush(timeout=30), "aggregator could not flush")
        for label, idle_after in (("default", t.idle_after), ("fixed-200us", float("inf"))):
            t.idle_after = idle_after  # "fixed-200us": never back off to the idle interval
            wall0, cpu0 = time.monotonic(), time.process_time()
            nothing = t.recv(timeout=1.5)
            wall, cpu = time.monotonic() - wall0, time.process_time() - cpu0
            expect(nothing is None, "idle recv got a message")
            say(f"IDLE_CPU {label} {name} {cpu:.3f} s over {wall:.2f} s")
        # the node's idle hint: naps of deep_poll_interval, no spin. Count the probes (each one is a
        # wake-up): at most one per deep nap (a loaded machine only makes fewer), while the default
        # mode, even backed off to 1 ms naps, makes several times as many.
        probes = {"n": 0}
        comm, real = t.comm, t.comm.Iprobe

        class Counting:
            def Iprobe(self, *a, **k):
                probes["n"] += 1
                return real(*a, **k)

            def __getattr__(self, attr):
                return getattr(comm, attr)

        t.comm = Counting()
        for label, idle in (("busy", False), ("idle", True)):
            t.set_idle(idle)
            probes["n"] = 0
            wall0 = time.monotonic()
            expect(t.recv(timeout=0.5) is None, "idle recv got a message")
            say(f"PROBES {label} {probes['n']} over {time.monotonic() - wall0:.2f} s")
        # idle for longer than long_idle_after (shortened here): the longest naps
        t.set_idle(False)
        t.long_idle_after = 0.2
        t.set_idle(True)
        time.sleep(0.25)
        probes["n"] = 0
        wall0 = time.monotonic()
        expect(t.recv(timeout=0.5) is None, "idle recv got a message")
        say(f"PROBES long-idle {probes['n']} over {time.monotonic() - wall0:.2f} s")
        t.set_idle(False)
        t.comm = comm
    expect(t.flush(timeout=30), f"{name} could not flush")
    COMM.Barrier()
    t.close()
    say(f"OK {name}")


def timeout(topology):
    name = {r: n for n, r in topology.mpi_ranks().items()}[COMM.Get_rank()]
    t = open_transport(topology, name, send_timeout=0.3)
    big = [bytes(4 * 1024 * 1024)]  # above the eager limit: completes only when received
    if name == "client":
        t.send("edge0", big)  # accepted: pending
        t0 = time.monotonic()
        try:
            for _ in range(100):
                t.send("edge0", big)
            expect(False, "send never timed out")
        except TransportError as exc:
            expect("edge0" in str(exc), str(exc))
            say(f"TIMEOUT after {time.monotonic() - t0:.2f} s: {exc}")
        COMM.Barrier()  # now edge0 drains, so MPI can finish cleanly
        expect(t.flush(timeout=30), "client could not flush")
    else:
        COMM.Barrier()
        if name == "edge0":
            while t.recv(timeout=1.0) is not None:
                pass
    COMM.Barrier()
    t.close()
    say(f"OK {name}")


def mismatch(topology):
    try:
        open_transport(topology, "client")
    except TransportError as exc:
        say(f"MISMATCH {exc}")
        say(f"OK rank {COMM.Get_rank()}")
        return
    expect(False, "opened a transport with the wrong world size")


if __name__ == "__main__":
    mode, path = sys.argv[1], sys.argv[2]
    {"exchange": exchange, "timeout": timeout, "mismatch": mismatch}[mode](load_topology(path, check_bundle=False))
