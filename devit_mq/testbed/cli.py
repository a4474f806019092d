"""``devit-mq testbed``: DeViT, pipeline partitioning and the monolith on hosts with real links.

Needs root (network namespaces, ``tc``, cgroups); says why and exits 0 ("skipped") otherwise, unless
``--require``. ``--cleanup`` removes what runs whose owner process is gone left behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from devit_mq.logs import add_log_arguments, setup_logging
from devit_mq.protocol import IMAGE_CODECS

from .net import TestbedError, cleanup, leftovers, unavailable_reason
from .profiles import DEFAULT_PROFILES, ProfileError, load_links
from .runner import QUICK, SYSTEMS, RunPlan, run_profile

DEFAULT_TOPOLOGY = Path(__file__).resolve().parents[2] / "topologies" / "bench-2edge.yaml"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="devit-mq testbed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("topology", nargs="?", type=Path, default=DEFAULT_TOPOLOGY,
                   help="the DeViT topology whose settings the testbed uses (hosts are replaced); "
                        "default: topologies/bench-2edge.yaml")
    p.add_argument("--links", type=Path, default=DEFAULT_PROFILES, help="link profiles (YAML)")
    p.add_argument("--profiles", default=None, help="comma-separated profile names (default: all)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(SYSTEMS)}")
    p.add_argument("--shapes", default="issue", choices=("issue", "tiny"),
                   help="random-weight bench bundle: issue = ViT-S/16 teacher vs 2 x ViT-Ti/16 at 224x224")
    p.add_argument("--bundle", type=Path, default=None, help="use this bundle (it must ship a teacher)")
    p.add_argument("--image-codec", default="raw", choices=IMAGE_CODECS, help="how images travel (default raw)")
    p.add_argument("--image-quality", type=int, default=None, help="JPEG quality (default: the topology's)")
    p.add_argument("--requests", type=int, default=RunPlan.latency_requests, help="batch-1 latency requests")
    p.add_argument("--throughput-images", type=int, default=RunPlan.throughput_images)
    p.add_argument("--window", type=int, default=RunPlan.window, help="requests in flight when pipelined")
    p.add_argument("--rounds", type=int, default=RunPlan.rounds,
                   help=f"split each system's requests over this many rounds, the systems' order reversing "
                        f"every round, so the host's speed drift lands on all of them (default {RunPlan.rounds})")
    p.add_argument("--quick", action="store_true", help="a few requests per system (CI)")
    p.add_argument("--work-dir", type=Path, default=Path("runs/testbed"))
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--plot", type=Path, default=None, help="latency against bandwidth (PNG)")
    p.add_argument("--cleanup", action="store_true",
                   help="remove leftovers (namespaces, veths, qdiscs, cgroups) of runs whose owner is gone")
    p.add_argument("--prefix", default=None, help="with --cleanup: remove exactly this run's leftovers")
    p.add_argument("--jpeg-accuracy", default=None, metavar="TOPOLOGY",
                   help="only measure what jpeg images cost in fused accuracy on TOPOLOGY's bundle's test split "
                        "(in-process, no root needed), at --qualities")
    p.add_argument("--qualities", default="50,75,90,95", help="with --jpeg-accuracy: JPEG qualities to measure")
    p.add_argument("--require", action="store_true", help="fail (exit 1) instead of skipping where it cannot run")
    add_log_arguments(p, default_level="warning")
    return p


def _bundle(args: argparse.Namespace) -> Path:
    if args.bundle is not None:
        return args.bundle.resolve()
    from devit_mq.bench.bundles import ensure_bundle, shapes_named

    shapes = shapes_named(args.shapes)
    return ensure_bundle(args.work_dir / "bundles" / shapes.name, shapes).resolve()


def table(results: dict[str, Any]) -> list[str]:
    """The markdown table: system x profile."""
    lines = ["| profile | system | p50 ms | p99 ms | p50 per round ms | img/s (pipelined) | "
             "bytes/image per link (measured / predicted) |",
             "|---|---|---:|---:|---|---:|---|"]
    for profile, systems in results["profiles"].items():
        for system, row in systems.items():
            links = ", ".join(f"{h} {row['bytes_per_image'][h]:,} / {row['bytes_per_image_predicted'][h]:,}"
                              for h in row["bytes_per_image"])
            rounds = " ".join(f"{p:.1f}" for p in row.get("latency_rounds_p50_ms", []))
            lines.append(f"| {profile} | {system} | {row['latency_p50_ms']:.1f} | {row['latency_p99_ms']:.1f} | "
                         f"{rounds} | {row['images_per_s']:.1f} | {links} |")
    return lines


def speedups(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    out = {}
    for profile, systems in results["profiles"].items():
        if "devit" not in systems:
            continue
        d = systems["devit"]["latency_p50_ms"]
        out[profile] = {f"p50_vs_{s}": systems[s]["latency_p50_ms"] / d for s in systems if s != "devit"}
    return out


def _without_probabilities(results: dict[str, Any]) -> dict[str, Any]:
    """The JSON keeps each answer's label, not its probability vector (1000 floats per request)."""
    out = json.loads(json.dumps(results))
    for systems in out["profiles"].values():
        for row in systems.values():
            probs = row.pop("probabilities", None)
            if probs is not None:
                row["labels"] = [int(np.argmax(p)) for p in probs]
    return out


def _delay_groups(results: dict[str, Any]) -> dict[tuple[float, float], list[str]]:
    """Profiles that differ only in rate, fastest first: {(delay_ms, jitter_ms): [profile, ...]}."""
    groups: dict[tuple[float, float], list[str]] = {}
    for name in results["profiles"]:
        link = results["links"][name]
        groups.setdefault((link["delay_ms"], link["jitter_ms"]), []).append(name)
    return {k: sorted(v, key=lambda n: -results["links"][n]["rate_mbit"]) for k, v in groups.items()}


def bandwidth_sweep(results: dict[str, Any]) -> list[dict[str, Any]]:
    """DeViT's p50 advantage as the rate falls with the delay held fixed (one entry per delay with at
    least two rates): the ratio and the gap in ms to each baseline, and whether the ratio over the
    pipeline grows at every step down in rate. Added delay is paid once per hop by every system, so it
    is held fixed rather than mixed into the comparison."""
    out = []
    for (delay, jitter), names in _delay_groups(results).items():
        names = [n for n in names if "devit" in results["profiles"][n]]
        if len(names) < 2:
            continue
        steps = []
        for name in names:
            systems = results["profiles"][name]
            d = systems["devit"]["latency_p50_ms"]
            steps.append({"profile": name, "rate_mbit": results["links"][name]["rate_mbit"],
                          **{f"p50_vs_{s}": systems[s]["latency_p50_ms"] / d for s in systems if s != "devit"},
                          **{f"gap_ms_vs_{s}": systems[s]["latency_p50_ms"] - d for s in systems if s != "devit"}})
        entry: dict[str, Any] = {"delay_ms": delay, "jitter_ms": jitter, "steps": steps}
        if all("p50_vs_pipeline" in s for s in steps):
            ratios = [s["p50_vs_pipeline"] for s in steps]
            entry["grows_vs_pipeline"] = all(b > a for a, b in zip(ratios, ratios[1:], strict=False))
        out.append(entry)
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    """Latency and DeViT's speedup against link rate: a line per system over the profiles that differ
    only in rate, open markers for the profiles with added delay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat_ax, speed_ax) = plt.subplots(1, 2, figsize=(11, 4))
    profiles = results["profiles"]
    for (delay, _), names in _delay_groups(results).items():
        style = {"marker": "o"} if delay == 0 else {"marker": "s", "linestyle": ":", "fillstyle": "none"}
        suffix = "" if delay == 0 else f" (+{delay:g} ms/hop)"
        for i, system in enumerate(SYSTEMS):
            row = [(results["links"][p]["rate_mbit"], profiles[p][system]["latency_p50_ms"])
                   for p in names if system in profiles[p]]
            if row:
                lat_ax.plot(*zip(*row, strict=True), color=f"C{i}", label=system + suffix, **style)
            if system != "devit" and row and all("devit" in profiles[p] for p in names):
                ratios = [(results["links"][p]["rate_mbit"],
                           profiles[p][system]["latency_p50_ms"] / profiles[p]["devit"]["latency_p50_ms"]) for p in names]
                speed_ax.plot(*zip(*ratios, strict=True), color=f"C{i}", label=f"vs {system}{suffix}", **style)
    for ax, ylabel in ((lat_ax, "batch-1 latency p50 (ms)"), (speed_ax, "DeViT p50 speedup (x)")):
        ax.set_xscale("log")
        ax.set_xlabel("link rate (Mbit/s)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"testbed: {results.get('shapes', '')} ({results.get('image_codec')} images)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args, node="testbed")
    if args.jpeg_accuracy:
        from .accuracy import jpeg_accuracy_cost

        cost = jpeg_accuracy_cost(args.jpeg_accuracy, [int(q) for q in args.qualities.split(",")])
        print(f"jpeg accuracy cost on {cost['images']} test images ({cost['source']}), features {cost['codec']}: "
              f"raw {cost['raw']['accuracy_pct']:.2f}% ({cost['raw']['bytes_per_image']} B/image)")
        for quality, row in cost["jpeg"].items():
            print(f"  quality {quality:>3}: {row['accuracy_pct']:.2f}% (cost {row['cost_points']:+.2f} points), "
                  f"{row['bytes_per_image']:.0f} B/image, mean |pixel error| {row['mean_abs_pixel_error']:.2f}")
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(cost, indent=1))
        return 0
    if args.cleanup:
        if (reason := unavailable_reason()) is not None and "root" in reason:
            print(f"devit-mq testbed: {reason}", file=sys.stderr)
            return 1
        done = cleanup(args.prefix)
        for prefix, found in done["removed"].items():
            print(f"removed {prefix}: " + ", ".join(f"{len(v)} {k}" for k, v in found.items()))
        for prefix in done["kept"]:
            print(f"kept {prefix}: its run is still alive")
        print("leftovers now: " + json.dumps(leftovers()))
        return 0
    reason = unavailable_reason()
    if reason is not None:
        print(f"devit-mq testbed: skipped: {reason}", file=sys.stderr)
        return 1 if args.require else 0
    try:
        links = load_links(args.links)
    except (ProfileError, OSError) as exc:
        print(f"devit-mq: error: {exc}", file=sys.stderr)
        return 2
    names = args.profiles.split(",") if args.profiles else list(links.profiles)
    unknown = [n for n in names if n not in links.profiles]
    systems = [s for s in args.systems.split(",") if s]
    if unknown or set(systems) - set(SYSTEMS):
        print(f"devit-mq: error: unknown profile(s) {unknown} or system(s) {sorted(set(systems) - set(SYSTEMS))}; "
              f"profiles: {', '.join(links.profiles)}; systems: {', '.join(SYSTEMS)}", file=sys.stderr)
        return 2
    try:
        plan = QUICK if args.quick else RunPlan(latency_requests=args.requests, throughput_images=args.throughput_images,
                                                window=args.window, rounds=args.rounds)
    except ValueError as exc:
        print(f"devit-mq: error: {exc}", file=sys.stderr)
        return 2
    args.work_dir.mkdir(parents=True, exist_ok=True)
    bundle = _bundle(args)
    from devit_mq.model import load_manifest

    from .probe import photo_crops

    spec = load_manifest(bundle).input
    images_path = args.work_dir / "images.npy"
    np.save(images_path, photo_crops(max(plan.latency_requests, plan.throughput_images, 8), spec.img_size,
                                     seed=plan.seed, channels=spec.in_chans))
    results: dict[str, Any] = {"profiles": {}, "links": {}, "bundle": str(bundle), "shapes": args.shapes,
                               "image_codec": args.image_codec, "image_quality": args.image_quality,
                               "plan": plan.__dict__, "devices": {"cpu": links.device.cpu, "cpus": links.device.cpus,
                                                                  "client_cpu": links.client.cpu},
                               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(f"testbed: bundle {bundle}, images {args.image_codec}, devices cpu={links.device.cpu}, "
          f"profiles {', '.join(names)}")
    try:
        for name in names:
            profile = links.profiles[name]
            results["links"][name] = profile.__dict__
            results["profiles"][name] = run_profile(profile, links, systems, args.topology, bundle, args.image_codec,
                                                    images_path, plan, args.work_dir, args.image_quality)
    except TestbedError as exc:
        print(f"devit-mq testbed: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("devit-mq testbed: interrupted; everything was torn down", file=sys.stderr)
        return 130
    finally:
        results["teardown_leftovers"] = leftovers()
    results["speedups"] = speedups(results)
    results["bandwidth_sweep"] = bandwidth_sweep(results)
    print("\n".join(table(results)))
    print("p50 speedup of DeViT: " + json.dumps(results["speedups"]))
    for sweep in results["bandwidth_sweep"]:
        steps = ", ".join(f"{s['rate_mbit']:g} Mbit/s {s.get('p50_vs_pipeline', float('nan')):.2f}x" for s in sweep["steps"])
        print(f"DeViT vs pipeline as the rate falls (+{sweep['delay_ms']:g} ms/hop): {steps}; "
              f"grows at every step: {sweep.get('grows_vs_pipeline')}")
    print("after teardown: " + json.dumps(results["teardown_leftovers"]))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_without_probabilities(results), indent=1))
    if args.plot is not None:
        plot(results, args.plot)
    logging.getLogger("devit_mq").debug("done")
    return 0
