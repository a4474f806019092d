"""Wire format: round trips for every kind x codec, and a WireError naming the field for each way a
message can be malformed."""

from __future__ import annotations

import pickle
import struct
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from devit_mq.protocol import (
    ERROR_CODES,
    MAX_PARTS,
    NAME_RE,
    ErrorMeta,
    FeaturesMeta,
    HeartbeatMeta,
    Hello,
    ImageMeta,
    Ready,
    ResultMeta,
    Shutdown,
    StageTimes,
    Status,
    StatusQuery,
)
from devit_mq.wire import (
    ARRAY_NDIM,
    CODECS,
    DEFAULT_LIMITS,
    WIRE_VERSION,
    EncodedArray,
    Kind,
    Limits,
    Message,
    WireError,
    decode,
    decode_array,
    encode,
    encode_array,
    payload_nbytes,
)
from devit_mq.wire import codecs as wire_codecs

FLOAT_CODECS = ["fp32", "fp16", "bf16", "int8", "int8-block"]
ARRAY_KINDS = list(ARRAY_NDIM)
PLAIN_KINDS = [k for k in Kind if k not in ARRAY_NDIM]


# ---------------------------------------------------------------------------------------------- helpers


def features(b: int = 2, p: int = 2, d: int = 192, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((b, p, d)).astype(np.float32)


def feature_msg(codec: str = "fp32", array: np.ndarray | None = None, **kw: Any) -> Message:
    array = features() if array is None else array
    kw.setdefault("request_ids", tuple(range(10, 10 + array.shape[0])))
    return Message(Kind.FEATURES, kw.pop("source", "edge0"), array=array, codec=codec, reply_to="client-7",
                   meta=FeaturesMeta(part=1, compute_ms=2.0), timestamps={"client_sent": 1.5, "edge_sent": 2.25}, **kw)


def tamper(msg: Message, payload: bytes | None = None, **changes: Any) -> list[bytes]:
    """Encode ``msg``, then edit header keys (value ``...`` deletes the key) and/or swap the payload."""
    head, body = encode(msg)
    header = msgpack.unpackb(head)
    header.pop("x", None)  # the routing checksum would catch most edits first: test each field's own check
    for key, value in changes.items():
        if value is ...:
            header.pop(key, None)
        else:
            header[key] = value
    return [msgpack.packb(header), body if payload is None else payload]


def assert_wire_error(field: str, frames: Any, limits: Limits = DEFAULT_LIMITS, **kw: Any) -> WireError:
    with pytest.raises(WireError) as info:
        decode(frames, limits, **kw)
    assert info.value.field == field, str(info.value)
    return info.value


def tolerance(codec: str, x: np.ndarray, block: int) -> np.ndarray:
    """Per-element error bound of each codec on finite input."""
    ax = np.abs(x.astype(np.float64))
    eps32 = float(np.finfo(np.float32).eps)
    if codec in ("fp32", "raw"):
        return np.zeros_like(ax)
    if codec == "fp16":  # half of 2**-10 relative in the normal range, 2**-25 absolute in the subnormal range
        return ax * 2.0**-11 + 2.0**-25
    if codec == "bf16":  # 7 stored mantissa bits; spacing 2**-133 among float32's subnormals
        return ax * 2.0**-8 + 2.0**-134
    rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
    nb = -(-rows.shape[1] // block)
    padded = np.zeros((rows.shape[0], nb * block))
    padded[:, : rows.shape[1]] = np.abs(rows)
    scale = (padded.reshape(rows.shape[0], nb, block).max(axis=2) / 127).astype(np.float32).astype(np.float64)
    per_elem = np.repeat(scale, block, axis=1)[:, : rows.shape[1]].reshape(x.shape)
    return per_elem / 2 * (1 + 1e-6) + 2 * eps32 * ax + 2e-36


def check_roundtrip(msg: Message, out: Message) -> None:
    assert out.kind == msg.kind and type(out.kind) is Kind
    assert out.source == msg.source and out.reply_to == msg.reply_to
    assert out.request_ids == tuple(msg.request_ids)
    assert out.meta == msg.meta
    assert out.timestamps == msg.timestamps
    if msg.array is None:
        assert out.array is None
        return
    assert out.codec == msg.codec
    assert out.array.shape == msg.array.shape
    if msg.codec == "raw":
        assert out.array.dtype == msg.array.dtype
        np.testing.assert_array_equal(out.array, msg.array)
        return
    assert out.array.dtype == np.float32
    block = msg.block_size if msg.codec == "int8-block" else msg.array.shape[-1]
    x = msg.array.astype(np.float32)
    err = np.abs(out.array.astype(np.float64) - x.astype(np.float64))
    assert np.all(err <= tolerance(msg.codec, x, block))


# ---------------------------------------------------------------------------------------------- round trips

# finite values in fp16's range (beyond +-65504 fp16 is inf by design, which receivers reject)
values = st.floats(-6e4, 6e4, width=32)
names = st.from_regex(NAME_RE, fullmatch=True)
millis = st.floats(0, 1e9)
parts = st.integers(0, MAX_PARTS - 1)


def meta_for(kind: Kind, rows: int) -> st.SearchStrategy:
    """A valid meta of ``kind`` for a message of ``rows`` array rows."""
    if kind == Kind.IMAGE:
        return st.just(ImageMeta())
    if kind == Kind.FEATURES:
        return st.builds(FeaturesMeta, part=parts, compute_ms=millis, queue_ms=millis, batch=st.integers(1, 4096))
    if kind == Kind.RESULT:
        stages = st.builds(StageTimes, edge_compute_ms=millis, fuse_ms=millis)
        return st.builds(ResultMeta, labels=st.lists(st.integers(0, 100), min_size=rows, max_size=rows),
                         degraded=st.lists(st.booleans(), min_size=rows, max_size=rows),
                         missing=st.lists(st.lists(parts, max_size=3), min_size=rows, max_size=rows),
                         stages=st.lists(stages, min_size=rows, max_size=rows) | st.just([]))
    if kind == Kind.ERROR:
        return st.builds(ErrorMeta, code=st.sampled_from(ERROR_CODES), message=st.text(max_size=40),
                         part=st.none() | parts)
    if kind == Kind.HEARTBEAT:
        return st.builds(HeartbeatMeta, part=parts)
    return st.one_of(st.just(Hello()), st.just(StatusQuery()), st.builds(Ready, part=parts),
                     st.builds(Shutdown, token=st.text(max_size=20)),
                     st.builds(Status, ready=st.lists(parts, max_size=4), parts=st.integers(0, MAX_PARTS),
                               classes=st.lists(st.text(max_size=10), max_size=5)))


@st.composite
def array_messages(draw: st.DrawFn) -> Message:
    kind = draw(st.sampled_from(ARRAY_KINDS))
    codec = draw(st.sampled_from(["raw", *FLOAT_CODECS]))
    shape = draw(hnp.array_shapes(min_dims=ARRAY_NDIM[kind], max_dims=ARRAY_NDIM[kind], min_side=1, max_side=9))
    if codec == "raw":
        dtype = draw(st.sampled_from(sorted(wire_codecs.RAW_DTYPES)))
        if np.dtype(dtype).kind == "f":
            array = draw(hnp.arrays(dtype, shape, elements=st.floats(-1e4, 1e4, width=8 * np.dtype(dtype).itemsize)))
        else:
            array = draw(hnp.arrays(dtype, shape))
    else:
        array = draw(hnp.arrays(np.float32, shape, elements=values))
    ids = tuple(draw(st.lists(st.integers(0, 2**64 - 1), min_size=shape[0], max_size=shape[0], unique=True)))
    return Message(
        kind, draw(names), request_ids=ids, array=array, codec=codec, block_size=draw(st.integers(1, 12)),
        meta=draw(meta_for(kind, shape[0])),
        timestamps=draw(st.dictionaries(names, st.floats(0, 2e9), max_size=3)),
        reply_to=draw(st.just("") | names),
    )


@st.composite
def plain_messages(draw: st.DrawFn) -> Message:
    kind = draw(st.sampled_from(PLAIN_KINDS))
    return Message(
        kind, draw(names),
        request_ids=tuple(draw(st.lists(st.integers(0, 2**64 - 1), max_size=5))),
        meta=draw(meta_for(kind, 0)),
        timestamps=draw(st.dictionaries(names, st.floats(0, 2e9), max_size=3)),
        reply_to=draw(st.just("") | names),
    )


@settings(max_examples=150, deadline=None)
@given(msg=array_messages())
def test_array_messages_round_trip(msg):
    check_roundtrip(msg, decode(encode(msg)))


@settings(max_examples=60, deadline=None)
@given(msg=plain_messages())
def test_plain_messages_round_trip(msg):
    frames = encode(msg)
    assert frames[1] == b""
    check_roundtrip(msg, decode(frames))


@pytest.mark.parametrize("codec", ["raw", *FLOAT_CODECS])
@pytest.mark.parametrize("kind", ARRAY_KINDS)
def test_every_kind_and_codec(kind, codec):
    shape = {Kind.IMAGE: (2, 8, 8, 3), Kind.FEATURES: (3, 2, 192), Kind.RESULT: (4, 10)}[kind]
    rng = np.random.default_rng(int(kind))
    if kind is Kind.IMAGE and codec == "raw":
        array = rng.integers(0, 256, shape, dtype=np.uint8)
    elif kind is Kind.RESULT:
        array = rng.dirichlet(np.ones(shape[1]), shape[0]).astype(np.float32)
    else:
        array = rng.standard_normal(shape).astype(np.float32)
    meta = {Kind.IMAGE: ImageMeta(), Kind.FEATURES: FeaturesMeta(part=3, compute_ms=1.25),
            Kind.RESULT: ResultMeta(labels=[1] * shape[0], degraded=[False] * shape[0], missing=[[]] * shape[0])}[kind]
    msg = Message(kind, "node-a", request_ids=tuple(range(shape[0])), array=array, codec=codec, block_size=16,
                  meta=meta, timestamps={"t": 3.0}, reply_to="client-1")
    check_roundtrip(msg, decode(encode(msg), expect_kind=kind, expect_source="node-a"))


@pytest.mark.parametrize("kind", PLAIN_KINDS)
def test_every_plain_kind(kind):
    meta = {Kind.ERROR: ErrorMeta(code="missing_features", message="late"), Kind.HEARTBEAT: HeartbeatMeta(part=2),
            Kind.CONTROL: Status(ready=[0, 1], parts=2, classes=["a", "b"], instance="x1")}[kind]
    msg = Message(kind, "aggregator", request_ids=(5,), meta=meta)
    check_roundtrip(msg, decode(encode(msg), expect_kind=kind))


def test_uint8_images_travel_exactly_and_float_codecs_accept_them():
    images = np.random.default_rng(3).integers(0, 256, (2, 28, 28, 1), dtype=np.uint8)
    out = decode(encode(Message(Kind.IMAGE, "client-1", request_ids=(1, 2), array=images, codec="raw")))
    assert out.array.dtype == np.uint8
    np.testing.assert_array_equal(out.array, images)
    out = decode(encode(Message(Kind.IMAGE, "client-1", request_ids=(1, 2), array=images, codec="fp16")))
    assert out.array.dtype == np.float32
    np.testing.assert_array_equal(out.array, images.astype(np.float32))  # 0..255 are exact in fp16


def test_int8_zero_vectors_and_block_size_travel():
    x = features(2, 2, 64)
    x[0, 1] = 0
    for codec, block in (("int8", 32), ("int8-block", 16), ("int8-block", 50)):
        out = decode(encode(feature_msg(codec, x, block_size=block)))
        assert not out.array[0, 1].any()
        assert out.block_size == (block if codec == "int8-block" else Message.block_size)
        check_roundtrip(feature_msg(codec, x, block_size=block), out)


def test_payload_sizes():
    for d in (192, 384):
        for p in (1, 2):
            fp32 = len(encode(feature_msg("fp32", features(1, p, d)))[1])
            assert fp32 == 4 * p * d
            assert len(encode(feature_msg("fp16", features(1, p, d)))[1]) == 2 * p * d
            assert len(encode(feature_msg("bf16", features(1, p, d)))[1]) == 2 * p * d
            int8 = len(encode(feature_msg("int8", features(1, p, d)))[1])
            assert int8 == p * d + 4 * p
            assert fp32 / int8 >= 3.5
            assert payload_nbytes("int8-block", "int8", (1, p, d), 32) == p * d + 4 * p * (d // 32)
    assert payload_nbytes("raw", "uint16", (3, 5)) == 30


def test_decoded_arrays_are_zero_copy_views():
    msg = feature_msg("fp32")
    frames = encode(msg)
    out = decode(frames)
    assert not out.array.flags.writeable  # a view of the immutable frame: copy before writing
    assert np.shares_memory(out.array, np.frombuffer(frames[1], np.uint8))


def test_frames_may_be_any_buffer():
    zmq = pytest.importorskip("zmq")
    msg = feature_msg("int8")
    head, body = encode(msg)
    for frames in ([memoryview(head), memoryview(body)], [bytearray(head), bytearray(body)],
                   (zmq.Frame(head), zmq.Frame(body)), [head, np.frombuffer(body, np.float32)]):
        check_roundtrip(msg, decode(frames))


def test_meta_arrives_typed_and_immutable():
    msg = Message(Kind.RESULT, "aggregator", request_ids=(1, 2), array=np.full((2, 3), 1 / 3, np.float32),
                  meta=ResultMeta(labels=[2, 0], degraded=[False, True], missing=[[], [1]]))
    out = decode(encode(msg))
    assert type(out.meta) is ResultMeta and out.meta == msg.meta
    with pytest.raises(AttributeError):
        out.meta.labels = [0, 0]  # frozen: a handler cannot rewrite what arrived
    assert decode(encode(Message(Kind.IMAGE, "client-1", (1,), np.zeros((1, 2, 2, 1), np.uint8)))).meta == ImageMeta()


def test_kind_accepts_plain_ints():
    assert Message(2, "edge0").kind is Kind.FEATURES
    with pytest.raises(WireError) as info:
        Message(42, "edge0")
    assert info.value.field == "kind"


def test_codec_switch_gives_identical_messages():
    x = features(3, 2, 100, seed=9)
    try:
        wire_codecs.use_kernels(False)
        slow = [encode(feature_msg(c, x, block_size=24)) for c in FLOAT_CODECS]
        slow_out = [decode(f).array for f in slow]
    finally:
        wire_codecs.use_kernels(True)
    fast = [encode(feature_msg(c, x, block_size=24)) for c in FLOAT_CODECS]
    assert [f[1] for f in fast] == [f[1] for f in slow]
    for f, ref in zip(fast, slow_out, strict=True):
        np.testing.assert_array_equal(decode(f).array, ref)


def test_wire_error_is_a_picklable_value_error():
    err = WireError("shape", "bad")
    assert isinstance(err, ValueError) and str(err) == "shape: bad"
    again = pickle.loads(pickle.dumps(err))
    assert (again.field, again.reason) == ("shape", "bad")


def test_limits_validate_themselves():
    with pytest.raises(ValueError):
        Limits(max_batch=0)
    with pytest.raises(ValueError):
        Limits(max_message_bytes=True)


# ---------------------------------------------------------------------------------------------- checks planned once


def test_a_header_seen_before_gets_the_same_errors():
    """Static header checks run once per header (a plan); a bad message must get the same error whether
    or not a good one with the same header came first, and a cached plan must not let through what
    differs per message (ids, checksum, payload, meta)."""
    from devit_mq.wire import message as wire_message

    good = feature_msg()
    bad = {
        "request_ids": tamper(good, i=struct.pack("<3Q", 1, 2, 3)),  # 3 ids for 2 rows
        "checksum": [msgpack.packb({**msgpack.unpackb(encode(good)[0]), "i": struct.pack("<2Q", 10, 99)}),
                     encode(good)[1]],
        "payload": [encode(good)[0], encode(good)[1][:-4]],
        "meta": tamper(good, m=b"\xc1"),
    }
    for field, frames in bad.items():
        wire_message._PLANS.clear()
        wire_message._NAME_CRCS.clear()
        cold = assert_wire_error(field, frames)
        decode(encode(good))  # now the header's plan is cached
        assert str(assert_wire_error(field, frames)) == str(cold)
    # a plan is per limits: the same header under a smaller batch limit is refused
    decode(encode(feature_msg(array=features(4))))
    assert_wire_error("request_ids", encode(feature_msg(array=features(4))), Limits(max_batch=2))


def test_plan_and_name_caches_stay_bounded_under_a_peer_cycling_names():
    from devit_mq.wire import message as wire_message

    for i in range(3 * wire_message._MAX_CACHED):
        out = decode(encode(feature_msg(source=f"edge{i}")))
        assert out.source == f"edge{i}"
        assert len(wire_message._PLANS) <= wire_message._MAX_CACHED
        assert len(wire_message._NAME_CRCS) <= wire_message._MAX_CACHED


def test_unhashable_names_are_refused_not_crashed_on():
    with pytest.raises(WireError) as info:
        encode(Message(Kind.FEATURES, ["edge0"], request_ids=(1,), array=features(1)))  # type: ignore[arg-type]
    assert info.value.field == "source"


# ---------------------------------------------------------------------------------------------- strict decoding


def test_version():
    assert_wire_error("version", tamper(feature_msg(), v=WIRE_VERSION + 1))
    assert_wire_error("version", tamper(feature_msg(), v=...))
    assert_wire_error("version", tamper(feature_msg(), v=True))
    assert_wire_error("version", tamper(feature_msg(), v=float(WIRE_VERSION)))


def test_kind():
    assert_wire_error("kind", tamper(feature_msg(), k=99))
    assert_wire_error("kind", tamper(feature_msg(), k="FEATURES"))
    assert_wire_error("kind", tamper(feature_msg(), k=...))
    assert_wire_error("kind", encode(feature_msg()), expect_kind=Kind.RESULT)


def test_source_and_reply_to():
    assert_wire_error("source", encode(feature_msg()), expect_source="edge1")
    assert_wire_error("source", tamper(feature_msg(), s=""))
    assert_wire_error("source", tamper(feature_msg(), s=...))
    assert_wire_error("source", tamper(feature_msg(), s=7))
    assert_wire_error("source", tamper(feature_msg(), s="x" * 300))
    assert_wire_error("source", tamper(feature_msg(), s="edge0\n2026 fake log line"))  # names are one safe alphabet
    assert_wire_error("source", tamper(feature_msg(), s="../keys/admin"))
    assert_wire_error("reply_to", tamper(feature_msg(), r=b"client"))
    assert_wire_error("reply_to", tamper(feature_msg(), r="client 1"))


def test_codec_and_dtype():
    assert_wire_error("codec", tamper(feature_msg(), c="fp8"))
    assert_wire_error("codec", tamper(feature_msg(), c=...))
    assert_wire_error("codec", tamper(feature_msg(), c=["fp32"]))
    assert_wire_error("dtype", tamper(feature_msg("fp16"), t="float32"))
    assert_wire_error("dtype", tamper(feature_msg("raw"), t="object"))
    assert_wire_error("dtype", tamper(feature_msg("raw"), t="bool"))
    assert_wire_error("dtype", tamper(feature_msg("raw"), t=["float32"]))
    assert_wire_error("dtype", tamper(feature_msg(), t=...))


def test_shape_and_payload_length():
    assert_wire_error("payload", tamper(feature_msg(), h=[2, 2, 191]))
    assert_wire_error("payload", tamper(feature_msg("int8"), h=[2, 1, 384]))  # same data bytes, fewer scales
    assert_wire_error("shape", tamper(feature_msg(), h=[2, 384]))
    assert_wire_error("shape", tamper(feature_msg(), h=[2, 2, -192]))
    assert_wire_error("shape", tamper(feature_msg(), h=[2, 2, 0]))
    assert_wire_error("shape", tamper(feature_msg(), h=[2, 2, 192.0]))
    assert_wire_error("shape", tamper(feature_msg(), h="2,2,192"))
    assert_wire_error("shape", tamper(feature_msg(), h=...))
    assert_wire_error("shape", tamper(feature_msg(), h=[2, 2, 2**62]))  # absurd: rejected before any allocation
    head, body = encode(feature_msg())
    assert_wire_error("payload", [head, body[:-1]])
    assert_wire_error("payload", [head, body + b"\0"])
    assert_wire_error("payload", [head, b""])


def test_request_ids_must_match_rows():
    assert_wire_error("request_ids", tamper(feature_msg(), i=struct.pack("<3Q", 1, 2, 3)))
    assert_wire_error("request_ids", tamper(feature_msg(), i=...))
    assert_wire_error("request_ids", tamper(feature_msg(), i=b"\0" * 15))
    assert_wire_error("request_ids", tamper(feature_msg(), i=[1, 2]))


def test_non_finite_values():
    x = features()
    x[1, 0, 5] = np.nan
    assert_wire_error("payload", encode(feature_msg("fp32", x)))
    assert_wire_error("payload", encode(feature_msg("bf16", x)))
    assert_wire_error("scale", encode(feature_msg("int8", x)))
    x[1, 0, 5] = np.inf
    assert_wire_error("payload", encode(feature_msg("fp32", x)))
    assert_wire_error("scale", encode(feature_msg("int8-block", x)))
    big = features()
    big[0, 0, 0] = 1e6  # beyond fp16's range: inf on the wire
    assert_wire_error("payload", encode(feature_msg("fp16", big)))
    result = np.full((1, 4), np.nan, np.float32)
    assert_wire_error("payload", encode(Message(Kind.RESULT, "aggregator", (1,), result,
                                                meta=ResultMeta(labels=[0], degraded=[False], missing=[[]]))))
    out = decode(encode(feature_msg("fp32", x)), Limits(allow_nonfinite=True))
    assert np.isinf(out.array[1, 0, 5])
    out = decode(encode(feature_msg("int8", x)), Limits(allow_nonfinite=True))
    assert not np.isfinite(out.array[1, 0]).all()



@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_non_finite_raw_floats_are_refused_on_their_bits(dtype):
    """raw float payloads are vetted before an array is built; ints carry no NaN to refuse"""
    x = np.linspace(-3, 3, 24, dtype=dtype).reshape(1, 2, 3, 4)
    assert np.array_equal(decode_array(encode_array(x, "raw")), x)
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[0, 1, 2, 3] = bad
        with pytest.raises(WireError) as err:
            decode_array(encode_array(y, "raw"))
        assert err.value.field == "payload"
        assert np.isnan(decode_array(encode_array(y, "raw"), allow_nonfinite=True)[0, 1, 2, 3]) == np.isnan(bad)
    ints = np.full((1, 2, 2, 1), 0x7F80, np.uint16)  # a bfloat16 NaN's bits, as plain integers: fine
    assert np.array_equal(decode_array(encode_array(ints, "raw")), ints)

def test_int8_scales():
    head, body = encode(feature_msg("int8"))
    scales = np.frombuffer(body, np.float32, count=4).copy()
    for bad in (-1.0, 2.0**122):
        forged = scales.copy()
        forged[2] = bad
        assert_wire_error("scale", [head, forged.tobytes() + body[16:]])


def test_block_size():
    assert_wire_error("block_size", tamper(feature_msg("int8-block"), b=...))
    assert_wire_error("block_size", tamper(feature_msg("int8-block"), b=0))
    assert_wire_error("block_size", tamper(feature_msg("int8-block"), b="32"))
    assert_wire_error("block_size", tamper(feature_msg("int8"), b=32))
    assert_wire_error("block_size", tamper(feature_msg("fp16"), b=2))


def test_limits():
    frames = encode(feature_msg("fp32", features(8, 2, 384)))
    assert_wire_error("size", frames, Limits(max_message_bytes=10_000))
    assert_wire_error("request_ids", frames, Limits(max_batch=4))
    assert_wire_error("shape", tamper(feature_msg("fp32", features(8, 2, 384)), i=struct.pack("<4Q", 1, 2, 3, 4)),
                      Limits(max_batch=4))
    assert_wire_error("header", frames, Limits(max_header_bytes=16, max_meta_bytes=16))
    many_ids = tamper(Message(Kind.ERROR, "edge0", request_ids=tuple(range(8))))
    assert_wire_error("request_ids", many_ids, Limits(max_batch=4))
    big_meta = encode(Message(Kind.ERROR, "edge0", meta=ErrorMeta(message="x" * 1000)))
    assert_wire_error("meta", big_meta, Limits(max_meta_bytes=512))
    decode(big_meta)
    assert_wire_error("source", encode(Message(Kind.HEARTBEAT, "edge-with-a-long-name", meta=HeartbeatMeta(part=0))),
                      Limits(max_name_len=8))


def test_meta():
    msg = Message(Kind.CONTROL, "edge0", meta=Hello())
    assert_wire_error("meta", tamper(msg, m=msgpack.packb([1, 2])))
    assert_wire_error("meta", tamper(msg, m={"op": "hello"}))  # must be a packed blob
    assert_wire_error("meta", tamper(msg, m=b"\xc1garbage"))
    assert_wire_error("meta", tamper(msg, m=msgpack.packb({1: "int key"})))
    assert_wire_error("meta", tamper(msg, m=msgpack.packb({"op": "hello", "t": msgpack.ExtType(5, b"x")})))
    assert_wire_error("meta", tamper(msg, m=msgpack.packb({"op": "ready", "part": msgpack.Timestamp(1, 0)})))
    nested: Any = "leaf"
    for _ in range(40):
        nested = [nested]
    assert_wire_error("meta", tamper(msg, m=msgpack.packb({"op": "hello", "deep": nested})))
    assert_wire_error("meta", tamper(msg, m=msgpack.packb({"op": "launch-missiles"})))  # unknown op
    assert_wire_error("meta", tamper(msg, m=msgpack.packb({})))  # no op
    assert_wire_error("meta", tamper(msg, m=...))  # a CONTROL without its op


@pytest.mark.parametrize("bad", [
    {"part": [0]}, {"part": 0.0}, {"part": -1}, {"part": MAX_PARTS}, {"part": True}, {"part": "0"},
    {"part": 0, "compute_ms": "abc"}, {"part": 0, "queue_ms": None}, {"part": 0, "compute_ms": float("nan")},
    {"part": 0, "compute_ms": float("inf")}, {"part": 0, "compute_ms": -1.0}, {"part": 0, "batch": 0},
    {"part": 0, "extra": 1}, {},
])
def test_hostile_features_meta_is_a_wire_error(bad):
    """What stopped the aggregator before the typed protocol: now refused at the boundary."""
    assert_wire_error("meta", tamper(feature_msg(), m=msgpack.packb(bad)))


@pytest.mark.parametrize("kind, bad", [
    (Kind.CONTROL, {"op": "ready", "part": [0]}),
    (Kind.CONTROL, {"op": "ready"}),
    (Kind.CONTROL, {"op": "shutdown", "token": 5}),
    (Kind.CONTROL, {"op": "status_reply", "nodes": {"x": {"node": "x", "counters": {"k": -1}}}}),
    (Kind.CONTROL, {"op": "status_reply", "nodes": {"bad name": {"node": "x"}}}),
    (Kind.HEARTBEAT, {"part": 0, "telemetry": {"node": "e", "counters": {f"k{i}": 1 for i in range(100)}}}),
    (Kind.HEARTBEAT, {"part": 0, "telemetry": {"node": "e", "info": {"k": "x" * 300}}}),
    (Kind.ERROR, {"code": "pwned"}),
    (Kind.ERROR, {"message": "x" * 5000}),
])
def test_hostile_plain_meta_is_a_wire_error(kind, bad):
    meta = {Kind.CONTROL: Hello(), Kind.HEARTBEAT: HeartbeatMeta(part=0), Kind.ERROR: ErrorMeta()}[kind]
    assert_wire_error("meta", tamper(Message(kind, "edge0", meta=meta), m=msgpack.packb(bad)))


def test_result_meta_must_have_one_entry_per_row():
    msg = Message(Kind.RESULT, "aggregator", request_ids=(1, 2), array=np.full((2, 3), 1 / 3, np.float32),
                  meta=ResultMeta(labels=[0], degraded=[False, False], missing=[[], []]))
    with pytest.raises(WireError) as info:
        encode(msg)
    assert info.value.field == "meta"


def test_timestamps():
    msg = feature_msg()
    assert_wire_error("timestamps", tamper(msg, ts={"a": "noon"}))
    assert_wire_error("timestamps", tamper(msg, ts={"a": float("nan")}))
    assert_wire_error("timestamps", tamper(msg, ts={"a": True}))
    assert_wire_error("timestamps", tamper(msg, ts=[1.0]))
    assert_wire_error("timestamps", tamper(msg, ts={"": 1.0}))
    assert_wire_error("timestamps", tamper(msg, ts={f"s{i}": 1.0 for i in range(100)}))  # beyond the map cap


def test_kinds_without_arrays_carry_none():
    hb = Message(Kind.HEARTBEAT, "edge0", meta=HeartbeatMeta(part=0))
    assert_wire_error("payload", [encode(hb)[0], b"\0\0\0\0"])
    assert_wire_error("codec", tamper(hb, c="fp32"))
    assert_wire_error("shape", tamper(hb, h=[1]))
    assert_wire_error("block_size", tamper(hb, b=1))


def test_header_itself():
    msg = feature_msg()
    head, body = encode(msg)
    assert_wire_error("header", tamper(msg, extra=1))
    assert_wire_error("header", [msgpack.packb([1, 2, 3]), body])
    assert_wire_error("header", [b"\x00garbage", body])
    assert_wire_error("header", [head[:-3], body])
    assert_wire_error("header", [head + b"\x00", body])
    assert_wire_error("header", [b"", body])
    with pytest.raises(WireError):  # never unpickled (its first byte reads as an empty msgpack map)
        decode([pickle.dumps({"v": 1}), body])
    assert_wire_error("kind", [msgpack.packb({"v": 1, "k": msgpack.ExtType(1, b"")}), body])  # no ext types
    assert_wire_error("header", [msgpack.packb({1: 1}), body])
    assert_wire_error("header", [msgpack.packb({b"v": 1, "zz": 2}), body])  # bytes and str keys mixed
    assert_wire_error("header", [b"\x91" * 5000, body])  # deep nesting


def test_frames():
    head, body = encode(feature_msg())
    assert_wire_error("frames", [head])
    assert_wire_error("frames", [head, body, b""])
    assert_wire_error("frames", [])
    assert_wire_error("frames", None)
    assert_wire_error("frames", [head, 17])
    assert_wire_error("frames", [np.zeros((4, 4), np.uint8)[:, ::2], body])


# ---------------------------------------------------------------------------------------------- encoding errors


@pytest.mark.parametrize(
    "msg, field",
    [
        (Message(Kind.FEATURES, "edge0", (1,), np.zeros((1, 192), np.float32)), "shape"),
        (Message(Kind.FEATURES, "edge0", (1, 2), np.zeros((1, 1, 192), np.float32)), "request_ids"),
        (Message(Kind.FEATURES, "edge0", (-1,), np.zeros((1, 1, 192), np.float32)), "request_ids"),
        (Message(Kind.FEATURES, "edge0", (2**64,), np.zeros((1, 1, 192), np.float32)), "request_ids"),
        (Message(Kind.FEATURES, "edge0", (1.5,), np.zeros((1, 1, 192), np.float32)), "request_ids"),
        (Message(Kind.FEATURES, "edge0", (1,)), "array"),
        (Message(Kind.FEATURES, "edge0", (1,), [[[1.0]]]), "array"),
        (Message(Kind.FEATURES, "edge0", (1,), np.zeros((1, 1, 0), np.float32)), "shape"),
        (Message(Kind.FEATURES, "edge0", (1,), np.zeros((1, 1, 4), np.float32), codec="fp64"), "codec"),
        (Message(Kind.FEATURES, "edge0", (1,), np.zeros((1, 1, 4), np.complex64)), "dtype"),
        (Message(Kind.FEATURES, "edge0", (1,), np.zeros((1, 1, 4), bool), codec="raw"), "dtype"),
        (Message(Kind.FEATURES, "edge0", (1,), np.zeros((1, 1, 4), np.float32), codec="int8-block", block_size=0),
         "block_size"),
        (Message(Kind.HEARTBEAT, "edge0", array=np.zeros((1, 1, 4), np.float32)), "array"),
        (Message(Kind.HEARTBEAT, "", meta=HeartbeatMeta(part=0)), "source"),
        (Message(Kind.HEARTBEAT, "edge 0", meta=HeartbeatMeta(part=0)), "source"),
        (Message(Kind.HEARTBEAT, "edge0", reply_to=5, meta=HeartbeatMeta(part=0)), "reply_to"),  # type: ignore[arg-type]
        (Message(Kind.HEARTBEAT, "edge0"), "meta"),  # a heartbeat needs its part
        (Message(Kind.HEARTBEAT, "edge0", meta={"part": 0}), "meta"),  # a dict is not a schema
        (Message(Kind.HEARTBEAT, "edge0", meta=FeaturesMeta(part=0)), "meta"),  # another kind's schema
        (Message(Kind.HEARTBEAT, "edge0", meta=HeartbeatMeta(part=MAX_PARTS)), "meta"),  # out of range
        (Message(Kind.CONTROL, "edge0", meta=ErrorMeta()), "meta"),
        (Message(Kind.ERROR, "edge0", meta=ErrorMeta(message="x" * 2000)), "meta"),
        (Message(Kind.HEARTBEAT, "edge0", meta=HeartbeatMeta(part=0), timestamps={"t": "now"}), "timestamps"),
        (Message(Kind.HEARTBEAT, "edge0", meta=HeartbeatMeta(part=0), timestamps={"t": float("inf")}),
         "timestamps"),
    ],
)
def test_encode_refuses_what_decode_would_drop(msg, field):
    with pytest.raises(WireError) as info:
        encode(msg)
    assert info.value.field == field, str(info.value)


def test_encode_array_and_decode_array_directly():
    x = features(2, 1, 40)
    enc = encode_array(x, "int8-block", block_size=8)
    assert isinstance(enc, EncodedArray) and enc.block_size == 8 and enc.dtype == "int8"
    assert len(enc.payload) == payload_nbytes("int8-block", "int8", x.shape, 8)
    y = decode_array(enc)
    assert np.all(np.abs(y - x) <= tolerance("int8-block", x, 8))
    with pytest.raises(WireError) as info:
        decode_array(enc._replace(block_size=16))
    assert info.value.field == "payload"
    with pytest.raises(WireError) as info:
        decode_array(enc._replace(block_size=0))
    assert info.value.field == "block_size"
    with pytest.raises(WireError) as info:
        decode_array(enc._replace(shape=[2, 1, 40]))
    assert info.value.field == "shape"
    assert set(CODECS) == {"raw", "fp32", "fp16", "bf16", "int8", "int8-block", "jpeg"}


def test_routing_checksum_catches_a_corrupted_request_id():
    msg = Message(Kind.FEATURES, "edge0", request_ids=(7, 8), reply_to="client-1",
                  array=np.zeros((2, 1, 4), np.float32), meta=FeaturesMeta(part=0))
    head, body = encode(msg)
    header = msgpack.unpackb(head)
    assert decode([head, body]).request_ids == (7, 8)
    ids = bytearray(header["i"])
    ids[0] ^= 0x01  # one flipped bit turns request 7 into request 6
    header["i"] = bytes(ids)
    err = assert_wire_error("checksum", [msgpack.packb(header), body])
    assert "corrupted" in str(err)
    header["i"] = msgpack.unpackb(head)["i"]
    header["r"] = "client-2"
    assert_wire_error("checksum", [msgpack.packb(header), body])


def test_duplicate_request_ids_on_rows_are_refused():
    """One row per request: a repeated id would let one message pin or overwrite another row."""
    assert_wire_error("request_ids", tamper(feature_msg(), i=struct.pack("<2Q", 5, 5)))


@pytest.mark.parametrize("stamp", [1e301, -1e305, 10**400, float("nan"), float("inf")])
def test_encode_refuses_a_timestamp_the_receiver_would_drop(stamp):
    """The sender checks the receiver's bounds (+-1e300), and says so with a WireError: a stamp
    beyond them used to be encoded (then dropped by every receiver), a huge int raised OverflowError."""
    with pytest.raises(WireError) as err:
        encode(Message(Kind.CONTROL, "client-1", meta=Hello(), timestamps={"sent": stamp}))
    assert err.value.field == "timestamps"
    assert decode(encode(Message(Kind.CONTROL, "client-1", meta=Hello(), timestamps={"sent": 1e300}))).timestamps


# -- jpeg: lossy, variable-length images, validated before they are decoded ---------------------------

def _photo(n: int = 2, size: int = 32, channels: int = 3) -> np.ndarray:
    """Smooth image content (JPEG's case): gradients plus a little noise."""
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([(x * 255 / size), (y * 255 / size), ((x + y) * 127 / size)], -1)[..., :channels]
    noise = np.random.default_rng(0).normal(0, 4, (n, size, size, channels))
    return np.clip(base[None] + noise, 0, 255).astype(np.uint8)


def _jpeg_file(image: np.ndarray, **save: Any) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, **{"format": "JPEG", **save})
    return buf.getvalue()


@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_images_round_trip_close_and_smaller(channels):
    images = _photo(3, 32, channels)
    for quality in (50, 90):
        frames = encode(Message(Kind.IMAGE, "client", (1, 2, 3), images, "jpeg", reply_to="client", quality=quality))
        out = decode(frames).array
        assert out.shape == images.shape and out.dtype == np.uint8
        assert np.abs(out.astype(int) - images).mean() < (6 if quality == 90 else 10)
        assert len(frames[1]) < images.nbytes
    header = msgpack.unpackb(frames[0])
    assert (header["c"], header["t"], header["h"]) == ("jpeg", "uint8", [3, 32, 32, channels])


def test_jpeg_encoder_refuses_what_it_cannot_carry():
    with pytest.raises(WireError, match="quality"):
        encode(Message(Kind.IMAGE, "c", (1,), _photo(1), "jpeg", reply_to="c", quality=0))
    with pytest.raises(WireError, match="uint8"):
        encode(Message(Kind.IMAGE, "c", (1,), _photo(1).astype(np.uint16), "jpeg", reply_to="c"))
    with pytest.raises(WireError, match="C = 1 or 3"):
        encode(Message(Kind.IMAGE, "c", (1,), np.zeros((1, 8, 8, 2), np.uint8), "jpeg", reply_to="c"))
    with pytest.raises(WireError, match="length"):
        payload_nbytes("jpeg", "uint8", (1, 8, 8, 3))


def test_hostile_jpeg_payloads_are_dropped_before_decoding():
    image = _photo(1, 32)
    msg = Message(Kind.IMAGE, "c", (1,), image, "jpeg", reply_to="c")
    good = _jpeg_file(image[0])

    def payload(*files: bytes, lengths: list[int] | None = None) -> bytes:
        sizes = lengths if lengths is not None else [len(f) for f in files]
        return struct.pack(f"<{len(sizes)}I", *sizes) + b"".join(files)

    assert decode(tamper(msg, payload(good))).array.shape == (1, 32, 32, 3)
    # dimensions other than the header's -- a 32x32 header must never decode a large image
    big = _jpeg_file(np.zeros((64, 640, 3), np.uint8))
    assert "640x64" in str(assert_wire_error("payload", tamper(msg, payload(big))))
    # a greyscale or CMYK file where the header says RGB
    assert_wire_error("payload", tamper(msg, payload(_jpeg_file(image[0, ..., 0]))))
    import io

    from PIL import Image

    cmyk = io.BytesIO()
    Image.fromarray(image[0]).convert("CMYK").save(cmyk, format="JPEG")
    assert_wire_error("payload", tamper(msg, payload(cmyk.getvalue())))
    # another format, truncated data, garbage, a lengths table that does not add up
    png = io.BytesIO()
    Image.fromarray(image[0]).save(png, format="PNG")
    assert_wire_error("payload", tamper(msg, payload(png.getvalue())))
    assert_wire_error("payload", tamper(msg, payload(good[: len(good) // 2])))
    assert_wire_error("payload", tamper(msg, payload(b"\xff\xd8\xff" + b"\x00" * 50)))
    assert_wire_error("payload", tamper(msg, payload(good, lengths=[len(good) + 1])))
    assert_wire_error("payload", tamper(msg, payload(good, lengths=[0])))
    assert_wire_error("payload", tamper(msg, b"\x01"))
    # a header shape beyond the message-size limit is refused before the payload is looked at
    assert_wire_error("shape", tamper(msg, payload(good), h=[1, 8192, 8192, 3]))
    # jpeg is an image codec: wrong axes (a FEATURES-shaped array) and channel counts are refused
    assert_wire_error("shape", tamper(msg, payload(good), h=[1, 32, 32, 4]))


def test_jpeg_decompression_bomb_is_refused(monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # so a 32x32 file counts as a bomb
    msg = Message(Kind.IMAGE, "c", (1,), _photo(1, 32), "jpeg", reply_to="c")
    assert "Decompression" in str(assert_wire_error("payload", encode(msg)))
