"""``devit-mq bench``: dispatch to one benchmark.

``bench wire`` and ``bench kernels`` are micro-benchmarks of one layer; anything else is a topology
file for the end-to-end runtime benchmark. Each target is imported only when chosen, so a wire
benchmark never pays for importing torch.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# sub-command -> "module:function"; the fallback takes a topology path as its first argument
TARGETS: dict[str, str] = {
    "wire": "devit_mq.bench.wire:main",
    "kernels": "devit_mq.bench.kernels:main",
    "hostile": "devit_mq.bench.hostile:main",
    "floor": "devit_mq.bench.floor:main",
    "executors": "devit_mq.bench.executors:main",
    "balance": "devit_mq.bench.balance:main",
}
RUNTIME = "devit_mq.bench.runtime:main"

USAGE = """usage: devit-mq bench {wire | kernels | executors | hostile | floor | balance | TOPOLOGY.yaml} [ARGS...]

  wire           bytes and encode/decode time of each wire codec
  kernels        attention backends side by side
  executors      edge executors (torch, numba, numpy) side by side: latency, RSS, import, ready time
  hostile        hostile-peer attacks against a launched topology: alive, correct, RSS, recovery
  floor          the floor of one request: bare fan-out/fan-in over raw pyzmq and raw mpi4py
  balance        equal vs balanced decomposition on unequal devices: latency, measured vs predicted edges
  TOPOLOGY.yaml  end-to-end latency and throughput of a running topology

Run 'devit-mq bench TARGET --help' for a target's options."""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    target, rest = TARGETS.get(args[0]), args[1:]
    if target is None:  # a topology path: the runtime benchmark parses it itself
        target, rest = RUNTIME, args
    module_name, func_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:  # a missing dependency inside the benchmark: a real error
            raise
        print(f"devit-mq bench: {module_name} is not available in this installation", file=sys.stderr)
        return 2
    return int(getattr(module, func_name)(rest) or 0)
