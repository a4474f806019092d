"""Transport efficiency: messages/s through our path vs the raw library, for the same bytes.

Our path is what a node does per message: ``wire.encode`` + ``Transport.send`` on one side,
``Transport.recv`` + ``wire.decode`` on the other, over the real links of a topology (features:
edge DEALER -> aggregator ROUTER; images: client PUSH -> edge PULL; MPI: buffer-framed ``Isend`` and
``Iprobe``/``Recv``). The baseline sends the already-encoded bytes with nothing around them: pyzmq
PUSH/PULL ``send_multipart``/``recv_multipart`` over TCP loopback, mpi4py ``Send``/``Recv`` into a
preallocated buffer. Sender and receiver are separate processes (ZeroMQ) or ranks (MPI).

The receiver times ``n`` messages after a warm-up; raw and ours alternate per repeat so that a busy
machine slows both alike, and the medians are reported. The orchestrating functions start the
processes; ``python -m devit_mq.bench.transport_rates zmq-recv|zmq-send|mpi SPEC.json`` is what runs
inside them.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from devit_mq.protocol import FeaturesMeta
from devit_mq.wire import Kind, Limits, Message, decode, encode

RAW_TAG = 0x5241  # raw mpi4py traffic: a tag the MPI transport never receives
ACK_TAG = 0x4143
RECV_TIMEOUT_S = 30.0


class RateError(RuntimeError):
    """A transport-rate run failed (a process died, or messages stopped arriving); says which."""


@dataclass(frozen=True)
class RateCase:
    """One message size: features of width ``dim`` (fp32, one CLS token) or one uint8 image."""

    name: str
    kind: str  # "features" | "image"
    shape: tuple[int, ...]

    def message(self) -> Message:
        if self.kind == "features":
            arr = np.random.default_rng(0).standard_normal(self.shape).astype(np.float32)
            return Message(Kind.FEATURES, "edge0", request_ids=(1,), array=arr, codec="fp32", reply_to="client",
                           meta=FeaturesMeta(part=0, compute_ms=1.0, batch=1, queue_ms=0.0),
                           timestamps={"client_sent": 1.0, "edge_recv": 1.0, "edge_sent": 1.0})
        arr = np.random.default_rng(0).integers(0, 256, self.shape, dtype=np.uint8)
        return Message(Kind.IMAGE, "client", request_ids=(1,), array=arr, codec="raw", reply_to="client",
                       timestamps={"client_sent": 1.0})

    @property
    def payload_bytes(self) -> int:
        return int(np.prod(self.shape)) * (4 if self.kind == "features" else 1)


DEFAULT_CASES = (
    RateCase("features 768 B (192-d fp32)", "features", (1, 1, 192)),
    RateCase("features 1.5 KB (384-d fp32)", "features", (1, 1, 384)),
    RateCase("image 150 KB (224x224x3 uint8)", "image", (1, 224, 224, 3)),
)
CASES_BY_NAME = {c.name: c for c in DEFAULT_CASES}


def schedule(cases: Sequence[RateCase], n_features: int, n_images: int, repeats: int) -> list[list[Any]]:
    """``[case name, path, n]`` rounds; raw and ours alternate (and swap order) every repeat."""
    rounds = []
    for r in range(repeats):
        for case in cases:
            n = n_images if case.kind == "image" else n_features
            paths = ("raw", "ours") if r % 2 == 0 else ("ours", "raw")
            rounds += [[case.name, path, n] for path in paths]
    return rounds


def codec_cost_us(case: RateCase, calls: int = 200, samples: int = 7) -> dict[str, float]:
    """Median in-process cost of ``encode`` and ``decode`` of the case's message (after a warm-up):
    the part of our path that the raw baseline does not do, to explain the ratio."""
    msg, limits = case.message(), Limits()
    frames = encode(msg)
    decode(frames, limits)  # first call may compile codec kernels
    out = {}
    for name, fn in (("encode_us", lambda: encode(msg)), ("decode_us", lambda: decode(frames, limits))):
        times = []
        for _ in range(samples):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - start) / calls * 1e6)
        out[name] = statistics.median(times)
    return out


def summarize(cases: Sequence[RateCase], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median messages/s per case and path, ours/raw, and the codec's share of our per-message cost."""
    out = {}
    for case in cases:
        frames = encode(case.message())
        entry: dict[str, Any] = {"payload_bytes": case.payload_bytes, "message_bytes": sum(len(f) for f in frames),
                                 **codec_cost_us(case)}
        for path in ("ours", "raw"):
            rates = [r["msgs_s"] for r in runs if r["case"] == case.name and r["path"] == path]
            entry[f"{path}_msgs_s"] = statistics.median(rates) if rates else float("nan")
            entry[f"{path}_runs"] = rates
        entry["ratio"] = entry["ours_msgs_s"] / entry["raw_msgs_s"] if entry["raw_msgs_s"] else float("nan")
        out[case.name] = entry
    return out


class _Timer:
    """Counts received messages; the clock starts once the warm-up ones are in."""

    def __init__(self, warmup: int, n: int) -> None:
        self.warmup, self.n, self.count, self.start = warmup, n, 0, 0.0

    def tick(self) -> bool:
        self.count += 1
        if self.count == self.warmup:
            self.start = time.perf_counter()
        return self.count < self.warmup + self.n

    def rate(self) -> float:
        return self.n / max(time.perf_counter() - self.start, 1e-9)


# -- ZeroMQ ---------------------------------------------------------------------------------------
def _free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _pair_topology(name: str, agg_port: int, edge_port: int, transport: str = "zmq") -> dict[str, Any]:
    """Aggregator + one edge: enough nodes for a transport to route between (no bundle needed)."""
    data: dict[str, Any] = {"name": name, "bundle": "unused", "transport": transport, "codec": "fp32",
                            "aggregator": {"name": "aggregator", "host": "127.0.0.1", "port": agg_port},
                            "edges": [{"name": "edge0", "submodel": 0, "host": "127.0.0.1", "port": edge_port}]}
    if transport == "mpi":
        data["client"] = {"name": "client"}
        for node in (data["aggregator"], *data["edges"]):
            node.pop("host"), node.pop("port")
    return data


def _topology(data: dict[str, Any]):
    from devit_mq.topology import load_topology

    return load_topology(data, check_bundle=False)


def _raw_zmq(spec: dict[str, Any], receiver: bool):
    """The baseline's PUSH -> PULL data link and the receiver's acknowledgement link (PUSH -> PULL
    back), same high-water mark as the topology's sockets; the receiver binds both."""
    import zmq

    ctx = zmq.Context()
    raw = ctx.socket(zmq.PULL if receiver else zmq.PUSH)
    raw.hwm = spec["hwm"]
    ack = ctx.socket(zmq.PUSH if receiver else zmq.PULL)
    for sock, port in ((raw, spec["raw_port"]), (ack, spec["ack_port"])):
        endpoint = f"tcp://127.0.0.1:{port}"
        if receiver:
            sock.bind(endpoint)
        else:
            sock.connect(endpoint)
    return ctx, raw, ack


def _zmq_receiver(spec: dict[str, Any]) -> None:

    from devit_mq.transport.zmq import ZmqTransport

    limits = Limits()
    ours = {"features": ZmqTransport(_topology(spec["features_topology"]), "aggregator"),
            "image": ZmqTransport(_topology(spec["images_topology"]), "edge0")}
    ctx, raw, ack = _raw_zmq(spec, receiver=True)
    print("READY", flush=True)
    runs = []
    try:
        for case_name, path, n in spec["schedule"]:
            kind = CASES_BY_NAME[case_name].kind
            timer = _Timer(spec["warmup"], n)
            while True:
                if path == "ours":
                    inbound = ours[kind].recv(RECV_TIMEOUT_S)
                    if inbound is None:
                        raise RateError(f"zmq {case_name}: no message for {RECV_TIMEOUT_S:g}s")
                    decode(inbound.frames, limits)
                else:
                    if not raw.poll(int(RECV_TIMEOUT_S * 1000)):
                        raise RateError(f"raw zmq {case_name}: no message for {RECV_TIMEOUT_S:g}s")
                    raw.recv_multipart()
                if not timer.tick():
                    break
            runs.append({"case": case_name, "path": path, "n": n, "msgs_s": timer.rate()})
            ack.send(b"ok")
    finally:
        for t in ours.values():
            t.close()
        ctx.destroy(linger=0)
    print(json.dumps({"runs": runs}), flush=True)


def _zmq_sender(spec: dict[str, Any]) -> None:
    from devit_mq.transport.zmq import ZmqTransport

    ours = {"features": (ZmqTransport(_topology(spec["features_topology"]), "edge0", send_timeout=RECV_TIMEOUT_S),
                         "aggregator"),
            "image": (ZmqTransport(_topology(spec["images_topology"]), "bench-client", send_timeout=RECV_TIMEOUT_S),
                      "edge0")}
    ctx, raw, ack = _raw_zmq(spec, receiver=False)
    try:
        for case_name, path, n in spec["schedule"]:
            case = CASES_BY_NAME[case_name]
            msg = case.message()
            total = n + spec["warmup"]
            if path == "ours":
                transport, peer = ours[case.kind]
                for _ in range(total):
                    transport.send(peer, encode(msg))
            else:
                frames = encode(msg)
                for _ in range(total):
                    raw.send_multipart(frames)
            if not ack.poll(int(2 * RECV_TIMEOUT_S * 1000)):
                raise RateError(f"zmq {case_name}: the receiver did not acknowledge")
            ack.recv()
    finally:
        for t, _ in ours.values():
            t.close()
        ctx.destroy(linger=0)


def measure_zmq(cases: Sequence[RateCase] = DEFAULT_CASES, n_features: int = 20000, n_images: int = 2000,
                repeats: int = 3, warmup: int = 200, hwm: int = 1000, timeout_s: float = 300.0) -> dict[str, Any]:
    """Run the ZeroMQ comparison in two fresh processes; returns the per-case summary."""
    ports = _free_ports(6)
    spec = {"features_topology": _pair_topology("rates-features", ports[0], ports[1]),
            "images_topology": _pair_topology("rates-images", ports[2], ports[3]),
            "raw_port": ports[4], "ack_port": ports[5], "hwm": hwm, "warmup": warmup,
            "schedule": schedule(cases, n_features, n_images, repeats)}
    with tempfile.TemporaryDirectory(prefix="devit-rates-") as tmp:
        path = Path(tmp) / "spec.json"
        path.write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "devit_mq.bench.transport_rates"]
        recv = subprocess.Popen([*cmd, "zmq-recv", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        send = None
        try:
            line = recv.stdout.readline() if recv.stdout else ""
            if line.strip() != "READY":
                raise RateError(f"zmq receiver did not start: {line}{recv.stderr.read() if recv.stderr else ''}")
            send = subprocess.Popen([*cmd, "zmq-send", str(path)], stderr=subprocess.PIPE, text=True)
            out, err = recv.communicate(timeout=timeout_s)
            send_err = send.communicate(timeout=30)[1]
        except subprocess.TimeoutExpired as exc:
            raise RateError(f"zmq transport rates did not finish within {timeout_s:g}s") from exc
        finally:
            for proc in (recv, send):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if recv.returncode or (send is not None and send.returncode):
            raise RateError(f"zmq transport rates failed:\n{err[-2000:]}\n{send_err[-2000:]}")
    runs = json.loads(out.strip().splitlines()[-1])["runs"]
    return {"transport": "zmq", "link": "tcp loopback", "cases": summarize(cases, runs)}


# -- MPI ------------------------------------------------------------------------------------------
def _mpi_wait(request: Any, nap: float = 1e-4) -> None:
    """Complete a request without busy-polling (a blocked MPI call spins a whole core)."""
    while not request.Test():
        time.sleep(nap)


def _mpi_rank(spec: dict[str, Any]) -> None:
    from mpi4py import MPI

    from devit_mq.transport.mpi import MpiTransport, pack_frames

    comm = MPI.COMM_WORLD
    topology = _topology(spec["topology"])
    ranks = topology.mpi_ranks(comm.Get_size())
    name = {r: n for n, r in ranks.items()}[comm.Get_rank()]
    if name == "aggregator":
        transport = MpiTransport(topology, name, send_timeout=RECV_TIMEOUT_S)
        limits, runs, src = Limits(), [], ranks["edge0"]
        for case_name, path, n in spec["schedule"]:
            timer = _Timer(spec["warmup"], n)
            size = len(pack_frames(encode(CASES_BY_NAME[case_name].message())))
            buf = bytearray(size)
            while True:
                if path == "ours":
                    inbound = transport.recv(RECV_TIMEOUT_S)
                    if inbound is None:
                        raise RateError(f"mpi {case_name}: no message for {RECV_TIMEOUT_S:g}s")
                    decode(inbound.frames, limits)
                else:
                    comm.Recv([buf, MPI.BYTE], source=src, tag=RAW_TAG)
                if not timer.tick():
                    break
            runs.append({"case": case_name, "path": path, "n": n, "msgs_s": timer.rate()})
            comm.Send([bytearray(1), MPI.BYTE], dest=src, tag=ACK_TAG)
        Path(spec["out"]).write_text(json.dumps({"runs": runs}))
        transport.close()
    elif name == "edge0":
        transport = MpiTransport(topology, name, send_timeout=RECV_TIMEOUT_S)
        dest = ranks["aggregator"]
        for case_name, path, n in spec["schedule"]:
            msg = CASES_BY_NAME[case_name].message()
            total = n + spec["warmup"]
            if path == "ours":
                for _ in range(total):
                    transport.send("aggregator", encode(msg))
                transport.flush(RECV_TIMEOUT_S)
            else:
                buf = pack_frames(encode(msg))
                for _ in range(total):
                    comm.Send([buf, MPI.BYTE], dest=dest, tag=RAW_TAG)
            _mpi_wait(comm.Irecv([bytearray(1), MPI.BYTE], source=dest, tag=ACK_TAG))
        transport.close()
    _mpi_wait(comm.Ibarrier(), 1e-3)


def measure_mpi(cases: Sequence[RateCase] = DEFAULT_CASES, n_features: int = 20000, n_images: int = 2000,
                repeats: int = 3, warmup: int = 200, timeout_s: float = 300.0) -> dict[str, Any]:
    """Run the MPI comparison under ``mpirun -n 3`` (client rank idle, edge0 -> aggregator)."""
    from devit_mq.nodes.mpi_launch import mpirun_command

    with tempfile.TemporaryDirectory(prefix="devit-rates-") as tmp:
        out = Path(tmp) / "runs.json"
        spec = {"topology": _pair_topology("rates-mpi", 0, 0, transport="mpi"), "warmup": warmup,
                "schedule": schedule(cases, n_features, n_images, repeats), "out": str(out)}
        path = Path(tmp) / "spec.json"
        path.write_text(json.dumps(spec))
        cmd = mpirun_command(3, keep_going=False) + [sys.executable, "-m", "devit_mq.bench.transport_rates",
                                                     "mpi", str(path)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise RateError(f"mpi transport rates did not finish within {timeout_s:g}s") from exc
        if proc.returncode or not out.is_file():
            raise RateError(f"mpi transport rates failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        runs = json.loads(out.read_text())["runs"]
    return {"transport": "mpi", "link": "mpirun -n 3 on one host", "cases": summarize(cases, runs)}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("zmq-recv", "zmq-send", "mpi"):
        print("usage: python -m devit_mq.bench.transport_rates zmq-recv|zmq-send|mpi SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[1]).read_text())
    {"zmq-recv": _zmq_receiver, "zmq-send": _zmq_sender, "mpi": _mpi_rank}[argv[0]](spec)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main(sys.argv[1:]))
