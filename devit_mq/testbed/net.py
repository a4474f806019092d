"""Hosts with real links on one machine: network namespaces, veth pairs, a bridge, ``tc tbf`` rate
limits and cgroup v1 CPU caps -- and their guaranteed teardown.

Layout of one run (``P`` is the run's unique prefix, e.g. ``dvtb3fa2``)::

    netns P-sw:   bridge br0 --+-- veth Ps0 ==== eth0 (netns P-client,     10.213.0.10)
                               +-- veth Ps1 ==== eth0 (netns P-aggregator, 10.213.0.11)
                               +-- ...

Every host's link is its veth pair: ``tbf`` on the host end limits what the host sends, ``tbf`` on
the switch end what it receives, both at the profile's rate. The root namespace gets no address,
route or qdisc: all traffic stays between the run's own namespaces. Each host also gets a cgroup
``/sys/fs/cgroup/cpu/P-HOST`` whose CFS quota caps its processes at ``cpu`` CPUs (and, with
``cpus``, a cpuset); a process joins it before it ``exec``\\ s (:meth:`Testbed.command`).

Teardown (:meth:`Testbed.close`, also from ``with``, an ``atexit`` hook and SIGTERM/SIGINT/SIGHUP
handlers) kills every process left in the hosts' namespaces and cgroups, deletes the namespaces
(which destroys their veths and qdiscs), any veth still in the root namespace, and the cgroups.
:func:`cleanup` does the same for leftovers of any run whose owner process is gone (``devit-mq
testbed --cleanup``), found by the name prefix; a state file in :data:`STATE_DIR` records each run's
owner pid so that a live parallel run is never touched.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("devit_mq.testbed")

NAME_PREFIX = "dvtb"  # every namespace, link and cgroup of every run starts with this
CGROUP_CPU = Path("/sys/fs/cgroup/cpu")
CGROUP_CPUSET = Path("/sys/fs/cgroup/cpuset")
STATE_DIR = Path("/run/devit-mq-testbed")
SUBNET = "10.213.0"  # inside the run's own namespaces only
FIRST_HOST_OCTET = 10
CFS_PERIOD_US = 100_000
MTU = 1500


class TestbedError(RuntimeError):
    """The testbed cannot be built here (not root, no ``ip netns``, no cgroup v1, a command failed)."""

    __test__ = False  # not a pytest class


def run(cmd: Sequence[str], check: bool = True, netns: str | None = None) -> subprocess.CompletedProcess:
    """Run a command (in ``netns`` if given); a failure is a :class:`TestbedError` quoting stderr."""
    full = ["ip", "netns", "exec", netns, *cmd] if netns else list(cmd)
    proc = subprocess.run(full, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise TestbedError(f"`{' '.join(full)}` failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def unavailable_reason() -> str | None:
    """Why the testbed cannot run on this machine (None: it can)."""
    if os.geteuid() != 0:
        return "the testbed needs root (network namespaces, tc and cgroups)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    if not (CGROUP_CPU / "cpu.cfs_quota_us").exists():
        return f"cgroup v1 cpu controller not mounted at {CGROUP_CPU} (no cpu.cfs_quota_us)"
    probe = f"{NAME_PREFIX}probe{os.getpid() % 100000}"
    try:
        made = run(["ip", "netns", "add", probe], check=False)
        if made.returncode != 0:
            return f"`ip netns add` fails here: {made.stderr.strip()}"
        tbf = run(["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "1mbit", "burst", "4kb",
                   "latency", "50ms"], check=False, netns=probe)
        if tbf.returncode != 0:
            return f"`tc qdisc ... tbf` fails here: {tbf.stderr.strip()}"
    finally:
        run(["ip", "netns", "del", probe], check=False)
    return None


@dataclass(frozen=True)
class HostSpec:
    """One "device": its link's rate and its CPU cap."""

    name: str
    rate_mbit: float
    cpu: float | None = None  # CPUs of CFS quota (None: uncapped)
    cpus: tuple[int, ...] | None = None  # a cpuset (None: any CPU)
    cpu_period_ms: float | None = None  # the CFS period of the quota (None: 100 ms)


@dataclass
class Host:
    spec: HostSpec
    index: int
    netns: str
    ip: str
    veth_host: str
    veth_switch: str
    cgroups: list[Path] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.name


def new_prefix() -> str:
    return f"{NAME_PREFIX}{secrets.token_hex(2)}"


def tbf_args(rate_mbit: float) -> list[str]:
    """``tbf`` at ``rate_mbit``: a bucket of 1 ms of traffic (at least two full frames) so that an
    image's serialisation time is real, and a queue of 200 ms before drops."""
    rate_bps = rate_mbit * 1e6
    burst = max(int(rate_bps / 8 / 1000), 3200)
    return ["tbf", "rate", f"{rate_mbit:g}mbit", "burst", str(burst), "latency", "200ms"]


def set_cpu_quota(group: Path, cpu: float, period_ms: float | None = None) -> None:
    """Cap cgroup ``group`` at ``cpu`` CPUs over CFS periods of ``period_ms`` (default 100 ms)."""
    period_us = CFS_PERIOD_US if period_ms is None else int(period_ms * 1000)
    (group / "cpu.cfs_period_us").write_text(str(period_us))
    (group / "cpu.cfs_quota_us").write_text(str(max(1000, int(cpu * period_us))))  # kernel minimum: 1 ms


@contextlib.contextmanager
def cpu_cap(cpu: float, period_ms: float | None = None) -> Iterator[Path]:
    """Run the calling process (all its threads) under a CFS quota of ``cpu`` CPUs until the block
    ends, in a cgroup of its own that is removed afterwards. TestbedError without root or cgroup v1."""
    if os.geteuid() != 0 or not (CGROUP_CPU / "cpu.cfs_quota_us").exists():
        raise TestbedError(f"a CPU cap needs root and the cgroup v1 cpu controller at {CGROUP_CPU}")
    group = CGROUP_CPU / f"devit-mq-cap-{os.getpid()}"  # not NAME_PREFIX: testbed cleanup must not reap it
    group.mkdir(exist_ok=True)
    try:
        set_cpu_quota(group, cpu, period_ms)
        (group / "cgroup.procs").write_text(str(os.getpid()))
        yield group
    finally:
        (CGROUP_CPU / "cgroup.procs").write_text(str(os.getpid()))  # back to the root group, then remove
        group.rmdir()


class Testbed:
    """``with Testbed(hosts) as tb: subprocess.Popen(tb.command("edge0", [...]))``

    Builds one namespace per host, joined by veth pairs to a bridge in a switch namespace, rate
    limits every link with ``tbf``, makes a cgroup per capped host. Always tears down (see module)."""

    def __init__(self, hosts: Iterable[HostSpec], prefix: str | None = None) -> None:
        self.prefix = prefix or new_prefix()
        specs = list(hosts)
        if len({h.name for h in specs}) != len(specs):
            raise ValueError("host names must be unique")
        self.switch = f"{self.prefix}-sw"
        self.hosts: dict[str, Host] = {}
        for i, spec in enumerate(specs):
            self.hosts[spec.name] = Host(spec, i, f"{self.prefix}-{spec.name}", f"{SUBNET}.{FIRST_HOST_OCTET + i}",
                                         f"{self.prefix}h{i}", f"{self.prefix}s{i}")
        self.procs: list[subprocess.Popen] = []
        self._closed = True
        self._old_handlers: dict[int, Any] = {}

    # -- build ----------------------------------------------------------------------------------
    def __enter__(self) -> Testbed:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> Testbed:
        reason = unavailable_reason()
        if reason:
            raise TestbedError(reason)
        self._closed = False
        atexit.register(self.close)
        self._install_signal_handlers()
        _write_state(self.prefix)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        run(["ip", "netns", "add", self.switch])
        run(["ip", "link", "set", "lo", "up"], netns=self.switch)
        run(["ip", "link", "add", "br0", "type", "bridge"], netns=self.switch)
        run(["ip", "link", "set", "br0", "up"], netns=self.switch)
        for host in self.hosts.values():
            ns = host.netns
            run(["ip", "netns", "add", ns])
            run(["ip", "link", "set", "lo", "up"], netns=ns)  # a namespace's loopback starts down
            run(["ip", "link", "add", host.veth_host, "type", "veth", "peer", "name", host.veth_switch])
            run(["ip", "link", "set", host.veth_host, "netns", ns])
            run(["ip", "link", "set", host.veth_switch, "netns", self.switch])
            run(["ip", "link", "set", host.veth_host, "name", "eth0"], netns=ns)
            run(["ip", "addr", "add", f"{host.ip}/24", "dev", "eth0"], netns=ns)
            # no segmentation offload: a veth would otherwise carry 64 KB super-packets, which neither a
            # real NIC's wire nor the byte counters of one show
            run(["ip", "link", "set", "dev", "eth0", "gso_max_size", str(MTU), "gso_max_segs", "1"], netns=ns)
            run(["ip", "link", "set", "eth0", "up"], netns=ns)
            run(["ip", "link", "set", host.veth_switch, "master", "br0"], netns=self.switch)
            run(["ip", "link", "set", host.veth_switch, "up"], netns=self.switch)
            tbf = tbf_args(host.spec.rate_mbit)
            run(["tc", "qdisc", "add", "dev", "eth0", "root", *tbf], netns=ns)  # the host's uplink
            run(["tc", "qdisc", "add", "dev", host.veth_switch, "root", *tbf], netns=self.switch)  # its downlink
            self._make_cgroups(host)
        self._wait_reachable()

    def _make_cgroups(self, host: Host) -> None:
        if host.spec.cpu is not None:
            group = CGROUP_CPU / host.netns
            group.mkdir(exist_ok=True)
            host.cgroups.append(group)
            set_cpu_quota(group, host.spec.cpu, host.spec.cpu_period_ms)
        if host.spec.cpus is not None:
            group = CGROUP_CPUSET / host.netns
            group.mkdir(exist_ok=True)
            host.cgroups.append(group)
            (group / "cpuset.mems").write_text((CGROUP_CPUSET / "cpuset.mems").read_text().strip())
            (group / "cpuset.cpus").write_text(",".join(map(str, host.spec.cpus)))

    def _wait_reachable(self, timeout_s: float = 10.0) -> None:
        """Every host's eth0 is up (with STP off the bridge forwards as soon as its ports are)."""
        deadline = time.monotonic() + timeout_s
        for host in self.hosts.values():
            while True:
                info = json.loads(run(["ip", "-j", "link", "show", "dev", "eth0"], netns=host.netns).stdout)
                if info and info[0].get("operstate") == "UP":
                    break
                if time.monotonic() > deadline:
                    raise TestbedError(f"{host.name}: eth0 did not come up ({info[0].get('operstate')})")
                time.sleep(0.05)

    # -- use --------------------------------------------------------------------------------------
    def ip(self, name: str) -> str:
        return self.hosts[name].ip

    def command(self, name: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run on host ``name``: it joins the host's cgroups (before entering the namespace,
        whose ``/sys`` hides them), then runs inside its namespace."""
        host = self.hosts[name]
        joins = "".join(f'echo $$ > "{g}/cgroup.procs" && ' for g in host.cgroups)
        return ["sh", "-c", f'{joins}exec ip netns exec {host.netns} "$@"', "sh", *argv]

    def spawn(self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None
              ) -> subprocess.Popen:
        """Start ``argv`` on host ``name`` (output to ``log_path``); it is killed at teardown."""
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(self.command(name, argv), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def link_bytes(self) -> dict[str, dict[str, int]]:
        """Bytes each host's eth0 has sent and received so far (interface counters)."""
        out = {}
        for host in self.hosts.values():
            stats = json.loads(run(["ip", "-j", "-s", "link", "show", "dev", "eth0"], netns=host.netns).stdout)
            s64 = stats[0]["stats64"]
            out[host.name] = {"tx": int(s64["tx"]["bytes"]), "rx": int(s64["rx"]["bytes"])}
        return out

    # -- teardown ---------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        def handler(signum: int, _frame: Any) -> None:
            self.close()
            previous = self._old_handlers.get(signum)
            if callable(previous):
                previous(signum, _frame)
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            try:
                self._old_handlers[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread: rely on with/atexit
                pass

    def _restore_signal_handlers(self) -> None:
        for sig, previous in self._old_handlers.items():
            try:
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
            except ValueError:
                pass
        self._old_handlers.clear()

    def stop_processes(self, timeout_s: float = 5.0) -> None:
        """SIGTERM every process started here, SIGKILL what is still alive after ``timeout_s``."""
        for proc in self.procs:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.05))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(5)
        self.procs.clear()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.stop_processes()
        finally:
            remove_prefix(self.prefix)
            self._restore_signal_handlers()
            atexit.unregister(self.close)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# -- finding and removing what a run left -------------------------------------------------------------
def leftovers(prefix: str = NAME_PREFIX) -> dict[str, list[str]]:
    """Everything on this machine whose name starts with ``prefix``: namespaces, root-namespace links,
    root-namespace qdiscs on such links, cgroups."""
    netns = [line.split()[0] for line in run(["ip", "netns", "list"], check=False).stdout.splitlines()
             if line.strip() and line.split()[0].startswith(prefix)]
    links = []
    for item in json.loads(run(["ip", "-j", "link", "show"], check=False).stdout or "[]"):
        if item.get("ifname", "").startswith(prefix):
            links.append(item["ifname"])
    qdiscs = [line for line in run(["tc", "qdisc", "show"], check=False).stdout.splitlines()
              if f"dev {prefix}" in line]
    cgroups = [str(p) for root in (CGROUP_CPU, CGROUP_CPUSET) if root.is_dir()
               for p in sorted(root.glob(f"{prefix}*")) if p.is_dir()]
    return {"netns": netns, "links": links, "qdiscs": qdiscs, "cgroups": cgroups}


def _pids_in(netns: str) -> list[int]:
    out = run(["ip", "netns", "pids", netns], check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _cgroup_pids(group: Path) -> list[int]:
    try:
        return [int(p) for p in (group / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def _kill(pids: Iterable[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def remove_prefix(prefix: str) -> dict[str, list[str]]:
    """Kill every process in the prefix's namespaces and cgroups and remove them all; returns what was
    found. Safe to call any number of times."""
    found = leftovers(prefix)
    for ns in found["netns"]:
        _kill(_pids_in(ns))
    for group in map(Path, found["cgroups"]):
        _kill(_cgroup_pids(group))
    for ns in found["netns"]:
        run(["ip", "netns", "del", ns], check=False)
    for link in found["links"]:
        run(["ip", "link", "del", link], check=False)
    for group in map(Path, found["cgroups"]):
        for _ in range(50):  # a killed task leaves its cgroup a moment later
            try:
                group.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.05)
    _state_file(prefix).unlink(missing_ok=True)
    return found


def _state_file(prefix: str) -> Path:
    return STATE_DIR / f"{prefix}.json"


def _write_state(prefix: str) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    _state_file(prefix).write_text(json.dumps({"prefix": prefix, "pid": os.getpid(), "started": time.time()}))


def _owner_alive(prefix: str) -> bool:
    try:
        pid = int(json.loads(_state_file(prefix).read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_prefixes(found: dict[str, list[str]]) -> set[str]:
    """The run prefixes (``dvtbXXXX``) that names in ``found`` belong to."""
    width = len(NAME_PREFIX) + 4
    names = [*found["netns"], *found["links"], *(Path(g).name for g in found["cgroups"])]
    names += [q.split("dev ", 1)[1].split()[0] for q in found["qdiscs"]]
    return {n[:width] for n in names if len(n) >= width}


def cleanup(prefix: str | None = None, force: bool = False) -> dict[str, Any]:
    """Remove the leftovers of ``prefix``'s run, or of every run whose owner is gone (``force``: also
    of live runs). Returns ``{"removed": {prefix: found}, "kept": [prefixes of live runs]}``."""
    if prefix is not None:
        return {"removed": {prefix: remove_prefix(prefix)}, "kept": []}
    removed, kept = {}, []
    states = {p.stem for p in STATE_DIR.glob(f"{NAME_PREFIX}*.json")} if STATE_DIR.is_dir() else set()
    for run_prefix in sorted(run_prefixes(leftovers()) | states):
        if not force and _owner_alive(run_prefix):
            kept.append(run_prefix)
            continue
        removed[run_prefix] = remove_prefix(run_prefix)
    return {"removed": removed, "kept": kept}
