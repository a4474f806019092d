"""``devit-mq profile --device NAME --out FILE [--bundle B] [--executor numba] [--threads 1] [--cpu-quota Q]``."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

DESCRIPTION = ("Measure this device: batch-1 sub-model latency over a grid of widths, head counts and MLP sizes "
               "(with the executor, threads and CPU cap an edge would use), fit the cost model, and write a "
               "device profile that `devit-mq train` (students.balance) and topologies (edges' `profile:`) read.")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="devit-mq profile", description=DESCRIPTION)
    parser.add_argument("--device", required=True, help="the device's name (recorded in the profile and bundles)")
    parser.add_argument("--out", required=True, help="profile file to write (JSON)")
    parser.add_argument("--bundle", default="default",
                        help="a bundle (path or shipped name, default: default): the input side (image size, "
                             "channels, patch, stem) of its sub-models is what the grid is measured for")
    parser.add_argument("--executor", choices=("numba", "numpy", "torch"), default="numba")
    parser.add_argument("--threads", type=int, default=1, help="compute threads, as the edge's `threads:` (1)")
    parser.add_argument("--cpu-quota", type=float,
                        help="measure under a CFS quota of this many CPUs (root, cgroup v1), e.g. 0.25")
    parser.add_argument("--cpu-period-ms", type=float, default=None,
                        help="the CFS period of --cpu-quota (default 100 ms; a few ms slows each forward evenly)")
    parser.add_argument("--speed", type=float, default=1.0,
                        help="measure an emulated slower device, as an edge's `speed:` (e.g. 0.25: every "
                             "forward stretched to 4x its time; default 1)")
    parser.add_argument("--widths", type=_ints, help="embed dims of the grid (default 32,48,64,96,128)")
    parser.add_argument("--heads", type=_ints, help="head counts of the grid (default 1,2,4)")
    parser.add_argument("--mlp-ratios", type=_floats, help="MLP ratios of the grid (default 1,2,4)")
    parser.add_argument("--repeats", type=int, help="timed forwards per shape and round (median; default 5)")
    parser.add_argument("--rounds", type=int,
                        help="passes over the whole grid, interleaved (median of rounds; default 5)")
    parser.add_argument("--gap-ms", type=float,
                        help="idle before each timed forward, as an edge between batch-1 requests (default 3)")
    parser.add_argument("--quick", action="store_true", help="a small grid and few repeats (smoke runs)")
    parser.add_argument("--check", action="store_true",
                        help="also time the bundle's own sub-models and print predicted vs measured")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))

    from ..model import BundleError, load_manifest
    from ..testbed.net import TestbedError, cpu_cap
    from ..topology.load import resolve_bundle
    from .device import ProfileError, save_profile
    from .measure import Grid, check_predictions, measure

    try:
        manifest = load_manifest(resolve_bundle(args.bundle, Path.cwd()))
    except BundleError as exc:
        print(f"devit-mq profile: error: {exc}", file=sys.stderr)
        return 2
    grid = Grid.quick() if args.quick else Grid()
    overrides = {k: v for k, v in (("widths", args.widths), ("heads", args.heads), ("mlp_ratios", args.mlp_ratios),
                                   ("repeats", args.repeats), ("rounds", args.rounds),
                                   ("gap_ms", args.gap_ms)) if v is not None}
    grid = Grid(**{**grid.__dict__, **overrides})
    if grid.repeats < 1 or grid.rounds < 1 or grid.gap_ms < 0:
        print("devit-mq profile: error: --repeats and --rounds must be >= 1 and --gap-ms >= 0", file=sys.stderr)
        return 2
    if not grid.shapes():
        print("devit-mq profile: error: the grid is empty (no head count divides any width)", file=sys.stderr)
        return 2
    if not 0 < args.speed <= 1:
        print(f"devit-mq profile: error: --speed must be in (0, 1], got {args.speed:g}", file=sys.stderr)
        return 2
    if args.cpu_quota is not None and args.cpu_quota <= 0:
        print("devit-mq profile: error: --cpu-quota must be > 0", file=sys.stderr)
        return 2
    try:
        cap = cpu_cap(args.cpu_quota, args.cpu_period_ms) if args.cpu_quota else contextlib.nullcontext()
        with cap:
            profile = measure(manifest.submodels[0], args.device, args.executor, args.threads, grid,
                              args.cpu_quota, args.cpu_period_ms if args.cpu_quota else None, args.speed,
                              say=print)
            checks = check_predictions(profile, manifest.submodels) if args.check else []
    except (TestbedError, ProfileError, ImportError) as exc:
        print(f"devit-mq profile: error: {exc}", file=sys.stderr)
        return 2
    save_profile(profile, args.out)
    print(f"profile {args.device!r} written to {args.out}: {len(profile.samples)} forwards, cost model fits them "
          f"within {profile.fit_median_rel_error:.1%} (median) / {profile.fit_max_rel_error:.1%} (max)")
    for row in checks:
        print("check:", json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
    return 0
