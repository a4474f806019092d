"""Fault injection for stress runs: fault specs, edge processes whose transport is a
:class:`~devit_mq.transport.FaultyTransport`, and a launcher that can start, kill and restart them.

A spec is ``drop=0.02,delay_ms=5,jitter_ms=5,duplicate=0.02,corrupt=0.01,peers=edge0+aggregator``:
per-message probabilities, a fixed delay plus uniform jitter, and optionally the peers whose links
are affected (``+``-separated; default: every peer). On a client it wraps the image sends to the
edges; on an edge, its feature (and heartbeat) sends to the aggregator.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from devit_mq.logs import add_log_arguments, setup_logging
from devit_mq.nodes.launcher import Launcher
from devit_mq.topology import NodeSpec
from devit_mq.transport import FaultyTransport, Transport


class FaultSpecError(ValueError):
    """A fault spec string is malformed; the message names the offending item."""


@dataclass(frozen=True)
class FaultSpec:
    drop: float = 0.0
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    duplicate: float = 0.0
    corrupt: float = 0.0
    peers: tuple[str, ...] | None = None

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        values: dict[str, Any] = {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or key not in cls.__dataclass_fields__:
                raise FaultSpecError(f"fault spec item {item!r}: expected KEY=VALUE with KEY one of "
                                     f"{', '.join(cls.__dataclass_fields__)}")
            if key == "peers":
                values[key] = tuple(p for p in value.split("+") if p)
                continue
            try:
                values[key] = float(value)
            except ValueError:
                raise FaultSpecError(f"fault spec item {item!r}: {value!r} is not a number") from None
        spec = cls(**values)
        for key in ("drop", "duplicate", "corrupt"):
            if not 0.0 <= getattr(spec, key) <= 1.0:
                raise FaultSpecError(f"fault spec: {key}={getattr(spec, key)} is not a probability in [0, 1]")
        if spec.delay_ms < 0 or spec.jitter_ms < 0:
            raise FaultSpecError("fault spec: delay_ms and jitter_ms must be >= 0")
        return spec

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["peers"] = list(self.peers) if self.peers is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FaultSpec:
        peers = data.get("peers")
        return cls(**{**data, "peers": tuple(peers) if peers is not None else None})

    def wrap(self, transport: Transport, seed: int = 0) -> FaultyTransport:
        return FaultyTransport(transport, drop=self.drop, delay_s=self.delay_ms / 1e3,
                               jitter_s=self.jitter_ms / 1e3, duplicate=self.duplicate, corrupt=self.corrupt,
                               seed=seed, peers=self.peers)


class FaultLauncher(Launcher):
    """A :class:`Launcher` whose edges may run behind a fault-injecting transport, and whose nodes
    can be killed and restarted mid-run (the stress run's fault scenarios). It only changes the
    launcher's ``node_command`` hook: a faulty edge runs ``python -m devit_mq.bench.faults``, which is
    ``devit-mq node`` with its transport wrapped."""

    def __init__(self, topology, edge_faults: FaultSpec | None = None, faulty_edges: Collection[str] | None = None,
                 seed: int = 0, **kwargs: Any) -> None:
        super().__init__(topology, **kwargs)
        self.edge_faults = edge_faults
        self.faulty_edges = set(faulty_edges) if faulty_edges is not None else None
        self.seed = seed
        self.killed: set[str] = set()

    def node_command(self, spec: NodeSpec) -> list[str]:
        faulty = self.faulty_edges is None or spec.name in self.faulty_edges
        if self.edge_faults is None or spec.role != "edge" or not faulty:
            return super().node_command(spec)
        return [self.python, "-m", "devit_mq.bench.faults", str(self.topology_path), "--name", spec.name,
                "--faults", json.dumps(self.edge_faults.to_dict()), "--seed", str(self.seed + spec.rank),
                *self.node_log_args]

    def kill(self, name: str) -> int:
        """SIGKILL node ``name`` (no goodbye to its peers: a crash); returns its pid."""
        node = self.processes[self._index(name)]
        node.proc.kill()
        node.proc.wait(10)
        self.killed.add(name)
        return node.proc.pid

    def restart(self, name: str) -> int:
        """Start a killed node again under the same name; returns the new pid."""
        node = self.restart_node(name)
        self.killed.discard(name)
        return node.proc.pid

    def alive(self) -> dict[str, bool]:
        return {node.spec.name: node.proc.poll() is None for node in self.processes}


def main(argv: list[str]) -> int:
    """``python -m devit_mq.bench.faults TOPOLOGY --name EDGE --faults JSON``: ``devit-mq node`` whose
    sends go through a FaultyTransport (what FaultLauncher starts)."""
    p = argparse.ArgumentParser(prog="python -m devit_mq.bench.faults")
    p.add_argument("topology", type=Path)
    p.add_argument("--name", required=True)
    p.add_argument("--faults", required=True, help="a FaultSpec as JSON")
    p.add_argument("--seed", type=int, default=0)
    add_log_arguments(p, default_level="info")
    args = p.parse_args(argv)
    setup_logging(args, node=args.name)
    from devit_mq.nodes.cli import run_node

    faults = FaultSpec.from_dict(json.loads(args.faults))
    wrapped: list[FaultyTransport] = []

    def wrap(transport: Transport) -> FaultyTransport:
        wrapped.append(faults.wrap(transport, seed=args.seed))
        return wrapped[-1]

    code = run_node(args.topology, args.name, wrap=wrap, describe=lambda _t: f" behind faults {faults}")
    if wrapped:
        logging.getLogger("devit_mq").info("%s: faults done %s", args.name, wrapped[0].stats)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
