"""Prometheus ``/metrics`` for a node (the topology's ``metrics_port``), with prometheus_client.

Nothing here runs on the node's hot path: the loop keeps updating its own :class:`~devit_mq.metrics.Metrics`
(plain counters and cumulative histograms), and :class:`NodeCollector` turns a snapshot of them into
metric families only when Prometheus scrapes, on prometheus_client's server thread. Copying a dict or
a list is atomic under the GIL, so a scrape never sees a half-updated counter map.

Why prometheus_client rather than writing the text format by hand: it is the reference
implementation of the exposition format (escaping, ``_total``/``_bucket``/``+Inf`` conventions,
OpenMetrics negotiation), it serves HTTP on a daemon thread, and its ``ProcessCollector`` reports the
process's CPU seconds, RSS, open files and start time the way every Prometheus dashboard expects.

Every family is labelled ``node`` (the topology's node name), so one Prometheus job can scrape a
whole topology. The names (see the README's table):

- ``devit_mq_node_info`` (gauge, 1): ``role``, ``version``, ``executor``, ``part``, ``codec``
- ``devit_mq_requests_total`` (aggregator): ``outcome`` = ``ok`` | ``degraded`` | ``error``, ``code``
  (the error code, ``""`` otherwise)
- ``devit_mq_stage_seconds`` (histogram): ``stage`` = ``queue`` and ``compute`` (edges), ``fuse``,
  ``hold`` (first features in -> fused) and ``e2e`` (client sent -> fused, on the client's and the
  aggregator's wall clocks) (aggregator)
- ``devit_mq_batch_size`` (histogram): ``stage`` = ``compute`` (an edge's forward) | ``fuse``
- ``devit_mq_queue_depth`` (gauge): images an edge holds for its next batch; requests the
  aggregator waits on
- ``devit_mq_link_bytes_total``: ``src``, ``dst`` (header + payload bytes per direction of a link)
- ``devit_mq_wire_errors_total``, ``devit_mq_unauthorized_total``, ``devit_mq_handler_errors_total``
  (handler and loop-step errors), ``devit_mq_send_failures_total`` (``peer``)
- ``devit_mq_events_total``: ``event``, every counter the node keeps (the raw telemetry counters)
- ``devit_mq_uptime_seconds``, ``devit_mq_peak_rss_bytes``; and prometheus_client's
  ``process_cpu_seconds_total``, ``process_resident_memory_bytes``, ``process_open_fds``, ...
"""

from __future__ import annotations

import resource
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import start_http_server

from devit_mq import __version__

from . import COUNT_STAGES, Histogram

if TYPE_CHECKING:
    from devit_mq.nodes.base import NodeBase

PREFIX = "devit_mq"
# counters with a family of their own (all counters also appear in devit_mq_events_total)
_ERROR_FAMILIES = {"wire_errors": "wire_errors", "unauthorized": "unauthorized",
                   "handler_errors": "handler_errors", "loop_errors": "handler_errors"}


def _buckets(hist: Histogram) -> list[tuple[str, float]]:
    """Cumulative ``(le, count)`` pairs from a histogram's per-bucket counts (copied first: the
    node's loop may add a sample meanwhile)."""
    counts = list(hist.counts)
    out, running = [], 0
    for bound, n in zip((*hist.bounds, float("inf")), counts, strict=True):
        running += n
        out.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
    return out


class NodeCollector:
    """The figures of one node as Prometheus metric families, built at scrape time."""

    def __init__(self, node: NodeBase) -> None:
        self.node = node

    def collect(self) -> Iterator[Any]:
        node, m = self.node, self.node.metrics
        name = node.name
        counters = dict(m.counters)
        yield self._info()

        requests = CounterMetricFamily(f"{PREFIX}_requests", "Requests answered, by outcome (aggregator)",
                                       labels=["node", "outcome", "code"])
        if node.role == "aggregator":
            degraded = counters.get("degraded", 0)
            requests.add_metric([name, "ok", ""], max(0, counters.get("answered", 0) - degraded))
            requests.add_metric([name, "degraded", ""], degraded)
            for key, n in counters.items():
                if key.startswith("errors."):
                    requests.add_metric([name, "error", key.removeprefix("errors.")], n)
        yield requests

        stages = HistogramMetricFamily(f"{PREFIX}_stage_seconds", "Time per stage of a request",
                                       labels=["node", "stage"])
        batches = HistogramMetricFamily(f"{PREFIX}_batch_size", "Images per edge forward / requests per fusion",
                                        labels=["node", "stage"])
        for stage, hist in list(m.histograms.items()):
            buckets = _buckets(hist)
            if stage in COUNT_STAGES:
                batches.add_metric([name, "fuse" if stage == "fuse_batch" else "compute"], buckets, hist.total)
            else:
                stages.add_metric([name, stage], buckets, hist.total)
        yield stages
        yield batches

        depth = GaugeMetricFamily(f"{PREFIX}_queue_depth", "Requests (images) this node holds now",
                                  labels=["node"])
        depth.add_metric([name], node.queue_depth())
        yield depth

        link = CounterMetricFamily(f"{PREFIX}_link_bytes", "Bytes per direction of a link (header + payload)",
                                   labels=["node", "src", "dst"])
        for key, n in dict(m.bytes).items():
            src, _, dst = key.partition("->")
            link.add_metric([name, src, dst], n)
        yield link

        yield from self._errors(name, counters)
        events = CounterMetricFamily(f"{PREFIX}_events", "Every counter the node keeps", labels=["node", "event"])
        for key, n in counters.items():
            events.add_metric([name, key], n)
        yield events

        uptime = GaugeMetricFamily(f"{PREFIX}_uptime_seconds", "Seconds since the node started", labels=["node"])
        uptime.add_metric([name], time.time() - m.started)
        yield uptime
        peak = GaugeMetricFamily(f"{PREFIX}_peak_rss_bytes", "Largest resident memory of the process so far",
                                 labels=["node"])
        peak.add_metric([name], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # KiB on Linux
        yield peak

    def _info(self) -> GaugeMetricFamily:
        info = dict(self.node.metrics.info)
        labels = {"role": self.node.role, "version": __version__, "executor": str(info.get("executor", "")),
                  "part": str(info.get("part", "")), "codec": str(info.get("codec", ""))}
        fam = GaugeMetricFamily(f"{PREFIX}_node_info", "What the node runs (value 1)",
                                labels=["node", *labels])
        fam.add_metric([self.node.name, *labels.values()], 1)
        return fam

    @staticmethod
    def _errors(name: str, counters: dict[str, int]) -> Iterator[CounterMetricFamily]:
        families = {fam: CounterMetricFamily(f"{PREFIX}_{fam}", f"{fam.replace('_', ' ').capitalize()}",
                                             labels=["node"]) for fam in dict.fromkeys(_ERROR_FAMILIES.values())}
        totals = dict.fromkeys(families, 0)
        for key, fam in _ERROR_FAMILIES.items():
            totals[fam] += counters.get(key, 0)
        for fam, total in totals.items():
            families[fam].add_metric([name], total)
        yield from families.values()
        failures = CounterMetricFamily(f"{PREFIX}_send_failures", "Sends that failed, by peer",
                                       labels=["node", "peer"])
        for key, n in counters.items():
            if key.startswith("send_failed."):
                failures.add_metric([name, key.removeprefix("send_failed.")], n)
        yield failures


class MetricsServer:
    """``/metrics`` of one node on ``(host, port)``, served from a daemon thread until :meth:`close`."""

    def __init__(self, node: NodeBase, host: str, port: int) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(NodeCollector(node))
        ProcessCollector(registry=self.registry)
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.host, self.port = host, self._server.server_address[1]  # the port bound (0 asks for any)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self._server is not None:
                self._server.shutdown()
                self._server.server_close()
                self._server = None


def serve_metrics(node: NodeBase, host: str, port: int) -> MetricsServer:
    """Start serving ``node``'s metrics; an address that cannot be bound raises :class:`OSError`."""
    node.metrics_server = MetricsServer(node, host, port)
    return node.metrics_server
