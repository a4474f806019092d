"""Per-stage timers, counters, bytes per link and process resource usage, reported as plain dicts/JSON."""

from __future__ import annotations

import bisect
import json
import os
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from devit_mq import __version__
from devit_mq.protocol import (
    MAX_COUNTERS,
    MAX_INFO,
    MAX_KEY_LEN,
    MAX_LINKS,
    MAX_STAGES,
    OTHER,
    Percentiles,
    Telemetry,
    to_builtins,
)

__all__ = ["Metrics", "percentiles", "process_age_s", "process_usage", "rapl_energy_uj"]

_RAPL_ROOT = Path("/sys/class/powercap")


#: histogram bucket upper bounds (Prometheus ``le``): seconds for timed stages, counts for batch sizes
LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                     2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
COUNT_STAGES = frozenset({"batch_size", "fuse_batch"})  # stages whose samples are counts, not seconds


class Histogram:
    """Cumulative since start (what Prometheus expects: never reset, unlike the percentile ring
    buffers): ``counts[i]`` samples fell in bucket ``i`` (the last one is +Inf), ``total`` their sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def add(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # le: a value equal to a bound is in it
        self.total += value


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 90, 99)) -> dict[str, float]:
    """``{"p50": ..., "p90": ..., "p99": ..., "mean": ..., "n": ...}`` (empty input -> only ``n``)."""
    if len(values) == 0:
        return {"n": 0}
    arr = np.asarray(values, dtype=np.float64)
    out = {f"p{q:g}": float(np.percentile(arr, q)) for q in qs}
    out["mean"] = float(arr.mean())
    out["n"] = int(arr.size)
    return out


def rapl_energy_uj() -> int | None:
    """Package energy counter in microjoules from Intel RAPL, or None where the platform hides it."""
    total, found = 0, False
    for zone in sorted(_RAPL_ROOT.glob("intel-rapl:*")):
        if zone.name.count(":") != 1:  # top-level package zones only
            continue
        try:
            total += int((zone / "energy_uj").read_text())
            found = True
        except (OSError, ValueError):
            return None
    return total if found else None


_SELF: dict[int, psutil.Process] = {}  # this process's handle, by pid (a forked child gets its own)


def process_usage(proc: psutil.Process | None = None) -> dict[str, float]:
    """CPU seconds (user+system) and resident memory of a process (default: this one)."""
    if proc is None:
        pid = os.getpid()
        proc = _SELF.get(pid)
        if proc is None:
            proc = _SELF[pid] = psutil.Process(pid)
    cpu = proc.cpu_times()
    return {"cpu_s": cpu.user + cpu.system, "rss_mb": proc.memory_info().rss / 2**20}


def process_age_s() -> float:
    """Seconds since this process started (the kernel's start time, 10 ms resolution): what an
    interpreter start plus imports really cost, which timing inside the process cannot see."""
    return time.time() - psutil.Process(os.getpid()).create_time()


class _BoundedCounts(dict):
    """A dict of counts that holds at most ``cap`` keys: a key past the cap is counted under
    :data:`~devit_mq.protocol.OTHER`, so no peer can grow a node's telemetry by inventing names."""

    def __init__(self, cap: int) -> None:
        super().__init__()
        self.cap = cap

    def __missing__(self, key: str) -> int:  # reads of an unseen counter are 0 (and add nothing)
        return 0

    def add(self, key: str, n: int) -> None:
        if key not in self:
            key = key[:MAX_KEY_LEN]
            if key not in self and len(self) >= self.cap:
                key = OTHER  # the one key past the cap (the schema allows cap + 1)
        self[key] = self.get(key, 0) + n


class Metrics:
    """Counters, byte totals and duration samples for one node.

    Bounded by construction: at most :data:`~devit_mq.protocol.MAX_COUNTERS` counters,
    ``MAX_LINKS`` byte counters and ``MAX_STAGES`` stages (more keys fold into ``other``), and
    samples in ring buffers of ``max_samples`` per stage, so a node that runs for days does not grow
    and its :meth:`telemetry` always fits its schema: percentiles describe the most recent samples,
    counters are totals.
    """

    def __init__(self, node: str, max_samples: int = 20000) -> None:
        self.node = node
        self.max_samples = max_samples
        self.counters = _BoundedCounts(MAX_COUNTERS)
        self.bytes = _BoundedCounts(MAX_LINKS)
        self._samples: dict[str, list[float]] = {}
        self.histograms: dict[str, Histogram] = {}  # per stage, the same samples, binned since start
        self._cursor: dict[str, int] = defaultdict(int)
        # each stage's percentiles and the sample count they describe: a heartbeat recomputes only
        # the stages that changed (an idle node none; a percentile over 20,000 samples is ~1 ms)
        self._percentiles: dict[str, tuple[int, Percentiles]] = {}
        self.started = time.time()
        self._peak_rss_mb = 0.0
        self.info: dict[str, Any] = {}  # static facts worth reporting (role, backend, threads, pid)

    def count(self, name: str, n: int = 1) -> None:
        self.counters.add(name, n)

    def add_bytes(self, link: str, n: int) -> None:
        self.bytes.add(link, n)

    def observe(self, stage: str, seconds: float) -> None:
        stage = stage[:MAX_KEY_LEN]
        buf = self._samples.get(stage)
        if buf is None:
            if len(self._samples) >= MAX_STAGES:
                return  # stage names are the code's own: a cap hit is a bug, not an attack
            buf = self._samples[stage] = []
            self.histograms[stage] = Histogram(BATCH_BUCKETS if stage in COUNT_STAGES else LATENCY_BUCKETS_S)
        self.histograms[stage].add(seconds)
        if len(buf) < self.max_samples:
            buf.append(seconds)
        else:  # ring buffer: overwrite the oldest sample
            buf[self._cursor[stage] % self.max_samples] = seconds
            self._cursor[stage] += 1

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.observe(stage, time.perf_counter() - start)

    def _info(self) -> dict[str, Any]:
        out = {}
        for key, value in list(self.info.items())[:MAX_INFO]:
            if not isinstance(value, (bool, int, float)) and value is not None:
                value = str(value)[:128]
            out[str(key)[:MAX_KEY_LEN]] = value
        return out

    def telemetry(self) -> Telemetry:
        """This node's figures as the protocol's bounded :class:`~devit_mq.protocol.Telemetry`."""
        usage = process_usage()
        self._peak_rss_mb = max(self._peak_rss_mb, usage["rss_mb"])
        stages = {}
        for k, samples in self._samples.items():
            observed = len(samples) + self._cursor[k]  # samples ever taken (the ring's overwrites too)
            cached = self._percentiles.get(k)
            if cached is None or cached[0] != observed:
                p = percentiles(samples)
                cached = self._percentiles[k] = (observed, Percentiles(
                    n=p["n"], **{q: p[q] * 1e3 for q in ("p50", "p90", "p99", "mean") if q in p}))
            stages[k] = cached[1]
        return Telemetry(node=self.node, pid=os.getpid(), version=__version__, info=self._info(), uptime_s=time.time() - self.started,
                         counters=dict(self.counters), bytes=dict(self.bytes), stages_ms=stages,
                         cpu_s=usage["cpu_s"], rss_mb=usage["rss_mb"], peak_rss_mb=self._peak_rss_mb)

    def snapshot(self) -> dict[str, Any]:
        """:meth:`telemetry` as plain dicts (for JSON reports)."""
        return to_builtins(self.telemetry())

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.snapshot(), indent=2) + "\n")
