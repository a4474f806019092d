"""``devit-mq node | launch | mpi | infer | demo``.

A user's mistake (missing or malformed topology, unknown node, missing bundle, port in use,
unreadable image) is one ``devit-mq: error: ...`` line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from devit_mq.logs import add_log_arguments, log_arguments, setup_logging

log = logging.getLogger("devit_mq")

DEFAULT_TOPOLOGY = "topologies/local-2edge.yaml"
DEFAULT_MPI_TOPOLOGY = "topologies/mpi-2edge.yaml"


def _fail(message: str, code: int = 2) -> int:
    print(f"devit-mq: error: {message}", file=sys.stderr)
    return code


def _one_line(exc: BaseException) -> str:
    """A user error's message on one line (a YAML parser's or a topology's several problems are
    joined with '; ')."""
    parts = [line.strip() for line in str(exc).splitlines()]
    return "; ".join(p for p in parts if p and set(p) != {"^"})


def _warn(message: str) -> None:
    print(f"devit-mq: warning: {message}", file=sys.stderr)


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean a user's mistake (configuration, files), not a bug."""
    from devit_mq.model import BundleError
    from devit_mq.topology import TopologyError
    from devit_mq.transport import TransportError

    from .executor import ExecutorError

    return (TopologyError, TransportError, BundleError, ExecutorError, FileNotFoundError, PermissionError)


# -- where this host keeps the bundle and the keys ---------------------------------------------------
ENV_BUNDLE = "DEVIT_MQ_BUNDLE"
ENV_KEYS_DIR = "DEVIT_MQ_KEYS_DIR"


def add_site_arguments(p: argparse.ArgumentParser) -> None:
    """``--bundle`` and ``--keys-dir``: this host's paths, in place of the topology file's (so one
    file serves every host of a deployment; a container sets the environment variables)."""
    p.add_argument("--bundle", default=os.environ.get(ENV_BUNDLE) or None,
                   help=f"this host's bundle directory, instead of the topology's 'bundle' (env {ENV_BUNDLE})")
    add_keys_argument(p)


def add_keys_argument(p: argparse.ArgumentParser) -> None:
    """``--keys-dir`` alone, for commands that need no bundle (``status``, ``dashboard``)."""
    p.add_argument("--keys-dir", default=os.environ.get(ENV_KEYS_DIR) or None,
                   help=f"this host's CURVE keys, instead of 'security.keys_dir' (env {ENV_KEYS_DIR})")


def load_site_topology(args: argparse.Namespace):
    from devit_mq.topology import load_topology

    return load_topology(args.topology, bundle=args.bundle, keys_dir=args.keys_dir)


# -- node ---------------------------------------------------------------------------------------------
def run_node(topology_path: str | Path, name: str, wrap: Callable[[Any], Any] | None = None,
             describe: Callable[[Any], str] | None = None, bundle: str | None = None,
             keys_dir: str | None = None) -> int:
    """Run node ``name`` of a ZeroMQ topology until it is told to stop. ``wrap`` (optional) wraps its
    transport (fault injection uses it); ``bundle``/``keys_dir`` replace the file's paths (this
    host's). Returns the exit code."""
    from devit_mq.topology import load_topology
    from devit_mq.transport import open_transport

    from .launcher import _node_start_hook
    from .runtime import build_node, serve

    _node_start_hook()
    errors = _user_errors()
    try:
        topology = load_topology(topology_path, bundle=bundle, keys_dir=keys_dir)
        spec = topology.node(name)
        if topology.transport != "zmq":
            return _fail(f"{topology_path}: transport is {topology.transport!r}; run MPI topologies with "
                         f"'mpirun -n {len(topology.nodes)} devit-mq mpi {topology_path}'")
        if spec.role == "client":
            return _fail(f"{name!r} is the topology's client; 'devit-mq node' runs the aggregator and the edges "
                         f"({', '.join(n.name for n in topology.nodes if n.role != 'client')})")
        transport = open_transport(topology, name)
    except errors as exc:
        return _fail(_one_line(exc))
    if wrap is not None:
        transport = wrap(transport)
    try:
        node = build_node(topology, name, transport)
    except errors as exc:
        transport.close()
        return _fail(f"{name}: {_one_line(exc)}")
    except BaseException:
        transport.close()
        raise
    log.info("%s: serving (%s, pid %d)%s", name, node.role, os.getpid(), describe(transport) if describe else "")
    serve(node)
    log.info("%s: stopped; metrics %s", name, json.dumps(node.metrics.snapshot()["counters"]))
    return 0


def main_node(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="devit-mq node", description="Run one node of a ZeroMQ topology.")
    p.add_argument("topology")
    p.add_argument("--name", required=True, help="the node's name in the topology")
    add_site_arguments(p)
    add_log_arguments(p, default_level="info")
    args = p.parse_args(argv)
    setup_logging(args, node=args.name)
    return run_node(args.topology, args.name, bundle=args.bundle, keys_dir=args.keys_dir)


# -- launch -------------------------------------------------------------------------------------------
class _Signalled(BaseException):
    """A stop signal reached the launcher (raised from its handler, so every wait is interrupted)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def main_launch(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="devit-mq launch", description=(
        "Start and supervise every local node of a ZeroMQ topology: a node that dies is restarted with "
        "backoff (the others keep serving, degraded meanwhile). SIGTERM, SIGINT and SIGHUP stop every node."))
    p.add_argument("topology")
    p.add_argument("--log-dir", default=None)
    p.add_argument("--ready-timeout", type=float, default=120.0)
    p.add_argument("--no-restart", action="store_true",
                   help="a node that dies stops every node (exit 1) instead of being restarted")
    add_log_arguments(p)
    args = p.parse_args(argv)
    setup_logging(args)
    from .client import ClientError
    from .launcher import Launcher, LaunchError

    try:
        launcher = Launcher(args.topology, log_dir=args.log_dir, ready_timeout_s=args.ready_timeout,
                            node_log_args=log_arguments(args))
    except (LaunchError, *_user_errors()) as exc:
        return _fail(_one_line(exc), getattr(exc, "exit_code", 2))

    received: list[int] = []

    def on_signal(signum, _frame):
        received.append(signum)
        if len(received) == 1:
            raise _Signalled(signum)
        launcher.kill_all()  # a second signal while stopping: do not wait any longer

    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    code = 0
    try:
        launcher.check_bundle_files()
        launcher.start()
        print(f"all nodes ready (logs in {launcher.log_dir}); Ctrl-C stops them")
        for row in launcher.describe():
            print("  " + ", ".join(f"{k}={v}" for k, v in row.items()))
        sys.stdout.flush()
        launcher.supervise(restart=not args.no_restart)
    except _Signalled as exc:
        print(f"{signal.Signals(exc.signum).name}: stopping nodes", flush=True)
    except LaunchError as exc:
        code = _fail(str(exc), exc.exit_code)
    except ClientError as exc:
        code = _fail(str(exc), 1)
    except _user_errors() as exc:
        code = _fail(_one_line(exc))
    finally:
        try:
            launcher.stop()
        except _Signalled:
            launcher.kill_all()
            launcher.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return code


# -- infer --------------------------------------------------------------------------------------------
def read_image(path: str, image_shape: tuple[int, int, int], warn: Callable[[str], None] | None = None) -> np.ndarray:
    """One image file -> uint8 ``[H,W,C]`` at the bundle's size and channel count (Pillow); ``warn``
    is told when the image had to be converted or resized. OSError/ValueError if unreadable."""
    from PIL import Image

    h, w, c = image_shape
    with Image.open(path) as img:
        img.load()
        mode = "L" if c == 1 else "RGB"
        if img.mode != mode:
            if warn:
                warn(f"{path}: converted from {img.mode} to {mode} ({c} channel{'s' if c > 1 else ''})")
            img = img.convert(mode)
        if img.size != (w, h):
            if warn:
                warn(f"{path}: resized from {img.size[0]}x{img.size[1]} to {w}x{h}")
            img = img.resize((w, h), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
    return arr.reshape(h, w, c)


def _image_problem(path: str) -> str | None:
    """Why ``path`` is not a readable image (checked before connecting), or None."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.verify()
    except FileNotFoundError:
        return "no such file"
    except IsADirectoryError:
        return "is a directory"
    except UnidentifiedImageError:
        return "not an image file Pillow can read"
    except (OSError, ValueError, SyntaxError) as exc:  # PIL raises SyntaxError for some broken headers
        return str(exc) or exc.__class__.__name__
    return None


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm")
INFER_CHUNK = 64  # images read, classified and printed at a time: a large folder streams its answers


def expand_inputs(specs: list[str], recursive: bool = False) -> tuple[list[str], dict[str, str]]:
    """Files, folders and glob patterns -> the image paths in order (folders sorted, by image file
    suffix; patterns sorted, ``**`` matches sub-folders), without repeats, and ``{spec: problem}``
    for a folder without images or a pattern that matches nothing."""
    import glob

    paths: dict[str, None] = {}
    problems: dict[str, str] = {}
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            walk = path.rglob("*") if recursive else path.iterdir()
            found = sorted(str(f) for f in walk if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not found:
                problems[spec] = (f"folder has no image files ({', '.join(IMAGE_SUFFIXES[:4])}, ...)"
                                  + ("" if recursive else "; --recursive looks in sub-folders"))
        elif not path.exists() and glob.has_magic(spec):
            found = sorted(f for f in glob.glob(spec, recursive=True) if Path(f).is_file())
            if not found:
                problems[spec] = "pattern matches no file"
        else:
            found = [spec]  # a file (or a missing one: reported as such)
        paths.update(dict.fromkeys(found))
    return list(paths), problems


def _infer_row(path: str, ans, classes: list[str], edge_of: dict[int, str], problem: str | None) -> dict:
    if ans is None:
        return {"image": path, "label": None, "class": None, "confidence": None, "degraded": False,
                "missing": [], "error": f"cannot read image: {problem or 'unknown error'}", "latency_ms": None}
    return {"image": path, "label": ans.label, "class": classes[ans.label] if ans.ok else None,
            "confidence": float(ans.probs.max()) if ans.ok else None, "degraded": ans.degraded,
            "missing": [edge_of.get(part, f"part {part}") for part in ans.missing], "error": ans.error,
            "latency_ms": round(ans.latency_s * 1e3, 2)}


def _print_row(row: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(row), flush=True)
    elif row["error"] is not None:
        print(f"{row['image']}: ERROR {row['error']}", flush=True)
    else:
        note = (f"  [degraded: no features from {', '.join(row['missing']) or 'some edge'}]"
                if row["degraded"] else "")
        print(f"{row['image']}: {row['class']} ({row['confidence']:.3f}){note}", flush=True)


def main_infer(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="devit-mq infer", description=(
        "Classify image files through a running topology. Each argument is a file, a folder (its image "
        "files, sorted) or a quoted glob pattern ('photos/**/*.jpg'). An unreadable file gets an error "
        "line and exit code 1; the other files are still classified."))
    p.add_argument("topology")
    p.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("-r", "--recursive", action="store_true", help="folders: also their sub-folders")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--json", action="store_true", help="print one JSON object per image")
    add_site_arguments(p)
    args = p.parse_args(argv)
    from .client import ClientError
    from .runtime import Client

    try:
        topology = load_site_topology(args)
    except _user_errors() as exc:
        return _fail(_one_line(exc))
    paths, empty = expand_inputs(args.images, args.recursive)
    if empty and not paths:
        return _fail("no images to classify: " + "; ".join(f"{k}: {v}" for k, v in empty.items()))
    for spec, why in empty.items():
        _warn(f"{spec}: {why}")
    problems = {path: why for path in paths if (why := _image_problem(path)) is not None}
    if len(problems) == len(paths):
        if len(problems) == 1:
            path, why = next(iter(problems.items()))
            return _fail(f"cannot read image {path}: {why}")
        return _fail(f"cannot read any of the {len(paths)} images: "
                     + "; ".join(f"{k}: {v}" for k, v in list(problems.items())[:5])
                     + ("; ..." if len(problems) > 5 else ""))
    try:
        client = Client(topology, timeout_s=args.timeout, connect_timeout_s=args.timeout)
    except (ClientError, *_user_errors()) as exc:
        return _fail(_one_line(exc))
    edge_of = {e.submodel: e.name for e in topology.edges}
    failed = 0
    with client:
        shape = tuple(client.status["image_shape"])
        for lo in range(0, len(paths), INFER_CHUNK):
            chunk = paths[lo: lo + INFER_CHUNK]
            images, readable = [], []
            for path in chunk:
                if path in problems:
                    continue
                try:
                    images.append(read_image(path, shape, warn=_warn))
                    readable.append(path)
                except (OSError, ValueError, SyntaxError) as exc:
                    problems[path] = str(exc)
            pred = client.predict(np.stack(images)) if images else None
            answers = dict(zip(readable, pred.answers, strict=True)) if pred is not None else {}
            for path in chunk:
                row = _infer_row(path, answers.get(path), client.classes, edge_of, problems.get(path))
                failed += row["error"] is not None
                _print_row(row, args.json)
    return 1 if failed or empty else 0


# -- demo ---------------------------------------------------------------------------------------------
def _demo_report(client_node, topology, limit: int | None, processes: list[dict]) -> str:
    from devit_mq.model import load_manifest

    from .demo import load_test_split, reference_probabilities, run_workload, summarize, wire_bytes_per_image

    manifest = load_manifest(topology.bundle)
    split = load_test_split(manifest, limit)
    reference = reference_probabilities(topology, split.images)
    result = run_workload(client_node, split)
    return summarize(result, split, reference, wire_bytes_per_image(topology, manifest), processes, topology,
                     trained=bool(manifest.metadata.get("trained", True)))


def main_demo(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="devit-mq demo", description=(
        "Launch a local topology on the shipped default bundle, classify its test split through it and "
        "compare with the in-process reference."))
    p.add_argument("--topology", default=None, help=f"default: {DEFAULT_TOPOLOGY} ({DEFAULT_MPI_TOPOLOGY} for MPI)")
    p.add_argument("--transport", choices=["zmq", "mpi"], default="zmq")
    p.add_argument("--limit", type=int, default=None, help="classify only the first N test images")
    add_log_arguments(p)
    args = p.parse_args(argv)
    setup_logging(args)
    if args.transport == "mpi":
        return _demo_mpi(args)
    from devit_mq.topology import load_topology

    from .client import ClientError
    from .launcher import Launcher, LaunchError

    path = args.topology or DEFAULT_TOPOLOGY
    try:
        topology = load_topology(path)
        launcher = Launcher(topology, node_log_args=log_arguments(args))
    except (LaunchError, *_user_errors()) as exc:
        return _fail(_one_line(exc), getattr(exc, "exit_code", 2))
    print(f"launching {path}: {1 + len(topology.edges)} node processes (ZeroMQ) ...", flush=True)
    started = time.perf_counter()
    try:
        launcher.check_bundle_files()
        with launcher:
            print(f"all nodes ready after {time.perf_counter() - started:.1f}s (logs in {launcher.log_dir})",
                  flush=True)
            print(_demo_report(launcher.client, topology, args.limit, launcher.describe()))
    except LaunchError as exc:
        return _fail(str(exc), exc.exit_code)
    except ClientError as exc:
        return _fail(str(exc), 1)
    except _user_errors() as exc:
        return _fail(_one_line(exc))
    except ValueError as exc:  # e.g. a bundle that records no data set
        return _fail(_one_line(exc))
    return 0


def _demo_mpi(args) -> int:
    from devit_mq.topology import load_topology

    from .mpi_launch import mpirun_command

    path = args.topology or DEFAULT_MPI_TOPOLOGY
    try:
        topology = load_topology(path)
        cmd = mpirun_command(len(topology.nodes))
    except _user_errors() as exc:
        return _fail(_one_line(exc))
    cmd += [sys.executable, "-m", "devit_mq.cli", "mpi", path, "--run", "demo"]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    print("running: " + " ".join(cmd), flush=True)
    return subprocess.call(cmd)


# -- mpi ----------------------------------------------------------------------------------------------
BUILTIN_RUNS = ("demo", "check")


def resolve_run(spec: str) -> Callable[..., Any] | None:
    """``demo`` / ``check`` (None: built in) or ``module:function``, imported now. The function is
    called on the client rank as ``function(client, topology, run_config)`` once every edge is ready
    (``run_config`` is ``--run-config``'s value or None) and may return an exit code."""
    if spec in BUILTIN_RUNS:
        return None
    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name:
        raise ValueError(f"--run {spec!r}: expected demo, check or MODULE:FUNCTION")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--run {spec!r}: cannot import {module_name}: {exc}") from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ValueError(f"--run {spec!r}: {module_name} has no function {func_name!r}")
    return func


def _check_workload(client_node, topology, n: int, seed: int, json_path: str | None,
                    dead: Callable[[], list[str]], aggregator_gone: Callable[[], bool]) -> int:
    """Classify seeded random images: a smoke test that every node answers, whatever the weights.
    Whatever happens (a dead edge, a lost aggregator, an exception), the answers received so far are
    printed (and written to ``json_path``) before the rank ends."""
    shape = tuple(client_node.status["image_shape"])
    imgs = np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)
    edge_of = {e.submodel: e.name for e in topology.edges}
    answers: dict[int, Any] = {}
    failure = None
    try:
        for i, answer in client_node.stream(imgs, batch_size=4, window=2):
            answers[i] = answer
            if aggregator_gone():
                failure = "the aggregator died: stopped early"
                break
    except Exception as exc:  # report what we have; the caller ends the job
        failure = f"{type(exc).__name__}: {exc}"
    finally:
        got = [answers[i] for i in sorted(answers)]
        errors = sum(1 for a in got if not a.ok)
        degraded = sum(1 for a in got if a.degraded)
        missing: dict[str, int] = {}
        for a in got:
            for part in a.missing:
                missing[edge_of.get(part, f"part {part}")] = missing.get(edge_of.get(part, f"part {part}"), 0) + 1
        lines = [f"answered {len(got)}/{n}, errors {errors}, degraded {degraded}",
                 "labels: " + " ".join(str(answers[i].label) if i in answers else "-" for i in range(n))]
        if missing:
            lines.append("degraded answers lack: " + ", ".join(f"{k} ({v})" for k, v in missing.items()))
        if dead():
            lines.append("dead nodes: " + ", ".join(dead()))
        if failure:
            lines.append(f"incomplete: {failure}")
        print("\n".join(lines), flush=True)
        if json_path:
            rows = [{"index": i, "label": a.label, "degraded": a.degraded,
                     "missing": [edge_of.get(p, f"part {p}") for p in a.missing], "error": a.error}
                    for i, a in sorted(answers.items())]
            Path(json_path).write_text(json.dumps({"images": n, "complete": len(got) == n and not failure,
                                                   "errors": errors, "degraded": degraded, "dead": dead(),
                                                   "failure": failure, "answers": rows}, indent=1) + "\n")
    return 1 if failure or errors else 0


class _GoOnDegraded(Exception):
    """Raised from the readiness wait: an edge died before it was ready; go on without it."""


def main_mpi(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="devit-mq mpi", description=(
        "Run under mpirun: rank r becomes the topology's r-th node (client = rank 0). If a rank dies, "
        "the others name it; the client goes on degraded (or reports what it has) and every rank ends."))
    p.add_argument("topology")
    p.add_argument("--run", default="demo", metavar="demo|check|MODULE:FUNCTION",
                   help="the workload the client rank runs before it stops every node: the demo, "
                        "'check': classify --images N seeded random images and print their labels, or a "
                        "plug-in MODULE:FUNCTION called as FUNCTION(client, topology, RUN_CONFIG)")
    p.add_argument("--run-config", "--bench-config", dest="run_config", default=None,
                   help="a value handed to a MODULE:FUNCTION workload (e.g. its config file)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="with --run check: also write the answers to this file")
    add_log_arguments(p)
    args = p.parse_args(argv)
    setup_logging(args)
    try:
        from mpi4py import MPI
    except ImportError as exc:  # the base install has no MPI
        return _fail(f"devit-mq mpi needs mpi4py and an MPI library ({exc}): pip install 'devit-mq[mpi]'")

    from devit_mq.topology import TopologyError, load_topology

    from . import mpi_launch

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    problem = plugin = None
    topology = ranks = None
    try:
        topology = load_topology(args.topology)
        if topology.transport != "mpi":
            problem = (f"{args.topology}: transport is {topology.transport!r}, not 'mpi': run ZeroMQ topologies "
                       f"with 'devit-mq launch {args.topology}' (MPI topologies set 'transport: mpi')")
        else:
            ranks = topology.mpi_ranks(comm.Get_size())
            if rank == 0:
                plugin = resolve_run(args.run)
    except (TopologyError, ValueError) as exc:
        problem = str(exc)
    try:
        peers = mpi_launch.agree(comm, problem)
    except mpi_launch.StartupError as exc:
        if rank == 0:
            _fail(str(exc))
        if exc.peers:  # every rank arrived: MPI can finalise normally
            return 2
        return mpi_launch.finish(comm, None, 2)
    assert topology is not None and ranks is not None
    names = {r: n for n, r in ranks.items()}
    name = names[rank]
    setup_logging(args, node=name)
    spec = topology.node(name)
    state: dict[str, Any] = {"node": None, "client": None}

    def on_death(dead_rank: int, reason: str) -> None:
        dead_name = names.get(dead_rank, f"rank {dead_rank}")
        role = topology.node(dead_name).role if dead_rank in names else "?"
        print(f"devit-mq mpi: {name} (rank {rank}): node {dead_name!r} ({role}, rank {dead_rank}) died: {reason}",
              file=sys.stderr, flush=True)
        react()

    def react() -> None:
        """Act on every death so far (called again once the node or the client exists)."""
        node, client = state["node"], state["client"]
        for dead_rank in list(watch.dead):
            role = topology.node(names[dead_rank]).role
            if node is not None and role == "client":
                node.stop()  # nobody is left to ask for anything, nor to say shutdown
            if client is not None and role == "edge":
                # its part is zero-filled; sending on to a dead rank would fill MPI's buffers
                client.edges = [e for e in client.edges if e != names[dead_rank]]
            if client is not None and role == "aggregator":
                client.timeout_s = 0.0  # nothing will answer: let every open request time out now

    watch = mpi_launch.RankWatch(comm, peers, on_death)
    watch.start()

    def dead_names() -> list[str]:
        return [f"{names.get(r, r)} (rank {r})" for r in sorted(watch.dead)]

    from devit_mq.transport import open_transport
    from devit_mq.transport.mpi import TAG

    from .runtime import build_node, make_client, serve

    transport = mpi_launch.apply_exit_hook(name, open_transport(topology, name, comm=comm))
    if spec.role != "client":
        try:
            node = build_node(topology, name, transport)
        except Exception as exc:  # e.g. a bundle file missing on this host: the others name this rank
            print(f"devit-mq mpi: {name} (rank {rank}): cannot start: {exc}", file=sys.stderr, flush=True)
            return mpi_launch.finish(comm, None, 1)
        state["node"] = node
        react()  # the client may have died while this node was loading
        serve(node)
        return mpi_launch.finish(comm, watch, 0, transport_tag=TAG)
    from .base import configure_threads
    from .client import ClientError

    configure_threads(spec.threads)
    client = make_client(topology, transport, name)
    state["client"] = client
    react()
    aggregator_rank = ranks[topology.aggregator.name]
    edge_ranks = {ranks[e.name] for e in topology.edges}

    def alive() -> None:
        if aggregator_rank in watch.dead:
            raise ClientError(f"aggregator {topology.aggregator.name!r} (rank {aggregator_rank}) died before "
                              "every edge was ready")
        dead_edges = edge_ranks & set(watch.dead)
        ready = client.status.get("ready")
        if dead_edges and ready is not None and len(ready) + len(dead_edges) >= len(edge_ranks):
            raise _GoOnDegraded()

    code = 0
    try:
        try:
            client.connect(120.0, alive=alive)
        except _GoOnDegraded:
            print(f"devit-mq mpi: client: going on without {', '.join(dead_names())} (degraded answers)",
                  file=sys.stderr, flush=True)
        if args.run == "demo":
            processes = [{"rank": r, "node": n, "role": topology.node(n).role,
                          "submodel": topology.node(n).submodel, "threads": topology.node(n).threads}
                         for n, r in sorted(ranks.items(), key=lambda kv: kv[1])]
            print(_demo_report(client, topology, args.limit, processes), flush=True)
        elif args.run == "check":
            code = _check_workload(client, topology, args.images, args.seed, args.json, dead_names,
                                   lambda: aggregator_rank in watch.dead)
        else:
            assert plugin is not None
            code = int(plugin(client, topology, args.run_config) or 0)
    except KeyboardInterrupt:
        code = _fail("interrupted", 130)
    except ClientError as exc:
        code = _fail(str(exc), 1)
    except Exception as exc:  # a workload's failure ends the job with its message, on every rank
        code = _fail(f"--run {args.run} failed: {type(exc).__name__}: {exc}", 1)
    finally:
        client.shutdown_nodes()
        client.close()
    if watch.dead:
        print(f"devit-mq mpi: client: finished degraded; dead: {', '.join(dead_names())}", file=sys.stderr,
              flush=True)
        code = max(code, 1)
    return mpi_launch.finish(comm, watch, code, transport_tag=TAG)
