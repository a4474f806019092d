"""Link profiles and device caps for the testbed (``topologies/testbed/links.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PROFILES = Path(__file__).resolve().parents[2] / "topologies" / "testbed" / "links.yaml"
PROFILE_KEYS = ("rate_mbit", "delay_ms", "jitter_ms", "note")
DEVICE_KEYS = ("cpu", "cpus", "cpu_period_ms")


class ProfileError(ValueError):
    """A links file is malformed; the message names the key."""


@dataclass(frozen=True)
class LinkProfile:
    name: str
    rate_mbit: float
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    note: str = ""


@dataclass(frozen=True)
class Device:
    cpu: float | None = None
    cpus: tuple[int, ...] | None = None
    # the CFS period the quota is spread over: 100 ms lets a 1 ms forward run at full speed and the
    # device stall later; a period of a few ms slows every forward evenly, like a slower CPU
    cpu_period_ms: float | None = None


@dataclass(frozen=True)
class LinksFile:
    profiles: dict[str, LinkProfile]
    device: Device
    client: Device
    hosts: dict[str, Device] = field(default_factory=dict)  # per-host overrides: unequal devices

    def device_of(self, host: str) -> Device:
        if host in self.hosts:
            return self.hosts[host]
        return self.client if host == "client" else self.device


def _number(where: str, value: Any, minimum: float, above: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum or (above and value == minimum):
        raise ProfileError(f"{where}: expected a number {'>' if above else '>='} {minimum:g}, got {value!r}")
    return float(value)


def _device(where: str, raw: Any, base: Device | None = None) -> Device:
    if raw is None:
        return base or Device()
    if not isinstance(raw, dict) or set(raw) - set(DEVICE_KEYS):
        raise ProfileError(f"{where}: expected a mapping with keys {', '.join(DEVICE_KEYS)}, got {raw!r}")
    cpu = raw.get("cpu", base.cpu if base else None)
    cpus = raw.get("cpus", base.cpus if base else None)
    if cpu is not None:
        cpu = _number(f"{where}.cpu", cpu, 0.0, above=True)
    if cpus is not None:
        if not isinstance(cpus, (list, tuple)) or not cpus or not all(isinstance(c, int) and c >= 0 for c in cpus):
            raise ProfileError(f"{where}.cpus: expected a non-empty list of CPU numbers, got {cpus!r}")
        cpus = tuple(cpus)
    period = raw.get("cpu_period_ms", base.cpu_period_ms if base else None)
    if period is not None:
        period = _number(f"{where}.cpu_period_ms", period, 1.0)  # the kernel's minimum CFS period is 1 ms
    return Device(cpu, cpus, period)


def load_links(path: str | Path = DEFAULT_PROFILES) -> LinksFile:
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("profiles"), dict) or not data["profiles"]:
        raise ProfileError(f"{path}: needs a non-empty 'profiles' mapping")
    profiles = {}
    for name, raw in data["profiles"].items():
        where = f"{path}: profiles.{name}"
        if not isinstance(raw, dict) or set(raw) - set(PROFILE_KEYS) or "rate_mbit" not in raw:
            raise ProfileError(f"{where}: expected a mapping with rate_mbit (and {', '.join(PROFILE_KEYS[1:])})")
        profiles[name] = LinkProfile(str(name), _number(f"{where}.rate_mbit", raw["rate_mbit"], 0.0, above=True),
                                     _number(f"{where}.delay_ms", raw.get("delay_ms", 0.0), 0.0),
                                     _number(f"{where}.jitter_ms", raw.get("jitter_ms", 0.0), 0.0),
                                     str(raw.get("note", "")))
    device = _device(f"{path}: devices", data.get("devices"))
    client = _device(f"{path}: client", data.get("client"), device)
    raw_hosts = data.get("hosts") or {}
    if not isinstance(raw_hosts, dict):
        raise ProfileError(f"{path}: hosts: expected a mapping of host name -> {{cpu, cpus}}")
    hosts = {str(name): _device(f"{path}: hosts.{name}", raw, client if name == "client" else device)
             for name, raw in raw_hosts.items()}
    return LinksFile(profiles, device, client, hosts)
