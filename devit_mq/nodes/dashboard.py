"""``devit-mq dashboard``: one live web page of a running topology, from the status module's query.

A poller thread asks the aggregator for its status once per second (:class:`~devit_mq.nodes.status.
StatusProbe`: a status-only connection, no hello, nothing bound) and turns counter deltas into rates:
answers, degraded answers and errors per second on the aggregator, computed images, errors and link
bytes per second on each edge, next to each node's compute (edges) or fuse (aggregator) p50. The last
:data:`HISTORY` polls of each figure are kept for sparklines.

The server (stdlib :mod:`http.server`, a thread per request) serves ``/`` (one self-contained page:
inline SVG, CSS and script, no external asset, so it works on closed networks) and ``/api/state``
(the JSON the page draws, refreshed every second). Page elements carry stable ids and data
attributes for tests and scrapers: ``#banner[data-state=ready|degraded|unreachable|stale]``,
``g[data-node=NAME][data-state=ready|down|never|unreachable]``, ``[data-link="A->B"]``.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import signal
import threading
import time
from collections import deque
from dataclasses import asdict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from devit_mq.logs import add_log_arguments, setup_logging
from devit_mq.topology import Topology

from .cli import add_keys_argument
from .status import (
    COMMON_COUNTERS,
    StatusProbe,
    StatusReport,
    build_report,
    load,
    query_status,
)

log = logging.getLogger("devit_mq.dashboard")

DEFAULT_PORT = 8765
DEFAULT_HOST = "127.0.0.1"
POLL_S = 1.0
HISTORY = 60  # polls kept per figure (a minute at one poll per second)
CLIENTS = "clients"  # the diagram's node for every client (the aggregator does not list them)

#: the figures drawn per role: series name -> title on the page
SERIES = {
    "edge": {"p50_ms": "compute p50 ms", "images_per_s": "images/s", "errors_per_s": "errors/s",
             "bytes_per_s": "link B/s"},
    "aggregator": {"answers_per_s": "answers/s", "degraded_per_s": "degraded/s", "errors_per_s": "errors/s",
                   "p50_ms": "fuse p50 ms"},
}


def _errors(node) -> int:
    return sum(node.errors.values()) + sum(node.counters.get(k, 0) for k in COMMON_COUNTERS)


def _rate(now: int | None, before: int | None, dt: float) -> float | None:
    if now is None or before is None or dt <= 0:
        return None
    return max(0, now - before) / dt  # a node that restarted counts from 0 again: no negative rate


class Dashboard:
    """The state the page draws: the latest report, rates from the previous one, and history."""

    def __init__(self, topology: Topology, timeout_s: float = 0.8, history: int = HISTORY) -> None:
        self.topology = topology
        self.timeout_s = timeout_s
        self.series: dict[str, dict[str, deque]] = {}
        self.history = history
        self._lock = threading.Lock()
        self._previous: tuple[float, dict[str, int]] | None = None
        self._state: dict[str, Any] = self._empty()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.polls = 0

    def _empty(self) -> dict[str, Any]:
        t = self.topology
        return {"topology": t.name, "time": time.time(), "reachable": None, "exit_code": None,
                "summary": "waiting for the first status reply", "poll_s": POLL_S, "nodes": [], "links": [],
                "edges": [e.name for e in sorted(t.edges, key=lambda e: e.submodel or 0)],
                "aggregator": t.aggregator.name, "endpoint": t.aggregator.connect_endpoint, "series_titles": SERIES}

    # -- polling ----------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dashboard-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout_s + 5)

    def _run(self) -> None:
        probe = None
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    if probe is None:
                        probe = StatusProbe(self.topology, send_timeout_s=self.timeout_s)
                    report = query_status(self.topology, self.timeout_s, probe)
                except Exception as exc:  # noqa: BLE001 -- e.g. a key file that vanished: shown, retried
                    log.warning("status query failed: %s", exc)
                    if probe is not None:
                        probe.close()
                        probe = None
                    report = build_report(self.topology, None, error=f"{type(exc).__name__}: {exc}")
                self.update(report)
                self._stop.wait(max(0.0, POLL_S - (time.monotonic() - started)))
        finally:
            if probe is not None:
                probe.close()

    def update(self, report: StatusReport, now: float | None = None) -> dict[str, Any]:
        """Fold one report into the state (rates from the previous report's counters)."""
        now = time.monotonic() if now is None else now
        counters = self._flat_counters(report)
        dt = now - self._previous[0] if self._previous else 0.0
        before = self._previous[1] if self._previous else {}

        def rate(key: str) -> float | None:
            return _rate(counters.get(key), before.get(key), dt)

        agg = report.aggregator
        nodes, links = [], []
        for node in report.nodes:
            if node.role == "edge":
                # a silent edge's telemetry is its last heartbeat's: its latency is unknown now
                p50 = node.compute_p50_ms if node.state == "ready" else None
                figures = {"p50_ms": p50, "images_per_s": rate(f"{node.name}:images"),
                           "errors_per_s": rate(f"{node.name}:errors"),
                           "bytes_per_s": rate(f"{agg}:bytes:{node.name}->{agg}")}
                links += [{"from": CLIENTS, "to": node.name, "bytes_per_s": rate(f"{node.name}:bytes:other->{node.name}"),
                           "state": node.state},
                          {"from": node.name, "to": agg, "bytes_per_s": figures["bytes_per_s"], "state": node.state}]
            else:
                figures = {"answers_per_s": rate(f"{agg}:answered"), "degraded_per_s": rate(f"{agg}:degraded"),
                           "errors_per_s": rate(f"{agg}:errors"), "p50_ms": node.compute_p50_ms}
            series = self.series.setdefault(node.name, {})
            for key, value in figures.items():
                series.setdefault(key, deque(maxlen=self.history)).append(
                    None if value is None or not report.reachable else round(value, 3))
            nodes.append({**asdict(node), "now": figures, "series": {k: list(v) for k, v in series.items()}})
        answers = rate(f"{agg}:bytes:{agg}->other")
        links.append({"from": agg, "to": CLIENTS, "bytes_per_s": answers,
                      "state": "ready" if report.reachable else "unreachable"})
        state = {**self._empty(), "time": report.time, "reachable": report.reachable, "exit_code": report.exit_code,
                 "summary": report.summary, "error": report.error, "pending": report.pending,
                 "silence_s": report.silence_s, "query_ms": report.query_ms, "nodes": nodes, "links": links,
                 "polls": self.polls + 1}
        if report.reachable:
            self._previous = (now, counters)
        with self._lock:
            self._state = state
            self.polls += 1
        return state

    @staticmethod
    def _flat_counters(report: StatusReport) -> dict[str, int]:
        out: dict[str, int] = {}
        for node in report.nodes:
            if not node.counters:
                continue
            out.update({f"{node.name}:{k}": v for k, v in node.counters.items()})
            out[f"{node.name}:errors"] = _errors(node)
            out.update({f"{node.name}:bytes:{k}": v for k, v in node.bytes.items()})
        return out

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {**self._state, "served": time.time()}


# -- serving --------------------------------------------------------------------------------------
def page() -> bytes:
    return resources.files("devit_mq").joinpath("assets", "dashboard.html").read_bytes()


def make_server(dashboard: Dashboard, host: str, port: int) -> ThreadingHTTPServer:
    html = page()

    class Handler(BaseHTTPRequestHandler):
        server_version = "devit-mq-dashboard"

        def do_GET(self) -> None:  # noqa: N802 -- the stdlib's name
            path = self.path.split("?", 1)[0]
            if path in ("/", "/index.html"):
                self._send(html, "text/html; charset=utf-8")
            elif path == "/api/state":
                self._send(json.dumps(dashboard.state()).encode(), "application/json")
            else:
                self._send(b"not found\n", "text/plain", HTTPStatus.NOT_FOUND)

        def _send(self, body: bytes, content_type: str, code: HTTPStatus = HTTPStatus.OK) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("%s %s", self.address_string(), fmt % args)

    ThreadingHTTPServer.daemon_threads = True
    return ThreadingHTTPServer((host, port), Handler)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="devit-mq dashboard", description=(
        "Serve a live page of a running ZeroMQ topology: its nodes and links, each edge colored by state, "
        "sparklines of latency, throughput, degraded and error rates and link bytes/s; /api/state is the "
        "JSON behind it. It polls the aggregator's status once per second (no side effect). SIGINT or "
        "SIGTERM stops it."))
    p.add_argument("topology")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}; "
                                                        "0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0 picks a free one")
    p.add_argument("--timeout", type=float, default=0.8, help="seconds each status query waits (default 0.8)")
    add_keys_argument(p)
    add_log_arguments(p)
    args = p.parse_args(argv)
    setup_logging(args)
    from .cli import _fail, _one_line, _user_errors

    try:
        topology = load(args.topology, args.keys_dir)
        StatusProbe(topology).close()  # missing CURVE keys are a one-line error now, not a warning per poll
    except _user_errors() as exc:
        return _fail(_one_line(exc))
    board = Dashboard(topology, args.timeout)
    try:
        server = make_server(board, args.host, args.port)
    except OSError as exc:
        why = "the port is already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        return _fail(f"cannot listen on {args.host}:{args.port}: {why}")
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("signal %d: stopping the dashboard", signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    board.start()
    serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="dashboard-http",
                               daemon=True)
    serving.start()
    host, port = server.server_address[:2]
    print(f"dashboard of {topology.name} on http://{host}:{port}/ (state: /api/state); Ctrl-C stops it",
          flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.shutdown()
        server.server_close()
        board.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    print("dashboard stopped", flush=True)
    return 0
