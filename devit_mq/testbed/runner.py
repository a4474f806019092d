"""One testbed run: for each link profile, build the hosts, then measure DeViT, layer-wise pipeline
partitioning and the monolithic teacher on the same links, in alternating rounds, and tear down.

Rounds: each system's requests are split over ``RunPlan.rounds`` rounds, and the order of the
systems reverses every round (DeViT, pipeline, monolith, then monolith, pipeline, DeViT, ...). A
shared host's speed drifts by tens of percent within minutes; with one block per system that drift
lands on whichever system ran in the slow minute, with alternating rounds it lands on all of them
alike. Each round starts its system's processes afresh (the same cost for every system).

Hosts: ``client``, ``aggregator``, ``edge0`` .. ``edge{N-1}``; every one has its own link at the
profile's rate and (except the client, by default) the same CPU cap. DeViT runs its aggregator and
edges there (``devit-mq node`` in each namespace); the pipeline runs its N stages on the N edge
hosts; the monolith runs on ``edge0``. The client host runs :mod:`devit_mq.testbed.probe`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from devit_mq.metrics import percentiles

from .net import HostSpec, Testbed, TestbedError
from .profiles import LinkProfile, LinksFile

log = logging.getLogger("devit_mq.testbed")
SYSTEMS = ("devit", "pipeline", "monolith")
STAGE_PORT = 5700
RESULT_PORT = 5799
ZMTP_SHORT_MAX = 255  # ZeroMQ frames up to this size have a 2-byte header, longer ones 9 bytes
FRAME_OVERHEAD = 14 + 20 + 32  # Ethernet, IPv4, TCP with timestamps
MSS = 1500 - 20 - 32
IDLE_S = 2.0  # the idle window before each measurement that gives the links' background traffic


@dataclass(frozen=True)
class RunPlan:
    latency_requests: int = 100
    throughput_images: int = 60
    warmup: int = 3
    window: int = 4  # requests in flight for the pipelined throughput
    timeout_s: float = 120.0
    seed: int = 0
    rounds: int = 2  # each system's requests are split over this many rounds (see the module docstring)

    def __post_init__(self) -> None:
        if not 1 <= self.rounds <= min(self.latency_requests, self.throughput_images):
            raise ValueError(f"rounds must be in [1, min(latency requests, throughput images)] = "
                             f"[1, {min(self.latency_requests, self.throughput_images)}], got {self.rounds}")

    def per_round(self) -> list[RunPlan]:
        """One plan per round; the requests are split as evenly as they go."""
        def split(n: int, r: int) -> int:
            return n // self.rounds + (1 if r < n % self.rounds else 0)

        return [dataclasses.replace(self, latency_requests=split(self.latency_requests, r),
                                    throughput_images=split(self.throughput_images, r), rounds=1)
                for r in range(self.rounds)]


QUICK = RunPlan(latency_requests=5, throughput_images=6, warmup=1, window=2, rounds=1)


def round_orders(systems: Sequence[str], rounds: int) -> list[list[str]]:
    """The systems in the order each round runs them: as given, then reversed, alternately."""
    return [list(systems) if r % 2 == 0 else list(reversed(systems)) for r in range(rounds)]


def _ms_stats(latencies_ms: Sequence[float]) -> dict[str, float]:
    p = percentiles(list(latencies_ms), (50, 99))
    return {"latency_p50_ms": p["p50"], "latency_p99_ms": p["p99"], "latency_mean_ms": float(np.mean(latencies_ms))}


def testbed_topology(base: Path, bundle: Path, ips: dict[str, str], image_codec: str, work_dir: Path,
                     image_quality: int | None = None) -> Path:
    """``base`` (a ZeroMQ topology) with its aggregator and edges on the testbed's hosts."""
    from devit_mq.topology import load_topology

    data = load_topology(base, check_bundle=False).to_dict()
    data.update(bundle=str(bundle.resolve()), image_codec=image_codec, name=f"{data['name']}-testbed")
    if image_quality is not None:
        data["image_quality"] = image_quality
    data.pop("client", None)
    data.pop("security", None)
    for node in (data["aggregator"], *data["edges"]):
        for key in ("rank", "ipc", "bind", "cpus"):
            node.pop(key, None)
        node["host"] = ips[node["name"]]
    target = work_dir / f"{data['name']}.yaml"
    target.write_text(yaml.safe_dump(data, sort_keys=False))
    load_topology(target)
    return target


def _framed(frames: Sequence[bytes]) -> int:
    """Bytes of a ZeroMQ multipart message on its TCP stream (ZMTP 3 frame headers included)."""
    return sum(len(f) + (2 if len(f) <= ZMTP_SHORT_MAX else 9) for f in frames)


def on_link(stream_bytes: float) -> float:
    """What ``stream_bytes`` of one TCP stream cost on an Ethernet link: each MSS-sized segment
    carries Ethernet + IPv4 + TCP (with timestamps) headers, and the receiver ACKs every second one."""
    segments = math.ceil(stream_bytes / MSS)
    return stream_bytes + segments * FRAME_OVERHEAD + math.ceil(segments / 2) * FRAME_OVERHEAD


def predicted_messages(system: str, topology_path: Path, stages: int, images: np.ndarray) -> dict[str, list[float]]:
    """The messages (their bytes on the TCP stream, ZMTP framing included) each host's link carries
    per image, both directions: DeViT's image to every edge, features, result; the pipeline's image,
    fp16 activations between stages, result. An image message is the mean over ``images`` (the
    requests measured: a JPEG's size depends on its content)."""
    from devit_mq.model import load_manifest
    from devit_mq.nodes.client import default_client_name
    from devit_mq.protocol import FeaturesMeta, ResultMeta, StageTimes
    from devit_mq.topology import load_topology
    from devit_mq.wire import Kind, Message, encode

    from .pipeline import ACTIVATION_CODEC

    topology = load_topology(topology_path)
    manifest = load_manifest(topology.bundle)
    client_name = default_client_name() if system == "devit" else "client"  # names travel in every header
    image_msg = float(np.mean([_framed(encode(Message(Kind.IMAGE, client_name, (1,), image[None], topology.image_codec,
                                                      reply_to=client_name, timestamps={"client_sent": 1.5},
                                                      quality=topology.image_quality)))
                               for image in images]))
    classes = len(manifest.classes)
    # metas and stamps as the nodes fill them (floats travel as 9 bytes whatever their value)
    times = StageTimes(edge_compute_ms=1.5, edge_queue_ms=0.5, fuse_ms=0.25, hold_ms=2.5)
    result_meta = ResultMeta(labels=[0], degraded=[False], missing=[[]], stages=[times])
    result = _framed(encode(Message(Kind.RESULT, "aggregator", (1 << 40,), np.zeros((1, classes), np.float32),
                                    "fp32", result_meta, {"agg_sent": 1.5}, client_name)))
    if system == "devit":
        out = {"client": [image_msg] * len(topology.edges) + [result]}
        agg = [result]
        for edge in topology.edges:
            cfg = manifest.submodels[edge.submodel]
            feats = np.ones((1, cfg.num_prefix_tokens, cfg.embed_dim), np.float32)
            meta = FeaturesMeta(part=edge.submodel, compute_ms=1.5, queue_ms=0.5, batch=1)
            stamps = {"client_sent": 1.5, "edge_recv": 1.5, "edge_sent": 1.5}
            msg = _framed(encode(Message(Kind.FEATURES, edge.name, (1 << 40,), feats, topology.codec, meta, stamps,
                                         client_name)))
            out[edge.name] = [image_msg, msg]
            agg.append(msg)
        out["aggregator"] = agg
        return out
    teacher = manifest.teacher
    assert teacher is not None
    act = _framed(encode(Message(Kind.FEATURES, "stage0", (1,), np.ones((1, teacher.num_tokens, teacher.embed_dim),
                                                                          np.float32), ACTIVATION_CODEC,
                                 FeaturesMeta(part=0, compute_ms=1.5), {"client_sent": 1.5}, "client")))
    chain_meta = ResultMeta(labels=[0], degraded=[False], missing=[[]], stages=[StageTimes(edge_compute_ms=1.5)])
    result = _framed(encode(Message(Kind.RESULT, f"stage{stages - 1}", (1,), np.zeros((1, classes), np.float32),
                                    "fp32", chain_meta, {"client_sent": 1.5}, "client")))
    hops = [image_msg] + [act] * (stages - 1) + [result]
    out = {"client": [image_msg, result]}
    for i in range(stages):
        out[f"edge{i}"] = [hops[i], hops[i + 1]]
    return out


def measured_images(images_path: Path, plan: RunPlan) -> np.ndarray:
    """The images the probes send between "go" and "done", round after round (each round: its
    latency requests, then its throughput images)."""
    images = np.load(images_path)
    return np.concatenate([images[np.arange(n) % len(images)] for rp in plan.per_round()
                           for n in (rp.latency_requests, rp.throughput_images)])


def merge_rounds(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One probe report from a system's rounds: latencies, answers, images and link bytes added up,
    throughput over the rounds' total time, and each round's latency p50 (the spread)."""
    hosts = reports[0]["link_bytes"]

    def total(key: str) -> dict[str, dict[str, float]]:
        return {h: {d: sum(r[key][h][d] for r in reports) for d in ("tx", "rx")} for h in hosts}

    images = sum(r["throughput_images"] for r in reports)
    seconds = sum(r["throughput_images"] / r["images_per_s"] for r in reports)
    return {**reports[0],
            "latencies_ms": [x for r in reports for x in r["latencies_ms"]],
            "probabilities": [p for r in reports for p in r["probabilities"]],
            "images_per_s": images / seconds, "throughput_images": images,
            "images_measured": sum(r["images_measured"] for r in reports),
            "link_bytes": total("link_bytes"), "background_bytes": total("background_bytes"),
            "measured_s": sum(r["measured_s"] for r in reports),
            "warmup_s": max(r["warmup_s"] for r in reports),
            "rounds_p50_ms": [percentiles(r["latencies_ms"], (50,))["p50"] for r in reports]}


class Phase:
    """One system on a built testbed: start its servers, run the probe on the client host, stop."""

    def __init__(self, tb: Testbed, system: str, profile: LinkProfile, plan: RunPlan, work_dir: Path,
                 images_path: Path, python: str = sys.executable, round_index: int = 0) -> None:
        self.tb, self.system, self.profile, self.plan = tb, system, profile, plan
        self.work_dir, self.images_path, self.python = work_dir, images_path, python
        self.tag = f"{system}-r{round_index}"  # names this round's logs and probe config
        self.logs = work_dir / "logs" / profile.name
        self.logs.mkdir(parents=True, exist_ok=True)

    def _faults(self) -> list[str]:
        if not (self.profile.delay_ms or self.profile.jitter_ms):
            return []
        return ["--delay-ms", f"{self.profile.delay_ms:g}", "--jitter-ms", f"{self.profile.jitter_ms:g}"]

    def start_devit(self, topology_path: Path) -> None:
        from devit_mq.topology import load_topology

        topology = load_topology(topology_path)
        for spec in (topology.aggregator, *topology.edges):
            if self.profile.delay_ms or self.profile.jitter_ms:
                faults = json.dumps({"delay_ms": self.profile.delay_ms, "jitter_ms": self.profile.jitter_ms})
                argv = [self.python, "-m", "devit_mq.bench.faults", str(topology_path), "--name", spec.name,
                        "--faults", faults, "--seed", str(spec.rank)]
            else:
                argv = [self.python, "-m", "devit_mq.cli", "node", str(topology_path), "--name", spec.name]
            self.tb.spawn(spec.name, argv, self.logs / f"{self.tag}-{spec.name}.log")

    def start_chain(self, bundle: Path, stages: int, threads: int = 1) -> str:
        """Start ``stages`` stages on edge0.. and return the first stage's endpoint."""
        for i in range(stages):
            host = f"edge{i}"
            nxt = (f"tcp://{self.tb.ip(f'edge{i + 1}')}:{STAGE_PORT + i + 1}" if i + 1 < stages
                   else f"tcp://{self.tb.ip('client')}:{RESULT_PORT}")
            argv = [self.python, "-m", "devit_mq.testbed.pipeline", "--bundle", str(bundle), "--stage", str(i),
                    "--stages", str(stages), "--bind", f"tcp://*:{STAGE_PORT + i}", "--next", nxt,
                    "--threads", str(threads), "--seed", str(i), *self._faults()]
            self.tb.spawn(host, argv, self.logs / f"{self.tag}-stage{i}.log")
        return f"tcp://{self.tb.ip('edge0')}:{STAGE_PORT}"

    def probe(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """Run the probe on the client host; returns its report plus the links' bytes measured
        exactly around its measured part."""
        p = self.plan
        cfg = {"images": str(self.images_path), "warmup": p.warmup, "latency_requests": p.latency_requests,
               "throughput_images": p.throughput_images, "window": p.window, "delay_ms": self.profile.delay_ms,
               "jitter_ms": self.profile.jitter_ms, "seed": p.seed, "timeout_s": p.timeout_s,
               "connect_timeout_s": p.timeout_s, **cfg}
        cfg_path = self.work_dir / f"probe-{self.profile.name}-{self.tag}.json"
        cfg_path.write_text(json.dumps(cfg))
        err_path = self.logs / f"{self.tag}-probe.log"
        with open(err_path, "wb") as err:
            proc = subprocess.Popen(self.tb.command("client", [self.python, "-m", "devit_mq.testbed.probe",
                                                               str(cfg_path)]),
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                    start_new_session=True)
        self.tb.procs.append(proc)

        def expect(word: str) -> str:
            line = proc.stdout.readline() if proc.stdout else ""
            if line.strip() != word and word:
                proc.kill()
                raise TestbedError(f"{self.system} probe on {self.profile.name}: expected {word!r}, got "
                                   f"{line.strip()[:200]!r}; see {err_path}:\n{_tail(err_path)}")
            return line

        assert proc.stdin is not None
        expect("ready")
        idle = self.tb.link_bytes()
        time.sleep(IDLE_S)  # what flows without requests (heartbeats): subtracted from the measurement
        before = self.tb.link_bytes()
        t_go = time.monotonic()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        expect("done")
        after = self.tb.link_bytes()
        measured_s = time.monotonic() - t_go  # the counters' window: the background scales with it
        proc.stdin.write("report\n")
        proc.stdin.flush()
        report = json.loads(expect(""))
        proc.wait(30)
        report["link_bytes"] = {h: {d: after[h][d] - before[h][d] for d in ("tx", "rx")} for h in after}
        report["background_bytes"] = {h: {d: (before[h][d] - idle[h][d]) * measured_s / IDLE_S for d in ("tx", "rx")}
                                      for h in after}
        report["measured_s"] = measured_s
        return report


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def summarize_phase(report: dict[str, Any], messages: dict[str, list[float]], hosts: Sequence[str]) -> dict[str, Any]:
    """``bytes_per_image``: measured on each host's interface (both directions); ``..._wire``: the
    wire format's messages (ZMTP framing included); ``..._predicted``: those plus the TCP/IP/Ethernet
    headers and ACKs they need on the link (:func:`on_link`), what the measurement is compared to."""
    n = report["images_measured"]
    net = {h: {d: max(b[d] - report["background_bytes"][h][d], 0.0) for d in ("tx", "rx")}
           for h, b in report["link_bytes"].items()}
    measured = {h: (b["tx"] + b["rx"]) / n for h, b in net.items() if h in hosts}
    predicted = {h: round(sum(map(on_link, messages.get(h, [])))) for h in hosts}
    out = {**_ms_stats(report["latencies_ms"]), "images_per_s": report["images_per_s"],
           "bytes_per_image": {h: round(measured.get(h, 0.0)) for h in hosts},
           "bytes_per_image_wire": {h: round(sum(messages.get(h, []))) for h in hosts},
           "bytes_per_image_predicted": predicted,
           "bytes_per_image_ratio": {h: (measured[h] / predicted[h]) if predicted.get(h) else None for h in hosts},
           "bytes_per_image_tx_rx": {h: {d: round(net[h][d] / n) for d in ("tx", "rx")} for h in hosts},
           "background_bytes_per_s": {h: round(sum(report["background_bytes"][h].values()) / report["measured_s"])
                                      for h in hosts},
           "window": report["window"], "throughput_images": report["throughput_images"],
           "latency_requests": len(report["latencies_ms"]), "warmup_s": report["warmup_s"]}
    return out


def run_profile(profile: LinkProfile, links: LinksFile, systems: Sequence[str], base_topology: Path, bundle: Path,
                image_codec: str, images_path: Path, plan: RunPlan, work_dir: Path,
                image_quality: int | None = None, say: Callable[[str], None] = print,
                keep: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every system of ``systems`` on one freshly built testbed of ``profile``, in ``plan.rounds``
    alternating rounds (:func:`round_orders`); torn down after. A row per system: its rounds merged
    (:func:`merge_rounds`), with each round's p50 in ``latency_rounds_p50_ms``."""
    from devit_mq.model import load_manifest

    manifest = load_manifest(bundle)
    n = len(manifest.submodels)
    names = ["client", "aggregator", *(f"edge{i}" for i in range(n))]
    hosts = [HostSpec(name, profile.rate_mbit, links.device_of(name).cpu, links.device_of(name).cpus,
                      links.device_of(name).cpu_period_ms)
             for name in names]
    reports: dict[str, list[dict[str, Any]]] = {system: [] for system in systems}
    seconds = dict.fromkeys(systems, 0.0)
    with Testbed(hosts) as tb:
        if keep is not None:
            keep["prefix"] = tb.prefix
        ips = {name: tb.ip(name) for name in names}
        topo = testbed_topology(base_topology, bundle, ips, image_codec, work_dir, image_quality)
        for r, (order, round_plan) in enumerate(zip(round_orders(systems, plan.rounds), plan.per_round(), strict=True)):
            for system in order:
                t0 = time.monotonic()
                phase = Phase(tb, system, profile, round_plan, work_dir, images_path, round_index=r)
                reports[system].append(_run_round(phase, topo, bundle, image_codec, n))
                seconds[system] += time.monotonic() - t0
    out: dict[str, Any] = {}
    for system in systems:
        stages = n if system != "monolith" else 1
        used = names if system == "devit" else ["client", *(f"edge{i}" for i in range(stages))]
        report = merge_rounds(reports[system])
        row = summarize_phase(report, predicted_messages(system, topo, stages, measured_images(images_path, plan)),
                              used)
        row["stages"] = stages if system != "devit" else None
        row["rounds"] = plan.rounds
        row["latency_rounds_p50_ms"] = report["rounds_p50_ms"]
        row["probabilities"] = report["probabilities"]
        out[system] = row
        say(f"  {profile.name:14s} {system:9s} p50 {row['latency_p50_ms']:8.2f} ms  p99 "
            f"{row['latency_p99_ms']:8.2f} ms  {row['images_per_s']:7.2f} img/s  bytes/img "
            + ", ".join(f"{h} {b}" for h, b in row["bytes_per_image"].items())
            + f"  (p50 per round {', '.join(f'{p:.1f}' for p in report['rounds_p50_ms'])} ms; {seconds[system]:.0f} s)")
    return out


def _run_round(phase: Phase, topo: Path, bundle: Path, image_codec: str, edges: int) -> dict[str, Any]:
    """Start ``phase``'s system, run its probe, stop its processes; the probe's report."""
    from devit_mq.topology import load_topology

    try:
        if phase.system == "devit":
            phase.start_devit(topo)
            return phase.probe({"system": "devit", "topology": str(topo)})
        first = phase.start_chain(bundle, edges if phase.system == "pipeline" else 1)
        return phase.probe({"system": "chain", "first": first, "result_bind": f"tcp://*:{RESULT_PORT}",
                            "image_codec": image_codec, "image_quality": load_topology(topo).image_quality})
    finally:
        phase.tb.stop_processes()
