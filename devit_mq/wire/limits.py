"""What a receiver is willing to accept."""

from __future__ import annotations

from dataclasses import dataclass

from devit_mq.protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_BATCH,
    MAX_HEADER_BYTES,
    MAX_HEADER_ITEMS,
    MAX_META_BYTES,
    MAX_NAME_LEN,
)

__all__ = ["DEFAULT_LIMITS", "MAX_HEADER_ITEMS", "Limits"]


@dataclass(frozen=True)
class Limits:
    """Bounds checked by :func:`devit_mq.wire.decode` before anything large is allocated.

    ``max_message_bytes`` caps header + payload (checked first, from the frame lengths alone);
    ``max_batch`` caps the rows of an array and the number of request ids; ``max_meta_bytes`` caps the
    packed ``meta`` blob (it travels as its own msgpack blob, so its size is known before msgspec
    decodes it against its kind's schema); ``max_header_bytes`` caps the header without its meta,
    which holds only short strings, the shape and 8 bytes per request id. ``allow_nonfinite`` lets NaN/Inf through in float arrays
    (and non-finite int8 scales); off by default because one NaN token poisons a fused prediction.
    """

    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_batch: int = MAX_BATCH
    max_meta_bytes: int = MAX_META_BYTES
    max_header_bytes: int = MAX_HEADER_BYTES
    max_name_len: int = MAX_NAME_LEN
    allow_nonfinite: bool = False

    def __post_init__(self) -> None:
        for name in ("max_message_bytes", "max_batch", "max_meta_bytes", "max_header_bytes",
                     "max_name_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive int, got {value!r}")

    @property
    def header_cap(self) -> int:
        """Largest header frame accepted (the fixed part plus the meta blob)."""
        return self.max_header_bytes + self.max_meta_bytes


DEFAULT_LIMITS = Limits()
