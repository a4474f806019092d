"""``devit-mq bench kernels``: the attention backends side by side, in one run.

For each shape (batch x heads x tokens, head_dim 64, fp32) and thread count it times torch's SDPA,
the naive torch formula and the fused Numba kernel, interleaving them round by round (so load from
other processes on a shared machine hits all three alike), and reports medians and the ratio
ours/SDPA. Then the same for a whole ViT-Tiny forward (224x224) per backend, with the backend that
``select_backend`` would pick at start-up. Prints a markdown table; ``--json`` keeps the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from devit_mq.model import VisionTransformer, get_backend, preset, select_backend
from devit_mq.model.kernel_backends import sync_numba_threads

# The grid of the issue: B in {1, 8}, heads in {3, 6, 12}, tokens in {50, 197}, head_dim 64.
FULL_GRID = [(b, h, n) for b in (1, 8) for h in (3, 6, 12) for n in (50, 197)]
QUICK_GRID = [(1, 3, 50), (1, 3, 197)]
ATTENTION_IMPLS = ("torch", "naive", "numba")  # SDPA, textbook torch, fused Numba kernel
TARGET_BATCH1, TARGET_OTHER = 1.0, 1.5


def interleaved_timings(fns: dict[str, Callable[[], Any]], budget_s: float, min_rounds: int = 7,
                        max_rounds: int = 400, warmup: int = 5) -> dict[str, tuple[float, float, float]]:
    """``(median, min, median CPU time of the calling thread)`` in seconds per call of each
    function, one call of each per round, for about ``budget_s`` seconds in all (at least
    ``min_rounds`` rounds). ``warmup`` untimed rounds come first: the first calls after a
    thread-count change or a new shape are many times slower (thread pools, JIT, allocator).

    On a loaded machine wall time also counts waiting for a core: a multi-threaded call often
    waits a whole scheduler slice for its second thread, which the median then shows. The minimum
    is what a call costs when nothing else wants the cores; with one thread the calling thread's
    CPU time is the cost regardless of load (with more, it misses the other threads' work)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    start = time.perf_counter()
    for fn in fns.values():
        fn()
    one_round = time.perf_counter() - start
    rounds = int(min(max_rounds, max(min_rounds, budget_s / max(one_round, 1e-9))))
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            c0, t0 = time.thread_time(), time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.thread_time() - c0)
    return {name: (statistics.median(wall[name]), min(wall[name]), statistics.median(cpu[name]))
            for name in fns}


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    sync_numba_threads()


def _figures(timings: dict[str, tuple[float, float, float]], unit: float, suffix: str,
             threads: int) -> dict[str, float | None]:
    """Medians, minimums and (one thread only) CPU times in ``unit``, and their ratios to SDPA."""
    names = {"torch": "sdpa", "naive": "naive", "numba": "numba"}
    row: dict[str, float | None] = {}
    for impl, label in names.items():
        row[f"{label}_{suffix}"] = timings[impl][0] * unit
        row[f"{label}_min_{suffix}"] = timings[impl][1] * unit
        row[f"{label}_cpu_{suffix}"] = timings[impl][2] * unit if threads == 1 else None
    for impl in ("numba", "naive"):
        row[f"ratio_{impl}_sdpa"] = timings[impl][0] / timings["torch"][0]
        row[f"ratio_{impl}_sdpa_min"] = timings[impl][1] / timings["torch"][1]
        row[f"ratio_{impl}_sdpa_cpu"] = timings[impl][2] / timings["torch"][2] if threads == 1 else None
    return row


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def bench_attention(grid: Sequence[tuple[int, int, int]], threads: Sequence[int], budget_s: float,
                    head_dim: int = 64) -> list[dict[str, Any]]:
    rows = []
    fns = {name: get_backend(name) for name in ATTENTION_IMPLS}
    for n_threads in threads:
        set_threads(n_threads)
        for batch, heads, tokens in grid:
            qkv = torch.randn(batch, tokens, 3 * heads * head_dim)
            calls = {name: (lambda fn=fn, qkv=qkv, heads=heads: fn(qkv, heads)) for name, fn in fns.items()}
            with torch.inference_mode():
                diff = (fns["numba"](qkv, heads) - fns["torch"](qkv, heads)).abs().max().item()
                timings = interleaved_timings(calls, budget_s)
            rows.append({"threads": n_threads, "batch": batch, "heads": heads, "tokens": tokens,
                         "head_dim": head_dim, **_figures(timings, 1e6, "us", n_threads),
                         "target": TARGET_BATCH1 if batch == 1 else TARGET_OTHER, "max_abs_diff": diff})
            print(f"  attention t={n_threads} B={batch} H={heads} N={tokens}: ours/SDPA "
                  f"{rows[-1]['ratio_numba_sdpa']:.2f} (min {rows[-1]['ratio_numba_sdpa_min']:.2f})", flush=True)
    return rows


def bench_vit(batches: Sequence[int], threads: Sequence[int], budget_s: float,
              model_name: str = "vit_tiny_patch16_224") -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = VisionTransformer(preset(model_name)).eval()
    rows = []
    for n_threads in threads:
        set_threads(n_threads)
        for batch in batches:
            x = torch.randn(batch, 3, 224, 224)

            def forward(backend: str, x: torch.Tensor = x) -> torch.Tensor:
                model.set_attention_backend(backend)
                return model(x)

            with torch.inference_mode():
                want = forward("torch")
                diff = (forward("numba") - want).abs().max().item()
                timings = interleaved_timings({b: (lambda b=b: forward(b)) for b in ATTENTION_IMPLS},
                                              budget_s, min_rounds=5, warmup=2)
                selected = select_backend(model, batch_size=batch, apply=False)
            rows.append({"model": model_name, "threads": n_threads, "batch": batch,
                         **_figures(timings, 1e3, "ms", n_threads), "max_abs_diff_logits": diff, "selected": selected})
            print(f"  {model_name} t={n_threads} B={batch}: ours/SDPA {rows[-1]['ratio_numba_sdpa']:.2f} "
                  f"(min {rows[-1]['ratio_numba_sdpa_min']:.2f})", flush=True)
    model.set_attention_backend("torch")
    return rows


def attention_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| threads | B | heads | tokens | SDPA µs | naive µs | numba µs | numba/SDPA | target | "
             "naive/SDPA | numba/SDPA (min) | numba/SDPA (CPU time) | max abs diff |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        met = "met" if r["ratio_numba_sdpa"] <= r["target"] else "MISSED"
        lines.append(f"| {r['threads']} | {r['batch']} | {r['heads']} | {r['tokens']} | {r['sdpa_us']:.0f} | "
                     f"{r['naive_us']:.0f} | {r['numba_us']:.0f} | **{r['ratio_numba_sdpa']:.2f}** | "
                     f"≤{r['target']:.1f} {met} | {r['ratio_naive_sdpa']:.2f} | "
                     f"{r['ratio_numba_sdpa_min']:.2f} | {_ratio(r['ratio_numba_sdpa_cpu'])} | "
                     f"{r['max_abs_diff']:.1e} |")
    return "\n".join(lines)


def vit_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| model | threads | B | torch (SDPA) ms | naive ms | numba ms | numba/SDPA | "
             "numba/SDPA (min) | numba/SDPA (CPU time) | max abs diff (logits) | select_backend |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['threads']} | {r['batch']} | {r['sdpa_ms']:.1f} | "
                     f"{r['naive_ms']:.1f} | {r['numba_ms']:.1f} | **{r['ratio_numba_sdpa']:.2f}** | "
                     f"{r['ratio_numba_sdpa_min']:.2f} | {_ratio(r['ratio_numba_sdpa_cpu'])} | "
                     f"{r['max_abs_diff_logits']:.1e} | {r['selected']} |")
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    import numba
    import numpy
    from threadpoolctl import threadpool_info

    return {
        "torch": torch.__version__, "numba": numba.__version__, "numpy": numpy.__version__,
        "cpu_count": os.cpu_count(), "machine": platform.machine(), "processor": platform.processor(),
        # the BLAS the kernel calls: OpenBLAS's kernel choice (e.g. an OPENBLAS_CORETYPE pin to
        # Haswell's AVX2 code on an AVX-512 CPU) moves the kernel's time by up to 2x
        "blas": [{k: lib.get(k) for k in ("filepath", "version", "architecture", "num_threads")}
                 for lib in threadpool_info() if lib.get("user_api") == "blas"],
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def parse_threads(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--threads takes comma-separated ints, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"--threads takes positive ints, got {text!r}")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="devit-mq bench kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two shapes, ViT at batch 1: a smoke run")
    parser.add_argument("--threads", type=parse_threads, default=[1, 2], help="thread counts (default 1,2)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timing per shape (default 0.6, quick 0.1)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--no-vit", action="store_true", help="skip the whole-model forward")
    args = parser.parse_args(argv)

    budget = args.budget if args.budget is not None else (0.1 if args.quick else 0.6)
    env_before = environment()
    blas = ", ".join(f"{os.path.basename(b['filepath'])} {b['version']} ({b['architecture']})"
                     for b in env_before["blas"])
    print(f"# attention kernels (torch {env_before['torch']}, numba {env_before['numba']}, "
          f"{env_before['cpu_count']} CPUs, load average {env_before['loadavg']})\n"
          f"# BLAS: {blas}; OPENBLAS_CORETYPE={env_before['OPENBLAS_CORETYPE']}", flush=True)
    attention = bench_attention(QUICK_GRID if args.quick else FULL_GRID, args.threads, budget)
    vit = [] if args.no_vit else bench_vit([1] if args.quick else [1, 8], args.threads, budget * 3)
    env_after = environment()

    print("\n## Attention alone (head_dim 64, fp32; per-call medians of interleaved rounds, plus the ratio "
          "of minimums and, at one thread, of CPU times: both robust to other load)\n")
    print(attention_table(attention))
    if vit:
        print("\n## Whole model forward, 224x224\n")
        print(vit_table(vit))
    print(f"\nload average before {env_before['loadavg']}, after {env_after['loadavg']} "
          "(a shared machine: compare ratios within this run, not absolute times across runs)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"environment": env_before, "environment_after": env_after,
                       "attention": attention, "vit": vit}, fh, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
