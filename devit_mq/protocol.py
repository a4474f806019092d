"""The protocol: every name, limit and message schema that two processes must agree on, defined once.

This module is light on purpose (stdlib + msgspec only): the topology checker, the wire codec, the
model config and the nodes all import their constants from here, and ``devit-mq check`` must not pay
for torch or Numba.

Each message :class:`Kind` has one typed ``meta`` schema (a :class:`msgspec.Struct`), and every
control operation is one struct of a tagged union keyed by ``op``. :func:`devit_mq.wire.decode` turns
the meta blob into that struct while it decodes (msgspec validates types, ranges and lengths in the
same pass), so a message whose meta has a wrong type, an out-of-range part, a NaN time or an unknown
field is a :class:`~devit_mq.wire.WireError` at the boundary, and handlers only ever see checked,
typed values. Every container has a length bound and every string a size bound, so a valid message
is also a bounded one: telemetry and status replies cannot grow with what peers send.

Why msgspec rather than more hand-written checks: one declaration gives the schema, the validation
(with the offending path in the error, e.g. ``$.part``), and a decoder that is faster than
``msgpack.unpackb`` followed by Python checks (about 0.4 us for a features meta here).
"""

from __future__ import annotations

import enum
import re
from typing import Annotated, Any, Literal, get_args

import msgspec
from msgspec import Meta, Struct

# -- wire constants ---------------------------------------------------------------------------------

# 2: typed meta per kind, control ops as a tagged union, names restricted to NAME_RE
# 3: status replies say how long ago each edge was heard from and which package version runs
# 4: the ``jpeg`` image codec
# 5: ``hello`` gained ``reply`` (refreshes of the binding ask for no status reply)
WIRE_VERSION = 5

#: every array codec, in the order reports list them; ``raw`` carries images (their own dtype)
CODEC_NAMES = ("raw", "fp32", "fp16", "bf16", "int8", "int8-block", "jpeg")
FEATURE_CODECS = ("fp32", "fp16", "bf16", "int8", "int8-block")  # edge -> aggregator
IMAGE_CODECS = ("raw", "jpeg")  # client -> edges
DEFAULT_JPEG_QUALITY = 90  # the topology's image_quality when it names none
JPEG_QUALITY_RANGE = (1, 95)  # Pillow: above 95 only grows the file
ATTENTION_BACKENDS = ("torch", "naive", "numba", "cuda", "auto")
# what runs an edge's sub-model forward: "auto" picks the fastest torch-free one at start-up
EDGE_EXECUTORS = ("auto", "torch", "numba", "numpy")
TRANSPORTS = ("zmq", "mpi")
MISSING_POLICIES = ("degrade", "error")
ROLES = ("client", "aggregator", "edge")

#: a node or client name: a ZeroMQ identity, an MPI peer label, a key file name and a metrics key
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_NAME_LEN = 64

MiB = 1 << 20
KiB = 1 << 10
DEFAULT_MAX_MESSAGE_BYTES = 16 * MiB  # header + payload, checked by sender and receiver
DEFAULT_HWM = 1000  # messages queued per peer before a send waits
MAX_BATCH = 4096  # rows of one array message (and request ids)
MAX_META_BYTES = 4 * MiB  # the packed meta blob; a status reply of 64 nodes and 16k classes fits
MAX_HEADER_BYTES = 64 * KiB  # the header without its meta: short strings, the shape, 8 B per id
MAX_HEADER_ITEMS = 64  # entries of any header map or array (the timestamps map is the largest)

MAX_PARTS = 64  # sub-models (edges) of one topology
MAX_NODES = MAX_PARTS + 2  # edges + aggregator + the MPI client
MAX_CLASSES = 16384
MAX_TEXT = 1024  # error messages
MAX_KEY_LEN = 96  # telemetry keys ("send_failed.edge0", "recv.features", ...)
MAX_COUNTERS = 64  # distinct counters a node reports (more fold into OTHER_COUNTER)
MAX_LINKS = 32  # byte counters per node
MAX_STAGES = 16
MAX_INFO = 16
OTHER = "other"  # the one shared bucket for peers the topology does not name

#: a bundle's manifest file (written by training, read by every node and by `devit-mq check`)
MANIFEST_FILE = "manifest.json"

#: the key name (CURVE) of the operator's tools: only it may stop nodes when CURVE is on
ADMIN_KEY = "admin"
#: environment variables a launcher hands to the nodes it starts
ENV_ADMIN_TOKEN = "DEVIT_MQ_ADMIN_TOKEN"
ENV_INSTANCE = "DEVIT_MQ_INSTANCE"

ErrorCode = Literal["bad_input", "missing_features", "overloaded", "shutdown", "unauthorized", "error"]
ERROR_CODES: tuple[str, ...] = get_args(ErrorCode)
MAX_CLASS_NAME = 96  # characters of one class name in a status reply (checked against the bundle)


class Kind(enum.IntEnum):
    """What a message is; the int is what travels."""

    IMAGE = 1  # client -> edges: uint8 images [B, H, W, C]
    FEATURES = 2  # edge -> aggregator: prefix tokens [B, P, D]
    RESULT = 3  # aggregator -> client: class probabilities [B, C]
    ERROR = 4  # edge -> aggregator, aggregator -> client: meta ErrorMeta
    HEARTBEAT = 5  # edge -> aggregator: liveness and telemetry, no array
    CONTROL = 6  # meta: one of the control ops below, no array


#: kinds that carry an array, with its number of axes; the first axis is the batch, one request id per row
ARRAY_NDIM: dict[Kind, int] = {Kind.IMAGE: 4, Kind.FEATURES: 3, Kind.RESULT: 2}


# -- field types ------------------------------------------------------------------------------------

Part = Annotated[int, Meta(ge=0, lt=MAX_PARTS)]
ClassIndex = Annotated[int, Meta(ge=0, lt=MAX_CLASSES)]
Millis = Annotated[float, Meta(ge=0.0, le=1e9)]  # finite, non-negative durations
Count = Annotated[int, Meta(ge=0, le=(1 << 63) - 1)]
Name = Annotated[str, Meta(pattern="^" + NAME_RE.pattern + "$", max_length=MAX_NAME_LEN)]  # re.search semantics: anchor both ends
Key = Annotated[str, Meta(min_length=1, max_length=MAX_KEY_LEN)]
Text = Annotated[str, Meta(max_length=MAX_TEXT)]
Short = Annotated[str, Meta(max_length=128)]
Number = Annotated[float, Meta(ge=-1e18, le=1e18)]
Integer = Annotated[int, Meta(ge=-(1 << 62), le=1 << 62)]
Token = Annotated[str, Meta(max_length=128)]


class _Schema(Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True, frozen=True):
    """Base of every meta schema: unknown fields are refused, defaults are not sent, values are
    immutable (a decoded message cannot be changed behind its handler's back)."""


# -- per-kind meta ----------------------------------------------------------------------------------

class ImageMeta(_Schema):
    """IMAGE carries nothing beyond the header (reply_to names the client)."""


class FeaturesMeta(_Schema):
    part: Part
    compute_ms: Millis = 0.0  # the batch's forward time on the edge
    queue_ms: Millis = 0.0  # this request's wait on the edge before its batch started
    batch: Annotated[int, Meta(ge=1, le=1 << 20)] = 1  # images in that compute batch (queued jobs add up)


class StageTimes(_Schema):
    edge_compute_ms: Millis = 0.0  # the slowest edge's compute
    edge_queue_ms: Millis = 0.0
    fuse_ms: Millis = 0.0
    hold_ms: Millis = 0.0  # first features in -> fused, on the aggregator


class ResultMeta(_Schema):
    """One entry per array row (checked against the rows by :func:`check_rows`)."""

    labels: Annotated[list[ClassIndex], Meta(max_length=MAX_BATCH)]
    degraded: Annotated[list[bool], Meta(max_length=MAX_BATCH)]
    missing: Annotated[list[Annotated[list[Part], Meta(max_length=MAX_PARTS)]], Meta(max_length=MAX_BATCH)]
    stages: Annotated[list[StageTimes], Meta(max_length=MAX_BATCH)] = []


class ErrorMeta(_Schema):
    code: ErrorCode = "error"
    message: Text = ""
    part: Part | None = None  # the part whose edge reported it


class Percentiles(_Schema):
    n: Count = 0
    p50: Number = 0.0
    p90: Number = 0.0
    p99: Number = 0.0
    mean: Number = 0.0


class Telemetry(_Schema):
    """A node's figures (what :meth:`devit_mq.metrics.Metrics.telemetry` makes); bounded by its schema."""

    node: Name
    pid: Count = 0
    version: Short = ""  # the devit_mq package version the node runs
    info: Annotated[dict[Key, Short | Integer | Number | bool | None], Meta(max_length=MAX_INFO)] = {}
    uptime_s: Number = 0.0
    counters: Annotated[dict[Key, Count], Meta(max_length=MAX_COUNTERS + 1)] = {}
    bytes: Annotated[dict[Key, Count], Meta(max_length=MAX_LINKS + 1)] = {}
    stages_ms: Annotated[dict[Key, Percentiles], Meta(max_length=MAX_STAGES)] = {}
    cpu_s: Number = 0.0
    rss_mb: Number = 0.0
    peak_rss_mb: Number = 0.0


class HeartbeatMeta(_Schema):
    part: Part
    telemetry: Telemetry | None = None


# -- control ops (CONTROL meta): a union tagged by "op" -------------------------------------------

class _Op(_Schema, tag_field="op"):
    pass


class Hello(_Op, tag="hello"):
    """A client announces itself to the aggregator (which binds its name to the connection) and,
    with ``reply``, asks for a :class:`Status`; a refresh of the binding says ``reply=False`` (a
    status carries every node's telemetry: kilobytes on the client's link)."""

    reply: bool = True


class StatusQuery(_Op, tag="status"):
    """Ask the aggregator for a :class:`Status`."""


class Ready(_Op, tag="ready"):
    """An edge tells the aggregator it has warmed up."""

    part: Part


class Shutdown(_Op, tag="shutdown"):
    """Stop the receiving node. Admin only: from the admin key under CURVE, else with the launch's token."""

    token: Token = ""


class Status(_Op, tag="status_reply"):
    ready: Annotated[list[Part], Meta(max_length=MAX_PARTS)] = []
    parts: Annotated[int, Meta(ge=0, le=MAX_PARTS)] = 0
    pending: Count = 0
    nodes: Annotated[dict[Name, Telemetry], Meta(max_length=MAX_NODES)] = {}
    classes: Annotated[list[Annotated[str, Meta(max_length=MAX_CLASS_NAME)]], Meta(max_length=MAX_CLASSES)] = []
    codec: Short = ""
    image_shape: Annotated[list[Annotated[int, Meta(ge=1, le=1 << 16)]], Meta(max_length=3)] = []
    instance: Token = ""  # the launch that started the aggregator (ENV_INSTANCE), "" if none
    # seconds since the aggregator last heard from each part's edge (index = part; -1: never)
    last_heard_s: Annotated[list[Annotated[float, Meta(ge=-1.0, le=1e9)]], Meta(max_length=MAX_PARTS)] = []
    silence_s: Millis = 0.0  # an edge silent for longer is treated as down (requests stop waiting for it)


ControlOp = Hello | StatusQuery | Ready | Shutdown | Status
MetaType = ImageMeta | FeaturesMeta | ResultMeta | ErrorMeta | HeartbeatMeta | ControlOp

#: the meta schema of each kind
META_SCHEMA: dict[Kind, object] = {
    Kind.IMAGE: ImageMeta, Kind.FEATURES: FeaturesMeta, Kind.RESULT: ResultMeta, Kind.ERROR: ErrorMeta,
    Kind.HEARTBEAT: HeartbeatMeta, Kind.CONTROL: ControlOp,
}
#: the meta a kind gets when none travels (None: that kind must carry one)
META_DEFAULT: dict[Kind, object | None] = {
    Kind.IMAGE: ImageMeta(), Kind.FEATURES: None, Kind.RESULT: None, Kind.ERROR: ErrorMeta(),
    Kind.HEARTBEAT: None, Kind.CONTROL: None,
}
META_DECODERS = {kind: msgspec.msgpack.Decoder(schema) for kind, schema in META_SCHEMA.items()}
META_ENCODER = msgspec.msgpack.Encoder()


def check_rows(meta: object, rows: int) -> str | None:
    """Per-row meta must have one entry per array row; the problem, or None."""
    if type(meta) is ResultMeta:
        sizes = {len(meta.labels), len(meta.degraded), len(meta.missing)} | ({len(meta.stages)} if meta.stages else set())
        if sizes != {rows}:
            return f"result meta lists {sorted(sizes)} entries for {rows} rows"
    return None


def to_builtins(value: Any) -> Any:
    """Plain dicts/lists of a schema value, every field included (defaults too: a user-facing dict
    keeps its keys whatever their values), for JSON reports and the client's status dict."""
    if isinstance(value, Struct):
        return {f: to_builtins(getattr(value, f)) for f in value.__struct_fields__}
    if isinstance(value, dict):
        return {k: to_builtins(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_builtins(v) for v in value]
    return value
