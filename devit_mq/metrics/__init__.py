"""Per-stage timers, counters, bytes per link and process resource usage, reported as plain dicts/JSON."""

from __future__ import annotations

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

__all__ = ["Metrics", "percentiles", "rapl_energy_uj", "process_usage"]

_RAPL_ROOT = Path("/sys/class/powercap")


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


def process_usage(proc: psutil.Process | None = None) -> dict[str, float]:
    """CPU seconds (user+system) and resident memory of a process."""
    proc = proc or psutil.Process(os.getpid())
    cpu = proc.cpu_times()
    return {"cpu_s": cpu.user + cpu.system, "rss_mb": proc.memory_info().rss / 2**20}


class Metrics:
    """Counters, byte totals and duration samples for one node.

    Samples are kept in bounded ring buffers (``max_samples`` per stage), so a node that runs for days
    does not grow: percentiles describe the most recent samples, counters are totals.
    """

    def __init__(self, node: str, max_samples: int = 20000) -> None:
        self.node = node
        self.max_samples = max_samples
        self.counters: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, int] = defaultdict(int)
        self._samples: dict[str, list[float]] = defaultdict(list)
        self._cursor: dict[str, int] = defaultdict(int)
        self.started = time.time()
        self._peak_rss_mb = 0.0
        self.info: dict[str, Any] = {}  # static facts worth reporting (role, backend, threads, pid)

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def add_bytes(self, link: str, n: int) -> None:
        self.bytes[link] += n

    def observe(self, stage: str, seconds: float) -> None:
        buf = self._samples[stage]
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

    def snapshot(self) -> dict[str, Any]:
        usage = process_usage()
        self._peak_rss_mb = max(self._peak_rss_mb, usage["rss_mb"])
        return {
            "node": self.node,
            "pid": os.getpid(),
            "info": dict(self.info),
            "uptime_s": time.time() - self.started,
            "counters": dict(self.counters),
            "bytes": dict(self.bytes),
            "stages_ms": {k: {q: (v * 1e3 if q != "n" else v) for q, v in percentiles(s).items()}
                          for k, s in self._samples.items()},
            "cpu_s": usage["cpu_s"],
            "rss_mb": usage["rss_mb"],
            "peak_rss_mb": self._peak_rss_mb,
        }

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.snapshot(), indent=2) + "\n")
