"""A DeViT client written from docs/protocol.md alone.

It uses only the standard library, msgpack, pyzmq and numpy; it never imports devit_mq (run as a
script it checks that at exit). It says hello to the aggregator, reads the status reply, sends
each image (uint8 [1, H, W, C], codec raw) to every edge with a fresh request id and waits for the
aggregator's RESULT (float32 probabilities) or ERROR.

    python spec_client.py --aggregator tcp://127.0.0.1:5600 --edge tcp://127.0.0.1:5610 \
        --edge tcp://127.0.0.1:5611 --name client-1 --images digits.npy [--out answers.json]

``--images`` is a .npy file of uint8 images [N, H, W, C]; the answers are printed (or written to
``--out``) as JSON: the status reply and one entry per image, in order. Under CURVE, give the keys
folder (``--keys DIR``: this client's ``KEY.key_secret`` and the servers' ``NAME.key``), the key
(``--key``, default: the name up to its first dot) and each server's name: ``--aggregator
aggregator=tcp://...``, ``--edge edge0=tcp://...``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import secrets
import struct
import sys
import time
import zlib
from typing import Any

import msgpack
import numpy as np
import zmq
import zmq.auth

WIRE_VERSION = 5
REFRESH_S = 2.0  # step 5: a hello without a reply after this long without a hello or an answer
IMAGE, FEATURES, RESULT, ERROR, HEARTBEAT, CONTROL = 1, 2, 3, 4, 5, 6
HEADER_ORDER = ("v", "k", "s", "r", "i", "c", "t", "h", "b", "m", "ts", "x")
#: the status reply's fields and their defaults (a field equal to its default is not sent)
STATUS_DEFAULTS: dict[str, Any] = {"ready": [], "parts": 0, "pending": 0, "nodes": {}, "classes": [], "codec": "",
                                   "image_shape": [], "instance": "", "last_heard_s": [], "silence_s": 0.0}
RESULT_DEFAULTS: dict[str, Any] = {"stages": []}
ERROR_DEFAULTS: dict[str, Any] = {"code": "error", "message": "", "part": None}
RAW_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float16", "float32",
              "float64")


class ProtocolError(RuntimeError):
    """A message this client must drop (or a topology that does not answer)."""


# -- the wire: two frames [header, payload] ----------------------------------------------------------

def routing_crc(source: str, reply_to: str, raw_ids: bytes) -> int:
    """CRC-32 over UTF-8 ``source``, one NUL byte, UTF-8 ``reply_to``, then the packed ids."""
    return zlib.crc32(source.encode() + b"\0" + reply_to.encode() + raw_ids)


def pack_ids(ids: list[int]) -> bytes:
    return struct.pack(f"<{len(ids)}Q", *ids)


def encode(kind: int, source: str, *, reply_to: str = "", ids: list[int] = (), array: np.ndarray | None = None,
           meta: dict | None = None, stamps: dict[str, float] | None = None) -> list[bytes]:
    """Frames of one message. ``array`` travels with codec raw (the only one a client sends)."""
    header: dict[str, Any] = {"v": WIRE_VERSION, "k": kind, "s": source}
    if reply_to:
        header["r"] = reply_to
    raw_ids = pack_ids(list(ids))
    if raw_ids:
        header["i"] = raw_ids
    payload = b""
    if array is not None:
        array = np.ascontiguousarray(array)
        header.update(c="raw", t=array.dtype.name, h=list(array.shape))
        payload = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    if meta is not None:
        header["m"] = msgpack.packb(meta)
    if stamps:
        header["ts"] = {k: float(v) for k, v in stamps.items()}
    header["x"] = routing_crc(source, reply_to, raw_ids)
    return [msgpack.packb(header), payload]


def _decode_array(header: dict, payload: bytes) -> np.ndarray:
    codec, dtype, shape = header["c"], header["t"], tuple(header["h"])
    count = int(np.prod(shape))
    width, rows = shape[-1], count // shape[-1]
    if codec == "raw":
        if dtype not in RAW_DTYPES:
            raise ProtocolError(f"raw dtype {dtype!r}")
        arr = np.frombuffer(payload, dtype=np.dtype(dtype).newbyteorder("<"))
    elif codec == "fp32":
        arr = np.frombuffer(payload, dtype="<f4")
    elif codec == "fp16":
        arr = np.frombuffer(payload, dtype="<f2").astype(np.float32)
    elif codec == "bf16":
        arr = (np.frombuffer(payload, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    elif codec in ("int8", "int8-block"):
        block = width if codec == "int8" else header["b"]
        nb = -(-width // block)
        scales = np.frombuffer(payload, dtype="<f4", count=rows * nb).reshape(rows, nb)
        q = np.frombuffer(payload, dtype=np.int8, offset=4 * rows * nb).reshape(rows, width)
        arr = q.astype(np.float32) * np.repeat(scales, block, axis=1)[:, :width]
    else:
        raise ProtocolError(f"unknown codec {codec!r}")
    if arr.size != count:
        raise ProtocolError(f"payload does not hold {shape}")
    return arr.reshape(shape)


def decode(frames: list[bytes]) -> dict[str, Any]:
    """The header as a dict plus ``ids`` (ints), ``meta`` (a dict, or None) and ``array`` (or None)."""
    if len(frames) != 2:
        raise ProtocolError(f"{len(frames)} frames")
    header = msgpack.unpackb(frames[0], raw=False)
    if not isinstance(header, dict) or header.get("v") != WIRE_VERSION:
        raise ProtocolError("not a version-3 header")
    raw_ids = header.get("i", b"")
    if "x" in header and header["x"] != routing_crc(header["s"], header.get("r", ""), raw_ids):
        raise ProtocolError("routing checksum mismatch")
    msg = dict(header)
    msg["ids"] = list(struct.unpack(f"<{len(raw_ids) // 8}Q", raw_ids))
    msg["meta"] = msgpack.unpackb(header["m"], raw=False) if "m" in header else None
    msg["array"] = _decode_array(header, frames[1]) if "c" in header else None
    return msg


# -- the client ----------------------------------------------------------------------------------------

class SpecClient:
    """One DEALER to the aggregator (hello, status, answers), one PUSH per edge (images)."""

    def __init__(self, aggregator: str, edges: list[str], name: str, timeout_s: float = 30.0,
                 keys_dir: str | None = None, key: str | None = None) -> None:
        """Endpoints are ``ENDPOINT`` or ``NAME=ENDPOINT``; with ``keys_dir`` (CURVE) every server
        needs its NAME, whose public key is ``keys_dir/NAME.key``."""
        self.name, self.timeout_s = name, timeout_s
        self.ctx = zmq.Context()
        self.curve = None
        if keys_dir is not None:
            public, secret = zmq.auth.load_certificate(os.path.join(keys_dir, f"{key or name.split('.')[0]}.key_secret"))
            self.curve = (keys_dir, public, secret)
        self.dealer = self._socket(zmq.DEALER, aggregator)
        self.pushes = [self._socket(zmq.PUSH, edge) for edge in edges]
        self.ids = itertools.count(secrets.randbits(40) << 16)  # unique per client, random base
        self.last_sign = 0.0  # time.monotonic() of the last hello sent or answer received (step 5)
        self.status: dict[str, Any] = {}
        self.aggregator_name: str | None = None

    def _socket(self, kind: int, server: str) -> zmq.Socket:
        """A socket connected to ``server`` (``[NAME=]ENDPOINT``)."""
        name, eq, endpoint = server.partition("=")
        if not eq or "://" in name:
            name, endpoint = "", server
        sock = self.ctx.socket(kind)
        sock.linger = 0
        if kind == zmq.DEALER:
            sock.identity = os.urandom(16)  # a random routing id: answers follow the hello's connection
        else:
            sock.sndtimeo = int(self.timeout_s * 1000)
        if self.curve is not None:
            keys_dir, sock.curve_publickey, sock.curve_secretkey = self.curve
            if not name:
                raise ProtocolError(f"CURVE needs the server's name: NAME=ENDPOINT, got {server!r}")
            sock.curve_serverkey, _ = zmq.auth.load_certificate(os.path.join(keys_dir, f"{name}.key"))
        sock.connect(endpoint)
        return sock

    def close(self) -> None:
        self.ctx.destroy(linger=0)

    def __enter__(self) -> SpecClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_raw(self, frames: list[bytes], to: str = "aggregator") -> None:
        """Frames as they are, to the aggregator or to every edge (``to="edges"``)."""
        for sock in (self.pushes if to == "edges" else [self.dealer]):
            sock.send_multipart(frames)

    def hello(self, reply: bool = True) -> None:
        meta = {"op": "hello"} if reply else {"op": "hello", "reply": False}
        self.send_raw(encode(CONTROL, self.name, meta=meta, stamps={"sent": time.time()}))
        self.last_sign = time.monotonic()

    def receive(self, timeout_s: float) -> dict[str, Any] | None:
        """The next valid message from the aggregator, or None after ``timeout_s``; malformed
        messages are dropped as the spec says."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.dealer.poll(int(left * 1000) + 1):
                return None
            try:
                msg = decode(self.dealer.recv_multipart())
            except (ProtocolError, ValueError, KeyError, TypeError, msgpack.UnpackException):
                continue
            if self.aggregator_name is None or msg["s"] == self.aggregator_name:
                return msg

    def connect(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """Hello every 0.25 s until a status reply says every edge is ready."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.hello()
            msg = self.receive(0.25)
            if msg is None or msg["k"] not in (CONTROL, ERROR):
                continue
            meta = msg["meta"] or {}
            if msg["k"] == ERROR:
                raise ProtocolError(f"hello refused: {meta.get('code')}: {meta.get('message')}")
            if meta.get("op") == "status_reply":
                self.aggregator_name = msg["s"]
                self.status = {**STATUS_DEFAULTS, **meta}
                if self.status["parts"] and len(self.status["ready"]) == self.status["parts"]:
                    return self.status
        raise ProtocolError(f"no ready status reply within {timeout_s:g} s (last: {self.status})")

    def submit(self, image: np.ndarray) -> int:
        """Send one image [H, W, C] (uint8) to every edge; returns its request id."""
        rid = next(self.ids)
        if time.monotonic() - self.last_sign > REFRESH_S:
            self.hello(reply=False)  # step 5: rebind (a restarted aggregator) before the images go out
        frames = encode(IMAGE, self.name, reply_to=self.name, ids=[rid], array=image[None],
                        stamps={"client_sent": time.time()})
        self.send_raw(frames, to="edges")
        return rid

    def answer(self, rid: int, timeout_s: float | None = None) -> dict[str, Any]:
        """Wait for the RESULT or ERROR about ``rid`` (other messages are skipped)."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while (left := deadline - time.monotonic()) > 0:
            msg = self.receive(left)
            if msg is None or rid not in msg["ids"]:
                continue
            row = msg["ids"].index(rid)
            self.last_sign = time.monotonic()
            if msg["k"] == RESULT:
                meta = {**RESULT_DEFAULTS, **msg["meta"]}
                probs = msg["array"][row]
                return {"request_id": rid, "label": int(meta["labels"][row]), "probs": probs.tolist(),
                        "degraded": bool(meta["degraded"][row]), "missing": list(meta["missing"][row]),
                        "error": None}
            if msg["k"] == ERROR:
                meta = {**ERROR_DEFAULTS, **(msg["meta"] or {})}
                return {"request_id": rid, "label": -1, "probs": None, "degraded": False, "missing": [],
                        "error": f"{meta['code']}: {meta['message']}"}
        return {"request_id": rid, "label": -1, "probs": None, "degraded": False, "missing": [],
                "error": "timeout"}

    def classify(self, images: np.ndarray) -> list[dict[str, Any]]:
        """One request per image, one at a time; the answers in order."""
        return [self.answer(self.submit(image)) for image in np.asarray(images, dtype=np.uint8)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--aggregator", required=True, help="the aggregator's [NAME=]ENDPOINT, e.g. tcp://127.0.0.1:5600")
    p.add_argument("--edge", action="append", required=True, help="an edge's [NAME=]ENDPOINT (once per edge)")
    p.add_argument("--keys", help="CURVE: the keys folder (NAME=ENDPOINT needed for every server)")
    p.add_argument("--key", help="CURVE: this client's key name (default: --name up to its first dot)")
    p.add_argument("--name", required=True, help="this client's name (letters, digits, '_.-')")
    p.add_argument("--images", required=True, help=".npy file of uint8 images [N, H, W, C]")
    p.add_argument("--out", help="write the JSON answers here instead of stdout")
    p.add_argument("--timeout", type=float, default=30.0)
    args = p.parse_args(argv)
    images = np.load(args.images, allow_pickle=False)
    with SpecClient(args.aggregator, args.edge, args.name, args.timeout, args.keys, args.key) as client:
        status = client.connect(args.timeout)
        answers = client.classify(images)
    foreign = sorted(m for m in sys.modules if m == "devit_mq" or m.startswith(("devit_mq.", "tests")))
    assert not foreign, f"the spec client imported {foreign}"
    report = {"status": {k: status[k] for k in ("classes", "image_shape", "codec", "parts", "ready")},
              "answers": answers, "foreign_modules": foreign}
    text = json.dumps(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)
    for i, a in enumerate(answers):
        print(f"image {i}: " + (f"label {a['label']}" if a["error"] is None else a["error"]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
