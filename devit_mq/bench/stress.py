"""``devit-mq stress TOPOLOGY``: sustained load against a ZeroMQ topology, with exactly-once accounting.

Two load shapes:

- **open loop** (``--rate R``): one client sends a request every 1/R s whatever happens to earlier
  ones; latency counts from the *scheduled* send time, so a stalled sender cannot hide queueing
  (no coordinated omission).
- **closed loop** (``--clients C``): C clients (threads, each its own connection and name), each
  with one request in flight: the system's saturated throughput.

Every request id must be answered exactly once by the system. The client library already turns
"nothing came back" into a client-side ``timeout`` error and drops a second answer for an id; this
tool taps the raw answers underneath it, so it reports what really arrived: answers, degraded
answers, explicit errors, client timeouts, lost requests (no answer from the system: timeouts plus
never answered), duplicates (an id answered twice) and unexpected answers (ids never sent, e.g. from
a corrupted header). A monitor samples every node's RSS from the aggregator's status once per
window; before the load the slowest edge's sub-model is timed standalone (same threads and batch
size) for the "sustained / standalone" ratio.

``--launch`` starts the topology (optionally with faulty edges, and an edge killed and restarted
mid-run); otherwise the tool attaches to a running one.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from devit_mq.logs import add_log_arguments, setup_logging
from devit_mq.metrics import percentiles
from devit_mq.transport import Inbound, Peer, Transport
from devit_mq.wire import Kind, Limits, WireError, decode

from . import report
from .bundles import SHAPES
from .faults import FaultLauncher, FaultSpec, FaultSpecError


class StressError(RuntimeError):
    """The stress run could not start or was misconfigured; the message says why."""


@dataclass
class StressConfig:
    duration: float
    rate: float | None = None
    clients: int | None = None
    window_s: float = 5.0
    batch_size: int = 1
    timeout_s: float = 10.0  # client-side: an id unanswered this long becomes a timeout error
    # A send to a dead edge waits this long before failing (ZeroMQ holds it while no peer is
    # connected): short, so that one crashed edge cannot stall the generator for seconds per request.
    send_timeout_s: float = 0.02
    pool: int = 16
    connect_timeout_s: float = 60.0  # how long to wait for the topology to report every edge ready
    seed: int = 0
    warmup_s: float | None = None  # RSS growth is measured from the first sample after this
    standalone: bool = True
    client_faults: FaultSpec | None = None
    edge_faults: FaultSpec | None = None
    faulty_edges: tuple[str, ...] | None = None  # which edges run behind edge_faults (default: all)
    kill_edge: str | None = None
    kill_at_s: float | None = None
    restart_after_s: float | None = None

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.clients is None):
            raise StressError("give exactly one of --rate (open loop) or --clients (closed loop)")
        if self.rate is not None and self.rate <= 0:
            raise StressError(f"--rate must be > 0, got {self.rate}")
        if self.clients is not None and self.clients < 1:
            raise StressError(f"--clients must be >= 1, got {self.clients}")
        if self.duration <= 0 or self.window_s <= 0 or self.batch_size < 1:
            raise StressError("--duration and --window must be > 0 and --batch-size >= 1")

    @property
    def rss_warmup_s(self) -> float:
        return self.warmup_s if self.warmup_s is not None else min(max(self.window_s, 0.1 * self.duration), 60.0)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["faulty_edges"] = list(self.faulty_edges) if self.faulty_edges is not None else None
        for key in ("client_faults", "edge_faults"):
            spec = getattr(self, key)
            out[key] = spec.to_dict() if spec is not None else None
        return out


# -- exactly-once accounting --------------------------------------------------------------------------
@dataclass
class Ledger:
    """Thread-safe record of every request sent and every answer seen (raw and as the client gave it)."""

    t0: float = field(default_factory=time.perf_counter)
    sent: dict[tuple[str, int], float] = field(default_factory=dict)  # -> scheduled/send time
    done: dict[tuple[str, int], tuple[float, float, str]] = field(default_factory=dict)  # -> (t, ms, kind)
    raw: Counter = field(default_factory=Counter)  # system answers per id, seen under the client
    unexpected: int = 0
    active: bool = False  # the tap ignores warm-up traffic
    error_examples: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def submit(self, client: str, ids: Sequence[int], at: float) -> None:
        with self.lock:
            for rid in ids:
                self.sent[(client, rid)] = at

    def tap(self, client: str, ids: Sequence[int]) -> None:
        if not self.active:
            return
        with self.lock:
            for rid in ids:
                if (client, rid) in self.sent:
                    self.raw[(client, rid)] += 1
                else:
                    self.unexpected += 1

    def record(self, client: str, answers: Sequence[Any]) -> None:
        now = time.perf_counter()
        with self.lock:
            for a in answers:
                key = (client, a.request_id)
                sent = self.sent.get(key)
                if sent is None or key in self.done:
                    continue  # the client gives each id at most once; the raw tap counts the rest
                if a.error is None:
                    kind = "degraded" if a.degraded else "ok"
                elif a.error.startswith("timeout"):
                    kind = "timeout"
                elif a.error.startswith("overloaded"):
                    kind = "overloaded"  # refused by admission control: answered at once, not lost
                else:
                    kind = "error"
                    if len(self.error_examples) < 5:
                        self.error_examples.append(a.error)
                self.done[key] = (now - self.t0, (now - sent) * 1e3, kind)

    def summary(self, load_s: float) -> dict[str, Any]:
        with self.lock:
            kinds = Counter(k for _, _, k in self.done.values())
            answered = kinds["ok"] + kinds["degraded"] + kinds["error"] + kinds["overloaded"]
            latencies = [ms for t, ms, k in self.done.values() if k != "timeout"]
            admitted = [ms for t, ms, k in self.done.values() if k in ("ok", "degraded")]
            in_load = sum(1 for t, _, k in self.done.values() if k != "timeout" and t <= load_s)
            served = sum(1 for t, _, k in self.done.values() if k in ("ok", "degraded") and t <= load_s)
            return {
                "submitted": len(self.sent), "answered": answered, "ok": kinds["ok"], "degraded": kinds["degraded"],
                "errors": kinds["error"], "overloaded": kinds["overloaded"], "timeouts": kinds["timeout"],
                "offered_per_s": len(self.sent) / load_s, "served_per_s": served / load_s,
                "admitted_latency_ms": percentiles(admitted, (50, 90, 99)),
                "lost": kinds["timeout"] + len(self.sent) - len(self.done),
                "duplicates": sum(1 for n in self.raw.values() if n > 1), "unexpected_answers": self.unexpected,
                "throughput": in_load / load_s, "latency_ms": percentiles(latencies, (50, 90, 99)),
                "error_examples": list(self.error_examples),
            }

    def windows(self, window_s: float, until_s: float) -> list[dict[str, Any]]:
        with self.lock:
            rows = list(self.done.values())
        out = []
        for i in range(max(1, int(np.ceil(until_s / window_s)))):
            lo, hi = i * window_s, (i + 1) * window_s
            sel = [(ms, k) for t, ms, k in rows if lo <= t < hi]
            got = [ms for ms, k in sel if k != "timeout"]
            out.append({"t0": lo, "t1": hi, "answered": len(got), "throughput": len(got) / window_s,
                        "latency_ms": percentiles(got, (50, 90, 99)),
                        "degraded": sum(k == "degraded" for _, k in sel), "errors": sum(k == "error" for _, k in sel),
                        "timeouts": sum(k == "timeout" for _, k in sel)})
        return out


class AnswerTap(Transport):
    """Sees every message a client receives before the client library deduplicates answers."""

    def __init__(self, inner: Transport, ledger: Ledger, limits: Limits | None = None) -> None:
        self.inner, self.ledger, self.node = inner, ledger, inner.node
        self.limits = limits or Limits()

    def send(self, peer: str, frames: Sequence[bytes]) -> None:
        self.inner.send(peer, frames)

    def reply(self, peer: Peer, frames: Sequence[bytes]) -> None:
        self.inner.reply(peer, frames)

    def set_idle(self, idle: bool) -> None:
        self.inner.set_idle(idle)

    def recv(self, timeout: float | None = None) -> Inbound | None:
        inbound = self.inner.recv(timeout)
        if inbound is not None:
            try:
                msg = decode(inbound.frames, self.limits)
            except WireError:
                return inbound  # the client counts and drops it
            if msg.kind in (Kind.RESULT, Kind.ERROR):
                self.ledger.tap(self.node, msg.request_ids)
        return inbound

    def close(self) -> None:
        self.inner.close()


# -- load ---------------------------------------------------------------------------------------------
def open_client(topology, name: str, cfg: StressConfig, ledger: Ledger | None, fault_seed: int = 0):
    """A connected ClientNode, tapped by ``ledger`` and behind the client faults if any."""
    from devit_mq.nodes.runtime import make_client
    from devit_mq.transport import open_transport

    transport: Transport = open_transport(topology, name, send_timeout=cfg.send_timeout_s)
    if ledger is not None:
        from devit_mq.nodes.runtime import wire_limits

        transport = AnswerTap(transport, ledger, wire_limits(topology))
        if cfg.client_faults is not None:
            transport = cfg.client_faults.wrap(transport, seed=cfg.seed * 1000 + fault_seed)
    client = make_client(topology, transport, name, timeout_s=cfg.timeout_s)
    try:
        client.connect(cfg.connect_timeout_s)
    except BaseException:
        client.close()
        raise
    return client


def _open_loop(client, images: np.ndarray, cfg: StressConfig, ledger: Ledger, end: float) -> None:
    assert cfg.rate is not None
    interval = cfg.batch_size / cfg.rate
    k = 0
    while True:
        now = time.perf_counter()
        due = ledger.t0 + k * interval
        if due >= end:
            break
        if now >= due:
            lo = (k * cfg.batch_size) % len(images)
            batch = np.take(images, range(lo, lo + cfg.batch_size), axis=0, mode="wrap")
            ledger.submit(client.name, client.submit(batch), due)
            k += 1
            continue
        ledger.record(client.name, client.collect(min(due - now, 0.05)))
    _drain(client, ledger, cfg)


def _drain(client, ledger: Ledger, cfg: StressConfig) -> None:
    """Wait for what is still in flight; the client's own timeout bounds this."""
    stop = time.perf_counter() + cfg.timeout_s + 2.0
    while client.outstanding and time.perf_counter() < stop:
        ledger.record(client.name, client.collect(0.1))


def _closed_loop_client(client, images: np.ndarray, cfg: StressConfig, ledger: Ledger, end: float,
                        offset: int, errors: list[BaseException]) -> None:
    try:
        k = offset
        while time.perf_counter() < end:
            lo = (k * cfg.batch_size) % len(images)
            batch = np.take(images, range(lo, lo + cfg.batch_size), axis=0, mode="wrap")
            ledger.submit(client.name, client.submit(batch), time.perf_counter())
            k += 1
            while client.outstanding:
                ledger.record(client.name, client.collect(0.5))
    except BaseException as exc:  # surfaced by the main thread: a crashed generator is a failed run
        errors.append(exc)


# -- the monitor: RSS samples and the kill/restart schedule --------------------------------------------
class Monitor(threading.Thread):
    def __init__(self, client, cfg: StressConfig, ledger: Ledger, end: float,
                 launcher: FaultLauncher | None) -> None:
        super().__init__(daemon=True, name="stress-monitor")
        self.client, self.cfg, self.ledger, self.end, self.launcher = client, cfg, ledger, end, launcher
        self.samples: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self.events: list[dict[str, Any]] = []
        self.status: dict = {}
        self.error: BaseException | None = None

    def _event(self, what: str, **info: Any) -> None:
        self.events.append({"t": time.perf_counter() - self.ledger.t0, "event": what, **info})

    def _sample(self) -> None:
        try:
            self.status = self.client.query_status(timeout_s=min(5.0, self.cfg.window_s))
        except Exception as exc:  # a missed sample is reported, not fatal
            self._event("status_missed", error=str(exc))
            return
        t = time.perf_counter() - self.ledger.t0
        for name, m in self.status.get("nodes", {}).items():
            if m.get("rss_mb") is not None:
                self.samples[name].append((t, float(m["rss_mb"])))

    def run(self) -> None:
        cfg, next_sample = self.cfg, self.ledger.t0
        kill_at = self.ledger.t0 + cfg.kill_at_s if cfg.kill_edge and cfg.kill_at_s is not None else None
        restart_at = kill_at + cfg.restart_after_s if kill_at and cfg.restart_after_s is not None else None
        try:
            while time.perf_counter() < self.end:
                now = time.perf_counter()
                if kill_at is not None and now >= kill_at and self.launcher is not None:
                    self._event("killed", node=cfg.kill_edge, pid=self.launcher.kill(cfg.kill_edge))
                    kill_at = None
                if restart_at is not None and now >= restart_at and self.launcher is not None:
                    self._event("restarted", node=cfg.kill_edge, pid=self.launcher.restart(cfg.kill_edge))
                    restart_at = None
                if now >= next_sample:
                    self._sample()
                    next_sample += cfg.window_s
                time.sleep(0.05)
            self._sample()
        except BaseException as exc:
            self.error = exc


def rss_summary(samples: dict[str, list[tuple[float, float]]], warmup_s: float,
                restarted: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """Per node: samples, first (after warm-up), last, max, growth %. A restarted node's series is a
    new process: its growth is not comparable and is left out."""
    out = {}
    for node, series in samples.items():
        steady = [mb for t, mb in series if t >= warmup_s] or [mb for _, mb in series]
        entry: dict[str, Any] = {"samples": [list(p) for p in series], "first_mb": steady[0], "last_mb": steady[-1],
                                 "max_mb": max(mb for _, mb in series)}
        entry["growth_pct"] = None if node in restarted else 100.0 * (steady[-1] - steady[0]) / steady[0]
        out[node] = entry
    return out


def standalone_throughput(topology, seconds: float = 2.0, seed: int = 0) -> dict[str, float]:
    """Images/s of each edge's sub-model alone in this process, with the edge's threads and
    max_batch: the ceiling a topology of such edges can sustain (the slowest one bounds it)."""
    import torch

    from devit_mq.model import load_manifest, load_submodel

    manifest = load_manifest(topology.bundle)
    out = {}
    for spec in topology.edges:
        model = load_submodel(topology.bundle, spec.submodel, manifest)
        torch.set_num_threads(spec.threads)
        images = np.random.default_rng(seed).integers(0, 256, (spec.max_batch, *manifest.input.image_shape), np.uint8)
        with torch.inference_mode():
            model.forward_prefix(manifest.input.to_tensor(images))  # warm-up
            n, start = 0, time.perf_counter()
            while n < 3 * spec.max_batch or time.perf_counter() - start < seconds:
                model.forward_prefix(manifest.input.to_tensor(images))
                n += len(images)
            out[spec.name] = n / (time.perf_counter() - start)
    return out


def run_stress(topology_path: str | Path, cfg: StressConfig, launch: bool = False,
               log_dir: Path | None = None, launcher: FaultLauncher | None = None) -> dict[str, Any]:
    """One stress run. ``launch`` starts (and finally stops) the topology; a caller that runs several
    passes ``launcher`` instead (already started, left running)."""
    from devit_mq.nodes.runtime import client_name
    from devit_mq.topology import load_topology

    topology = load_topology(topology_path)
    if topology.transport != "zmq":
        raise StressError(f"{topology_path}: transport is {topology.transport!r}; the stress tool attaches over "
                          "ZeroMQ (use a zmq variant of the topology)")
    own_launcher = launch and launcher is None
    if launcher is None and not launch and (cfg.edge_faults or cfg.kill_edge):
        raise StressError("--edge-faults and --kill-edge need --launch (the tool must start the edges)")
    if cfg.kill_edge and cfg.kill_edge not in [e.name for e in topology.edges]:
        raise StressError(f"--kill-edge {cfg.kill_edge!r}: not an edge of {topology.name!r} "
                          f"({', '.join(e.name for e in topology.edges)})")
    result: dict[str, Any] = {"kind": "stress", "topology": str(topology_path), "config": cfg.to_dict(),
                              "machine": {"cpu_count": os.cpu_count(), "loadavg": list(os.getloadavg())}}
    if cfg.client_faults or cfg.edge_faults or cfg.kill_edge:
        result["faults"] = {"client": cfg.client_faults.to_dict() if cfg.client_faults else None,
                            "edges": cfg.edge_faults.to_dict() if cfg.edge_faults else None,
                            "faulty_edges": list(cfg.faulty_edges) if cfg.faulty_edges else "all",
                            "kill": {"edge": cfg.kill_edge, "at_s": cfg.kill_at_s,
                                     "restart_after_s": cfg.restart_after_s} if cfg.kill_edge else None}
    if own_launcher:
        launcher = FaultLauncher(topology, edge_faults=cfg.edge_faults, faulty_edges=cfg.faulty_edges, seed=cfg.seed,
                                 log_dir=log_dir)
        print(f"launching {topology_path} ...", flush=True)
        launcher.start()
    clients = []
    try:
        if cfg.standalone:
            result["standalone"] = standalone_throughput(topology, seed=cfg.seed)
        ledger = Ledger()
        base = client_name(topology)  # under CURVE: client.<random>, on the shared client pair
        n_clients = cfg.clients or 1
        clients = [open_client(topology, f"{base}-{i}", cfg, ledger, fault_seed=i) for i in range(n_clients)]
        monitor_client = open_client(topology, f"{base}-monitor", cfg, None)
        clients.append(monitor_client)
        shape = tuple(monitor_client.status["image_shape"])
        images = np.random.default_rng(cfg.seed).integers(0, 256, (cfg.pool, *shape), dtype=np.uint8)
        shape_text = f"open loop {cfg.rate:g} req/s" if cfg.rate else f"{n_clients} closed-loop clients"
        print(f"load: {shape_text} for {cfg.duration:g} s", flush=True)
        for client in clients[:n_clients]:  # first requests compile codec kernels and size buffers
            client.predict(images[:2], batch_size=1, window=2)
        ledger.active = True
        ledger.t0 = time.perf_counter()
        end = ledger.t0 + cfg.duration
        monitor = Monitor(monitor_client, cfg, ledger, end, launcher)
        monitor.start()
        errors: list[BaseException] = []
        if cfg.rate is not None:
            _open_loop(clients[0], images, cfg, ledger, end)
        else:
            threads = [threading.Thread(target=_closed_loop_client,
                                        args=(c, images, cfg, ledger, end, i * 7, errors), daemon=True)
                       for i, c in enumerate(clients[:n_clients])]
            for t in threads:
                t.start()
            for t in threads:
                t.join(cfg.duration + cfg.timeout_s + 30)
        monitor.join(cfg.window_s + 10)
        if errors or monitor.error:
            raise StressError(f"load generator failed: {errors[0] if errors else monitor.error!r}")
        for client in clients[:n_clients]:
            fstats = getattr(client.transport, "stats", None)
            if fstats is not None:
                for k, v in fstats.items():
                    result.setdefault("client_fault_stats", Counter())[k] += v
        result["summary"] = ledger.summary(cfg.duration)
        result["windows"] = ledger.windows(cfg.window_s, cfg.duration)
        restarted = [e["node"] for e in monitor.events if e["event"] == "killed"]
        result["rss"] = rss_summary(monitor.samples, cfg.rss_warmup_s, restarted)
        result["events"] = monitor.events
        result["node_counters"] = {n: m.get("counters", {}) for n, m in monitor.status.get("nodes", {}).items()}
        result["status_ready_parts"] = monitor.status.get("ready")
        if launcher is not None:
            result["alive"] = launcher.alive()
        if result.get("standalone"):
            slowest = min(result["standalone"], key=result["standalone"].get)
            s = result["summary"]
            s["slowest_edge"], s["standalone_img_s"] = slowest, result["standalone"][slowest]
            s["throughput_ratio"] = s["throughput"] / s["standalone_img_s"]
        result["machine"]["loadavg_end"] = list(os.getloadavg())
        result["targets"] = report.stress_targets(result)
        return result
    finally:
        for client in clients:
            client.close()
        if own_launcher and launcher is not None:
            launcher.stop()


def run_rate_sweep(topology_path: str | Path, cfg: StressConfig, rates: Sequence[float], launch: bool = False,
                   log_dir: Path | None = None) -> dict[str, Any]:
    """Open-loop runs at each offered rate on one topology (launched once): latency vs offered load."""
    from devit_mq.topology import load_topology

    if cfg.kill_edge:
        raise StressError("--kill-edge applies to one run, not to a sweep of rates")
    launcher = None
    if launch:
        launcher = FaultLauncher(load_topology(topology_path), edge_faults=cfg.edge_faults,
                                 faulty_edges=cfg.faulty_edges, seed=cfg.seed, log_dir=log_dir)
        print(f"launching {topology_path} ...", flush=True)
        launcher.start()
    runs = []
    try:
        for i, rate in enumerate(rates):
            one = dataclasses.replace(cfg, rate=rate, clients=None, standalone=cfg.standalone and i == 0)
            runs.append(run_stress(topology_path, one, log_dir=log_dir, launcher=launcher))
    finally:
        if launcher is not None:
            launcher.stop()
    sweep = [{"offered": r["config"]["rate"], "achieved": r["summary"]["throughput"],
              "served": r["summary"]["served_per_s"],
              **{k: r["summary"][k] for k in ("latency_ms", "admitted_latency_ms", "degraded", "errors", "overloaded",
                                              "lost", "duplicates")}}
             for r in runs]
    return {"kind": "stress-sweep", "topology": str(topology_path), "sweep": sweep, "runs": runs,
            "standalone": runs[0].get("standalone") if runs else None,
            "summary": {"lost": sum(r["summary"]["lost"] for r in runs),
                        "duplicates": sum(r["summary"]["duplicates"] for r in runs)}}


def run_capacity_sweep(topology_path: str | Path, cfg: StressConfig, multiples: Sequence[float],
                       capacity_clients: int = 2, launch: bool = False, log_dir: Path | None = None) -> dict[str, Any]:
    """Behaviour past capacity, on one topology (launched once): the unloaded latency (one closed-loop
    client), the capacity (``capacity_clients`` closed-loop clients: what the system serves when
    saturated), then open loop at each multiple of that capacity. With admission control on
    (``max_queue_ms`` on the edges) the overload is answered ``overloaded`` at once, so the admitted
    requests keep their latency and the edges keep serving at capacity."""
    from devit_mq.topology import load_topology

    if cfg.kill_edge:
        raise StressError("--kill-edge applies to one run, not to a capacity sweep")
    if not multiples or min(multiples) <= 0:
        raise StressError(f"--capacity-sweep needs multiples > 0 of the capacity, got {list(multiples)}")
    topology = load_topology(topology_path)
    launcher = None
    if launch:
        launcher = FaultLauncher(topology, edge_faults=cfg.edge_faults, faulty_edges=cfg.faulty_edges, seed=cfg.seed,
                                 log_dir=log_dir)
        print(f"launching {topology_path} ...", flush=True)
        launcher.start()
    try:
        def one(**change: Any) -> dict[str, Any]:
            return run_stress(topology_path, dataclasses.replace(cfg, **change), log_dir=log_dir, launcher=launcher)

        print("== unloaded: 1 closed-loop client ==", flush=True)
        unloaded = one(clients=1, rate=None)
        print(f"== capacity: {capacity_clients} closed-loop clients ==", flush=True)
        saturated = one(clients=capacity_clients, rate=None, standalone=False)
        capacity = saturated["summary"]["served_per_s"]
        if not capacity > 0:
            raise StressError("the saturated run served nothing: no capacity to sweep against "
                              f"({saturated['summary'].get('error_examples')})")
        runs = []
        for m in multiples:
            print(f"== open loop at {m:g}x capacity ({m * capacity:.1f} req/s) ==", flush=True)
            runs.append(one(rate=m * capacity, clients=None, standalone=False))
    finally:
        if launcher is not None:
            launcher.stop()
    unloaded_p99 = unloaded["summary"]["admitted_latency_ms"].get("p99", float("nan"))
    rows = [_capacity_row(m, r["summary"], capacity, unloaded_p99) for m, r in zip(multiples, runs, strict=True)]
    everything = [unloaded, saturated, *runs]
    result = {"kind": "stress-capacity", "topology": str(topology_path), "config": cfg.to_dict(),
              "admission": {e.name: e.max_queue_ms for e in topology.edges},
              "machine": {"cpu_count": os.cpu_count(), "loadavg": unloaded["machine"]["loadavg"],
                          "loadavg_end": runs[-1]["machine"]["loadavg_end"]},
              "standalone": unloaded.get("standalone"), "capacity_per_s": capacity, "capacity_clients": capacity_clients,
              "unloaded": unloaded["summary"], "saturated": saturated["summary"], "sweep": rows,
              "summary": {"lost": sum(r["summary"]["lost"] for r in everything),
                          "duplicates": sum(r["summary"]["duplicates"] for r in everything)}}
    result["targets"] = report.capacity_targets(result)
    return result


def _capacity_row(multiple: float, s: dict[str, Any], capacity: float, unloaded_p99: float) -> dict[str, Any]:
    p99 = s["admitted_latency_ms"].get("p99", float("nan"))
    return {"multiple": multiple, "offered_per_s": s["offered_per_s"], "served_per_s": s["served_per_s"],
            "served_vs_capacity": s["served_per_s"] / capacity, "admitted_latency_ms": s["admitted_latency_ms"],
            "admitted_p99_vs_unloaded": p99 / unloaded_p99 if unloaded_p99 > 0 else float("nan"),
            **{k: s[k] for k in ("submitted", "answered", "ok", "degraded", "overloaded", "errors", "timeouts", "lost",
                                 "duplicates")}}


def shaped_topology(topology: str | Path, shapes_name: str, work_dir: Path, seed: int = 0) -> tuple[Path, str]:
    """The ZeroMQ variant of ``topology`` on a random-weight bundle of ``shapes_name`` (cached)."""
    from devit_mq.topology import load_topology

    from .bundles import ensure_bundle, shapes_named
    from .runtime import derive_topologies

    shapes = shapes_named(shapes_name, load_topology(topology, check_bundle=False).num_edges)
    work_dir.mkdir(parents=True, exist_ok=True)
    bundle = ensure_bundle(work_dir / "bundles" / shapes.name, shapes, seed=seed)
    return derive_topologies(topology, bundle, work_dir)["zmq"], shapes.describe()


def _rates(text: str) -> list[float]:
    try:
        return [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers, got {text!r}") from None


def _kill_spec(text: str | None) -> tuple[str | None, float | None]:
    if not text:
        return None, None
    name, sep, at = text.partition("@")
    try:
        return name, float(at) if sep else None
    except ValueError:
        raise StressError(f"--kill-edge takes NAME@SECONDS, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="devit-mq stress", description=(
        "Open-loop (--rate) or closed-loop (--clients) load against a ZeroMQ topology: throughput, "
        "latency per window, errors, degraded and lost requests (every id must be answered exactly once), "
        "RSS over time; optional fault injection."))
    p.add_argument("topology", help="topology YAML (ZeroMQ; with --shapes its MPI variant works too)")
    load = p.add_mutually_exclusive_group(required=True)
    load.add_argument("--rate", type=_rates, help="open loop: requests per second; a comma-separated list "
                                                   "runs one after the other (latency vs offered load)")
    load.add_argument("--clients", type=int, help="closed loop: concurrent clients, one request in flight each")
    load.add_argument("--capacity-sweep", type=_rates, metavar="MULTIPLES",
                      help="measure the unloaded latency and the capacity (closed loop), then offer open-loop "
                           "load at these multiples of the capacity, e.g. 0.5,1,2; --duration is per phase")
    p.add_argument("--capacity-clients", type=int, default=2,
                   help="closed-loop clients that measure the capacity (default 2: with max_batch 1, one "
                        "request computing and one queued per edge, so the edges never idle yet nothing "
                        "waits long enough to be refused)")
    p.add_argument("--duration", type=float, required=True, help="seconds of load")
    p.add_argument("--launch", action="store_true", help="start the topology (else attach to a running one)")
    p.add_argument("--window", type=float, default=5.0, help="seconds per reporting window")
    p.add_argument("--batch-size", type=int, default=1, help="images per request message")
    p.add_argument("--timeout", type=float, default=10.0, help="client-side answer timeout (s)")
    p.add_argument("--connect-timeout", type=float, default=60.0,
                   help="seconds to wait for a running topology's edges to be ready (attach mode)")
    p.add_argument("--send-timeout", type=float, default=0.02,
                   help="how long a send may wait for a link (s); a dead edge costs this per request")
    p.add_argument("--client-faults", default=None, metavar="SPEC",
                   help="e.g. drop=0.02,delay_ms=5,jitter_ms=5,duplicate=0.02,corrupt=0.01,peers=edge0")
    p.add_argument("--edge-faults", default=None, metavar="SPEC", help="the same on the edges' sends (--launch)")
    p.add_argument("--faulty-edges", default=None, metavar="NAMES", help="comma-separated edges that get "
                   "--edge-faults (default: all)")
    p.add_argument("--kill-edge", default=None, metavar="NAME@SECONDS", help="SIGKILL an edge mid-run (--launch)")
    p.add_argument("--restart-after", type=float, default=None, help="restart the killed edge after this many s")
    p.add_argument("--no-standalone", action="store_true", help="skip timing the edges' sub-models standalone")
    p.add_argument("--shapes", choices=SHAPES, default=None,
                   help="with --launch: run the topology's nodes on a random-weight bundle of these shapes (as "
                        "'devit-mq bench' does: 'issue' = ViT-Ti/16-sized edges at 224x224) instead of its bundle")
    p.add_argument("--work-dir", type=Path, default=Path("runs/bench"), help="bundle cache for --shapes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", type=Path, default=None, help="node logs with --launch")
    p.add_argument("--json", type=Path, default=None, help="write the result as JSON")
    # a killed edge or injected faults make every affected send log a warning: expected here, so
    # only errors by default (-v logs every failed send and dropped message)
    add_log_arguments(p, default_level="error")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG (needs matplotlib)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    from devit_mq.nodes.client import ClientError
    from devit_mq.nodes.launcher import LaunchError
    from devit_mq.topology import TopologyError

    try:
        kill_edge, kill_at = _kill_spec(args.kill_edge)
        cfg = StressConfig(
            duration=args.duration, rate=args.rate[0] if args.rate else None,
            clients=1 if args.capacity_sweep else args.clients,  # each phase of a sweep sets its own load
            window_s=args.window,
            batch_size=args.batch_size, timeout_s=args.timeout, send_timeout_s=args.send_timeout, seed=args.seed,
            connect_timeout_s=args.connect_timeout,
            standalone=not args.no_standalone,
            client_faults=FaultSpec.parse(args.client_faults) if args.client_faults else None,
            edge_faults=FaultSpec.parse(args.edge_faults) if args.edge_faults else None,
            faulty_edges=tuple(n for n in args.faulty_edges.split(",") if n) if args.faulty_edges else None,
            kill_edge=kill_edge, kill_at_s=kill_at if kill_at is not None else (args.duration / 3 if kill_edge else None),
            restart_after_s=args.restart_after)
        topology_path, bundle_note = args.topology, None
        if args.shapes:
            if not args.launch:
                raise StressError("--shapes needs --launch (the nodes must be started on the built bundle)")
            topology_path, bundle_note = shaped_topology(args.topology, args.shapes, args.work_dir, args.seed)
        if args.capacity_sweep:
            result = run_capacity_sweep(topology_path, cfg, args.capacity_sweep, args.capacity_clients,
                                        launch=args.launch, log_dir=args.log_dir)
        elif args.rate and len(args.rate) > 1:
            result = run_rate_sweep(topology_path, cfg, args.rate, launch=args.launch, log_dir=args.log_dir)
        else:
            result = run_stress(topology_path, cfg, launch=args.launch, log_dir=args.log_dir)
        if bundle_note:
            result["bundle"] = bundle_note
    except (StressError, FaultSpecError, TopologyError, ClientError, LaunchError, OSError) as exc:
        print(f"devit-mq stress: error: {exc}", file=sys.stderr)
        return 2
    result["command"] = "devit-mq stress " + " ".join(argv)
    sweep = result["kind"] == "stress-sweep"
    markdown = {"stress-sweep": report.sweep_markdown, "stress-capacity": report.capacity_markdown}
    print(markdown.get(result["kind"], report.stress_markdown)(result))
    if args.json:
        print(f"JSON: {report.write_json(args.json, result)}")
    if args.plot and result["kind"] != "stress-capacity":
        print(report.try_plot(report.plot_sweep if sweep else report.plot_stress, result, args.plot))
    s = result["summary"]
    return 0 if s["lost"] == 0 and s["duplicates"] == 0 else 1
