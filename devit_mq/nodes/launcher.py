"""Start every local node of a ZeroMQ topology as its own process, wait until all are ready (a
hello/status handshake through the aggregator, never a sleep), supervise them, stop them cleanly."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from devit_mq.protocol import ENV_ADMIN_TOKEN, ENV_INSTANCE
from devit_mq.topology import NodeSpec, Topology, load_topology
from devit_mq.transport import open_transport

from .client import CLIENT_SEND_TIMEOUT_S, ClientNode
from .runtime import client_name, make_client

log = logging.getLogger("devit_mq.launch")

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0", "*", ""}


class LaunchError(RuntimeError):
    """A node process failed to start or died; the message names it and quotes its log."""


@dataclass
class NodeProcess:
    spec: NodeSpec
    proc: subprocess.Popen
    log_path: Path

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


class Launcher:
    """``with Launcher(path) as launcher: launcher.client.predict(...)``"""

    def __init__(self, topology: Topology | str | Path, log_dir: str | Path | None = None,
                 ready_timeout_s: float = 120.0, python: str = sys.executable) -> None:
        self.topology_path = Path(topology.source) if isinstance(topology, Topology) else Path(topology)
        self.topology = topology if isinstance(topology, Topology) else load_topology(topology)
        if self.topology.transport != "zmq":
            raise LaunchError(f"{self.topology_path}: transport is {self.topology.transport!r}; "
                              "use 'mpirun -n K devit-mq mpi TOPOLOGY' for MPI topologies")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.log_dir = Path(log_dir) if log_dir else Path("runs") / f"{self.topology.name}-{stamp}-{os.getpid()}"
        self.ready_timeout_s = ready_timeout_s
        self.python = python
        self.processes: list[NodeProcess] = []
        # per-launch secrets: the nodes this launch starts obey shutdown only with admin_token (a
        # remote peer never sees it), and report instance so a second launch can tell them apart
        self.instance = secrets.token_hex(8)
        self.admin_token = secrets.token_hex(16)
        self.client: ClientNode | None = None
        self.status: dict = {}

    # -- start ------------------------------------------------------------------------------------
    def start(self) -> dict:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        servers = [self.topology.aggregator, *self.topology.edges]
        remote = [s.name for s in servers if not is_local(s)]
        if remote:
            log.warning("not starting remote nodes %s: run 'devit-mq node %s --name NAME' on their hosts",
                        remote, self.topology_path)
        for spec in servers:
            if is_local(spec):
                self.processes.append(self._spawn(spec))
        try:
            name = client_name(self.topology, admin=True)
            transport = open_transport(self.topology, name, send_timeout=CLIENT_SEND_TIMEOUT_S)
            self.client = make_client(self.topology, transport, name, admin_token=self.admin_token)
            self.status = self.client.connect(self.ready_timeout_s, alive=self.check_alive)
        except BaseException:
            self.stop()
            raise
        return self.status

    def _spawn(self, spec: NodeSpec) -> NodeProcess:
        log_path = self.log_dir / f"{spec.name}.log"
        cmd = [self.python, "-m", "devit_mq.cli", "node", str(self.topology_path), "--name", spec.name]
        env = dict(os.environ, PYTHONUNBUFFERED="1", **{ENV_ADMIN_TOKEN: self.admin_token, ENV_INSTANCE: self.instance})
        with log_path.open("wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)  # Ctrl-C reaches the launcher, which stops nodes in order
        return NodeProcess(spec, proc, log_path)

    # -- supervise --------------------------------------------------------------------------------
    def check_alive(self) -> None:
        for node in self.processes:
            code = node.proc.poll()
            if code is not None:
                raise LaunchError(f"node {node.spec.name!r} (pid {node.proc.pid}) exited with code {code}; "
                                  f"last lines of {node.log_path}:\n{node.tail()}")

    def supervise(self, poll_s: float = 0.5) -> None:
        """Block until a node dies (raises LaunchError) or KeyboardInterrupt."""
        while True:
            self.check_alive()
            time.sleep(poll_s)

    def describe(self) -> list[dict]:
        rows = []
        for node in self.processes:
            s = node.spec
            rows.append({"node": s.name, "role": s.role, "pid": node.proc.pid, "submodel": s.submodel,
                         "endpoint": s.connect_endpoint, "threads": s.threads, "attention": s.attention})
        return rows

    # -- stop -------------------------------------------------------------------------------------
    def stop(self, timeout_s: float = 10.0) -> None:
        if self.client is not None:
            try:
                self.client.shutdown_nodes()
            finally:
                self.client.close()
                self.client = None
        deadline = time.monotonic() + timeout_s
        for node in self.processes:
            try:
                node.proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                node.proc.terminate()
        for node in self.processes:
            try:
                node.proc.wait(3)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait()

    def __enter__(self) -> Launcher:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
