"""``devit-mq bench TOPOLOGY``: collaborative (DeViT) vs monolithic inference, side by side in one run.

One run, one set of seeded images, four ways of classifying them:

- the monolithic teacher in one process, on 1 thread and on 2 threads;
- the DeViT topology with each edge its own 1-thread process, over ZeroMQ (launched here) and over
  MPI (``mpirun``, the client rank runs :func:`run_mpi_client`).

Each DeViT phase also runs the teacher *in its client process, interleaved in rounds with the
DeViT requests* (the topology idles meanwhile), so that the ratios compare numbers measured under
the same machine load: shared machines drift by tens of percent within a minute.

Per way: latency p50/p99 at batch 1 (sequential requests) and throughput at the best batch size;
for DeViT also the framework overhead (end-to-end latency minus the slowest edge's compute, from
the answers' stage timers), per-node CPU seconds and peak RSS (the nodes' telemetry, which the
aggregator's status carries), and energy per image from RAPL where readable, else CPU-seconds per
image. Then the transport efficiency (:mod:`devit_mq.bench.transport_rates`). Bundles are built
with random weights of the issue's shapes unless ``--bundle`` names one (it must ship a teacher).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from devit_mq.metrics import percentiles, process_usage, rapl_energy_uj
from devit_mq.nodes.client import latency_breakdown

from . import report
from .bundles import SHAPES, ensure_bundle, shapes_named

STATUS_SETTLE_S = 0.75  # edges' telemetry rides on 0.5 s heartbeats: wait for one after a phase


class BenchError(RuntimeError):
    """A benchmark phase could not run; the message names the phase and the cause."""


@dataclass(frozen=True)
class BenchPlan:
    """How much to measure. ``QUICK`` is the CI smoke size; the default takes a few minutes."""

    latency_requests: int = 500  # batch-1 requests per configuration (p99 from 500 is not the maximum)
    rounds: int = 10  # DeViT and teacher latency requests alternate in this many chunks
    floor_requests: int = 500  # the raw fan-out/fan-in measured next to each DeViT phase
    batch_sizes: tuple[int, ...] = (1, 4, 8, 16)
    throughput_images: int = 64
    window: int = 2  # batches in flight during throughput runs
    teacher_threads: tuple[int, ...] = (1, 2)
    teacher_batch_sizes: tuple[int, ...] = (1, 4, 8)
    teacher_throughput_images: int = 16
    rate_features: int = 20000
    rate_images: int = 2000
    rate_repeats: int = 3
    idle_s: float = 15.0  # how long the nodes' idle CPU is measured, after the workload
    idle_steady: bool = True  # first wait for a polling transport's longest naps (see idle_cpu)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchPlan:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


QUICK = BenchPlan(latency_requests=6, rounds=2, floor_requests=20, batch_sizes=(1, 4), throughput_images=8,
                  teacher_batch_sizes=(1, 4), teacher_throughput_images=4, rate_features=2000, rate_images=200,
                  rate_repeats=1, idle_s=2.0, idle_steady=False)


def bench_images(n: int, image_shape: Sequence[int], seed: int) -> np.ndarray:
    """The images every way classifies: seeded uniform uint8 (content is irrelevant to timing)."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, *image_shape), dtype=np.uint8)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _tile(images: np.ndarray, n: int) -> np.ndarray:
    return images[np.arange(n) % len(images)]


# -- the monolithic teacher -----------------------------------------------------------------------
class TeacherRunner:
    """The teacher in this process: uint8 images -> normalised tensor -> logits -> probabilities,
    i.e. the same work the DeViT path does end to end, with ``threads`` torch threads.

    ``attention`` is the edges' setting, so both sides get the same attention policy: a named
    backend, or ``auto`` = the fastest one measured for this model at each thread count (what an
    edge does at start-up)."""

    def __init__(self, bundle: Path, attention: str = "torch") -> None:
        from devit_mq.model import load_manifest, load_teacher

        manifest = load_manifest(bundle)
        self.model = load_teacher(bundle, manifest)
        self.input = manifest.input
        self.attention = attention
        self.backends: dict[int, str] = {}  # threads -> attention backend used
        self.params_mb = sum(p.numel() * p.element_size() for p in self.model.parameters()) / 2**20

    def _use_threads(self, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        if threads not in self.backends:
            if self.attention == "auto":
                from devit_mq.model import select_backend

                self.backends[threads] = select_backend(self.model, batch_size=1, apply=False)
            else:
                self.backends[threads] = self.attention
        if self.model.attention_backend != self.backends[threads]:
            self.model.set_attention_backend(self.backends[threads])

    def predict(self, images: np.ndarray, threads: int) -> np.ndarray:
        import torch

        self._use_threads(threads)
        with torch.inference_mode():
            out = self.model(self.input.to_tensor(images))
            if isinstance(out, tuple):  # a distilled (DeiT) teacher: average its two heads
                out = (out[0] + out[1]) / 2
            return out.softmax(-1).numpy()

    def latency(self, images: np.ndarray, threads: int) -> list[float]:
        out = []
        for i in range(len(images)):
            start = time.perf_counter()
            self.predict(images[i: i + 1], threads)
            out.append(time.perf_counter() - start)
        return out

    def throughput(self, images: np.ndarray, threads: int, batch: int) -> dict[str, float]:
        usage, energy = process_usage(), rapl_energy_uj()
        start = time.perf_counter()
        for lo in range(0, len(images), batch):
            self.predict(images[lo: lo + batch], threads)
        elapsed = time.perf_counter() - start
        return _rates(len(images), elapsed, process_usage()["cpu_s"] - usage["cpu_s"], energy)


def _rates(n: int, elapsed: float, cpu_s: float, energy_start: int | None) -> dict[str, float]:
    out = {"images": n, "elapsed_s": elapsed, "img_s": n / elapsed, "cpu_s_per_img": cpu_s / n}
    energy_end = rapl_energy_uj()
    if energy_start is not None and energy_end is not None and energy_end >= energy_start:
        out["energy_j_per_img"] = (energy_end - energy_start) / 1e6 / n
    return out


def _best(throughput: dict[str, dict[str, float]]) -> tuple[str, float]:
    key = max(throughput, key=lambda b: throughput[b]["img_s"])
    return key, throughput[key]["img_s"]


# -- the DeViT topology, seen from its client -------------------------------------------------------
def _settled_status(client) -> dict:
    time.sleep(STATUS_SETTLE_S)
    return client.query_status()


def _node_cpu(status: dict) -> dict[str, float]:
    return {name: float(m.get("cpu_s", 0.0)) for name, m in status.get("nodes", {}).items()}


def idle_cpu(client, seconds: float, steady: bool = True) -> dict[str, float]:
    """Each node's CPU while nothing is asked of it, in % of one core over ``seconds``: from its own
    telemetry (``cpu_s`` over ``uptime_s``, so a heartbeat's age does not matter), once every node has
    been without request traffic long enough to tell its transport it is idle and (``steady``) for a
    polling transport to reach its longest naps (the steady state of an idle node). ``client`` is this
    process (it only sleeps). The two status queries are the only traffic besides heartbeats."""
    from devit_mq.nodes.base import HEARTBEAT_INTERVAL_S, IDLE_AFTER_S
    from devit_mq.transport.mpi import LONG_IDLE_AFTER_S

    time.sleep(IDLE_AFTER_S + (LONG_IDLE_AFTER_S if steady else 0.0) + 2 * HEARTBEAT_INTERVAL_S)
    before = client.query_status().get("nodes", {})
    usage, start = process_usage(), time.monotonic()
    time.sleep(seconds)
    after = client.query_status().get("nodes", {})
    out = {}
    for name, m in after.items():
        b = before.get(name)
        span = m.get("uptime_s", 0.0) - b.get("uptime_s", 0.0) if b else 0.0
        if span > 0:
            out[name] = 100 * (m.get("cpu_s", 0.0) - b.get("cpu_s", 0.0)) / span
    out["client"] = 100 * (process_usage()["cpu_s"] - usage["cpu_s"]) / (time.monotonic() - start)
    return out


def _devit_throughput(client, images: np.ndarray, batch: int, window: int) -> dict[str, Any]:
    before = _node_cpu(_settled_status(client))
    usage, energy = process_usage(), rapl_energy_uj()
    start = time.perf_counter()
    pred = client.predict(images, batch_size=batch, window=window)
    elapsed = time.perf_counter() - start
    client_cpu = process_usage()["cpu_s"] - usage["cpu_s"]
    after = _node_cpu(_settled_status(client))
    node_cpu = {n: after[n] - before.get(n, 0.0) for n in after}
    node_cpu["client"] = client_cpu
    out = _rates(len(images), elapsed, sum(node_cpu.values()), energy)
    out.update(errors=len(pred.errors), degraded=pred.degraded, cpu_s_by_node=node_cpu)
    return out


def run_client_workload(client, teacher: TeacherRunner | None, image_shape: Sequence[int],
                        plan: BenchPlan, log: Callable[[str], None] = print) -> dict[str, Any]:
    """What the client of a ready DeViT topology measures (the same over ZeroMQ and MPI): batch-1
    latency interleaved with the teacher's, stage timers, throughput per batch size, node telemetry."""
    import torch

    threads_before = torch.get_num_threads()  # the teacher changes them; the caller gets its own back
    try:
        return _client_workload(client, teacher, image_shape, plan, log)
    finally:
        torch.set_num_threads(threads_before)


def _client_workload(client, teacher: TeacherRunner | None, image_shape: Sequence[int], plan: BenchPlan,
                     log: Callable[[str], None]) -> dict[str, Any]:
    n_img = max(plan.latency_requests, plan.throughput_images, plan.teacher_throughput_images)
    images = bench_images(n_img, image_shape, plan.seed)
    client.predict(images[:2], batch_size=1, window=1)  # warm the path (sockets, codec kernels)
    if teacher is not None:
        for t in plan.teacher_threads:
            teacher.latency(images[:2], t)
    answers, teacher_lat = [], {t: [] for t in plan.teacher_threads}
    rounds_p50 = []
    chunks = np.array_split(np.arange(plan.latency_requests), max(1, plan.rounds))
    for r, idx in enumerate(chunks):
        got = client.predict(images[idx % len(images)], batch_size=1, window=1).answers
        answers += got
        rounds_p50.append(percentiles([a.latency_s * 1e3 for a in got if a.ok]).get("p50"))
        if teacher is not None:
            for t in plan.teacher_threads:
                teacher_lat[t] += teacher.latency(images[idx], t)
        log(f"  latency round {r + 1}/{len(chunks)} done")
    ok = [a for a in answers if a.ok]
    result: dict[str, Any] = {
        **latency_breakdown(answers),
        "latency_errors": len(answers) - len(ok), "latency_degraded": sum(a.degraded for a in ok),
        "latency_rounds_p50_ms": rounds_p50,  # the spread across interleaved rounds
    }
    result["throughput"] = {}
    for b in plan.batch_sizes:
        result["throughput"][str(b)] = _devit_throughput(client, _tile(images, plan.throughput_images), b,
                                                         plan.window)
        log(f"  DeViT batch {b}: {result['throughput'][str(b)]['img_s']:.1f} img/s")
    result["best_batch"], result["best_img_s"] = _best(result["throughput"])
    status = _settled_status(client)
    result["nodes"] = {name: {k: m.get(k) for k in ("cpu_s", "rss_mb", "peak_rss_mb")}
                       for name, m in status.get("nodes", {}).items()}
    result["nodes"]["client"] = {**process_usage(), "peak_rss_mb": _peak_rss_mb()}
    if teacher is not None:
        result["teacher"] = {}
        for t in plan.teacher_threads:
            tp = {str(b): teacher.throughput(_tile(images, plan.teacher_throughput_images), t, b)
                  for b in plan.teacher_batch_sizes}
            best_b, best = _best(tp)
            result["teacher"][str(t)] = {"latency_ms": percentiles([x * 1e3 for x in teacher_lat[t]], (50, 90, 99)),
                                         "throughput": tp, "best_batch": best_b, "best_img_s": best}
            log(f"  teacher {t} thread(s): p50 {result['teacher'][str(t)]['latency_ms']['p50']:.1f} ms, "
                f"best {best:.1f} img/s")
        result["teacher_params_mb"] = teacher.params_mb
        result["teacher_attention"] = {str(t): b for t, b in teacher.backends.items()}
    if plan.idle_s > 0:  # last: nothing else runs in this process meanwhile
        log(f"  idle CPU: {plan.idle_s:g} s without requests")
        result["idle_cpu_pct"] = idle_cpu(client, plan.idle_s, plan.idle_steady)
    return result


# the plug-in `devit-mq mpi --run` calls on the client rank (the runtime never imports the benchmarks)
MPI_CLIENT = "devit_mq.bench.runtime:run_mpi_client"


def run_mpi_client(client, topology, config_path: str | Path) -> None:
    """``devit-mq mpi TOPOLOGY --run devit_mq.bench.runtime:run_mpi_client --run-config FILE`` on rank
    0: run the workload that ``devit-mq bench`` wrote into FILE and write the result where FILE says."""
    config = json.loads(Path(config_path).read_text())
    plan = BenchPlan.from_dict(config["plan"])
    teacher = TeacherRunner(topology.bundle, topology.edges[0].attention) if config.get("teacher", True) else None
    result = run_client_workload(client, teacher, tuple(client.status["image_shape"]), plan,
                                 log=lambda line: print(f"[mpi] {line}", flush=True))
    Path(config["out"]).write_text(json.dumps(result))


# -- topologies and phases --------------------------------------------------------------------------
def derive_topologies(path: str | Path, bundle: Path, work_dir: Path) -> dict[str, Path]:
    """The same nodes and settings as ``path`` with ``bundle``, once over ZeroMQ and once over MPI
    (the missing variant gets loopback ports or a client rank), written to ``work_dir``."""
    from devit_mq.topology import load_topology

    from .transport_rates import _free_ports

    base = load_topology(path, check_bundle=False).to_dict()
    base["bundle"] = str(bundle.resolve())
    out = {}
    for transport in ("zmq", "mpi"):
        data = json.loads(json.dumps(base))
        data["transport"] = transport
        servers = [data["aggregator"], *data["edges"]]
        for node in servers + ([data["client"]] if "client" in data else []):
            node.pop("rank", None)
        if transport == "mpi":
            data.pop("security", None)
            for node in servers:
                for key in ("host", "port", "ipc", "bind"):
                    node.pop(key, None)
            data.setdefault("client", {"name": "client"})
        else:
            data.pop("client", None)
            if base["transport"] != "zmq":
                for node, port in zip(servers, _free_ports(len(servers)), strict=True):
                    node.update(host="127.0.0.1", port=port)
        data["name"] = f"{base['name']}-{transport}"
        target = work_dir / f"{data['name']}.yaml"
        target.write_text(yaml.safe_dump(data, sort_keys=False))
        load_topology(target)  # fail here, naming the file, rather than inside a node process
        out[transport] = target
    return out


def n_edge_topology(path: str | Path, num_edges: int, bundle: Path, work_dir: Path) -> Path:
    """A ZeroMQ topology like ``path`` (its codec, limits, defaults, aggregator settings, first edge's
    settings) but with ``num_edges`` edges on fresh loopback ports, written to ``work_dir``."""
    from devit_mq.topology import load_topology

    from .transport_rates import _free_ports

    data = load_topology(path, check_bundle=False).to_dict()
    template = {k: v for k, v in data["edges"][0].items()
                if k not in ("name", "submodel", "rank", "host", "port", "ipc", "bind", "embed_dim")}
    ports = _free_ports(num_edges + 1)
    data.update(transport="zmq", bundle=str(bundle.resolve()), name=f"{data['name']}-{num_edges}edge")
    data.pop("client", None)
    data.pop("security", None)
    for key in ("rank", "ipc", "bind"):
        data["aggregator"].pop(key, None)
    data["aggregator"].update(host="127.0.0.1", port=ports[0])
    data["edges"] = [{"name": f"edge{i}", "submodel": i, **template, "host": "127.0.0.1", "port": ports[i + 1]}
                     for i in range(num_edges)]
    target = work_dir / f"{data['name']}.yaml"
    target.write_text(yaml.safe_dump(data, sort_keys=False))
    load_topology(target)
    return target


def sweep_edges(topology: str | Path, counts: Sequence[int], plan: BenchPlan, work_dir: Path,
                shapes_name: str = "issue") -> list[dict[str, Any]]:
    """DeViT over ZeroMQ with N = each of ``counts`` edges, the teacher's width split N ways (N=1 is
    the whole ViT-S behind the framework): batch-1 latency and best throughput per N."""
    from devit_mq.nodes.launcher import Launcher, LaunchError

    small = dataclasses.replace(plan, latency_requests=min(plan.latency_requests, 20), rounds=1,
                                throughput_images=min(plan.throughput_images, 32),
                                batch_sizes=tuple(b for b in plan.batch_sizes if b in (1, 8)) or plan.batch_sizes[:1])
    rows = []
    for n in counts:
        shapes = shapes_named(shapes_name, n)
        print(f"== edges sweep: N={n} ({shapes.describe()}) ==", flush=True)
        bundle = ensure_bundle(work_dir / "bundles" / shapes.name, shapes, seed=plan.seed)
        path = n_edge_topology(topology, n, bundle, work_dir)
        try:
            with Launcher(path, log_dir=work_dir / f"logs-sweep-{n}") as launcher:
                res = run_client_workload(launcher.client, None, tuple(launcher.status["image_shape"]), small)
        except LaunchError as exc:
            raise BenchError(f"edges sweep N={n}: {exc}") from exc
        rows.append({"edges": n, "width": shapes.submodels[0].embed_dim, "latency_ms": res["latency_ms"],
                     "edge_compute_ms": res["edge_compute_ms"], "overhead_ms": res["overhead_ms"],
                     "best_batch": res["best_batch"], "best_img_s": res["best_img_s"],
                     "throughput": {b: t["img_s"] for b, t in res["throughput"].items()}})
    return rows


def _phase_zmq(topology_path: Path, teacher: TeacherRunner | None, plan: BenchPlan, log_dir: Path) -> dict:
    from devit_mq.nodes.launcher import Launcher, LaunchError

    try:
        with Launcher(topology_path, log_dir=log_dir) as launcher:
            result = run_client_workload(launcher.client, teacher, tuple(launcher.status["image_shape"]), plan)
            result["processes"] = launcher.describe()
    except LaunchError as exc:
        raise BenchError(f"ZeroMQ phase: {exc}") from exc
    return result


def _phase_mpi(topology_path: Path, plan: BenchPlan, work_dir: Path, timeout_s: float) -> dict:
    from devit_mq.nodes.mpi_launch import mpirun_command
    from devit_mq.topology import load_topology

    nodes = len(load_topology(topology_path).nodes)
    out = work_dir / "mpi-result.json"
    out.unlink(missing_ok=True)
    config = work_dir / "mpi-config.json"
    config.write_text(json.dumps({"plan": plan.to_dict(), "out": str(out.resolve())}))
    cmd = mpirun_command(nodes) + [sys.executable, "-m", "devit_mq.cli", "mpi", str(topology_path),
                                   "--run", MPI_CLIENT, "--run-config", str(config)]
    print("  running: " + " ".join(cmd), flush=True)
    try:
        proc = subprocess.run(cmd, stdout=None, stderr=subprocess.PIPE, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"MPI phase did not finish within {timeout_s:g}s") from exc
    if proc.returncode or not out.is_file():
        raise BenchError(f"MPI phase failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    result["processes"] = f"mpirun -n {nodes}: client rank 0, aggregator, edges (1 thread each)"
    return result


def message_sizes(topology_path: Path) -> dict[str, Any]:
    """Bytes of the batch-1 image message and of each edge's feature message (header included), as
    the topology's codecs encode them: what the floor sends."""
    from devit_mq.model import load_manifest
    from devit_mq.nodes.demo import wire_bytes_per_image
    from devit_mq.topology import load_topology

    topology = load_topology(topology_path)
    sizes = list(wire_bytes_per_image(topology, load_manifest(topology.bundle)).values())
    return {"image_bytes": sizes[0], "feature_bytes": sizes[1:]}


def measure_floor(transport: str, sizes: dict[str, Any], requests: int, edge_work_ms: float = 0.0) -> dict[str, Any]:
    from .floor import mpi_floor, zmq_floor

    measure = zmq_floor if transport == "zmq" else mpi_floor
    return measure(sizes["image_bytes"], sizes["feature_bytes"], requests, edge_work_ms=edge_work_ms)


def machine_info() -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "loadavg": list(os.getloadavg()), "rapl": rapl_energy_uj() is not None}


def speedups(result: dict[str, Any]) -> dict[str, Any]:
    """Teacher / DeViT latency and DeViT / teacher throughput, each from one phase's own numbers."""
    out = {}
    for transport, phase in result["devit"].items():
        if "teacher" not in phase:
            continue
        d_lat = phase["latency_ms"].get("p50", float("nan"))
        for t, tr in phase["teacher"].items():
            out[f"{transport} vs teacher {t}T"] = {
                "latency_p50": tr["latency_ms"].get("p50", float("nan")) / d_lat,
                "latency_p99": tr["latency_ms"].get("p99", float("nan")) / phase["latency_ms"].get("p99", float("nan")),
                "throughput": phase["best_img_s"] / tr["best_img_s"],
            }
    return out


def run_bench(topology: str | Path, plan: BenchPlan, work_dir: Path, shapes_name: str = "issue",
              bundle: Path | None = None, transports: Sequence[str] = ("zmq", "mpi"),
              rates: bool = True, mpi_timeout_s: float = 1200.0,
              edges_sweep: Sequence[int] = ()) -> dict[str, Any]:
    """Every phase in order; returns the result dict (see :mod:`devit_mq.bench.report`)."""
    from devit_mq.model import load_manifest
    from devit_mq.topology import load_topology

    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    spec = load_topology(topology, check_bundle=False)
    n_edges, attention = spec.num_edges, spec.edges[0].attention
    result: dict[str, Any] = {"kind": "bench", "topology": str(topology), "plan": plan.to_dict(),
                              "machine": machine_info(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if bundle is None:
        shapes = shapes_named(shapes_name, n_edges)
        print(f"bundle: {shapes.describe()}", flush=True)
        bundle = ensure_bundle(work_dir / "bundles" / shapes.name, shapes, seed=plan.seed)
        result["bundle"] = {"path": str(bundle), "shapes": shapes.describe(), "random_weights": True}
    else:
        meta = load_manifest(bundle).metadata
        result["bundle"] = {"path": str(bundle), "random_weights": bool(meta.get("random_weights", False))}
    paths = derive_topologies(topology, bundle, work_dir)
    teacher = TeacherRunner(bundle, attention)
    result["attention"] = {"edges": sorted({e.attention for e in spec.edges})}
    result["devit"] = {}
    result["floor"], result["busy_floor"] = {}, {}
    sizes = message_sizes(paths["zmq"])
    for transport in transports:
        print(f"== DeViT over {transport} (teacher interleaved in the client process) ==", flush=True)
        if transport == "zmq":
            result["devit"]["zmq"] = _phase_zmq(paths["zmq"], teacher, plan, work_dir / "logs-zmq")
        else:
            result["devit"]["mpi"] = _phase_mpi(paths["mpi"], plan, work_dir, mpi_timeout_s)
        # the floors right after, same hops and sizes: the ratios compare numbers of the same minutes.
        # The busy floor's edges compute (BLAS) as long as ours did, so its processes wake on cold
        # caches as ours do: it separates what the framework costs from what the machine charges.
        phase = result["devit"][transport]
        work_ms = phase["edge_compute_ms"].get("p50", 0.0)
        print(f"== raw {transport} floor ({plan.floor_requests} requests), idle and with {work_ms:.1f} ms "
              "of edge work ==", flush=True)
        result["floor"][transport] = measure_floor(transport, sizes, plan.floor_requests)
        result["busy_floor"][transport] = measure_floor(transport, sizes, plan.floor_requests, work_ms)
        overhead_us = phase["overhead_ms"].get("p50", float("nan")) * 1e3
        phase["overhead_vs_floor"] = overhead_us / result["floor"][transport]["p50_us"]
        phase["overhead_vs_busy_floor"] = overhead_us / result["busy_floor"][transport]["p50_us"]
    result["speedup"] = speedups(result)
    if rates:
        from .transport_rates import measure_mpi, measure_zmq

        print("== transport efficiency: our path vs raw pyzmq / mpi4py ==", flush=True)
        result["transport"] = {}
        kwargs = {"n_features": plan.rate_features, "n_images": plan.rate_images, "repeats": plan.rate_repeats}
        if "zmq" in transports:
            result["transport"]["zmq"] = measure_zmq(**kwargs)
        if "mpi" in transports:
            result["transport"]["mpi"] = measure_mpi(**kwargs)
    if edges_sweep:
        result["edges_sweep"] = sweep_edges(topology, edges_sweep, plan, work_dir, shapes_name)
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    result["elapsed_s"] = time.time() - started
    result["targets"] = report.bench_targets(result)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="devit-mq bench", description=(
        "Monolithic teacher vs the DeViT topology over ZeroMQ and MPI, on the same images in one run: "
        "latency, throughput, framework overhead, transport efficiency, CPU/RSS/energy."))
    p.add_argument("topology", help="topology YAML (its nodes and settings; the bench derives the ZeroMQ and "
                                    "MPI variants)")
    p.add_argument("--quick", action="store_true", help="smoke-test sizes (well under a minute on tiny shapes)")
    p.add_argument("--shapes", choices=SHAPES, default="issue",
                   help="random-weight bundle shapes: 'issue' = ViT-S/16 teacher vs N sub-models splitting its "
                        "width (N=2: ViT-Ti/16), 224x224; 'tiny' = seconds-fast shapes")
    p.add_argument("--bundle", type=Path, default=None, help="benchmark this bundle instead (needs a teacher)")
    p.add_argument("--transports", default="zmq,mpi", help="comma-separated subset of zmq,mpi")
    p.add_argument("--no-rates", action="store_true", help="skip the transport-efficiency comparison")
    p.add_argument("--edges-sweep", default="", metavar="N,N,...",
                   help="also run DeViT over ZeroMQ with each number of edges (the teacher's width split N "
                        "ways; random weights), e.g. 1,2,4: throughput and latency vs number of edges")
    p.add_argument("--work-dir", type=Path, default=Path("runs/bench"),
                   help="bundles cache, derived topologies and node logs")
    p.add_argument("--json", type=Path, default=None, help="write the result here (default WORK_DIR/bench.json)")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG (needs matplotlib: pip install '.[plot]')")
    p.add_argument("--idle-s", type=float, default=None, metavar="SECONDS",
                   help="how long each phase measures its idle nodes' CPU after the workload (default 15, "
                        "2 with --quick; 0 skips it)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    unknown = sorted(set(transports) - {"zmq", "mpi"})
    if unknown or not transports:
        print(f"devit-mq bench: error: --transports takes zmq and/or mpi, got {args.transports!r}", file=sys.stderr)
        return 2
    plan = dataclasses.replace(QUICK if args.quick else BenchPlan(), seed=args.seed)
    if args.idle_s is not None:
        if not args.idle_s >= 0:
            print(f"devit-mq bench: error: --idle-s takes seconds >= 0, got {args.idle_s:g}", file=sys.stderr)
            return 2
        plan = dataclasses.replace(plan, idle_s=args.idle_s)
    try:
        sweep = [int(n) for n in args.edges_sweep.split(",") if n.strip()]
    except ValueError:
        print(f"devit-mq bench: error: --edges-sweep takes integers, got {args.edges_sweep!r}", file=sys.stderr)
        return 2
    from devit_mq.model import BundleError
    from devit_mq.topology import TopologyError

    from .transport_rates import RateError

    try:
        result = run_bench(args.topology, plan, args.work_dir, args.shapes, args.bundle, transports,
                           rates=not args.no_rates, edges_sweep=sweep)
    except (BenchError, RateError, TopologyError, BundleError, OSError, ValueError) as exc:
        print(f"devit-mq bench: error: {exc}", file=sys.stderr)
        return 2
    result["command"] = "devit-mq bench " + " ".join(argv)
    json_path = args.json or args.work_dir / "bench.json"
    report.write_json(json_path, result)
    print(report.bench_markdown(result))
    print(f"\nJSON: {json_path}")
    if args.plot:
        print(report.try_plot(report.plot_bench, result, args.plot))
    return 0


__all__ = ["QUICK", "BenchError", "BenchPlan", "TeacherRunner", "bench_images", "derive_topologies", "main",
           "n_edge_topology", "run_bench", "run_client_workload", "run_mpi_client", "speedups", "sweep_edges"]
