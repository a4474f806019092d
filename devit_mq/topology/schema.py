"""The topology: which process runs what, where, and how they talk.

A topology is a YAML file (or the equivalent mapping)::

    name: local-2edge
    bundle: default          # a path (relative paths resolve against the YAML file's folder), or the
                             # name of a bundle shipped in the package: devit_mq/assets/bundles/<name>/
    transport: zmq           # zmq | mpi
    codec: int8              # features edge->aggregator: fp32 | fp16 | bf16 | int8 | int8-block
    image_codec: raw         # images client->edges: raw (uint8 as they are) | jpeg (Pillow, lossy)
    image_quality: 90        # the JPEG quality the clients encode at (1-95; only with jpeg)
    limits: {max_message_bytes: 16777216, hwm: 1000}
    security: {curve: false, keys_dir: keys/}   # ZeroMQ CURVE; keys from `devit-mq keys DIR --nodes ...`
    defaults:                # any node setting below; a node's own value wins
      threads: 1             # torch (and numba) threads for that process
      attention: auto        # torch | naive | numba | cuda | auto (calibrated at start-up)
      max_batch: 8           # dynamic batching: at most this many images per compute batch
      max_wait_ms: 0.0       #   ...waiting at most this long for more (0: take what is queued, never wait)
      executor: auto         # edges: auto | torch | numba | numpy (auto: the fastest torch-free one here)
    aggregator:
      name: aggregator
      host: 127.0.0.1        # where peers connect
      port: 5600             # inbox for features, control and client hellos
      deadline_ms: 1000      # fuse at this age even if not all N feature sets are in
      missing_policy: degrade   # degrade (zero-fill + flag) | error
      max_pending: 10000     # bound on pending requests (oldest expire first)
    edges:
      - {name: edge0, submodel: 0, host: 127.0.0.1, port: 5610}
      - {name: edge1, submodel: 1, host: 127.0.0.1, port: 5611, threads: 1}
    client: {name: client}   # only needed for MPI (the client is a rank there)

Keys, by section (everything not marked *required* has the default shown):

- top level: ``name`` (*required*), ``bundle`` (*required*), ``transport`` (``zmq``), ``codec``
  (``fp16``), ``image_codec`` (``raw``), ``image_quality`` (90: the clients' JPEG quality, 1-95,
  used only with ``image_codec: jpeg``), ``limits``, ``security``, ``defaults``, ``aggregator``
  (*required*), ``edges`` (*required*, a non-empty list), ``client`` (*required* for MPI).
- ``limits``: ``max_message_bytes`` (16 MiB; larger messages are refused by the sender and dropped by
  the receiver), ``hwm`` (1000: messages queued per peer before a send waits, then times out).
- ``security``: ``curve`` (false), ``keys_dir`` (``keys``, relative to the YAML file's folder). With
  CURVE on, every node needs ``<name>.key_secret`` in ``keys_dir`` (an implicit ZeroMQ client without
  its own pair uses ``client``'s), and servers admit only the public keys (``*.key``) found there.
- every node: ``name`` (*required*: letters, digits, ``_ . -``), ``role`` (optional; must match the
  section), ``rank`` (MPI rank; by default client 0, aggregator 1, edges in listed order).
- aggregator and edges: ``host`` (``127.0.0.1``) + ``port``, *or* ``ipc`` (a Unix socket path,
  e.g. ``/tmp/devit-edge0.sock``) -- one of them is *required* with ZeroMQ; ``bind`` (the endpoint
  to bind, default ``tcp://<host>:<port>`` for a loopback host, otherwise ``tcp://*:<port>``);
  ``threads`` (1), ``attention`` (``auto``), ``max_batch`` (8), ``max_wait_ms`` (0.0).
- edges only: ``submodel`` (*required*: the bundle's sub-model index; each of 0..N-1 exactly once),
  ``embed_dim`` (optional: the expected feature width, checked against the bundle), ``max_queue_ms``
  (0 = off: admission control; a request that has waited longer when its batch starts is answered
  ``overloaded`` at once instead of computed late), ``executor`` (``auto``: what runs the
  sub-model; ``torch``, ``numba`` (NumPy + our Numba kernels), ``numpy`` (NumPy only); ``auto`` times
  ``numba`` and ``numpy`` at start-up and keeps the faster, or takes ``torch`` when ``attention``
  names a backend only torch runs: ``torch``, ``naive``, ``cuda``). ``attention`` applies to the torch
  executor; ``numba`` takes ``auto``/``numba`` there, ``numpy`` only ``auto``. ``profile`` (optional:
  the device profile of the edge's host, from ``devit-mq profile``, relative to the YAML file's
  folder); a bundle sized for unequal devices (``students.balance``) must run each sub-model on the
  device it was sized for, and the edge logs the profile's predicted latency beside its measured one.
  ``speed`` (optional, in (0, 1], default 1): emulate a slower device on this one: every forward is
  stretched to ``1 / speed`` of its time (a CPU quota cannot slow a short batch-1 forward; the
  README says why); its profile must have been measured at the same speed.
- aggregator only: ``deadline_ms`` (1000), ``missing_policy`` (``degrade``), ``max_pending`` (10000).
- aggregator and edges: ``cpus`` (optional, per node: a list of CPU numbers of its host to pin the
  process to, e.g. ``[1]``; checked against the host when the node starts).
- aggregator and edges: ``metrics_port`` (optional, off by default): serve Prometheus ``/metrics`` on
  that TCP port (loopback only for a loopback host, all interfaces otherwise); it must not clash with
  any other port of the same host.
- client: ``threads`` (1).
- ``defaults`` may hold ``host``, ``metrics_port`` and any of the tunables (``threads``, ``attention``, ``max_batch``,
  ``max_wait_ms``, ``deadline_ms``, ``missing_policy``, ``max_pending``, ``max_queue_ms``, ``executor``); each applies to the roles
  that take it.

Every mistake is reported as a :class:`TopologyError` whose lines start with the key path
(``edges[1].port: 5610 clashes with edges[0].port``); all problems found are reported at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devit_mq.protocol import (
    ATTENTION_BACKENDS,
    DEFAULT_HWM,
    DEFAULT_JPEG_QUALITY,
    DEFAULT_MAX_MESSAGE_BYTES,
    EDGE_EXECUTORS,
    FEATURE_CODECS,
    IMAGE_CODECS,
    JPEG_QUALITY_RANGE,
    MAX_PARTS,
    MISSING_POLICIES,
    NAME_RE,
    ROLES,
    TRANSPORTS,
)

CODECS = FEATURE_CODECS  # what `codec:` takes
# Linux's sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
MAX_IPC_PATH = 107

TOP_KEYS = ("name", "bundle", "transport", "codec", "image_codec", "image_quality", "limits", "security", "defaults",
            "aggregator", "edges", "client")
LIMIT_KEYS = ("max_message_bytes", "hwm")
SECURITY_KEYS = ("curve", "keys_dir")
ADDRESS_KEYS = ("host", "port", "ipc", "bind")
COMPUTE_KEYS = ("threads", "attention", "max_batch", "max_wait_ms")
PLACEMENT_KEYS = ("cpus",)  # per node only: which CPUs of its host the process may run on
OPS_KEYS = ("metrics_port",)  # Prometheus /metrics on this TCP port of the node's host (off when absent)
AGGREGATOR_KEYS = ("deadline_ms", "missing_policy", "max_pending")
EDGE_KEYS = ("submodel", "embed_dim", "max_queue_ms", "executor", "profile", "speed")
NODE_KEYS: dict[str, tuple[str, ...]] = {
    "edge": ("name", "role", "rank", *ADDRESS_KEYS, *COMPUTE_KEYS, *PLACEMENT_KEYS, *OPS_KEYS, *EDGE_KEYS),
    "aggregator": ("name", "role", "rank", *ADDRESS_KEYS, *COMPUTE_KEYS, *PLACEMENT_KEYS, *OPS_KEYS,
                   *AGGREGATOR_KEYS),
    "client": ("name", "role", "rank", "threads"),
}
DEFAULTS_KEYS = ("host", *COMPUTE_KEYS, *OPS_KEYS, *AGGREGATOR_KEYS, "max_queue_ms", "executor")
BUILTIN_DEFAULTS: dict[str, Any] = {
    "host": "127.0.0.1", "threads": 1, "attention": "auto", "max_batch": 8, "max_wait_ms": 0.0,
    "deadline_ms": 1000.0, "missing_policy": "degrade", "max_pending": 10000, "max_queue_ms": 0.0,
    "executor": "auto", "metrics_port": None,
}
# what each torch-free executor accepts as `attention` (it runs its own; torch runs any)
EXECUTOR_ATTENTION = {"numba": ("auto", "numba"), "numpy": ("auto",)}
_ALL_NODE_KEYS = sorted({k for keys in NODE_KEYS.values() for k in keys})
_LOOPBACK_NAMES = ("localhost", "ip6-localhost")


class TopologyError(ValueError):
    """A topology is invalid. ``problems`` holds ``(key path, message)`` pairs; ``str()`` has one line
    per problem, each starting with the key path (and the file, when there is one)."""

    def __init__(self, problems: str | Iterable[tuple[str, str]], source: str | Path | None = None) -> None:
        self.problems: list[tuple[str, str]] = [("", problems)] if isinstance(problems, str) else list(problems)
        self.source = str(source) if source is not None else None
        super().__init__(str(self))

    @property
    def path(self) -> str:
        """The key path of the first problem (``""`` for the document itself)."""
        return self.problems[0][0] if self.problems else ""

    def __str__(self) -> str:
        prefix = f"{self.source}: " if self.source else ""
        lines = [f"{prefix}{path}: {msg}" if path else f"{prefix}{msg}" for path, msg in self.problems]
        return "\n".join(lines)


class UnknownNodeError(TopologyError, KeyError):
    """``topology.node(name)`` for a name the topology does not have (a KeyError, too)."""

    __str__ = TopologyError.__str__


@dataclass(frozen=True)
class LinkLimits:
    """The topology's ``limits`` section: what every link of it carries (the receiver's full set of
    bounds is :class:`devit_mq.wire.Limits`, which takes ``max_message_bytes`` from here)."""

    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    hwm: int = DEFAULT_HWM


@dataclass(frozen=True)
class Security:
    curve: bool = False
    keys_dir: Path | None = None


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _tcp_host(host: str) -> str:
    """IPv6 literals go in brackets inside a ZeroMQ tcp:// endpoint."""
    return f"[{host}]" if ":" in host else host


@dataclass(frozen=True)
class NodeSpec:
    """One process of the topology. Role-specific settings are ``None`` on the other roles."""

    name: str
    role: str
    rank: int
    submodel: int | None = None
    host: str | None = None
    port: int | None = None
    ipc: str | None = None
    bind: str | None = None
    threads: int = 1
    attention: str = "torch"
    max_batch: int = 8
    max_wait_ms: float = 0.0
    deadline_ms: float | None = None
    missing_policy: str | None = None
    max_pending: int | None = None
    embed_dim: int | None = None
    max_queue_ms: float | None = None  # edges: admission control (0: off)
    executor: str | None = None  # edges: what runs the sub-model (auto | torch | numba | numpy)
    profile: str | None = None  # edges: the device profile file of the edge's host (devit-mq profile)
    speed: float = 1.0  # edges: < 1 emulates a slower device (every forward stretched to 1/speed)
    cpus: tuple[int, ...] | None = None  # CPU affinity on its host (None: the scheduler decides)
    metrics_port: int | None = None  # Prometheus /metrics (None: not served)
    key_path: str = field(default="", compare=False)  # where it was declared, e.g. "edges[1]"

    @property
    def has_address(self) -> bool:
        return self.port is not None or self.ipc is not None

    @property
    def connect_endpoint(self) -> str | None:
        """The ZeroMQ endpoint peers connect to (``None`` for a node without an address)."""
        if self.ipc is not None:
            return f"ipc://{self.ipc}"
        if self.port is not None:
            return f"tcp://{_tcp_host(self.host or '127.0.0.1')}:{self.port}"
        return None

    @property
    def bind_endpoint(self) -> str | None:
        """The ZeroMQ endpoint this node binds. A loopback host binds only loopback (a local
        topology is not exposed to the network); any other host binds all interfaces, because the
        address peers use (``host``) may be a NAT or DNS name the machine does not own."""
        if self.bind is not None:
            return self.bind
        if self.ipc is not None:
            return f"ipc://{self.ipc}"
        if self.port is not None:
            host = self.host or "127.0.0.1"
            return f"tcp://{_tcp_host(host)}:{self.port}" if _is_loopback(host) else f"tcp://*:{self.port}"
        return None

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """Where ``/metrics`` listens: like :attr:`bind_endpoint`, only loopback for a loopback host
        (a local topology is not exposed), all interfaces otherwise (Prometheus scrapes from afar)."""
        if self.metrics_port is None:
            return None
        host = self.host or "127.0.0.1"
        return ("127.0.0.1" if _is_loopback(host) else "0.0.0.0", self.metrics_port)


@dataclass(frozen=True)
class Link:
    """An outgoing link of a :class:`RoutePlan`: messages to ``peer`` go to ``endpoint``.

    ``pattern``: ``request`` (the peer answers over this same connection: hellos, features),
    ``push`` (one-way: images and control to an edge). ``eager`` links connect at start-up, the
    others on first use."""

    peer: str
    endpoint: str | None
    pattern: str
    eager: bool


@dataclass(frozen=True)
class RoutePlan:
    """A node's wiring, computed from the topology (:meth:`Topology.route_plan`).

    ``inbox`` is how the bound endpoint ``bind`` behaves: ``answering`` (it can reply to whoever
    connected, :meth:`devit_mq.transport.Transport.reply`), ``receiving`` (it only receives), or
    ``None`` (the node binds nothing: a client)."""

    node: str
    role: str
    bind: str | None
    inbox: str | None
    links: tuple[Link, ...]

    def link(self, peer: str) -> Link | None:
        return next((link for link in self.links if link.peer == peer), None)


@dataclass(frozen=True)
class Topology:
    """A validated topology. ``edges`` is sorted by sub-model index; ``nodes`` is in rank order."""

    name: str
    bundle: Path
    transport: str
    codec: str
    image_codec: str
    limits: LinkLimits
    security: Security
    aggregator: NodeSpec
    edges: tuple[NodeSpec, ...]
    client: NodeSpec | None = None
    source: Path | None = field(default=None, compare=False)
    image_quality: int = DEFAULT_JPEG_QUALITY  # what clients encode JPEG images at

    @property
    def nodes(self) -> tuple[NodeSpec, ...]:
        everyone = [self.aggregator, *self.edges] + ([self.client] if self.client else [])
        return tuple(sorted(everyone, key=lambda n: n.rank))

    @property
    def num_edges(self) -> int:
        return len(self.edges)

    def node(self, name: str) -> NodeSpec:
        for node in self.nodes:
            if node.name == name:
                return node
        known = ", ".join(n.name for n in self.nodes)
        raise UnknownNodeError([("", f"no node named {name!r} in topology {self.name!r} (nodes: {known})")],
                               self.source)

    def edge_for(self, submodel: int) -> NodeSpec:
        """The edge that runs sub-model ``submodel``."""
        for edge in self.edges:
            if edge.submodel == submodel:
                return edge
        raise UnknownNodeError([("", f"no edge runs sub-model {submodel} in topology {self.name!r}")],
                               self.source)

    def mpi_ranks(self, world_size: int | None = None) -> dict[str, int]:
        """Node name -> MPI rank. With ``world_size`` (the communicator's size), a mismatch is a
        :class:`TopologyError` that says how many ranks to start."""
        nodes = self.nodes
        if world_size is not None and world_size != len(nodes):
            names = ", ".join(n.name for n in nodes)
            raise TopologyError(
                [("", f"MPI started {world_size} rank(s) but topology {self.name!r} has {len(nodes)} nodes "
                      f"({names}): run `mpirun -n {len(nodes)} ...`")], self.source)
        return {n.name: n.rank for n in nodes}

    def route_plan(self, node: str) -> RoutePlan:
        """How ``node`` (a node of this topology, or any other name: an implicit client) is wired:
        the one place that turns roles into sockets, so transports follow a plan and know no roles.

        The aggregator binds an inbox that answers connections (features, control, client hellos
        come in; results go back over the connection that asked) and reaches each edge's inbox;
        an edge binds an inbox that only receives (images, control) and reaches the aggregator; a
        client reaches the aggregator (hello, then answers come back) and every edge (images)."""
        spec = next((n for n in self.nodes if n.name == node), None)
        role = spec.role if spec is not None else "client"
        agg = self.aggregator
        if role == "aggregator":
            return RoutePlan(node, role, agg.bind_endpoint, "answering",
                             tuple(Link(e.name, e.connect_endpoint, "push", eager=False) for e in self.edges))
        to_agg = Link(agg.name, agg.connect_endpoint, "request", eager=True)
        if role == "edge":
            assert spec is not None
            return RoutePlan(node, role, spec.bind_endpoint, "receiving", (to_agg,))
        return RoutePlan(node, role, None, None,
                         (to_agg, *(Link(e.name, e.connect_endpoint, "push", eager=True) for e in self.edges)))

    def to_dict(self) -> dict[str, Any]:
        """A mapping that :func:`devit_mq.topology.load_topology` reads back into an equal topology
        (paths made absolute, defaults spelled out): how to hand a topology to another process."""
        def node_dict(n: NodeSpec) -> dict[str, Any]:
            allowed = NODE_KEYS[n.role]
            d = {k: v for k, v in dataclasses.asdict(n).items() if k in allowed and v is not None}
            d.pop("role", None)
            if "cpus" in d:
                d["cpus"] = list(d["cpus"])
            return d

        out: dict[str, Any] = {
            "name": self.name, "bundle": str(self.bundle), "transport": self.transport, "codec": self.codec,
            "image_codec": self.image_codec, "image_quality": self.image_quality,
            "limits": dataclasses.asdict(self.limits),
            "security": {"curve": self.security.curve,
                         **({"keys_dir": str(self.security.keys_dir)} if self.security.keys_dir else {})},
            "aggregator": node_dict(self.aggregator),
            "edges": [node_dict(e) for e in sorted(self.edges, key=lambda e: e.rank)],
        }
        if self.client is not None:
            out["client"] = node_dict(self.client)
        return out


# --------------------------------------------------------------------------------------------------
# Validation


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


class _Checker:
    """Collects ``(key path, message)`` problems while reading an untrusted mapping."""

    def __init__(self) -> None:
        self.problems: list[tuple[str, str]] = []

    def error(self, path: str, message: str) -> None:
        self.problems.append((path, message))

    def mapping(self, value: Any, path: str) -> dict[str, Any] | None:
        if isinstance(value, Mapping):
            bad = [k for k in value if not isinstance(k, str)]
            for k in bad:
                self.error(path, f"keys must be strings, got {k!r}")
            return {k: v for k, v in value.items() if isinstance(k, str)}
        self.error(path, f"expected a mapping, got {_type_name(value)} {value!r}")
        return None

    def keys(self, data: Mapping[str, Any], path: str, allowed: Iterable[str], required: Iterable[str] = (),
             elsewhere: Callable[[str], str | None] | None = None) -> None:
        allowed = list(allowed)
        for key in data:
            if key in allowed:
                continue
            hint = elsewhere(key) if elsewhere else None
            if hint is None:
                close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
                hint = f"unknown key; did you mean {close[0]!r}?" if close else \
                    f"unknown key; known keys here: {', '.join(allowed)}"
            self.error(_join(path, key), hint)
        for key in required:
            if key not in data:
                self.error(_join(path, key), "required key is missing")

    def value(self, data: Mapping[str, Any], key: str, path: str, kind: type, default: Any = None, *,
              choices: tuple[str, ...] | None = None, minimum: float | None = None,
              above: float | None = None, maximum: float | None = None) -> Any:
        """``data[key]`` checked for type and range; ``default`` if absent; ``None`` if wrong."""
        if key not in data:
            return default
        value, where = data[key], _join(path, key)
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            kind_name = "a number"
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
            kind_name = "an integer"
        elif kind is bool:
            ok = isinstance(value, bool)
            kind_name = "true or false"
        else:
            ok = isinstance(value, str)
            kind_name = "a string"
        if not ok:
            self.error(where, f"expected {kind_name}, got {_type_name(value)} {value!r}")
            return None
        if kind is float:
            value = float(value)
        if kind is str and not value.strip():
            self.error(where, "must not be empty")
            return None
        if choices is not None and value not in choices:
            close = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            self.error(where, f"{value!r} is not one of {', '.join(choices)}{hint}")
            return None
        if minimum is not None and value < minimum:
            self.error(where, f"must be >= {minimum:g}, got {value!r}")
            return None
        if above is not None and value <= above:
            self.error(where, f"must be > {above:g}, got {value!r}")
            return None
        if maximum is not None and value > maximum:
            self.error(where, f"must be <= {maximum:g}, got {value!r}")
            return None
        return value


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


# Checks shared by `defaults` and the nodes: key -> (type, keyword checks).
_TUNABLES: dict[str, tuple[type, dict[str, Any]]] = {
    "host": (str, {}),
    "threads": (int, {"minimum": 1}),
    "attention": (str, {"choices": ATTENTION_BACKENDS}),
    "max_batch": (int, {"minimum": 1}),
    "max_wait_ms": (float, {"minimum": 0}),
    "deadline_ms": (float, {"above": 0}),
    "missing_policy": (str, {"choices": MISSING_POLICIES}),
    "max_pending": (int, {"minimum": 1}),
    "max_queue_ms": (float, {"minimum": 0}),
    "executor": (str, {"choices": EDGE_EXECUTORS}),
    "metrics_port": (int, {"minimum": 1, "maximum": 65535}),
}


def _role_hint(role: str) -> Callable[[str], str | None]:
    """For a key another role takes, say so instead of 'unknown key'."""
    def hint(key: str) -> str | None:
        owners = [r for r, keys in NODE_KEYS.items() if key in keys and r != role]
        if not owners:
            return None
        return f"'{key}' is not a setting of {'an' if role[0] in 'ae' else 'a'} {role} " \
               f"(only of: {', '.join(owners)})"
    return hint


def _resolve_relative(value: str, base_dir: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base_dir / path)


def _parse_node(ck: _Checker, raw: Any, path: str, role: str, defaults: Mapping[str, Any],
                transport: str, base_dir: Path) -> dict[str, Any] | None:
    data = ck.mapping(raw, path)
    if data is None:
        return None
    required = ["name"] + (["submodel"] if role == "edge" else [])
    ck.keys(data, path, NODE_KEYS[role], required, elsewhere=_role_hint(role))
    out: dict[str, Any] = {"role": role, "key_path": path}
    out["name"] = ck.value(data, "name", path, str)
    if out["name"] is not None and not NAME_RE.fullmatch(out["name"]):
        ck.error(_join(path, "name"), f"{out['name']!r} is not a valid node name "
                 "(1-64 characters: letters, digits, '_', '.', '-'; starting with a letter or digit)")
        out["name"] = None
    if "role" in data:
        given = ck.value(data, "role", path, str, choices=ROLES)
        if given is not None and given != role:
            section = {"edge": "edges", "aggregator": "aggregator", "client": "client"}[given]
            ck.error(_join(path, "role"), f"{given!r} does not match this section; {given} nodes go under "
                     f"'{section}'")
    out["rank"] = ck.value(data, "rank", path, int, minimum=0)
    for key in NODE_KEYS[role]:
        if key in _TUNABLES:
            kind, checks = _TUNABLES[key]
            out[key] = ck.value(data, key, path, kind, defaults.get(key, BUILTIN_DEFAULTS[key]), **checks)
    if "cpus" in data:
        out["cpus"] = _parse_cpus(ck, data["cpus"], _join(path, "cpus"))
    if role == "edge":
        out["submodel"] = ck.value(data, "submodel", path, int, minimum=0)
        out["embed_dim"] = ck.value(data, "embed_dim", path, int, minimum=1)
        out["profile"] = _parse_profile(ck, data, path, base_dir)
        out["speed"] = ck.value(data, "speed", path, float, 1.0, above=0, maximum=1)
        _check_executor_attention(ck, out, path)
    if role == "client":
        return out
    out["port"] = ck.value(data, "port", path, int, minimum=1, maximum=65535)
    ipc = ck.value(data, "ipc", path, str)
    if ipc is not None:
        ipc = ipc.removeprefix("ipc://")
        resolved = str(_resolve_relative(ipc, base_dir))
        if len(resolved.encode()) > MAX_IPC_PATH:
            ck.error(_join(path, "ipc"), f"{resolved!r} is {len(resolved.encode())} bytes; a Unix socket path "
                     f"holds at most {MAX_IPC_PATH}")
        ipc = resolved
    out["ipc"] = ipc
    bind = ck.value(data, "bind", path, str)
    if bind is not None and not bind.startswith(("tcp://", "ipc://")):
        ck.error(_join(path, "bind"), f"{bind!r} is not a ZeroMQ endpoint (tcp://HOST:PORT or ipc://PATH)")
    out["bind"] = bind
    if "port" in data and "ipc" in data:
        ck.error(_join(path, "ipc"), "give either 'port' (with 'host') or 'ipc', not both")
    elif transport == "zmq" and "port" not in data and "ipc" not in data:
        ck.error(path, "needs an address for ZeroMQ: 'port' (with 'host') or 'ipc'")
    return out


def _parse_profile(ck: _Checker, data: dict[str, Any], path: str, base_dir: Path) -> str | None:
    """An edge's device profile: a readable profile file (relative to the YAML file's folder)."""
    value = ck.value(data, "profile", path, str)
    if value is None:
        return None
    from devit_mq.profile.device import ProfileError, load_profile

    resolved = str(_resolve_relative(value, base_dir))
    try:
        load_profile(resolved)
    except ProfileError as exc:
        ck.error(_join(path, "profile"), str(exc))
        return None
    return resolved


def _check_executor_attention(ck: _Checker, edge: dict[str, Any], path: str) -> None:
    """A torch-free executor runs its own attention: an attention backend it does not run is a
    contradiction (``cuda`` in particular would silently not be used)."""
    executor, attention = edge.get("executor"), edge.get("attention")
    allowed = EXECUTOR_ATTENTION.get(executor or "")
    if allowed is not None and attention is not None and attention not in allowed:
        ck.error(_join(path, "attention"), f"{attention!r} does not run in executor {executor!r} (it runs its "
                 f"own {executor} attention; attention may be {' or '.join(allowed)} there); use "
                 f"executor 'torch' or 'auto' for attention {attention!r}")


def _parse_cpus(ck: _Checker, value: Any, where: str) -> tuple[int, ...] | None:
    """A non-empty list of distinct CPU numbers (whether the host has them is checked where the node
    starts: a multi-host topology describes other machines)."""
    if (not isinstance(value, list) or not value
            or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in value)):
        ck.error(where, f"expected a non-empty list of CPU numbers (ints >= 0), got {value!r}")
        return None
    if len(set(value)) != len(value):
        ck.error(where, f"lists a CPU twice: {value}")
        return None
    return tuple(value)


def _parse_defaults(ck: _Checker, raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    data = ck.mapping(raw, "defaults")
    if data is None:
        return {}
    ck.keys(data, "defaults", DEFAULTS_KEYS, elsewhere=lambda k: (
        f"'{k}' is per node and cannot have a default" if k in _ALL_NODE_KEYS else None))
    out = {}
    for key in DEFAULTS_KEYS:
        kind, checks = _TUNABLES[key]
        value = ck.value(data, key, "defaults", kind, **checks)
        if value is not None:
            out[key] = value
    return out


def _check_unique(ck: _Checker, nodes: list[dict[str, Any]], key: str, describe: Callable[[dict[str, Any]], Any],
                  message: Callable[[Any, dict[str, Any]], str]) -> None:
    """Report every node whose ``describe(node)`` equals an earlier node's (``None`` is skipped)."""
    seen: dict[Any, dict[str, Any]] = {}
    for node in nodes:
        ident = describe(node)
        if ident is None:
            continue
        if ident in seen:
            ck.error(_join(node["key_path"], key), message(node.get(key), seen[ident]))
        else:
            seen[ident] = node


def _check_ports(ck: _Checker, nodes: list[dict[str, Any]]) -> None:
    """No two TCP ports of one host may be the same, whether a node's ``port`` or its ``metrics_port``."""
    seen: dict[tuple[str, int], str] = {}
    for node in nodes:
        for key in ("port", "metrics_port"):
            if node.get(key) is None:
                continue
            ident = (_host_key(node.get("host")), node[key])
            where = _join(node["key_path"], key)
            if ident in seen:
                ck.error(where, f"{node[key]} clashes with {seen[ident]}")
            else:
                seen[ident] = where


def _host_key(host: str | None) -> str:
    return "127.0.0.1" if host is None or host in _LOOPBACK_NAMES else host


def _assign_ranks(ck: _Checker, nodes: list[dict[str, Any]]) -> None:
    """Explicit ranks are kept; the others take the free ranks in the default order (client,
    aggregator, edges as listed). Every rank must end up in 0..K-1 exactly once."""
    count = len(nodes)
    _check_unique(ck, nodes, "rank", lambda n: n.get("rank"),
                  lambda v, first: f"rank {v} is already taken by {first['key_path']}")
    taken = {n["rank"] for n in nodes if n.get("rank") is not None}
    for node in nodes:
        if node.get("rank") is not None and node["rank"] >= count:
            ck.error(_join(node["key_path"], "rank"), f"{node['rank']} is out of range: the topology has "
                     f"{count} nodes, so ranks are 0..{count - 1}")
    free = iter(r for r in range(count) if r not in taken)
    for node in nodes:
        if node.get("rank") is None:
            node["rank"] = next(free, -1)


def parse_topology(data: Any, *, base_dir: Path, source: Path | None = None,
                   resolve_bundle: Callable[[str, Path], Path] | None = None) -> Topology:
    """Validate a mapping (a loaded YAML document) into a :class:`Topology`.

    Relative paths (bundle, keys_dir, ipc) resolve against ``base_dir``; ``resolve_bundle(value,
    base_dir)`` maps the ``bundle`` value to a directory (default: the path, resolved). Raises
    :class:`TopologyError` listing every problem found.
    """
    ck = _Checker()
    top = ck.mapping(data, "")
    if top is None:
        raise TopologyError([("", f"a topology must be a mapping, got {_type_name(data)}")], source)
    ck.keys(top, "", TOP_KEYS, ["name", "bundle", "aggregator", "edges"])
    name = ck.value(top, "name", "", str)
    bundle_value = ck.value(top, "bundle", "", str)
    transport = ck.value(top, "transport", "", str, "zmq", choices=TRANSPORTS)
    codec = ck.value(top, "codec", "", str, "fp16", choices=CODECS)
    image_codec = ck.value(top, "image_codec", "", str, "raw", choices=IMAGE_CODECS)
    image_quality = ck.value(top, "image_quality", "", int, DEFAULT_JPEG_QUALITY, minimum=JPEG_QUALITY_RANGE[0],
                             maximum=JPEG_QUALITY_RANGE[1])

    limits = LinkLimits()
    if top.get("limits") is not None and (raw := ck.mapping(top["limits"], "limits")) is not None:
        ck.keys(raw, "limits", LIMIT_KEYS)
        limits = LinkLimits(ck.value(raw, "max_message_bytes", "limits", int, DEFAULT_MAX_MESSAGE_BYTES, minimum=1)
                        or DEFAULT_MAX_MESSAGE_BYTES,
                        ck.value(raw, "hwm", "limits", int, DEFAULT_HWM, minimum=1) or DEFAULT_HWM)
    security = Security()
    if top.get("security") is not None and (raw := ck.mapping(top["security"], "security")) is not None:
        ck.keys(raw, "security", SECURITY_KEYS)
        curve = bool(ck.value(raw, "curve", "security", bool, False))
        keys_dir = ck.value(raw, "keys_dir", "security", str, "keys")
        security = Security(curve, _resolve_relative(keys_dir, base_dir) if keys_dir else None)
        if curve and transport == "mpi":
            ck.error("security.curve", "CURVE secures ZeroMQ links; with transport 'mpi' there is nothing to "
                     "secure (turn it off or use transport 'zmq')")

    defaults = _parse_defaults(ck, top.get("defaults"))
    net = transport or "zmq"
    nodes: list[dict[str, Any]] = []
    client = None
    if "client" in top and top["client"] is not None:
        client = _parse_node(ck, top["client"], "client", "client", defaults, net, base_dir)
    elif net == "mpi":
        ck.error("client", "required key is missing: with transport 'mpi' the client is a rank "
                 "(e.g. client: {name: client})")
    if client is not None:
        nodes.append(client)
    aggregator = None
    if "aggregator" in top:
        aggregator = _parse_node(ck, top["aggregator"], "aggregator", "aggregator", defaults, net, base_dir)
        if aggregator is not None:
            nodes.append(aggregator)
    edges: list[dict[str, Any]] = []
    if "edges" in top:
        raw_edges = top["edges"]
        if not isinstance(raw_edges, list):
            ck.error("edges", f"expected a list of edges, got {_type_name(raw_edges)}")
        elif not raw_edges:
            ck.error("edges", "needs at least one edge")
        elif len(raw_edges) > MAX_PARTS:
            ck.error("edges", f"{len(raw_edges)} edges; the protocol carries at most {MAX_PARTS} parts")
        else:
            for i, raw in enumerate(raw_edges):
                edge = _parse_node(ck, raw, f"edges[{i}]", "edge", defaults, net, base_dir)
                if edge is not None:
                    edges.append(edge)
    nodes.extend(edges)

    _check_unique(ck, nodes, "name", lambda n: n.get("name"),
                  lambda v, first: f"{v!r} is already used by {first['key_path']}")
    _check_ports(ck, nodes)
    _check_unique(ck, nodes, "ipc", lambda n: n.get("ipc"),
                  lambda v, first: f"{v} clashes with {first['key_path']}.ipc")
    _check_unique(ck, edges, "submodel", lambda n: n.get("submodel"),
                  lambda v, first: f"sub-model {v} is already served by {first['key_path']} "
                                   f"({first.get('name')}); each sub-model runs on exactly one edge")
    indices = sorted({e["submodel"] for e in edges if e.get("submodel") is not None})
    if indices and len(indices) == len(edges):
        missing = sorted(set(range(max(indices) + 1)) - set(indices))
        if missing:
            ck.error("edges", f"no edge runs sub-model(s) {', '.join(map(str, missing))} "
                     f"(edges run {', '.join(map(str, indices))}); sub-models are numbered 0..N-1")
    _assign_ranks(ck, nodes)

    bundle = None
    if bundle_value is not None:
        bundle = (resolve_bundle or (lambda v, b: _resolve_relative(v, b)))(bundle_value, base_dir)
    if ck.problems:
        raise TopologyError(ck.problems, source)

    def spec(d: dict[str, Any]) -> NodeSpec:
        return NodeSpec(**{k: v for k, v in d.items() if k in _SPEC_FIELDS})

    assert aggregator is not None and bundle is not None  # no problems means both parsed
    return Topology(
        name=name, bundle=bundle, transport=transport, codec=codec, image_codec=image_codec,
        image_quality=image_quality, limits=limits,
        security=security, aggregator=spec(aggregator),
        edges=tuple(sorted((spec(e) for e in edges), key=lambda e: e.submodel if e.submodel is not None else -1)),
        client=spec(client) if client is not None else None, source=source,
    )


_SPEC_FIELDS = {f.name for f in dataclasses.fields(NodeSpec)}
