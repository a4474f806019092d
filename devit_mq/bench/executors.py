"""``devit-mq bench executors``: the edge executors side by side (latency, RSS, import, ready time).

Two parts, so that each figure is measured where it means something:

1. **Latency**, in this process, 1 thread: the ``torch`` executor (attention calibrated, as an edge
   does), ``numba`` and ``numpy`` run ``forward_prefix`` on uint8 images (input normalisation
   included) round by round, interleaved, so load from other processes hits all alike. Shapes: the
   default bundle's sub-model 0 and a ViT-Ti/16 at 224x224 with random weights (the shape, not the
   weights, sets the time), at batch 1 and 8.
2. **Start-up**, one fresh process per executor, doing what an edge process does before it says
   ready (import the runtime, build and warm up its executor on the default bundle): the process's
   age once its libraries are imported (``import_s``) and once warm (``ready_s``), its RSS, and
   whether torch ended up in ``sys.modules``. ``cold`` runs the same with an empty Numba cache.

3. **Fusions**, this process, 1 thread: each Numba op against the NumPy ops it replaces, at
   ViT-Ti/16's shapes (197 tokens, 192 wide, MLP 768).

``--install`` also builds a fresh venv with only the base install and reports its size on disk.
Prints markdown tables; ``--json`` keeps the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path
from typing import Any

import numpy as np

EXECUTORS = ("torch", "numba", "numpy")
DEFAULT_BUNDLE = "default"
# The targets, as ratios to the torch executor and absolute start-up figures.
TARGETS = {"latency_default_b1": 1.0, "latency_vit_ti_b1": 1.1, "rss_numba_mb": 200, "rss_numpy_mb": 100,
           "ready_warm_s": 1.5, "install_mb": 450}

# What a child process runs: the edge's start-up path, then its own figures as one JSON line.
_CHILD = """
import json, sys
from devit_mq.metrics import process_age_s, process_usage
from devit_mq.nodes.base import configure_threads
from devit_mq.nodes.executor import build_edge_executor
from devit_mq.model import load_manifest
from devit_mq.topology.load import resolve_bundle
from devit_mq.wire import use_kernels, warmup
from pathlib import Path
kind = sys.argv[1]
configure_threads(1)
if kind == "numpy":
    use_kernels(False)
warmup()
bundle = resolve_bundle(sys.argv[2], Path.cwd())
manifest = load_manifest(bundle)
executor = build_edge_executor(kind, bundle, 0, manifest, threads=1)
ready = process_age_s()
print(json.dumps({"executor": executor.backend, "import_s": executor.import_s, "ready_s": ready,
                  "rss_mb": process_usage()["rss_mb"], "torch_imported": "torch" in sys.modules,
                  "numba_imported": "numba" in sys.modules}))
"""


def startup(kind: str, bundle: str, cold: bool) -> dict[str, Any]:
    """One fresh process's start-up figures for executor ``kind``."""
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as cache:
        if cold:
            env["NUMBA_CACHE_DIR"] = cache  # nothing compiled yet: every kernel compiles
        out = subprocess.run([sys.executable, "-c", _CHILD, kind, bundle], capture_output=True, text=True,
                             env=env, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"start-up of executor {kind!r} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _executors_for(kind_models: dict[str, Any], input_spec: Any) -> dict[str, Any]:
    from devit_mq.nodes.executor import ArrayEdgeExecutor, TorchEdgeExecutor

    out = {}
    for kind, model in kind_models.items():
        cls = TorchEdgeExecutor if kind == "torch" else ArrayEdgeExecutor
        out[kind] = cls(model, input_spec, max_batch=64)
    return out


def _models(shape: str) -> tuple[dict[str, Any], Any]:
    """``{executor: model}`` and the input spec for ``shape`` (``default`` or ``vit_ti``)."""
    import torch

    from devit_mq.kernels import vit_numba, vit_numpy
    from devit_mq.model import (
        InputSpec,
        VisionTransformer,
        load_manifest,
        load_submodel,
        preset,
        select_backend,
    )
    from devit_mq.model.numpy_vit import ArrayViT
    from devit_mq.topology.load import resolve_bundle

    if shape == "default":
        bundle = resolve_bundle(DEFAULT_BUNDLE, Path.cwd())
        manifest = load_manifest(bundle)
        model, spec = load_submodel(bundle, 0, manifest), manifest.input
        array = ArrayViT.from_bundle(bundle, 0, manifest)
    else:
        torch.manual_seed(0)
        model = VisionTransformer(preset("vit_tiny_patch16_224")).eval()
        spec = InputSpec(224, 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        array = ArrayViT(model.config, {k: v.numpy() for k, v in model.state_dict().items()})
    select_backend(model, batch_size=1)  # as an edge's torch executor does at start-up
    return {"torch": model, "numba": array.with_ops(vit_numba), "numpy": array.with_ops(vit_numpy)}, spec


def latency(shape: str, batch: int, budget_s: float) -> dict[str, dict[str, float]]:
    """Median and min ms per ``forward_prefix`` of each executor (1 thread, interleaved rounds)."""
    from devit_mq.bench.kernels import interleaved_timings

    models, spec = _models(shape)
    executors = _executors_for(models, spec)
    images = np.random.default_rng(0).integers(0, 256, size=(batch, *spec.image_shape), dtype=np.uint8)
    fns = {kind: (lambda e=e: e.forward_prefix(images)) for kind, e in executors.items()}
    timings = interleaved_timings(fns, budget_s, min_rounds=5, warmup=2)
    attention = executors["torch"].model.attention_backend
    return {kind: {"median_ms": t[0] * 1e3, "min_ms": t[1] * 1e3, "cpu_ms": t[2] * 1e3,
                   **({"attention": attention} if kind == "torch" else {})} for kind, t in timings.items()}


def fused_ops(budget_s: float = 2.0) -> dict[str, dict[str, float]]:
    """Median us per call of each Numba op and its NumPy counterpart, ViT-Ti/16 shapes, 1 thread."""
    from devit_mq.bench.kernels import interleaved_timings
    from devit_mq.kernels import vit_numba, vit_numpy

    rng = np.random.default_rng(0)
    x = rng.standard_normal((197, 192)).astype(np.float32)
    y = rng.standard_normal((197, 192)).astype(np.float32)
    h = rng.standard_normal((197, 768)).astype(np.float32)
    w_qkv = rng.standard_normal((576, 192)).astype(np.float32)
    vec, vec4 = rng.standard_normal(192).astype(np.float32), rng.standard_normal(768).astype(np.float32)
    qkv = rng.standard_normal((1, 197, 576)).astype(np.float32)
    cases = {
        "residual + LayerNorm (197x192)": lambda ops: ops.residual_layernorm(x.copy(), y, vec, vec, vec, 1e-6),
        "bias + GELU (197x768)": lambda ops: ops.bias_gelu(h.copy(), vec4),
        "qkv linear + bias (197x192 @ 192x576)": lambda ops: ops.linear(x, w_qkv, vec4[:576]),
        "attention (3 heads x 197)": lambda ops: ops.attention(qkv, 3),
    }
    out = {}
    for name, case in cases.items():
        t = interleaved_timings({"numpy": lambda c=case: c(vit_numpy), "numba": lambda c=case: c(vit_numba)},
                                budget_s, min_rounds=20, warmup=3)
        out[name] = {"numpy_us": t["numpy"][0] * 1e6, "numba_us": t["numba"][0] * 1e6}
    return out


def create_base_venv(target: Path) -> str:
    """A fresh venv at ``target`` with only the base install of this package (no extras: no torch);
    returns its python. pip's cache makes a repeat quick."""
    repo = Path(__file__).resolve().parents[2]
    venv.EnvBuilder(with_pip=True).create(target)
    python = str(target / "bin" / "python")
    out = subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(repo)],
                         capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"base install failed:\n{out.stdout[-1000:]}{out.stderr[-2000:]}")
    return python


def install_size() -> dict[str, Any]:
    """Seconds to create a base-install venv and its size on disk (MB)."""
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "venv"
        start = time.perf_counter()
        python = create_base_venv(target)
        seconds = time.perf_counter() - start
        size = subprocess.run(["du", "-sm", str(target)], capture_output=True, text=True).stdout.split()[0]
        has_torch = subprocess.run([python, "-c", "import torch"], capture_output=True).returncode == 0
    return {"seconds": seconds, "size_mb": int(size), "torch_installed": has_torch}


def configure_one_thread() -> None:
    from threadpoolctl import threadpool_limits

    from devit_mq.nodes.base import configure_threads, configure_torch_threads

    configure_threads(1)
    configure_torch_threads(1)
    threadpool_limits(1, user_api="blas")
    import numba

    numba.set_num_threads(1)


def report(results: dict[str, Any]) -> str:
    lines = ["| shape | batch | " + " | ".join(f"{k} ms" for k in EXECUTORS) + " | numba/torch | numpy/torch |",
             "|---|---:|" + "---:|" * (len(EXECUTORS) + 2)]
    for row in results["latency"]:
        t = row["timings"]
        cells = " | ".join(f"{t[k]['median_ms']:.2f}" for k in EXECUTORS)
        lines.append(f"| {row['shape']} | {row['batch']} | {cells} | "
                     f"{t['numba']['median_ms'] / t['torch']['median_ms']:.2f} | "
                     f"{t['numpy']['median_ms'] / t['torch']['median_ms']:.2f} |")
    lines += ["", "| executor | cache | import s | ready s | RSS MB | torch imported |", "|---|---|---:|---:|---:|---|"]
    for row in results["startup"]:
        lines.append(f"| {row['executor']} | {row['cache']} | {row['import_s']:.2f} | {row['ready_s']:.2f} | "
                     f"{row['rss_mb']:.0f} | {'yes' if row['torch_imported'] else 'no'} |")
    lines += ["", "| op (1 thread) | NumPy us | Numba us | NumPy / Numba |", "|---|---:|---:|---:|"]
    for name, t in results["fused_ops"].items():
        lines.append(f"| {name} | {t['numpy_us']:.0f} | {t['numba_us']:.0f} | {t['numpy_us'] / t['numba_us']:.1f} |")
    if "install" in results:
        inst = results["install"]
        lines += ["", f"base install (fresh venv, pip cache warm): {inst['size_mb']} MB on disk, "
                      f"{inst['seconds']:.0f} s, torch installed: {inst['torch_installed']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="devit-mq bench executors", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="default,vit_ti", help="comma list of default, vit_ti")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--budget", type=float, default=6.0, help="seconds of timing per shape and batch")
    p.add_argument("--ops-budget", type=float, default=2.0, help="seconds of timing per fused op")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per executor for start-up")
    p.add_argument("--no-cold", action="store_true", help="skip the start-ups with an empty Numba cache")
    p.add_argument("--install", action="store_true", help="also measure a fresh base install (about a minute)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = sorted(set(shapes) - {"default", "vit_ti"})
    if unknown:
        p.error(f"--shapes: unknown {unknown}; choose from default, vit_ti")
    results: dict[str, Any] = {"machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                                           "load_before": os.getloadavg()}, "targets": TARGETS}
    startups = []
    for cache in ("warm",) + (() if args.no_cold else ("cold",)):
        for kind in EXECUTORS:
            if cache == "cold" and kind != "numba":
                continue  # only Numba compiles
            runs = [startup(kind, DEFAULT_BUNDLE, cold=cache == "cold") for _ in range(max(1, args.repeats))]
            best = min(runs, key=lambda r: r["ready_s"])
            startups.append({**best, "cache": cache, "ready_s_all": [r["ready_s"] for r in runs],
                             "rss_mb_all": [r["rss_mb"] for r in runs]})
    results["startup"] = startups
    configure_one_thread()
    results["latency"] = [{"shape": shape, "batch": int(batch), "timings": latency(shape, int(batch), args.budget)}
                          for shape in shapes for batch in args.batches.split(",")]
    results["fused_ops"] = fused_ops(args.ops_budget)
    if args.install:
        results["install"] = install_size()
    results["machine"]["load_after"] = os.getloadavg()
    print(report(results))
    print(f"load average before/after: {results['machine']['load_before']} / {results['machine']['load_after']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0
