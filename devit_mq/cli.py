"""The ``devit-mq`` command: a thin dispatcher.

Each sub-command lives in the module that owns the concept and exposes ``main(argv) -> int``; this
file only maps names to those functions, so ``devit-mq --help`` stays fast (no torch import) and each
sub-command parses its own arguments.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# name -> ("module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("devit_mq.dekd.cli:main", "run the DEKD pipeline from a YAML config and write a bundle"),
    "profile": ("devit_mq.profile.cli:main", "measure this device's sub-model latency grid and write a device profile"),
    "prune": ("devit_mq.prune.cli:main", "prune sub-models of a bundle (heads, MLP neurons) to a MACs budget; writes a new bundle"),
    "check": ("devit_mq.topology.cli:main", "validate a topology YAML (and its bundle) without starting anything"),
    "node": ("devit_mq.nodes.cli:main_node", "start one node of a topology (how multi-host deployments run)"),
    "launch": ("devit_mq.nodes.cli:main_launch", "start and supervise every local node of a ZeroMQ topology"),
    "mpi": ("devit_mq.nodes.cli:main_mpi", "run under mpirun: map ranks to the topology's nodes"),
    "status": ("devit_mq.nodes.status:main", "every node's state from the aggregator (exit 0 ready, 1 degraded, 2 unreachable)"),
    "dashboard": ("devit_mq.nodes.dashboard:main", "serve a live web page of a running topology's nodes and links"),
    "infer": ("devit_mq.nodes.cli:main_infer", "classify image files through a running topology"),
    "demo": ("devit_mq.nodes.cli:main_demo", "launch the default topology and classify the default test split"),
    "bench": ("devit_mq.bench.cli:main", "benchmarks: TOPOLOGY | kernels | wire"),
    "stress": ("devit_mq.bench.stress:main", "open/closed-loop load against a running topology"),
    "testbed": ("devit_mq.testbed.cli:main", "DeViT vs pipeline partitioning vs the monolith on emulated hosts and links (root)"),
    "keys": ("devit_mq.transport.security:main_keys", "generate CURVE key pairs for a secured topology"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: devit-mq COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'devit-mq COMMAND --help' for a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if args[0] in ("-V", "--version"):
        from devit_mq import __version__

        print(f"devit-mq {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"devit-mq: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
