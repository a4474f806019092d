"""Start every local node of a ZeroMQ topology as its own process, wait until all are ready (a
hello/status handshake through the aggregator, never a sleep), supervise them, stop them cleanly.

Lifecycle rules:

- **Refuse to start twice.** Before spawning anything, every local endpoint is tried: a tcp port
  that cannot be bound, or an ipc socket file that accepts connections, means the topology (or
  something else) already runs there, and the launch stops with :class:`EndpointInUse`.
- **One launch, one instance.** Each launch has a random instance id and admin secret, passed to the
  nodes it starts (``DEVIT_MQ_INSTANCE``, ``DEVIT_MQ_ADMIN_TOKEN``). When the aggregator that answers
  the handshake reports another instance, the launch fails (another instance answers) and never
  asks that topology to shut down.
- **Only own nodes are stopped.** Shutdown messages go out only when this launch started every
  server of the topology; otherwise its own processes get SIGTERM.
- **Supervision.** :meth:`Launcher.supervise` restarts a node that died, with backoff (0.5 s,
  doubling up to 10 s, back to 0.5 s once the node has run 30 s), while the others keep serving;
  with ``restart=False`` a dead node is a :class:`LaunchError` naming it.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from devit_mq.protocol import ENV_ADMIN_TOKEN, ENV_INSTANCE
from devit_mq.topology import NodeSpec, Topology, load_topology
from devit_mq.transport import open_transport

from .client import CLIENT_SEND_TIMEOUT_S, ClientNode
from .runtime import client_name, make_client

log = logging.getLogger("devit_mq.launch")

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0", "*", ""}

# Set for nodes spawned from the launcher's main thread: the node asks the kernel for SIGTERM when the
# launcher dies (even by SIGKILL), so a crashed launcher leaves no orphans.
ENV_PARENT_PID = "DEVIT_MQ_PARENT_PID"

RESTART_BACKOFF_S = 0.5
RESTART_BACKOFF_MAX_S = 10.0
RESTART_RESET_AFTER_S = 30.0


class LaunchError(RuntimeError):
    """A node process failed to start or died; the message names it and quotes its log.
    ``exit_code`` is what the command line returns for it (1: a node died, 2: a user's mistake)."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class EndpointInUse(LaunchError):
    """An endpoint of the topology is already bound, or another instance answers: nothing was started."""

    exit_code = 2


@dataclass
class NodeProcess:
    spec: NodeSpec
    proc: subprocess.Popen
    log_path: Path
    started: float = field(default_factory=time.monotonic)
    restarts: int = 0
    backoff_s: float = RESTART_BACKOFF_S
    restart_at: float | None = None  # time.monotonic() of a scheduled restart (the process is dead)

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def is_local(spec: NodeSpec) -> bool:
    if spec.ipc:
        return True
    host = spec.host or ""
    return host in LOCAL_HOSTS or host.startswith("127.") or host in {socket.gethostname(), socket.getfqdn()}


# -- endpoint checks ---------------------------------------------------------------------------------
def endpoint_busy(endpoint: str | None) -> str | None:
    """Why ``endpoint`` (a ZeroMQ bind endpoint) cannot be bound right now, or None if it can.

    tcp: a test bind with SO_REUSEADDR, as libzmq binds (so a port in TIME_WAIT counts as free, a
    listening one as busy). ipc: a socket file that accepts a connection is busy; a stale file (no
    listener) is free, since ZeroMQ replaces it."""
    if not endpoint:
        return None
    if endpoint.startswith("tcp://"):
        host, _, port_text = endpoint[len("tcp://"):].rpartition(":")
        host = host.strip("[]")
        if not port_text.isdigit():  # "*" / "!": an ephemeral port is never busy
            return None
        host = "0.0.0.0" if host in ("*", "") else host
        try:
            addrs = socket.getaddrinfo(host, int(port_text), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            return f"cannot resolve {host!r}: {exc.strerror}"
        for family, kind, proto, _, addr in addrs[:1]:
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind(addr)
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE:
                        return "the port is already in use"
                    return exc.strerror or str(exc)
        return None
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            if path.startswith("@"):  # Linux abstract namespace: a bind fails while someone holds it
                try:
                    sock.bind("\0" + path[1:])
                except OSError:
                    return "the abstract socket is already bound"
                return None
            if not os.path.exists(path):
                return None
            try:
                sock.connect(path)
            except OSError:
                return None  # a stale socket file
            return "a process accepts connections on that socket"
    return None


def check_endpoints(topology: Topology, specs: list[NodeSpec]) -> None:
    """:class:`EndpointInUse` naming the first local endpoint of ``specs`` that is taken."""
    for spec in specs:
        why = endpoint_busy(spec.bind_endpoint)
        if why is not None:
            raise EndpointInUse(
                f"{spec.bind_endpoint} (node {spec.name!r} of topology {topology.name!r}) is not free: {why}; "
                "is the topology already running? Nothing was started")


def _node_start_hook() -> None:
    """Called by ``devit-mq node``: die with the launcher that started this process (Linux)."""
    parent = os.environ.get(ENV_PARENT_PID)
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError, ValueError):
        return
    if os.getppid() != int(parent):  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


class Launcher:
    """``with Launcher(path) as launcher: launcher.client.predict(...)``

    ``node_command(spec)`` (a hook: override it, or pass ``node_command=``) returns the command that
    runs one node; the default is ``python -m devit_mq.cli node TOPOLOGY --name NAME``."""

    def __init__(self, topology: Topology | str | Path, log_dir: str | Path | None = None,
                 ready_timeout_s: float = 120.0, python: str = sys.executable,
                 node_command: Callable[[NodeSpec], list[str]] | None = None,
                 node_log_args: list[str] | None = None) -> None:
        self.topology_path = Path(topology.source) if isinstance(topology, Topology) else Path(topology)
        self.topology = topology if isinstance(topology, Topology) else load_topology(topology)
        if self.topology.transport != "zmq":
            raise LaunchError(f"{self.topology_path}: transport is {self.topology.transport!r}; "
                              "use 'mpirun -n K devit-mq mpi TOPOLOGY' for MPI topologies", exit_code=2)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.log_dir = Path(log_dir) if log_dir else Path("runs") / f"{self.topology.name}-{stamp}-{os.getpid()}"
        self.ready_timeout_s = ready_timeout_s
        self.python = python
        self.node_log_args = list(node_log_args or [])  # --log-level/--log-format for every node
        if node_command is not None:
            self.node_command = node_command  # type: ignore[method-assign]
        self.instance = secrets.token_hex(8)
        self.admin_token = secrets.token_hex(16)
        self.processes: list[NodeProcess] = []
        self.client: ClientNode | None = None
        self.status: dict = {}
        self.foreign: str | None = None  # set when another instance answered: never shut it down

    # -- start ------------------------------------------------------------------------------------
    def start(self) -> dict:
        servers = [self.topology.aggregator, *self.topology.edges]
        local = [s for s in servers if is_local(s)]
        remote = [s.name for s in servers if not is_local(s)]
        check_endpoints(self.topology, local)  # before anything is started
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if remote:
            log.warning("not starting remote nodes %s: run 'devit-mq node %s --name NAME' on their hosts",
                        remote, self.topology_path)
        try:
            for spec in local:
                self.processes.append(self._spawn(spec))
            name = client_name(self.topology, admin=True)
            transport = open_transport(self.topology, name, send_timeout=CLIENT_SEND_TIMEOUT_S)
            self.client = make_client(self.topology, transport, name, admin_token=self.admin_token)
            self.status = self.client.connect(self.ready_timeout_s, alive=self.check_alive)
            self._check_instance(self.status)
        except BaseException:
            self.stop()
            raise
        return self.status

    def check_bundle_files(self) -> None:
        """Every weights file the local nodes load must exist: a user's mistake the command line
        reports before any node starts (the nodes verify the checksums when they load). Without
        this check, such a node dies at start and :meth:`start` quotes its log."""
        from devit_mq.model import BundleError, load_manifest
        from devit_mq.model.manifest import part_path

        servers = [self.topology.aggregator, *self.topology.edges]
        try:
            manifest = load_manifest(self.topology.bundle)
            for spec in (s for s in servers if is_local(s)):
                part = "fusion" if spec.role == "aggregator" else f"submodel_{spec.submodel}"
                part_path(self.topology.bundle, manifest, part, verify=False)
        except BundleError as exc:
            raise LaunchError(f"{self.topology_path}: {exc}; nothing was started", exit_code=2) from None

    def _check_instance(self, status: dict) -> None:
        other = status.get("instance")
        if isinstance(other, str) and other and other != self.instance:
            agg = self.topology.aggregator
            self.foreign = other
            raise EndpointInUse(f"another instance answers at {agg.connect_endpoint} (aggregator {agg.name!r} "
                                f"reports instance {other}, this launch is {self.instance}); "
                                "is the topology already running?")

    def node_command(self, spec: NodeSpec) -> list[str]:
        """The command that runs node ``spec`` (a hook for subclasses, e.g. fault injection)."""
        return [self.python, "-m", "devit_mq.cli", "node", str(self.topology_path), "--name", spec.name,
                *self.node_log_args]

    def node_env(self, spec: NodeSpec) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env[ENV_INSTANCE] = self.instance
        env[ENV_ADMIN_TOKEN] = self.admin_token
        # the kernel's parent-death signal follows the *thread* that forked: only the main thread's
        # children may ask for it (a helper thread that restarts a node may end before the node)
        if threading.current_thread() is threading.main_thread():
            env[ENV_PARENT_PID] = str(os.getpid())
        else:
            env.pop(ENV_PARENT_PID, None)
        return env

    def _spawn(self, spec: NodeSpec, append: bool = False) -> NodeProcess:
        log_path = self.log_dir / f"{spec.name}.log"
        with log_path.open("ab" if append else "wb") as out:
            proc = subprocess.Popen(self.node_command(spec), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=self.node_env(spec),
                                    start_new_session=True)  # signals reach the launcher, which stops nodes in order
        return NodeProcess(spec, proc, log_path)

    # -- supervise --------------------------------------------------------------------------------
    def _index(self, name: str) -> int:
        for i, node in enumerate(self.processes):
            if node.spec.name == name:
                return i
        raise KeyError(f"no local node process named {name!r} (started: "
                       f"{', '.join(n.spec.name for n in self.processes)})")

    def _died(self, node: NodeProcess, code: int) -> str:
        return (f"node {node.spec.name!r} (pid {node.proc.pid}) exited with code {code}; "
                f"last lines of {node.log_path}:\n{node.tail()}")

    def check_alive(self) -> None:
        for node in self.processes:
            code = node.proc.poll()
            if code is not None and node.restart_at is None:
                raise LaunchError(self._died(node, code))

    def restart_node(self, name: str) -> NodeProcess:
        """Start node ``name`` again (its process must have exited); its log is appended to."""
        i = self._index(name)
        old = self.processes[i]
        node = self._spawn(old.spec, append=True)
        node.restarts, node.backoff_s = old.restarts + 1, old.backoff_s
        self.processes[i] = node
        return node

    def poll(self, restart: bool = True, now: float | None = None) -> list[str]:
        """One supervision pass: schedule restarts of dead nodes, start those that are due. Returns
        what happened (also logged). With ``restart=False`` a dead node is a LaunchError."""
        now = time.monotonic() if now is None else now
        events = []
        for node in list(self.processes):
            if node.restart_at is not None:
                if now >= node.restart_at:
                    new = self.restart_node(node.spec.name)
                    events.append(f"node {new.spec.name!r} restarted (pid {new.proc.pid}, restart {new.restarts})")
                    log.warning("%s", events[-1])
                continue
            code = node.proc.poll()
            if code is None:
                if now - node.started >= RESTART_RESET_AFTER_S:
                    node.backoff_s = RESTART_BACKOFF_S  # it ran long enough: a later death starts over
                continue
            if not restart:
                raise LaunchError(self._died(node, code))
            uptime = now - node.started
            delay = RESTART_BACKOFF_S if uptime >= RESTART_RESET_AFTER_S else node.backoff_s
            node.backoff_s = min(2 * delay, RESTART_BACKOFF_MAX_S)
            node.restart_at = now + delay
            tail = node.tail(5).replace("\n", "\n    ")
            events.append(f"node {node.spec.name!r} (pid {node.proc.pid}) exited with code {code} after "
                          f"{uptime:.1f}s; restarting in {delay:g}s (the others keep serving, degraded)")
            log.warning("%s; last lines of %s:\n    %s", events[-1], node.log_path, tail)
        return events

    def supervise(self, poll_s: float = 0.25, restart: bool = True) -> None:
        """Block until interrupted, restarting nodes that die (``restart=False``: until one dies,
        then LaunchError)."""
        while True:
            self.poll(restart)
            time.sleep(poll_s)

    def describe(self) -> list[dict]:
        rows = []
        for node in self.processes:
            s = node.spec
            rows.append({"node": s.name, "role": s.role, "pid": node.proc.pid, "submodel": s.submodel,
                         "endpoint": s.connect_endpoint, "threads": s.threads,
                         **({"executor": s.executor} if s.role == "edge" else {}), "attention": s.attention})
        return rows

    # -- stop -------------------------------------------------------------------------------------
    def owns_topology(self) -> bool:
        """Every server of the topology is a process of this launch (and no other instance answered):
        only then may shutdown messages go out."""
        started = {n.spec.name for n in self.processes}
        servers = {self.topology.aggregator.name, *(e.name for e in self.topology.edges)}
        return self.foreign is None and servers <= started

    def stop(self, timeout_s: float = 10.0) -> None:
        client, self.client = self.client, None
        asked = False
        if client is not None:
            try:
                if self.owns_topology():
                    client.shutdown_nodes()
                    asked = True
            finally:
                client.close()
        running = [n for n in self.processes if n.proc.poll() is None]
        if asked:
            deadline = time.monotonic() + timeout_s
            for node in running:
                try:
                    node.proc.wait(max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    pass
        # edges first, so the aggregator can still answer what is open
        for node in sorted(running, key=lambda n: n.spec.role == "aggregator"):
            if node.proc.poll() is None:
                node.proc.terminate()
        for node in running:
            try:
                node.proc.wait(5)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait()
        for node in self.processes:
            node.restart_at = None

    def kill_all(self) -> None:
        """SIGKILL every node process of this launch (a second Ctrl-C)."""
        for node in self.processes:
            if node.proc.poll() is None:
                node.proc.kill()

    def __enter__(self) -> Launcher:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
