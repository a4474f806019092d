"""devit_mq.wire: everything that crosses a process boundary.

A :class:`Message` is a small msgpack header plus raw payload bytes: two frames
(:func:`encode` / :func:`decode`), which every transport carries opaquely. The typed meta schemas
and shared constants live in :mod:`devit_mq.protocol`. Arrays travel
with a codec from :data:`CODECS` (``raw``, ``fp32``, ``fp16``, ``bf16``, ``int8``, ``int8-block``).
Decoding is strict and raises only :class:`WireError`; nothing is ever pickled.
"""

from .codecs import (
    CODECS,
    DEFAULT_BLOCK_SIZE,
    RAW_DTYPES,
    Codec,
    EncodedArray,
    decode_array,
    encode_array,
    payload_nbytes,
    use_kernels,
    warmup,
)
from .errors import WireError
from .limits import DEFAULT_LIMITS, Limits
from .message import ARRAY_NDIM, WIRE_VERSION, Kind, Message, decode, encode

__all__ = [
    "ARRAY_NDIM",
    "CODECS",
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_LIMITS",
    "RAW_DTYPES",
    "WIRE_VERSION",
    "Codec",
    "EncodedArray",
    "Kind",
    "Limits",
    "Message",
    "WireError",
    "decode",
    "decode_array",
    "encode",
    "encode_array",
    "payload_nbytes",
    "use_kernels",
    "warmup",
]
