"""docs/protocol.md is held to the code: every protocol name appears in it, its hex examples are what
the encoder writes, and a client written from it alone (tests/spec_client.py, no devit_mq import)
classifies real MNIST digits through a real ZeroMQ topology exactly like devit_mq.Client."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import yaml

from devit_mq import Client
from devit_mq.data import load_dataset
from devit_mq.nodes.launcher import Launcher
from devit_mq.protocol import (
    CODEC_NAMES,
    ERROR_CODES,
    FEATURE_CODECS,
    META_SCHEMA,
    NAME_RE,
    WIRE_VERSION,
    ControlOp,
    FeaturesMeta,
    Hello,
    Kind,
    Percentiles,
    ResultMeta,
    StageTimes,
    Telemetry,
)
from devit_mq.topology import load_topology
from devit_mq.topology.load import PACKAGE_BUNDLES
from devit_mq.transport.security import create_keys
from devit_mq.wire import RAW_DTYPES, Message, decode, encode
from devit_mq.wire.message import _Header

from . import spec_client as sc
from .runtime_helpers import free_ports

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "protocol.md"
SPEC_CLIENT = Path(__file__).with_name("spec_client.py")
DIGITS = 32


def doc() -> str:
    return DOC.read_text()


def table_cells(text: str) -> set[str]:
    """The backticked first cell of every table row (``| `v` | ...``)."""
    return set(re.findall(r"^\| `([^`]+)` \|", text, re.M))


# -- the document names everything ----------------------------------------------------------------

def _schemas() -> list[type]:
    found: list[type] = [Telemetry, StageTimes, Percentiles]
    for schema in META_SCHEMA.values():
        found.extend(getattr(schema, "__args__", (schema,)))
    return found


def test_document_names_every_header_key_kind_op_error_code_codec_and_field():
    text, cells = doc(), table_cells(doc())
    assert f"version {WIRE_VERSION})" in text.splitlines()[0] and f"**{WIRE_VERSION}**" in text
    missing = {
        "header keys": [k for k in _Header.__struct_fields__ if k not in cells],
        "kinds": [k.name for k in Kind if f"| `{k.name}` | {int(k)} |" not in text],
        "control ops": [t for t in (op.__struct_config__.tag for op in ControlOp.__args__) if t not in cells],
        "error codes": [c for c in ERROR_CODES if c not in cells],
        "codecs": [c for c in CODEC_NAMES if c not in cells],
        "raw dtypes": [d for d in RAW_DTYPES if f"`{d}`" not in text],
        "meta fields": sorted({f"{s.__name__}.{f}" for s in _schemas() for f in s.__struct_fields__
                               if f"`{f}`" not in text}),
    }
    assert NAME_RE.pattern in text
    assert not any(missing.values()), f"docs/protocol.md does not document: {missing}"


# -- the worked examples are the encoder's bytes ----------------------------------------------------

EXAMPLES = {
    "hello": Message(Kind.CONTROL, "client-7", meta=Hello(), timestamps={"sent": 1700000000.5}),
    "image": Message(Kind.IMAGE, "client-7", request_ids=(1,), reply_to="client-7", codec="raw",
                     array=np.array([[[[0], [64]], [[128], [255]]]], dtype=np.uint8),
                     timestamps={"client_sent": 1700000000.75}),
    "result": Message(Kind.RESULT, "aggregator", request_ids=(1,), reply_to="client-7", codec="fp32",
                      array=np.array([[0.125, 0.75, 0.125]], np.float32),
                      meta=ResultMeta(labels=[1], degraded=[False], missing=[[]],
                                      stages=[StageTimes(edge_compute_ms=1.5, fuse_ms=0.25, hold_ms=2.0)]),
                      timestamps={"agg_sent": 1700000001.0}),
}


def doc_examples() -> dict[str, bytes]:
    """``<!-- wire-example: NAME -->`` then a fenced block: the hex bytes before each line's ``#``."""
    blocks = re.findall(r"<!-- wire-example: ([\w.]+) -->\n```text\n(.*?)```", doc(), re.S)
    out = {}
    for name, body in blocks:
        tokens = " ".join(line.split("#", 1)[0] for line in body.splitlines()).split()
        assert all(re.fullmatch(r"[0-9a-f]{2}", t) for t in tokens), f"{name}: not hex bytes: {tokens}"
        out[name] = bytes(int(t, 16) for t in tokens)
    return out


def test_worked_examples_are_exactly_what_the_encoder_writes():
    examples = doc_examples()
    assert set(examples) == {f"{n}.{f}" for n in EXAMPLES for f in ("header", "payload")}
    for name, msg in EXAMPLES.items():
        header, payload = encode(msg)
        assert examples[f"{name}.header"] == header, f"{name} header:\n{header.hex(' ')}"
        assert examples[f"{name}.payload"] == payload, f"{name} payload:\n{payload.hex(' ')}"
        decode([examples[f"{name}.header"], examples[f"{name}.payload"]])  # and they are valid messages
    # the spec client writes the same bytes as the real encoder, and reads the result the same way
    assert sc.encode(sc.CONTROL, "client-7", meta={"op": "hello"}, stamps={"sent": 1700000000.5}) == \
        encode(EXAMPLES["hello"])
    refresh = sc.encode(sc.CONTROL, "client-7", meta={"op": "hello", "reply": False})
    assert refresh == encode(Message(Kind.CONTROL, "client-7", meta=Hello(reply=False)))
    assert decode(refresh).meta == Hello(reply=False)
    image = EXAMPLES["image"]
    assert sc.encode(sc.IMAGE, "client-7", reply_to="client-7", ids=[1], array=image.array,
                     stamps={"client_sent": 1700000000.75}) == encode(image)
    result = sc.decode([examples["result.header"], examples["result.payload"]])
    assert result["ids"] == [1] and result["meta"]["labels"] == [1]
    np.testing.assert_array_equal(result["array"], EXAMPLES["result"].array)


@pytest.mark.parametrize("codec", FEATURE_CODECS)
def test_spec_client_decodes_every_feature_codec_like_the_wire(codec):
    x = np.random.default_rng(1).normal(size=(3, 2, 37)).astype(np.float32)
    frames = encode(Message(Kind.FEATURES, "edge0", request_ids=(4, 5, 6), array=x, codec=codec,
                            meta=FeaturesMeta(part=0), block_size=8))
    np.testing.assert_array_equal(sc.decode(frames)["array"], decode(frames).array)


def test_spec_client_imports_nothing_but_stdlib_msgpack_zmq_numpy():
    tree = ast.parse(SPEC_CLIENT.read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(tree))  # no relative imports
    assert roots - set(sys.stdlib_module_names) <= {"msgpack", "numpy", "zmq"}, roots


# -- against a live topology ------------------------------------------------------------------------

def write_spec_topology(path: Path, **extra) -> Path:
    """The shipped default bundle (real MNIST weights) on two edges and an aggregator, torch-free."""
    ports = free_ports(3)
    path.write_text(yaml.safe_dump({
        "name": path.stem, "bundle": "default", "transport": "zmq", "codec": "int8", "image_codec": "raw",
        "defaults": {"threads": 1, "attention": "auto", "executor": "numpy", "max_batch": 8, "max_wait_ms": 0.0},
        "aggregator": {"name": "aggregator", "host": "127.0.0.1", "port": ports[0], "deadline_ms": 5000},
        "edges": [{"name": f"edge{i}", "submodel": i, "host": "127.0.0.1", "port": ports[i + 1]} for i in range(2)],
        **extra,
    }, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spec")
    topo_path = write_spec_topology(tmp / "spec.yaml")
    manifest = json.loads((PACKAGE_BUNDLES / "default" / "manifest.json").read_text())
    data = load_dataset(**manifest["metadata"]["dataset"])
    pick = np.linspace(0, len(data.test_labels) - 1, DIGITS).astype(int)  # the split is sorted by class: spread out
    with Launcher(topo_path, log_dir=tmp / "logs", ready_timeout_s=60) as launcher:
        yield {"topology": load_topology(topo_path), "path": topo_path, "launcher": launcher, "tmp": tmp,
               "manifest": manifest, "images": np.asarray(data.test_images[pick], dtype=np.uint8),
               "labels": np.asarray(data.test_labels[pick])}


def endpoints(topology) -> list[str]:
    return ["--aggregator", topology.aggregator.connect_endpoint,
            *[arg for e in topology.edges for arg in ("--edge", e.connect_endpoint)]]


@pytest.mark.timeout(120)
def test_spec_client_in_a_clean_process_classifies_real_digits_like_devit_mq_client(live):
    tmp, images = live["tmp"], np.ascontiguousarray(live["images"], dtype=np.uint8)
    np.save(tmp / "digits.npy", images)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    # -I: no PYTHONPATH, no user site, not even the script's folder on sys.path; the script asserts
    # at exit that no devit_mq (or tests) module was loaded
    out = subprocess.run([sys.executable, "-I", str(SPEC_CLIENT), *endpoints(live["topology"]),
                          "--name", "spec-client-1", "--images", str(tmp / "digits.npy"), "--out",
                          str(tmp / "answers.json"), "--timeout", "30"],
                         cwd=tmp, env=env, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp / "answers.json").read_text())
    assert report["foreign_modules"] == []
    status = report["status"]
    assert status["classes"] == live["manifest"]["classes"] and status["image_shape"] == [28, 28, 1]
    assert status["codec"] == "int8" and status["ready"] == [0, 1] and status["parts"] == 2

    answers = report["answers"]
    assert [a["error"] for a in answers] == [None] * DIGITS
    assert not any(a["degraded"] for a in answers)
    labels = np.array([a["label"] for a in answers])
    probs = np.array([a["probs"] for a in answers], dtype=np.float32)
    assert len({a["request_id"] for a in answers}) == DIGITS
    np.testing.assert_array_equal(labels, probs.argmax(1))
    assert len(set(live["labels"].tolist())) == 10 and (labels == live["labels"]).mean() >= 0.8  # really classified

    with Client(live["path"], timeout_s=30) as client:  # the same requests, one at a time, as the spec client
        ref = client.predict(images, batch_size=1, window=1)
    assert not ref.errors
    np.testing.assert_array_equal(labels, ref.labels)
    # identical images give identical int8 features, so the fused probabilities agree to float32 rounding
    np.testing.assert_allclose(probs, ref.probabilities, rtol=0, atol=1e-6)


def counters(client: sc.SpecClient) -> dict[str, dict[str, int]]:
    """Each node's counters from a fresh status reply (edges' come with their heartbeats)."""
    client.send_raw(sc.encode(sc.CONTROL, client.name, meta={"op": "status"}))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        msg = client.receive(0.5)
        if msg is not None and (msg["meta"] or {}).get("op") == "status_reply":
            return {name: t.get("counters", {}) for name, t in msg["meta"].get("nodes", {}).items()}
    raise AssertionError("no status reply")


def tampered(frames: list[bytes], **changes) -> list[bytes]:
    header = msgpack.unpackb(frames[0])
    header.update(changes)
    return [msgpack.packb(header), frames[1]]


@pytest.mark.timeout(120)
def test_wrong_checksum_unknown_op_and_forged_reply_to_are_dropped_and_nodes_keep_serving(live):
    images = np.ascontiguousarray(live["images"][:2], dtype=np.uint8)
    topology = live["topology"]
    with sc.SpecClient(topology.aggregator.connect_endpoint, [e.connect_endpoint for e in topology.edges],
                       "spec-hostile", timeout_s=30) as client:
        client.connect(30)
        before = counters(client)

        good = sc.encode(sc.IMAGE, client.name, reply_to=client.name, ids=[77], array=images[:1])
        bad_crc = tampered(good, x=msgpack.unpackb(good[0])["x"] ^ 1)
        client.send_raw(bad_crc, to="edges")  # wire_errors at both edges; request 77 is never answered
        forged = sc.encode(sc.IMAGE, client.name, reply_to="someone-else", ids=[78], array=images[:1])
        client.send_raw(forged, to="edges")  # unauthorized at both edges (answers only to oneself)
        client.send_raw(sc.encode(sc.CONTROL, client.name, meta={"op": "bogus"}))  # wire_errors, aggregator
        hello = sc.encode(sc.CONTROL, client.name, meta={"op": "hello"})
        client.send_raw(tampered(hello, x=0))  # wire_errors at the aggregator, and no status reply
        quiet_until = time.monotonic() + 1.0
        while (left := quiet_until - time.monotonic()) > 0:
            msg = client.receive(left)
            assert msg is None, f"a dropped message was answered: {msg}"

        # the same nodes still answer correctly, and they counted what they dropped
        answers = client.classify(images)
        assert [a["error"] for a in answers] == [None, None]
        reference = live["launcher"].client.predict(images, batch_size=1, window=1)
        assert [a["label"] for a in answers] == reference.labels.tolist()
        deadline = time.monotonic() + 10
        while True:
            after = counters(client)
            grew = {(node, key): after.get(node, {}).get(key, 0) - before.get(node, {}).get(key, 0)
                    for node in ("aggregator", "edge0", "edge1") for key in ("wire_errors", "unauthorized")}
            expected = {("aggregator", "wire_errors"): 2, ("aggregator", "unauthorized"): 0,
                        **{(e, "wire_errors"): 1 for e in ("edge0", "edge1")},
                        **{(e, "unauthorized"): 1 for e in ("edge0", "edge1")}}
            if grew == expected or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert grew == expected


@pytest.mark.timeout(60)
def test_the_worked_example_image_is_answered_bad_input_as_the_document_says(live):
    topology = live["topology"]
    with sc.SpecClient(topology.aggregator.connect_endpoint, [e.connect_endpoint for e in topology.edges],
                       "spec-bad-input", timeout_s=30) as client:
        client.connect(30)
        answer = client.answer(client.submit(EXAMPLES["image"].array[0]))
    assert answer["error"].startswith("bad_input: edge") and "image shape (1, 2, 2, 1)" in answer["error"]


@pytest.mark.timeout(120)
def test_spec_client_under_curve_with_the_shared_client_key(live, tmp_path):
    keys = tmp_path / "keys"
    create_keys(keys, ["aggregator", "edge0", "edge1", "admin", "client"])
    topo_path = write_spec_topology(tmp_path / "curve.yaml", security={"curve": True, "keys_dir": str(keys)})
    images = live["images"][:4]
    with Launcher(topo_path, log_dir=tmp_path / "logs", ready_timeout_s=60) as launcher:
        topology = launcher.topology
        servers = [f"{e.name}={e.connect_endpoint}" for e in topology.edges]
        aggregator = f"aggregator={topology.aggregator.connect_endpoint}"
        # the shared "client" key may go by "client.SUFFIX" ...
        with sc.SpecClient(aggregator, servers, "client.spec", timeout_s=20, keys_dir=str(keys)) as client:
            assert client.connect(20)["ready"] == [0, 1]
            answers = client.classify(images)
        reference = launcher.client.predict(images, batch_size=1, window=1)
        assert [a["label"] for a in answers] == reference.labels.tolist()
        np.testing.assert_allclose(np.array([a["probs"] for a in answers]), reference.probabilities, atol=1e-6)
        # ... but not by a name of its own choosing: that hello is refused and answered by nobody
        with sc.SpecClient(aggregator, servers, "mallory", timeout_s=2, keys_dir=str(keys), key="client") as liar:
            with pytest.raises(sc.ProtocolError, match="no ready status reply"):
                liar.connect(1.5)
