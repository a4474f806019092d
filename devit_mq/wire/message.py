"""Messages: a small msgpack header plus raw payload bytes.

A message is two frames, ``[header, payload]`` (the payload is ``b""`` when there is no array). Every
transport carries frames opaquely (MPI packs them into one buffer with its own framing, see
:mod:`devit_mq.transport.mpi`).

The header is a msgpack map with short keys; absent keys mean "empty":

=====  =================  ===========================================================================
key    field              value
=====  =================  ===========================================================================
``v``  version            int, :data:`WIRE_VERSION`; anything else is rejected
``k``  kind               int, a :class:`Kind`
``s``  source             str, the sending node's name (:data:`~devit_mq.protocol.NAME_RE`)
``r``  reply_to           str, the client that gets the RESULT (same alphabet)
``i``  request_ids        bin, uint64 little-endian, one per array row for IMAGE/FEATURES/RESULT
``c``  codec              str, a name in :data:`~devit_mq.wire.codecs.CODECS` (only with an array)
``t``  dtype              str, the payload element type (only with an array)
``h``  shape              array of ints, the decoded array's shape (only with an array)
``b``  block_size         int, elements per int8 scale (only for ``int8-block``)
``m``  meta               bin, the kind's typed meta (:data:`~devit_mq.protocol.META_SCHEMA`), packed
                          separately: its size is known before msgspec decodes and validates it
``ts`` timestamps         map str -> float, ``time.time()`` per stage
``x``  checksum           int, CRC-32 of source, reply_to and the request ids (the routing fields)
=====  =================  ===========================================================================

The int8 scales travel at the front of the payload (see :mod:`devit_mq.wire.codecs`), not in the header.

Decoding is strict: sizes are checked against :class:`Limits` before anything is decoded, the header
is decoded by msgspec straight into a typed struct (every field type-checked, unknown keys, ext types
and oversized maps refused), the meta straight into its kind's schema, the remaining checks (version,
kind, names, sizes, checksum) follow, and nothing is ever unpickled. Any problem is a :class:`WireError` naming the field; no other exception
escapes :func:`decode`.
"""

from __future__ import annotations

import math
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, NamedTuple

import msgspec
import numpy as np

from devit_mq.protocol import (
    ARRAY_NDIM,
    DEFAULT_JPEG_QUALITY,
    MAX_NAME_LEN,
    META_DECODERS,
    META_DEFAULT,
    META_ENCODER,
    META_SCHEMA,
    NAME_RE,
    WIRE_VERSION,
    Kind,
    check_rows,
)

from .codecs import (
    CODECS,
    DEFAULT_BLOCK_SIZE,
    Codec,
    block_size_for,
    byte_view,
    check_dtype,
    check_shape,
    decode_checked,
    encode_array,
)
from .errors import WireError
from .limits import DEFAULT_LIMITS, MAX_HEADER_ITEMS, Limits

_MAX_TIMESTAMPS = MAX_HEADER_ITEMS
_STAMP_MAX = 1e300
_Stamp = Annotated[float, msgspec.Meta(ge=-_STAMP_MAX, le=_STAMP_MAX)]  # finite: NaN and inf fail the bounds


class _Header(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """The header map as it travels (short keys; an absent key means empty). msgspec checks every
    type while it decodes (no bool for an int, no float for a dimension, no ext types, no unknown
    keys, bounded maps), in one pass that is faster than ``msgpack.unpackb`` plus Python checks;
    the checks that need more than a type (version, kind, names, sizes, checksum) follow it."""

    v: int
    k: int
    s: str
    r: str = ""
    i: bytes = b""
    c: str | None = None
    t: str | None = None
    h: Annotated[list[int], msgspec.Meta(max_length=MAX_HEADER_ITEMS)] | None = None
    b: int | None = None
    m: bytes | None = None
    ts: Annotated[dict[Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_LEN)], _Stamp],
                  msgspec.Meta(max_length=_MAX_TIMESTAMPS)] | None = None
    x: int | None = None


_HEADER_DECODER = msgspec.msgpack.Decoder(_Header)
_HEADER_ENCODER = msgspec.msgpack.Encoder()
_PATH = re.compile(r"`\$\.(\w+)|field `(\w+)`")
_KIND_BY_VALUE = {int(k): k for k in Kind}


@dataclass(eq=False)
class Message:
    """One message.

    ``source`` names the sending node; ``request_ids`` are uint64s, one per row of ``array`` for the
    kinds in :data:`ARRAY_NDIM` (IMAGE uint8 ``[B, H, W, C]``, FEATURES float32 ``[B, P, D]``, RESULT
    float32 ``[B, C]``), the requests concerned for the others; ``codec`` says how ``array`` travels
    (``block_size`` is used by ``int8-block`` only); ``meta`` is the kind's typed schema from
    :data:`devit_mq.protocol.META_SCHEMA` (``None`` gives the kind's default where it has one);
    ``timestamps`` maps stage names to ``time.time()`` stamps; ``reply_to`` names the client that
    gets the RESULT.

    After :func:`decode`, ``array`` is float32 for every codec but ``raw`` (its own dtype) and may be
    a read-only view of the received frame (see :mod:`devit_mq.wire.codecs`). ``eq=False``: arrays
    make field-wise ``==`` ambiguous, so equality is identity.
    """

    kind: Kind
    source: str
    request_ids: tuple[int, ...] = ()
    array: np.ndarray | None = None
    codec: str = "fp32"
    meta: Any = None
    timestamps: dict[str, float] = field(default_factory=dict)
    reply_to: str = ""
    block_size: int = DEFAULT_BLOCK_SIZE  # elements per scale for codec "int8-block"
    quality: int = DEFAULT_JPEG_QUALITY  # the encoder's quality for codec "jpeg" (it does not travel)

    def __post_init__(self) -> None:
        if type(self.kind) is not Kind:
            self.kind = _kind(self.kind)
        if self.meta is None:
            self.meta = META_DEFAULT[self.kind]


def _kind(value: object) -> Kind:
    kind = _KIND_BY_VALUE.get(value) if type(value) is int or type(value) is Kind else None  # type: ignore[call-overload]
    if kind is None:
        raise WireError("kind", f"unknown message kind {value!r}")
    return kind


# ----------------------------------------------------------------------------------------------
# encoding
# ----------------------------------------------------------------------------------------------


def _check_name(value: object, name: str, *, required: bool, max_len: int) -> str:
    """Names become routing keys, metrics keys and log text: one safe alphabet (NAME_RE)."""
    if type(value) is not str or len(value) > max_len or not (NAME_RE.fullmatch(value) or (not required and not value)):
        need = "a node name" if required else "empty or a node name"
        raise WireError(name, f"must be {need} (letters, digits, '_.-', at most {max_len} characters), "
                              f"got {value!r:.80}")
    return value


def _pack_ids(ids: Sequence[int]) -> bytes:
    try:
        return struct.pack(f"<{len(ids)}Q", *ids)
    except (struct.error, TypeError, OverflowError) as exc:
        raise WireError("request_ids", f"must be ints in [0, 2**64): {exc}") from None


def _check_timestamps(stamps: object, max_len: int) -> dict[str, float]:
    if type(stamps) is not dict or len(stamps) > _MAX_TIMESTAMPS:
        raise WireError("timestamps", f"must be a dict of at most {_MAX_TIMESTAMPS} entries")
    out = {}
    for key, value in stamps.items():
        if type(key) is not str or not key or len(key) > max_len:
            raise WireError("timestamps", f"stage names must be non-empty str, got {key!r:.80}")
        # the receiver's bounds (NaN fails both comparisons; a huge int compares without overflowing)
        if type(value) not in (float, int) or not -_STAMP_MAX <= value <= _STAMP_MAX:
            raise WireError("timestamps", f"stamp {key!r} must be a number within +-1e300, got {value!r:.80}")
        out[key] = float(value)
    return out


def _header(msg: Message) -> tuple[_Header, bytes]:
    """The header and the payload of ``msg``, checked as a receiver would."""
    kind = _kind(msg.kind)
    source, reply_to = msg.source, msg.reply_to or ""
    names_crc = _names_crc(source, reply_to, DEFAULT_LIMITS.max_name_len)
    ids = msg.request_ids
    raw_ids = _pack_ids(ids) if ids else b""
    payload = b""
    codec = dtype = shape = block = None
    ndim = ARRAY_NDIM.get(kind)
    if ndim is None:
        if msg.array is not None:
            raise WireError("array", f"{kind.name} messages carry no array")
    else:
        if msg.array is None:
            raise WireError("array", f"{kind.name} messages need an array")
        enc = encode_array(msg.array, msg.codec, block_size=msg.block_size, quality=msg.quality)
        if len(enc.shape) != ndim:
            raise WireError("shape", f"{kind.name} arrays have {ndim} axes, got shape {enc.shape}")
        if enc.shape[0] != len(ids):
            raise WireError("request_ids", f"{len(ids)} request ids for {enc.shape[0]} array rows")
        codec, dtype, shape, payload = enc.codec, enc.dtype, enc.shape, enc.payload
        if enc.codec == "int8-block":
            block = enc.block_size
    meta = None
    if msg.meta is None or msg.meta is not META_DEFAULT[kind]:
        meta = _pack_meta(kind, msg.meta, len(ids) if ndim is not None else None)
    stamps = _check_timestamps(msg.timestamps, DEFAULT_LIMITS.max_name_len) if msg.timestamps else None
    header = _Header(WIRE_VERSION, int(kind), source, reply_to, raw_ids, codec, dtype, shape, block, meta, stamps,
                     zlib.crc32(raw_ids, names_crc))
    return header, payload


#: CRC-32 of (source, reply_to) pairs whose names passed their checks, by (source, reply_to, max
#: name length): a node sends and receives few distinct pairs, so their checks run once. Bounded:
#: a peer cycling through names only clears it.
_NAME_CRCS: dict[tuple[str, str, int], int] = {}
_MAX_CACHED = 256


def _names_crc(source: object, reply_to: object, max_len: int) -> int:
    """The CRC-32 of the two names that route a message, once both are known good (else a
    :class:`WireError` naming the bad one); the request ids are added to it by the caller.

    Transports deliver intact bytes, but a corrupted id would make the aggregator answer a request
    nobody asked and drop the real one later as "late"; the CRC catches that. Array payloads are not
    covered: a flipped pixel misleads one prediction, it cannot misroute."""
    key = (source, reply_to, max_len) if type(source) is str and type(reply_to) is str else None
    crc = _NAME_CRCS.get(key) if key is not None else None  # type: ignore[arg-type]
    if crc is None:
        _check_name(source, "source", required=True, max_len=max_len)
        _check_name(reply_to, "reply_to", required=False, max_len=max_len)
        crc = zlib.crc32(f"{source}\0{reply_to}".encode())
        if len(_NAME_CRCS) >= _MAX_CACHED:
            _NAME_CRCS.clear()
        _NAME_CRCS[key] = crc  # type: ignore[index]
    return crc


def _pack_meta(kind: Kind, meta: object, rows: int | None) -> bytes:
    schema = META_SCHEMA[kind]
    if meta is None or not isinstance(meta, getattr(schema, "__args__", (schema,))):
        raise WireError("meta", f"{kind.name} meta must be a {_schema_name(kind)}, got {type(meta).__name__}")
    try:
        packed = META_ENCODER.encode(meta)
    except (TypeError, ValueError, OverflowError) as exc:
        raise WireError("meta", f"not serialisable: {exc}") from None
    # Round-trip through the receiver's own checks so a sender learns at once what would be dropped
    # (about 1 us for the hot kinds' small metas).
    _unpack_meta(kind, packed, DEFAULT_LIMITS, rows)
    return packed


def _schema_name(kind: Kind) -> str:
    schema = META_SCHEMA[kind]
    return " | ".join(t.__name__ for t in getattr(schema, "__args__", (schema,)))


def encode(msg: Message) -> list[bytes]:
    """ZeroMQ frames ``[header, payload]`` (payload ``b""`` for kinds without an array).

    Refuses (with a :class:`WireError` naming the field) anything a receiver with the default
    :class:`Limits` would drop, so a sender's bug shows up at the sender."""
    header, payload = _header(msg)
    return [_HEADER_ENCODER.encode(header), payload]


# ----------------------------------------------------------------------------------------------
# decoding
# ----------------------------------------------------------------------------------------------

_ARRAY_KEYS = ("c", "t", "h")
_KEY_NAMES = {"v": "version", "k": "kind", "s": "source", "r": "reply_to", "i": "request_ids", "c": "codec",
              "t": "dtype", "h": "shape", "b": "block_size", "m": "meta", "ts": "timestamps",
              "x": "checksum"}


def _parse_header(head: Any) -> _Header:
    """The typed header, or a :class:`WireError` naming the field msgspec found wrong."""
    try:
        return _HEADER_DECODER.decode(head)
    except msgspec.ValidationError as exc:
        found = _PATH.search(str(exc))
        key = next((g for g in found.groups() if g), "") if found else ""
        unknown = "unknown field" in str(exc)
        raise WireError("header" if unknown else _KEY_NAMES.get(key, "header"), str(exc)) from None
    except Exception as exc:  # msgspec.DecodeError and anything else: the bytes are not a msgpack map
        raise WireError("header", f"malformed msgpack: {type(exc).__name__}: {exc}") from None


def _unpack_meta(kind: Kind, packed: object, limits: Limits, rows: int | None) -> Any:
    if type(packed) is not bytes:
        raise WireError("meta", "must be a msgpack blob")
    if len(packed) > limits.max_meta_bytes:
        raise WireError("meta", f"{len(packed)} bytes exceed the limit of {limits.max_meta_bytes}")
    try:
        meta = META_DECODERS[kind].decode(packed)
    except msgspec.ValidationError as exc:
        raise WireError("meta", f"{kind.name}: {exc}") from None
    except Exception as exc:  # msgspec.DecodeError and anything else: the blob is garbage
        raise WireError("meta", f"malformed msgpack: {type(exc).__name__}: {exc}") from None
    if rows is not None:
        problem = check_rows(meta, rows)
        if problem:
            raise WireError("meta", problem)
    return meta


class _Plan(NamedTuple):
    """What a header's static fields (version, kind, names, codec, dtype, shape, block) imply, once
    they have passed every check: a node receives the same few headers over and over (one per link
    and batch size), so their checks run once and later messages only pay for what changes per
    message (request ids, checksum, payload, meta, stamps)."""

    kind: Kind
    names_crc: int  # CRC-32 of source and reply_to, to which the request ids are added
    spec: Codec | None  # None for the kinds without an array
    shape: tuple[int, ...]
    block: int  # the block the payload uses (0 unless the codec is scaled)
    block_size: int  # what the decoded Message reports


#: Plans by (header's static fields, the limits they are checked against). Only headers that passed
#: are stored (so names are short), and at most _MAX_CACHED: a peer that cycles through headers only
#: clears it (the checks then run every time, as they would without it), it cannot grow memory.
_PLANS: dict[tuple, _Plan] = {}


def _plan(h: _Header, limits: Limits) -> _Plan:
    shape_key = tuple(h.h) if h.h is not None else None
    # the limits the static checks read (hashing the Limits dataclass itself costs more)
    key = (h.v, h.k, h.s, h.r, h.c, h.t, shape_key, h.b, limits.max_name_len, limits.max_batch,
           limits.max_message_bytes)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _check_static(h, shape_key, limits)
        if len(_PLANS) >= _MAX_CACHED:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def _routing_ids(h: _Header, names_crc: int, limits: Limits) -> tuple[int, ...]:
    """The request ids, once their count and the routing CRC are checked."""
    raw_ids = h.i
    if len(raw_ids) % 8 or len(raw_ids) > 8 * limits.max_batch:
        raise WireError("request_ids", f"must be at most {limits.max_batch} packed uint64s")
    if h.x is not None and h.x != zlib.crc32(raw_ids, names_crc):
        raise WireError("checksum", "routing fields (source, reply_to, request ids) fail their CRC-32: "
                                    "the header was corrupted")
    return struct.unpack(f"<{len(raw_ids) >> 3}Q", raw_ids) if raw_ids else ()


def _check_rows(shape: tuple[int, ...], ids: tuple[int, ...]) -> None:
    if shape[0] != len(ids):
        raise WireError("request_ids", f"{len(ids)} request ids for {shape[0]} array rows")
    if len(ids) > 1 and len(set(ids)) != len(ids):  # one row per request: a repeat is a forgery
        raise WireError("request_ids", "the same request id appears on two rows")


def _check_static(h: _Header, shape: tuple | None, limits: Limits) -> _Plan:
    """Every check on the header's static fields; a :class:`WireError` naming the first that fails.
    The per-message routing checks run here too, where they fall in the order of the checks, so the
    error a message gets does not depend on whether its header was seen before."""
    if h.v != WIRE_VERSION:
        raise WireError("version", f"unsupported wire format version {h.v!r:.40}, expected {WIRE_VERSION}")
    kind = _kind(h.k)
    # Strings may be as long as the header; each field's own limit is checked here so the error names it.
    names_crc = _names_crc(h.s, h.r, limits.max_name_len)
    ids = _routing_ids(h, names_crc, limits)
    ndim = ARRAY_NDIM.get(kind)
    if ndim is None:
        present = [key for key in (*_ARRAY_KEYS, "b") if getattr(h, key) is not None]
        if present:
            raise WireError(_KEY_NAMES[present[0]], f"{kind.name} messages carry no array")
        return _Plan(kind, names_crc, None, (), 0, DEFAULT_BLOCK_SIZE)
    for key in _ARRAY_KEYS:
        if getattr(h, key) is None:
            raise WireError(_KEY_NAMES[key], f"missing from a {kind.name} message")
    assert shape is not None
    if len(shape) != ndim:
        raise WireError("shape", f"{kind.name} arrays have {ndim} axes, got {list(shape)!r:.80}")
    shape = check_shape(shape)
    if shape[0] > limits.max_batch:
        raise WireError("shape", f"batch of {shape[0]} exceeds the limit of {limits.max_batch}")
    if math.prod(shape) > limits.max_message_bytes:
        raise WireError("shape", f"{shape} holds more elements than a message may have bytes")
    _check_rows(shape, ids)
    spec = CODECS.get(h.c)
    if spec is None:
        raise WireError("codec", f"unknown codec {h.c!r:.40}")
    check_dtype(spec, h.t)
    block_size = DEFAULT_BLOCK_SIZE
    if spec.name == "int8-block":
        if h.b is None:
            raise WireError("block_size", "missing for codec int8-block")
        block = block_size = block_size_for(spec, shape[-1], h.b)
    elif h.b is not None:
        raise WireError("block_size", f"codec {h.c!r} takes no block size")
    else:
        block = block_size_for(spec, shape[-1], 0)
    return _Plan(kind, names_crc, spec, shape, block, block_size)


def _decode(head: Any, payload: Any, limits: Limits, expect_kind: Kind | None, expect_source: str | None) -> Message:
    if type(head) is not bytes:
        head = byte_view(head, "frames")
    if type(payload) is not bytes:
        payload = byte_view(payload, "frames")
    if len(head) > limits.header_cap:
        raise WireError("header", f"{len(head)} bytes exceed the limit of {limits.header_cap}")
    if len(head) + len(payload) > limits.max_message_bytes:
        raise WireError("size", f"{len(head) + len(payload)} bytes exceed the limit of {limits.max_message_bytes}")
    h = _parse_header(head)
    plan = _plan(h, limits)
    kind = plan.kind
    if expect_kind is not None and kind != expect_kind:
        raise WireError("kind", f"expected {Kind(expect_kind).name}, got {kind.name}")
    source = h.s
    if expect_source is not None and source != expect_source:
        raise WireError("source", f"expected a message from {expect_source!r}, got {source!r}")

    ids = _routing_ids(h, plan.names_crc, limits)

    array = None
    codec = "fp32"
    if plan.spec is None:
        if len(payload):
            raise WireError("payload", f"{kind.name} messages have an empty payload, got {len(payload)} bytes")
    else:
        _check_rows(plan.shape, ids)
        codec = h.c  # type: ignore[assignment]  # the plan checked it
        array = decode_checked(plan.spec, h.t, plan.shape, plan.block, payload, limits.allow_nonfinite)  # type: ignore[arg-type]

    if h.m is not None:
        meta = _unpack_meta(kind, h.m, limits, len(ids) if plan.spec is not None else None)
    else:
        meta = META_DEFAULT[kind]
        if meta is None:
            raise WireError("meta", f"missing from a {kind.name} message")
    return Message(kind, source, ids, array, codec, meta, h.ts or {}, h.r, plan.block_size)


def decode(
    frames: Sequence[bytes | memoryview],
    limits: Limits = DEFAULT_LIMITS,
    *,
    expect_kind: Kind | None = None,
    expect_source: str | None = None,
) -> Message:
    """Decode ZeroMQ frames ``[header, payload]``; raises only :class:`WireError`."""
    try:
        count = len(frames)
    except TypeError:
        raise WireError("frames", f"expected a sequence of 2 frames, got {type(frames).__name__}") from None
    if count != 2:
        raise WireError("frames", f"expected 2 frames (header, payload), got {count}")
    return _decode(frames[0], frames[1], limits, expect_kind, expect_source)

