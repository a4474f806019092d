"""Equal vs balanced decomposition on unequal devices: ``devit-mq bench balance EQUAL.yaml BALANCED.yaml``.

Both topologies run the same devices (each edge's ``profile:`` names its device, and its
``executor``/``cpus`` make it that device here); they differ in the bundle: an equal split, or one
trained with ``students.balance`` for those devices. The topologies are launched in turn, in
interleaved rounds (a busy machine slows both alike), and each round sends the same sequential
batch-1 requests. Reported per topology: end-to-end latency p50/p99 (client send to answer), each
edge's measured compute p50 (its own telemetry: only batch-1 requests are sent, so that is the
batch-1 forward) next to what its profile predicts, and fused accuracy on the bundle's test split
through the running topology; then the balanced/equal latency ratio.

Before each launch the bench calibrates every profiled device (``--no-calibrate`` skips it): pinned
to the edge's CPUs, it re-times a spread of the profile's own grid forwards and scales the
prediction by now / then (:func:`devit_mq.profile.measure.drift`). A shared machine runs the same
forward 20-60% faster or slower from one hour to the next; the calibrated prediction separates the
cost model's error from that drift. Both are reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from devit_mq.metrics import percentiles


def calibrate(path: str | Path) -> dict[str, dict[str, Any]]:
    """Each profiled edge's :func:`~devit_mq.profile.measure.drift`, timed in this process pinned to the
    edge's CPUs (before its topology starts, so nothing else runs there)."""
    import os

    from devit_mq.profile import load_profile
    from devit_mq.profile.measure import drift
    from devit_mq.topology import load_topology

    out = {}
    before = os.sched_getaffinity(0)
    try:
        for edge in load_topology(path).edges:
            if edge.profile:
                os.sched_setaffinity(0, edge.cpus or before)
                out[edge.name] = drift(load_profile(edge.profile))
    finally:
        os.sched_setaffinity(0, before)
    return out


def measure_once(path: str | Path, requests: int, warmup: int, log_dir: Path,
                 calibrated: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Launch ``path``, send ``warmup`` + ``requests`` sequential batch-1 requests, read each edge's
    compute p50 from its telemetry, classify the test split (accuracy), stop. ``calibrated``: each
    edge's drift (:func:`calibrate`), recorded beside its prediction."""
    from devit_mq.model import load_manifest
    from devit_mq.nodes.demo import load_test_split
    from devit_mq.nodes.launcher import Launcher
    from devit_mq.nodes.runtime import Client
    from devit_mq.profile import load_profile

    with Launcher(path, log_dir=log_dir) as launcher, Client(launcher.topology, timeout_s=30) as client:
        topology = launcher.topology
        manifest = load_manifest(topology.bundle)
        split = load_test_split(manifest)
        images = split.images[: warmup + requests]
        client.predict(images[:warmup], batch_size=1, window=1)
        latencies = []
        for image in images[warmup:]:
            start = time.perf_counter()
            pred = client.predict(image[None], batch_size=1, window=1)
            latencies.append(time.perf_counter() - start)
            if pred.errors:
                raise RuntimeError(f"{topology.name}: request failed: {pred.errors[0].error}")
        nodes = fresh_edge_telemetry(client, topology, min(warmup + requests, 20000))
        edges = {}
        for edge in topology.edges:
            stages = nodes[edge.name]["stages_ms"]
            cfg = manifest.submodels[edge.submodel]
            predicted = load_profile(edge.profile).predict_ms(cfg) if edge.profile else None
            drift = (calibrated or {}).get(edge.name)
            edges[edge.name] = {"embed_dim": cfg.embed_dim, "depth": cfg.depth, "executor": edge.executor,
                                "speed": edge.speed,
                                "measured_compute_p50_ms": stages.get("compute", {}).get("p50"),
                                "predicted_ms": predicted, "drift": drift,
                                "predicted_calibrated_ms": None if drift is None else predicted * drift["ratio"]}
        bulk = client.predict(split.images, batch_size=8, window=4)
        accuracy = float((bulk.labels == split.labels).mean())
    lat = percentiles(latencies)
    return {"latency_p50_ms": lat["p50"] * 1e3, "latency_p99_ms": lat["p99"] * 1e3, "edges": edges,
            "accuracy": accuracy, "requests": len(latencies)}


def fresh_edge_telemetry(client, topology, samples: int, timeout_s: float = 10.0) -> dict[str, Any]:
    """The aggregator's view of every node once each edge's telemetry counts ``samples`` forwards.

    Edges report in heartbeats (every 0.5 s), so a status asked right after the last answer may
    still hold an older snapshot; waiting for the count keeps the last requests in the p50."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = client.node.query_status(timeout_s).get("nodes", {})
        counts = {e.name: nodes.get(e.name, {}).get("stages_ms", {}).get("compute", {}).get("n", 0) for e in topology.edges}
        if min(counts.values()) >= samples:
            return nodes
        if time.monotonic() > deadline:
            raise RuntimeError(f"{topology.name}: edges' telemetry counts {counts} forwards after {timeout_s:g} s, "
                               f"expected {samples}")
        time.sleep(0.2)


def _rel_error(predicted: float | None, measured: float) -> float | None:
    return None if predicted is None else (predicted - measured) / measured


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians over rounds; per edge the prediction's relative error, raw and calibrated."""
    out: dict[str, Any] = {}
    for name, rounds in runs.items():
        edges = {}
        for edge in rounds[0]["edges"]:
            measured = statistics.median(r["edges"][edge]["measured_compute_p50_ms"] for r in rounds)
            predicted = rounds[0]["edges"][edge]["predicted_ms"]
            each = [r["edges"][edge].get("predicted_calibrated_ms") for r in rounds]
            calibrated = statistics.median(each) if None not in each else None
            edges[edge] = {**{k: rounds[0]["edges"][edge].get(k) for k in ("embed_dim", "depth", "executor", "speed")},
                           "measured_ms": measured, "predicted_ms": predicted, "rel_error": _rel_error(predicted, measured),
                           "predicted_calibrated_ms": calibrated, "rel_error_calibrated": _rel_error(calibrated, measured)}
        out[name] = {"latency_p50_ms": statistics.median(r["latency_p50_ms"] for r in rounds),
                     "latency_p99_ms": statistics.median(r["latency_p99_ms"] for r in rounds),
                     "round_p50s_ms": [round(r["latency_p50_ms"], 3) for r in rounds],
                     "accuracy": rounds[0]["accuracy"], "edges": edges}
    if {"equal", "balanced"} <= set(out):
        out["speedup_p50"] = out["equal"]["latency_p50_ms"] / out["balanced"]["latency_p50_ms"]
    return out


def _device(edge: dict[str, Any]) -> str:
    speed = edge.get("speed") or 1
    return f"{edge['embed_dim']}-d x{edge['depth']} {edge['executor']}" + ("" if speed == 1 else f" at speed {speed:g}")


def _edge_cell(name: str, edge: dict[str, Any]) -> str:
    cell = f"{name} {_device(edge)} {edge['measured_ms']:.3f}"
    if edge["predicted_ms"] is not None:
        cell += f" / {edge['predicted_ms']:.3f} ({edge['rel_error']:+.0%})"
    if edge.get("predicted_calibrated_ms") is not None:
        cell += f" / calibrated {edge['predicted_calibrated_ms']:.3f} ({edge['rel_error_calibrated']:+.0%})"
    return cell


def format_summary(summary: dict[str, Any]) -> str:
    lines = ["| split | latency p50 ms | p99 ms | fused accuracy % | edges: shape, executor, measured / predicted "
             "(/ calibrated) ms |", "|---|---:|---:|---:|---|"]
    for name in ("equal", "balanced"):
        s = summary[name]
        edges = "; ".join(_edge_cell(e, v) for e, v in s["edges"].items())
        lines.append(f"| {name} | {s['latency_p50_ms']:.3f} | {s['latency_p99_ms']:.3f} | {100 * s['accuracy']:.2f} | "
                     f"{edges} |")
    if "speedup_p50" in summary:
        lines.append(f"\nbalanced vs equal, batch-1 p50: {summary['speedup_p50']:.2f}x")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="devit-mq bench balance", description=__doc__.split("\n\n")[0])
    parser.add_argument("equal", help="topology of the equal split on the unequal devices")
    parser.add_argument("balanced", help="the same devices running the balanced bundle")
    parser.add_argument("--requests", type=int, default=300, help="sequential batch-1 requests per round (300)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per topology (2)")
    parser.add_argument("--no-calibrate", action="store_true",
                        help="skip timing each profiled device before each launch (no calibrated predictions)")
    parser.add_argument("--json", help="write the summary and every round here")
    parser.add_argument("--log-dir", default="runs/bench-balance-logs")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))

    from devit_mq.topology import TopologyError, load_topology

    try:
        for path in (args.equal, args.balanced):
            load_topology(path)
    except TopologyError as exc:
        print(f"devit-mq bench balance: error: {exc}", file=sys.stderr)
        return 2
    runs: dict[str, list[dict[str, Any]]] = {"equal": [], "balanced": []}
    try:
        for r in range(args.rounds):
            order = ("equal", "balanced") if r % 2 == 0 else ("balanced", "equal")
            for name in order:
                path = args.equal if name == "equal" else args.balanced
                calibrated = None if args.no_calibrate else calibrate(path)
                runs[name].append(measure_once(path, args.requests, args.warmup, Path(args.log_dir) / f"{name}-{r}",
                                               calibrated))
                print(f"round {r} {name}: p50 {runs[name][-1]['latency_p50_ms']:.3f} ms", flush=True)
    except (RuntimeError, ValueError, OSError) as exc:  # launch, client, bundle and data errors name themselves
        print(f"devit-mq bench balance: error: {exc}", file=sys.stderr)
        return 1
    summary = summarize(runs)
    print(format_summary(summary))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": runs}, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
