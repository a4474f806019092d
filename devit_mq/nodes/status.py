"""``devit-mq status``: every node's state from one status query to the aggregator.

One :class:`~devit_mq.protocol.StatusQuery` over a connection of its own, under a fresh client name
(``client.<random>`` under CURVE, with the shared ``client`` key pair): a probe never says hello, so
the aggregator binds nothing to it and no other client's name is blocked or taken over; nothing on
the running topology changes. The aggregator's reply says which parts ever said ready, how long ago
each edge was last heard from, the silence after which an edge counts as down, and the latest
telemetry of every node (its own and the edges' heartbeats).

Exit codes (what a Docker ``HEALTHCHECK`` or a Kubernetes exec probe reads): 0 every part ready,
1 the aggregator answers but an edge is missing or silent (degraded answers), 2 the aggregator does
not answer within ``--timeout`` (or the topology file is unusable). ``--degraded-ok`` turns 1 into 0,
for liveness probes; ``--node NAME`` answers for one node (0 ready, 1 not ready, 2 no answer), a
node container's own health check. The probe connects to the aggregator only, never to an edge.

:class:`StatusProbe` keeps its connection open between queries, for the dashboard's poller.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from devit_mq.protocol import ADMIN_KEY, Status, StatusQuery, Telemetry
from devit_mq.topology import Topology, load_topology

DEFAULT_TIMEOUT_S = 3.0

READY, DOWN, NEVER, UNREACHABLE = "ready", "down", "never", "unreachable"
EXIT_READY, EXIT_DEGRADED, EXIT_UNREACHABLE = 0, 1, 2

#: counters a report names for each role (0 when the node never counted them)
COMMON_COUNTERS = ("wire_errors", "unauthorized", "handler_errors")
KEY_COUNTERS = {"aggregator": ("answered", "degraded", *COMMON_COUNTERS), "edge": ("images", *COMMON_COUNTERS)}


@dataclass
class NodeState:
    """One node as the aggregator sees it. ``state``: ``ready``, ``down`` (heard from, then silent
    for longer than the silence window), ``never`` (never said ready), or ``unreachable`` (the
    aggregator itself did not answer; nothing is known of the edges then)."""

    name: str
    role: str
    state: str
    part: int | None = None
    last_heard_s: float | None = None  # edges: seconds since the aggregator heard from it (None: never)
    executor: str | None = None
    version: str | None = None
    pid: int | None = None
    rss_mb: float | None = None
    cpu_s: float | None = None
    uptime_s: float | None = None
    compute_p50_ms: float | None = None  # edges: compute; aggregator: fuse
    counters: dict[str, int] = field(default_factory=dict)  # KEY_COUNTERS of its role
    errors: dict[str, int] = field(default_factory=dict)  # aggregator: errors.<code>; edges: their error counters
    bytes: dict[str, int] = field(default_factory=dict)  # link "a->b" -> bytes this node counted


@dataclass
class StatusReport:
    topology: str
    aggregator: str
    endpoint: str | None
    reachable: bool
    exit_code: int
    summary: str
    nodes: list[NodeState]
    pending: int = 0
    silence_s: float = 0.0
    instance: str = ""
    query_ms: float = 0.0
    error: str | None = None
    time: float = field(default_factory=time.time)

    @property
    def edges(self) -> list[NodeState]:
        return [n for n in self.nodes if n.role == "edge"]

    def node_exit_code(self, name: str) -> int:
        """The exit code for one node (``status --node``): 0 it is ready, 1 the aggregator answers
        but that node is not ready, 2 the aggregator does not answer."""
        if not self.reachable:
            return EXIT_UNREACHABLE
        return EXIT_READY if next(n for n in self.nodes if n.name == name).state == READY else EXIT_DEGRADED

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- querying ---------------------------------------------------------------------------------------
def probe_name(topology: Topology, node: str | None = None) -> str:
    """A fresh random client name per probe. Under CURVE it goes by the first key pair this host
    holds of: the shared ``client`` pair, the operator's ``admin`` pair, ``node``'s own, or any
    server's of the topology (a health check inside a node's container, which holds only that
    node's secret): ``KEY.<random>``."""
    from devit_mq.transport.security import CLIENT_KEY, key_files

    from .client import default_client_name
    from .runtime import client_name

    sec = topology.security
    if sec.curve and sec.keys_dir is not None:
        servers = [n.name for n in topology.nodes if n.role != "client"]
        for key in (CLIENT_KEY, ADMIN_KEY, *([node] if node else []), *servers):
            if key_files(Path(sec.keys_dir), key)[1].is_file():
                return f"{key}.{default_client_name()}"
    return client_name(topology)


class StatusProbe:
    """A status-only client of ``topology``: :meth:`query` asks the aggregator for a :class:`Status`
    (None when it does not answer in time). It never says hello, so it binds no client name."""

    def __init__(self, topology: Topology, name: str | None = None, send_timeout_s: float = DEFAULT_TIMEOUT_S,
                 node: str | None = None) -> None:
        from dataclasses import replace

        from devit_mq.transport.zmq import ZmqTransport

        from .client import ClientNode
        from .runtime import roster, wire_limits

        self.topology = topology
        self.name = name or probe_name(topology, node)
        # the aggregator only: a probe opens no connection to any edge
        plan = topology.route_plan(self.name)
        plan = replace(plan, links=tuple(link for link in plan.links if link.peer == topology.aggregator.name))
        transport = ZmqTransport(topology, self.name, send_timeout=max(0.05, send_timeout_s), plan=plan)
        self.node = ClientNode(self.name, transport, roster(topology), limits=wire_limits(topology))
        self.problem: str | None = None

    def query(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> Status | None:
        """The aggregator's reply, or None (:attr:`problem` says why)."""
        deadline = time.monotonic() + timeout_s
        while self.node.receive(0) is not None:  # a late reply to an earlier query: not this one's
            pass
        if not self.node.control(self.node.aggregator, StatusQuery(), expect_failure=True):
            self.problem = "no connection (nothing accepts connections there, or it refused this key)"
            return None
        while (left := deadline - time.monotonic()) > 0:
            msg = self.node.receive(left)
            if msg is not None and isinstance(msg.meta, Status):
                self.problem = None
                return msg.meta
        self.problem = f"no status reply within {timeout_s:g}s"
        return None

    def close(self) -> None:
        self.node.close()

    def __enter__(self) -> StatusProbe:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _counters(t: Telemetry | None, role: str) -> tuple[dict[str, int], dict[str, int]]:
    if t is None:
        return {}, {}
    c = t.counters
    counters = {k: int(c.get(k, 0)) for k in KEY_COUNTERS[role]}
    if role == "aggregator":
        errors = {k.split(".", 1)[1]: int(v) for k, v in c.items() if k.startswith("errors.")}
    else:
        errors = {k: int(c.get(k, 0)) for k in ("compute_errors", "bad_images", "overloaded", "loop_errors")
                  if c.get(k, 0)}
    return counters, errors


def _node_state(name: str, role: str, state: str, t: Telemetry | None, part: int | None = None,
                heard: float | None = None) -> NodeState:
    counters, errors = _counters(t, role)
    stage = (t.stages_ms.get("compute" if role == "edge" else "fuse") if t is not None else None)
    info = t.info if t is not None else {}
    executor = info.get("executor") if role == "edge" else None
    return NodeState(
        name=name, role=role, state=state, part=part, last_heard_s=heard,
        executor=None if executor is None else str(executor),
        version=(t.version or None) if t is not None else None, pid=(t.pid or None) if t is not None else None,
        rss_mb=round(t.rss_mb, 1) if t is not None else None, cpu_s=round(t.cpu_s, 2) if t is not None else None,
        uptime_s=round(t.uptime_s, 1) if t is not None else None,
        compute_p50_ms=round(stage.p50, 3) if stage is not None and stage.n else None,
        counters=counters, errors=errors, bytes=dict(t.bytes) if t is not None else {})


def edge_state(status: Status, part: int) -> tuple[str, float | None]:
    """``(state, seconds since last heard or None)`` of ``part``'s edge: ready iff it ever said ready
    and was heard from within the silence window."""
    heard = status.last_heard_s[part] if part < len(status.last_heard_s) else -1.0
    if part in status.ready and 0 <= heard <= status.silence_s:
        return READY, heard
    if heard < 0 and part not in status.ready:
        return NEVER, None
    return DOWN, heard if heard >= 0 else None


def build_report(topology: Topology, status: Status | None, query_ms: float = 0.0,
                 error: str | None = None) -> StatusReport:
    """The typed report of one status reply (``None``: the aggregator did not answer)."""
    agg = topology.aggregator
    edges = sorted(topology.edges, key=lambda e: e.submodel or 0)
    common = {"topology": topology.name, "aggregator": agg.name, "endpoint": agg.connect_endpoint}
    if status is None:
        nodes = [NodeState(agg.name, "aggregator", UNREACHABLE)]
        nodes += [NodeState(e.name, "edge", UNREACHABLE, part=e.submodel) for e in edges]
        why = error or "no answer"
        return StatusReport(**common, reachable=False, exit_code=EXIT_UNREACHABLE, nodes=nodes, query_ms=query_ms,
                            summary=f"UNREACHABLE: aggregator {agg.name!r} at {agg.connect_endpoint}: {why}",
                            error=why)
    nodes = [_node_state(agg.name, "aggregator", READY, status.nodes.get(agg.name))]
    for e in edges:
        state, heard = edge_state(status, e.submodel or 0)
        nodes.append(_node_state(e.name, "edge", state, status.nodes.get(e.name), e.submodel, heard))
    not_ready = [n for n in nodes if n.state != READY]
    if not_ready:
        code = EXIT_DEGRADED
        summary = (f"DEGRADED: {len(edges) - len(not_ready)} of {len(edges)} edges ready; "
                   + ", ".join(f"{n.name} {n.state}" for n in not_ready))
    else:
        code, summary = EXIT_READY, f"READY: all {len(edges)} edges ready"
    return StatusReport(**common, reachable=True, exit_code=code, summary=summary, nodes=nodes,
                        pending=status.pending, silence_s=status.silence_s, instance=status.instance,
                        query_ms=query_ms)


def query_status(topology: Topology, timeout_s: float = DEFAULT_TIMEOUT_S, probe: StatusProbe | None = None,
                 node: str | None = None) -> StatusReport:
    """Ask ``topology``'s aggregator once (over ``probe``, else a connection opened for this call;
    ``node``: the node whose key pair a probe may fall back on under CURVE)."""
    start = time.perf_counter()
    own = probe is None
    if probe is None:
        probe = StatusProbe(topology, send_timeout_s=timeout_s, node=node)
    try:
        status = probe.query(timeout_s)
    finally:
        if own:
            probe.close()
    ms = round((time.perf_counter() - start) * 1e3, 1)
    return build_report(topology, status, ms, probe.problem)


# -- rendering --------------------------------------------------------------------------------------
def _fmt(value: Any, spec: str = "", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def render_text(report: StatusReport) -> str:
    head = f"{report.topology}: {report.summary}"
    if report.reachable:
        head += (f" (aggregator {report.endpoint} answered in {report.query_ms:g} ms; pending {report.pending}; "
                 f"an edge silent > {report.silence_s:g}s is down)")
    cols = ("NODE", "ROLE", "STATE", "HEARD", "EXECUTOR", "VERSION", "PID", "RSS_MB", "UPTIME", "P50_MS",
            "ANSWERED", "DEGRADED", "IMAGES", "ERRORS", "WIRE_ERR", "UNAUTH", "HANDLER_ERR")
    rows = [cols]
    for n in report.nodes:
        c = n.counters
        errors = ",".join(f"{k}={v}" for k, v in sorted(n.errors.items())) or ("0" if c else "-")
        heard = _age(n.last_heard_s) if n.role == "edge" else "-"
        rows.append((n.name, n.role, n.state, heard, _fmt(n.executor), _fmt(n.version), _fmt(n.pid),
                     _fmt(n.rss_mb, ".1f"), _age(n.uptime_s), _fmt(n.compute_p50_ms, ".2f"),
                                  *(_fmt(c.get(k)) for k in ("answered", "degraded", "images")), errors,
                     *(_fmt(c.get(k)) for k in COMMON_COUNTERS)))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(cols))]
    table = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join([head, *table])


def render_json(report: StatusReport) -> str:
    return json.dumps(report.to_dict(), indent=1, sort_keys=False)


# -- command line -----------------------------------------------------------------------------------
def load(path: str | Path, keys_dir: str | Path | None = None) -> Topology:
    """A ZeroMQ topology for a status query; the bundle need not be on this host (a probe in its
    own container); ``keys_dir`` replaces the file's ``security.keys_dir`` (this host's keys):
    :class:`TopologyError` for anything unusable."""
    from devit_mq.topology import TopologyError

    topology = load_topology(path, check_bundle=False, keys_dir=keys_dir)
    if topology.transport != "zmq":
        raise TopologyError([("transport", f"status queries need a ZeroMQ topology, this one is {topology.transport!r} "
                                           "(an MPI job reports through its client rank)")], topology.source)
    return topology


def main(argv: list[str]) -> int:
    from .cli import add_keys_argument

    p = argparse.ArgumentParser(prog="devit-mq status", description=(
        "Ask a running ZeroMQ topology's aggregator for every node's state (one status query: no hello, "
        "no side effect). Exit 0: every part ready; 1: the aggregator answers but an edge is missing or "
        "silent; 2: the aggregator does not answer within --timeout, or the topology is unusable."))
    p.add_argument("topology")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help=f"seconds to wait for the aggregator (default {DEFAULT_TIMEOUT_S:g})")
    p.add_argument("--node", default=None, metavar="NAME",
                   help="report on one node: exit 0 when NAME is ready, 1 when the aggregator answers but NAME "
                        "is not ready, 2 when the aggregator does not answer (a node's own health check)")
    add_keys_argument(p)
    p.add_argument("--degraded-ok", action="store_true",
                   help="exit 0 also when degraded: only an unreachable aggregator fails (a liveness probe "
                        "that must not restart the aggregator because an edge is down)")
    args = p.parse_args(argv)
    from .cli import _fail, _one_line, _user_errors

    if not args.timeout > 0:
        return _fail(f"--timeout must be > 0, got {args.timeout:g}")
    try:
        topology = load(args.topology, args.keys_dir)
        if args.node is not None and args.node not in {n.name for n in topology.nodes if n.role != "client"}:
            names = ", ".join(n.name for n in topology.nodes if n.role != "client")
            return _fail(f"{args.topology}: no node named {args.node!r} (nodes: {names})")
        report = query_status(topology, args.timeout, node=args.node)
    except _user_errors() as exc:
        return _fail(_one_line(exc))
    print(render_json(report) if args.json else render_text(report), flush=True)
    if args.node is not None:
        return report.node_exit_code(args.node)
    if args.degraded_ok and report.exit_code == EXIT_DEGRADED:
        return EXIT_READY
    return report.exit_code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
