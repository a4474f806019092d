"""``devit-mq check TOPOLOGY``: validate a topology (and its bundle's manifest) without starting anything."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from .load import bundle_manifest, check_against_bundle, load_topology, read_yaml
from .schema import NodeSpec, Topology, TopologyError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="devit-mq check",
        description="Validate a topology YAML and, unless --no-bundle, check it against its bundle's "
                    "manifest and verify every bundle file against the SHA-256 the manifest records "
                    "(nothing is started). Exit 0 if valid, 2 if not.")
    p.add_argument("topology", help="topology YAML file")
    p.add_argument("--no-bundle", action="store_true", help="skip the bundle checks (schema only)")
    p.add_argument("--no-checksums", action="store_true",
                   help="check the bundle's manifest but do not hash its files")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--ranks", action="store_true",
                     help="print only the number of MPI ranks the topology needs (for scripts)")
    out.add_argument("--nodes", action="store_true",
                     help="print one tab-separated line per node: name, role, host, connect endpoint")
    return p


def _endpoint(node: NodeSpec, transport: str) -> str:
    if transport == "mpi":
        return "(MPI)"
    if node.connect_endpoint is None:
        return "(connects only)"
    bind = node.bind_endpoint
    return node.connect_endpoint + (f"  [binds {bind}]" if bind != node.connect_endpoint else "")


def _settings(node: NodeSpec) -> str:
    parts = [f"threads={node.threads}"]
    if node.role == "edge":
        parts.append(f"executor={node.executor}")
    if node.role != "client":
        parts += [f"attention={node.attention}", f"max_batch={node.max_batch}", f"max_wait_ms={node.max_wait_ms:g}"]
    if node.role == "aggregator":
        parts += [f"deadline_ms={node.deadline_ms:g}", f"missing_policy={node.missing_policy}",
                  f"max_pending={node.max_pending}"]
    return " ".join(parts)


def summary(topology: Topology, manifest: Any | None) -> str:
    """The human-readable report ``devit-mq check`` prints."""
    t = topology
    lines = [f"topology {t.name!r} ({t.source or 'mapping'})",
             f"  transport {t.transport}, codec {t.codec}, image codec {t.image_codec}"
             f"{f' (quality {t.image_quality})' if t.image_codec == 'jpeg' else ''}, "
             f"max message {t.limits.max_message_bytes} B, hwm {t.limits.hwm}"]
    if manifest is not None:
        widths = ", ".join(str(c.embed_dim) for c in manifest.submodels)
        tokens = manifest.fusion.num_prefix_tokens
        lines.append(f"  bundle {t.bundle}: N={manifest.num_parts} sub-models, widths {widths}, "
                     f"{len(manifest.classes)} classes, {tokens} token(s) per edge, "
                     f"input {manifest.input.img_size}px x{manifest.input.in_chans}")
    else:
        lines.append(f"  bundle {t.bundle} (not checked)")
    if t.security.curve:
        lines.append(f"  security: CURVE on, keys in {t.security.keys_dir}")
    else:
        lines.append("  security: none (plain ZeroMQ)" if t.transport == "zmq" else "  security: n/a (MPI)")
    lines.append(f"  {len(t.nodes)} nodes" + (f" (mpirun -n {len(t.nodes)})" if t.transport == "mpi" else "") + ":")
    rows = []
    for node in t.nodes:
        what = f"sub-model {node.submodel}" if node.role == "edge" else ""
        if node.role == "edge" and manifest is not None and node.submodel is not None:
            what += f" ({manifest.submodels[node.submodel].embed_dim}-d)"
        rows.append((f"rank {node.rank}", node.name, node.role, what, _endpoint(node, t.transport), _settings(node)))
    widths_ = [max(len(r[i]) for r in rows) for i in range(5)]
    for row in rows:
        lines.append("    " + "  ".join(c.ljust(w) for c, w in zip(row[:5], widths_, strict=True)) + "  " + row[5])
    return "\n".join(lines)


def _key_problems(topology: Topology) -> list[tuple[str, str]]:
    """With CURVE on, every named node needs its key pair in keys_dir (ZeroMQ clients may share
    ``client``'s)."""
    keys_dir = topology.security.keys_dir
    if not topology.security.curve or keys_dir is None:
        return []
    if not keys_dir.is_dir():
        return [("security.keys_dir", f"{keys_dir} does not exist; create it with "
                 f"`devit-mq keys {keys_dir} --topology {topology.source or 'TOPOLOGY'}`")]
    names = [n.name for n in topology.nodes] + ([] if topology.client else ["client"])
    missing = [n for n in names if not (keys_dir / f"{n}.key_secret").is_file()]
    if missing:
        return [("security.keys_dir", f"no key pair for {', '.join(missing)} in {keys_dir}; create them with "
                 f"`devit-mq keys {keys_dir} --nodes {','.join(missing)}`")]
    return []


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        topology = load_topology(args.topology, check_bundle=False)
        manifest = None
        if not args.no_bundle:
            raw = read_yaml(args.topology)
            manifest = bundle_manifest(topology, raw.get("bundle") if isinstance(raw, dict) else None)
            check_against_bundle(topology, manifest)
            if not args.no_checksums:
                from devit_mq.model.manifest import verify_bundle

                corrupt = verify_bundle(topology.bundle, manifest)
                if corrupt:
                    raise TopologyError([("bundle", msg) for msg in corrupt], topology.source)
        key_problems = _key_problems(topology)
        if key_problems:
            raise TopologyError(key_problems, topology.source)
    except TopologyError as exc:
        print(f"devit-mq check: invalid topology\n{exc}", file=sys.stderr)
        return 2
    if args.ranks:
        print(len(topology.nodes))
    elif args.nodes:
        for node in topology.nodes:
            print("\t".join([node.name, node.role, node.host or "-", node.connect_endpoint or "-"]))
    else:
        print(summary(topology, manifest))
        print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
