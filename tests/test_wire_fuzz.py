"""Fuzzing the decoders: random and mutated messages may decode or raise WireError, nothing else.

The default suite runs a few thousand cases per mutation; ``-m slow`` runs many more."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devit_mq.protocol import (
    META_SCHEMA,
    ErrorMeta,
    FeaturesMeta,
    HeartbeatMeta,
    ImageMeta,
    Ready,
    ResultMeta,
    Shutdown,
    Status,
)
from devit_mq.wire import ARRAY_NDIM, Kind, Limits, Message, WireError, decode, encode

FIELDS = {"version", "kind", "source", "reply_to", "request_ids", "codec", "dtype", "shape", "block_size", "meta",
          "timestamps", "header", "frames", "payload", "size", "scale", "array", "checksum"}
HEADER_KEYS = ["v", "k", "s", "r", "i", "c", "t", "h", "b", "m", "ts", "x"]
LIMITS = [Limits(), Limits(allow_nonfinite=True), Limits(max_message_bytes=4096, max_batch=3, max_meta_bytes=64)]


def corpus() -> list[Message]:
    """Valid messages of every kind and codec (small, so mutations hit headers as often as payloads)."""
    rng = np.random.default_rng(0)
    out = [Message(Kind.IMAGE, "client-1", (1, 2), rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8), codec="raw",
                   reply_to="client-1", timestamps={"client_sent": 1.0}, meta=ImageMeta())]
    for codec in ("fp32", "fp16", "bf16", "int8", "int8-block"):
        out.append(Message(Kind.FEATURES, "edge0", (7, 8), rng.standard_normal((2, 2, 24)).astype(np.float32),
                           codec=codec, block_size=8, meta=FeaturesMeta(part=0, compute_ms=1.0, queue_ms=0.5),
                           reply_to="client-1", timestamps={"edge_sent": 2.0}))
    out.append(Message(Kind.RESULT, "aggregator", (7,), np.full((1, 5), 0.2, np.float32),
                       meta=ResultMeta(labels=[3], degraded=[False], missing=[[]])))
    out.append(Message(Kind.ERROR, "aggregator", (7, 8), meta=ErrorMeta(code="missing_features", message="too late")))
    out.append(Message(Kind.HEARTBEAT, "edge1", timestamps={"sent": 3.0}, meta=HeartbeatMeta(part=1)))
    out.append(Message(Kind.CONTROL, "launcher", meta=Shutdown(token="t")))
    out.append(Message(Kind.CONTROL, "edge1", meta=Ready(part=1)))
    out.append(Message(Kind.CONTROL, "aggregator", meta=Status(ready=[0], parts=2, classes=["a", "b"])))
    return out


CORPUS = corpus()
CORPUS_FRAMES = [encode(m) for m in CORPUS]


def check_decoded(msg: Message, limits: Limits) -> None:
    """What a successful decode promises, whatever the input was."""
    assert isinstance(msg, Message) and type(msg.kind) is Kind
    assert isinstance(msg.source, str) and msg.source
    assert all(type(i) is int and 0 <= i < 2**64 for i in msg.request_ids)
    schema = META_SCHEMA[msg.kind]
    assert isinstance(msg.meta, getattr(schema, "__args__", (schema,))) and type(msg.timestamps) is dict
    ndim = ARRAY_NDIM.get(msg.kind)
    if ndim is None:
        assert msg.array is None
        return
    assert msg.array is not None and msg.array.ndim == ndim and msg.array.shape[0] == len(msg.request_ids)
    assert msg.array.shape[0] <= limits.max_batch
    if msg.codec != "raw":
        assert msg.array.dtype == np.float32
    if msg.array.dtype.kind == "f" and not limits.allow_nonfinite:
        assert np.isfinite(msg.array).all()


def try_decode(fn: Callable[..., Message], data: Any, limits: Limits) -> str:
    try:
        msg = fn(data, limits)
    except WireError as exc:
        assert exc.field in FIELDS, exc.field
        return exc.field
    check_decoded(msg, limits)
    return "ok"


# ---------------------------------------------------------------------------------------------- mutations

POOL: list[Any] = [None, True, False, 0, 1, -1, 2, 6, 255, 2**31, 2**63, 2**64 - 1, -(2**63), 0.0, -1.5, float("nan"),
                   float("inf"), "", "x", "fp32", "int8", "int8-block", "raw", "float32", "int8", "uint8", "bfloat16",
                   "edge0", b"", b"\x00" * 8, b"\xff" * 16, [], [1], [2, 2, 24], [1, 1, 1, 1], [2**40, 2**40, 2**40],
                   [-1, 2, 3], {}, {"a": 1}, {"t": "x"}, [[[]]], msgpack.packb({"op": "x"}), msgpack.packb([1])]


def flip_bits(rng: np.random.Generator, data: bytes) -> bytes:
    if not data:
        return data
    buf = bytearray(data)
    for _ in range(int(rng.integers(1, 9))):
        pos = int(rng.integers(len(buf)))
        buf[pos] ^= 1 << int(rng.integers(8))
    return bytes(buf)


def resize(rng: np.random.Generator, data: bytes) -> bytes:
    if rng.random() < 0.5 and data:
        return data[: int(rng.integers(len(data)))]
    return data + rng.bytes(int(rng.integers(1, 40)))


def mutate_header(rng: np.random.Generator, head: bytes) -> bytes:
    header = msgpack.unpackb(head)
    for _ in range(int(rng.integers(1, 4))):
        op = rng.integers(4)
        key = HEADER_KEYS[int(rng.integers(len(HEADER_KEYS)))]
        if op == 0:  # replace a value with something of another type or range
            header[key] = POOL[int(rng.integers(len(POOL)))]
        elif op == 1:  # delete a field
            header.pop(key, None)
        elif op == 2:  # swap two fields' values
            other = HEADER_KEYS[int(rng.integers(len(HEADER_KEYS)))]
            if key in header and other in header:
                header[key], header[other] = header[other], header[key]
        else:  # an unknown field
            header[f"x{int(rng.integers(100))}"] = POOL[int(rng.integers(len(POOL)))]
    return msgpack.packb(header)


META_KEYS = ["op", "part", "compute_ms", "queue_ms", "batch", "labels", "degraded", "missing", "stages", "code",
             "message", "telemetry", "token", "ready", "parts", "nodes", "classes", "instance", "zz"]


def mutate_meta(rng: np.random.Generator, head: bytes) -> bytes:
    """Well-formed frames whose meta has hostile values: what the node loops must never see."""
    header = msgpack.unpackb(head)
    meta = msgpack.unpackb(header["m"]) if "m" in header else {}
    for _ in range(int(rng.integers(1, 4))):
        meta[META_KEYS[int(rng.integers(len(META_KEYS)))]] = POOL[int(rng.integers(len(POOL)))]
    header["m"] = msgpack.packb(meta)
    header.pop("x", None)
    return msgpack.packb(header)


def mutated_frames(rng: np.random.Generator, kind: str) -> Iterator[Any]:
    i = int(rng.integers(len(CORPUS_FRAMES)))
    head, body = CORPUS_FRAMES[i]
    if kind == "random":
        yield [rng.bytes(int(rng.integers(0, 120))), rng.bytes(int(rng.integers(0, 200)))]
    elif kind == "bitflip":
        which = rng.integers(3)
        yield [flip_bits(rng, head) if which != 1 else head, flip_bits(rng, body) if which != 0 else body]
    elif kind == "resize":
        yield [resize(rng, head), body] if rng.random() < 0.5 else [head, resize(rng, body)]
    elif kind == "fields":
        yield [mutate_header(rng, head), body]
    elif kind == "meta":
        yield [mutate_meta(rng, head), body]
    elif kind == "splice":  # header of one message, payload of another
        yield [head, CORPUS_FRAMES[int(rng.integers(len(CORPUS_FRAMES)))][1]]
    elif kind == "frames":
        yield [[head], [head, body, body], [], [body, head], (head, body, b""), [None, body], [head, 3.5]][
            int(rng.integers(7))]


MUTATIONS = ["random", "bitflip", "resize", "fields", "meta", "splice", "frames"]


def run_fuzz(mutation: str, cases: int, seed: int) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    outcomes: dict[str, int] = {}
    for n in range(cases):
        limits = LIMITS[n % len(LIMITS)]
        for frames in mutated_frames(rng, mutation):
            result = try_decode(decode, frames, limits)
            outcomes[result] = outcomes.get(result, 0) + 1
    return outcomes


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mutation", MUTATIONS)
def test_fuzz_only_wire_errors(mutation):
    outcomes = run_fuzz(mutation, 4000, seed=MUTATIONS.index(mutation))
    assert sum(outcomes.values()) >= 3000
    if mutation in ("random", "resize", "frames", "fields", "meta"):
        assert sum(v for k, v in outcomes.items() if k != "ok") > 0.5 * sum(outcomes.values())


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("mutation", MUTATIONS)
def test_fuzz_only_wire_errors_long(mutation):
    for seed in range(100, 110):
        run_fuzz(mutation, 10_000, seed=seed)


def test_corpus_decodes_cleanly():
    for msg, frames in zip(CORPUS, CORPUS_FRAMES, strict=True):
        assert decode(frames).kind == msg.kind


# ---------------------------------------------------------------------------------------------- hypothesis

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=12)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=4), inner, max_size=5),
    max_leaves=10,
)
headers = st.dictionaries(st.sampled_from([*HEADER_KEYS, "zz"]), msgpack_values, max_size=12)


@settings(max_examples=400, deadline=None)
@given(head=st.binary(max_size=200), body=st.binary(max_size=200))
def test_arbitrary_bytes(head, body):
    for limits in LIMITS[:2]:
        try_decode(decode, [head, body], limits)


@settings(max_examples=400, deadline=None)
@given(header=headers, body=st.binary(max_size=300), base=st.integers(0, len(CORPUS) - 1))
def test_arbitrary_headers(header, body, base):
    real = msgpack.unpackb(CORPUS_FRAMES[base][0])
    real.update(header)  # keep most of a real header so the checks past the first ones get exercised
    for candidate in (header, real):
        head = msgpack.packb(candidate)
        for payload in (body, CORPUS_FRAMES[base][1]):
            try_decode(decode, [head, payload], Limits())
