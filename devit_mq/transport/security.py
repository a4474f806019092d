"""ZeroMQ CURVE: key files, the ZAP authenticator, and ``devit-mq keys``.

Layout of a keys folder (what :func:`zmq.auth.create_certificates` writes)::

    keys/
      aggregator.key  aggregator.key_secret
      edge0.key       edge0.key_secret
      admin.key       admin.key_secret        # the operator's tools (launch, shutdown)
      client-0000.key client-0000.key_secret  # one pair per client (`--clients N` issues them in bulk)

``NAME.key`` holds a public key, ``NAME.key_secret`` the pair. Servers (the aggregator and edges,
which bind) admit exactly the public keys of the ``*.key`` files in the folder, and the ZAP handler
reports each admitted connection's **key name** as its ZeroMQ ``User-Id``: that is the identity a
receiver binds the message's claimed ``source`` to (:mod:`devit_mq.nodes.auth`). A key named like a
node of the topology is that node; :data:`~devit_mq.protocol.ADMIN_KEY` is the operator; any other
key is a client that may only speak for itself. Connecting sockets authenticate the server by its
public key. Distribute to each host only the secret file of its own node plus all public files, and
to each client only its own pair.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import zmq
import zmq.auth
import zmq.utils.z85
from zmq.auth.thread import ThreadAuthenticator

from devit_mq.protocol import ADMIN_KEY, NAME_RE

from .base import TransportError

CLIENT_KEY = "client"  # the shared pair of clients without one of their own: they go by "client.<suffix>"


def key_name(name: str) -> str:
    """The key a name authenticates with: ``name`` itself, or for ``KEY.suffix`` names the shared
    ``KEY`` (several processes holding one key, each under its own name)."""
    return name.split(".", 1)[0] if "." in name else name


def may_claim(key: str, name: str) -> bool:
    """May the holder of ``key`` go by ``name``? Its own name, or a ``key.suffix`` name."""
    return name == key or (name.startswith(key + ".") and len(name) > len(key) + 1)


def key_files(keys_dir: Path, name: str) -> tuple[Path, Path]:
    return keys_dir / f"{name}.key", keys_dir / f"{name}.key_secret"


def load_keypair(keys_dir: Path, name: str, fallback: str | None = None) -> tuple[bytes, bytes]:
    """``(public, secret)`` of ``name`` (or of ``fallback`` if ``name`` has no secret file)."""
    for candidate in [name] + ([fallback] if fallback and fallback != name else []):
        _, secret_file = key_files(keys_dir, candidate)
        if secret_file.is_file():
            public, secret = zmq.auth.load_certificate(secret_file)
            if secret is None:
                raise TransportError(f"CURVE: {secret_file} holds no secret key")
            return public, secret
    tried = " or ".join(str(key_files(keys_dir, c)[1]) for c in [name] + ([fallback] if fallback else []))
    raise TransportError(f"CURVE: no key pair for {name!r}: {tried} does not exist "
                         f"(create it with `devit-mq keys {keys_dir} --nodes {name}`)")


def load_public_key(keys_dir: Path, name: str) -> bytes:
    public_file, _ = key_files(keys_dir, name)
    if not public_file.is_file():
        raise TransportError(f"CURVE: no public key for server {name!r}: {public_file} does not exist")
    public, _ = zmq.auth.load_certificate(public_file)
    return public


def public_keys(keys_dir: Path) -> dict[bytes, str]:
    """Every public key of the folder (z85) -> its key name (the file name without ``.key``)."""
    out: dict[bytes, str] = {}
    for public_file in sorted(keys_dir.glob("*.key")):
        name = public_file.stem
        if not NAME_RE.fullmatch(name):
            continue  # not one of ours: a name that could not be a node or client is never admitted
        try:
            public, _ = zmq.auth.load_certificate(public_file)
        except (OSError, ValueError) as exc:
            raise TransportError(f"CURVE: cannot read public key {public_file}: {exc}") from exc
        out[public] = name
    return out


class NamedKeyAuthenticator(ThreadAuthenticator):
    """Admits the folder's public keys whose file names are valid node names, and names each
    connection by its key (ZAP ``User-Id``); any other file in the folder admits nobody."""

    def __init__(self, ctx: zmq.Context, keys_dir: Path) -> None:
        super().__init__(ctx)
        self.names = public_keys(keys_dir)
        self.keys_dir = keys_dir

    def configure_curve(self, domain: str = "*", location: str | os.PathLike = ".") -> None:
        super().configure_curve(domain, location)
        # pyzmq admits every *.key file it finds: keep only the ones we can name
        self.certs[domain] = {k: v for k, v in self.certs.get(domain, {}).items() if k in self.names}

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.names.get(zmq.utils.z85.encode(client_public_key), "")


def start_authenticator(ctx: zmq.Context, keys_dir: Path) -> ThreadAuthenticator:
    """A ZAP handler on ``ctx`` that admits only the public keys found in ``keys_dir`` and reports
    their names as ``User-Id``. Start it before binding; stop it before destroying the context."""
    if not keys_dir.is_dir():
        raise TransportError(f"CURVE: keys folder {keys_dir} does not exist")
    auth = NamedKeyAuthenticator(ctx, keys_dir)
    auth.start()
    auth.configure_curve(domain="*", location=str(keys_dir))
    return auth


def make_server(sock: zmq.Socket, keys_dir: Path, name: str) -> None:
    _, secret = load_keypair(keys_dir, name)
    sock.curve_secretkey = secret
    sock.curve_server = True


def make_client(sock: zmq.Socket, keys_dir: Path, name: str, server: str) -> None:
    public, secret = load_keypair(keys_dir, name)
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_serverkey = load_public_key(keys_dir, server)


def create_keys(keys_dir: str | Path, names: Sequence[str], force: bool = False) -> list[Path]:
    """Write a key pair per name (secret files readable by the owner only); refuses to overwrite
    existing pairs unless ``force``. Returns the secret files written."""
    directory = Path(keys_dir)
    bad = [n for n in names if not NAME_RE.fullmatch(n)]
    if bad:  # names become file names: no paths, no surprises
        raise ValueError(f"not valid node names: {', '.join(map(repr, bad))}")
    existing = [n for n in names if any(p.exists() for p in key_files(directory, n))]
    if existing and not force:
        raise FileExistsError(f"keys already exist in {directory} for {', '.join(existing)} (use --force to replace)")
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        _, secret_file = zmq.auth.create_certificates(str(directory), name)
        os.chmod(secret_file, 0o600)
        written.append(Path(secret_file))
    return written


def main_keys(argv: Sequence[str] | None = None) -> int:
    """``devit-mq keys DIR (--nodes a,b,c | --topology T)``."""
    p = argparse.ArgumentParser(prog="devit-mq keys",
                                description="Generate ZeroMQ CURVE key pairs (NAME.key, NAME.key_secret).")
    p.add_argument("dir", help="folder to write the keys to (the topology's security.keys_dir)")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--nodes", help="comma-separated node (or client) names")
    who.add_argument("--topology", help=f"a topology YAML: one pair per node, plus '{ADMIN_KEY}' and '{CLIENT_KEY}'")
    p.add_argument("--clients", type=int, default=0, metavar="N",
                   help="also issue N client pairs, PREFIX-0000 ... (each client gets its own)")
    p.add_argument("--prefix", default="client", help="name prefix for --clients (default: client)")
    p.add_argument("--force", action="store_true", help="replace existing pairs")
    args = p.parse_args(argv)
    if args.nodes is None and args.topology is None and args.clients <= 0:
        print("devit-mq keys: give --nodes, --topology or --clients N", file=sys.stderr)
        return 2
    if not zmq.has("curve"):
        print("devit-mq keys: this libzmq was built without CURVE", file=sys.stderr)
        return 2
    if args.topology:
        from devit_mq.topology import TopologyError, load_topology

        try:
            topology = load_topology(args.topology, check_bundle=False)
        except TopologyError as exc:
            print(f"devit-mq keys: {exc}", file=sys.stderr)
            return 2
        names = [n.name for n in topology.nodes]
        names += [k for k in (ADMIN_KEY, CLIENT_KEY) if k not in names]
    elif args.nodes is not None:
        names = [n.strip() for n in args.nodes.split(",") if n.strip()]
    else:
        names = []
    names += [f"{args.prefix}-{i:04d}" for i in range(max(0, args.clients))]
    if not names:
        print("devit-mq keys: no node names given", file=sys.stderr)
        return 2
    try:
        written = create_keys(args.dir, names, force=args.force)
    except (FileExistsError, OSError, ValueError) as exc:
        print(f"devit-mq keys: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path.with_suffix('.key')} and {path}")
    return 0
