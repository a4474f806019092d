"""Array codecs: how an ndarray becomes payload bytes and back.

Every codec is a pure pair ``encode(float32 C-array, block) -> bytes`` / ``decode(buffer, shape,
block) -> float32 array`` (``raw`` keeps the array's own dtype instead). Payloads are little-endian and
carry nothing but element data, so their length is a function of the header (shape, dtype, codec,
block size) and is checked exactly before anything is read.

=============  ==============  ===================================================================
codec          payload dtype   payload layout
=============  ==============  ===================================================================
``raw``        the array's     exact bytes of the array, any dtype in :data:`RAW_DTYPES` (images)
``fp32``       float32         exact
``fp16``       float16         IEEE half, round to nearest even; values beyond +-65504 become inf
``bf16``       bfloat16        top 16 bits of the float32 (stored as uint16), round to nearest even
``int8``       int8            ``float32 scales[N]`` then ``int8 q[N, D]``: one symmetric scale
                               ``max|x| / 127`` per vector along the last axis (N = all other axes)
``int8-block`` int8            ``float32 scales[N, ceil(D / block)]`` then ``int8 q[N, D]``: one
                               scale per ``block`` elements of each vector
``jpeg``       uint8           ``uint32 lengths[B]`` then B baseline/progressive JPEG files, one per
                               image of a ``[B, H, W, C]`` uint8 batch (C = 1: greyscale, 3: RGB)
=============  ==============  ===================================================================

``jpeg`` is the one lossy, variable-length codec (images only): its payload length is checked
against the lengths table instead of the shape, and every file is checked before it is decoded
-- it must be a JPEG whose own header gives exactly the message's ``H x W`` and mode (the header's
shape is already bounded by the message-size limit), so a hostile file cannot make the receiver
decode more pixels than a ``raw`` message of the same limit could carry (Pillow's decompression-bomb
limit applies as well). The encoder's quality is the sender's choice (the topology's
``image_quality``); it does not travel.

The int8 scales sit at the *front* of the payload so that, for an aligned frame, the float32 scale
array is aligned too. Decoding returns float32 for every codec but ``raw``; int8 is dequantised
(``q * scale``, error at most ``scale / 2`` per element).

Zero copies where it is possible: ``fp32`` and ``raw`` decode to an ``np.frombuffer`` view of the
frame, which is **read-only** when the frame is ``bytes`` and shares its memory otherwise; call
``.copy()`` before writing to it or keeping it past the frame's lifetime if the frame is reused.

The conversions run in the Numba kernels of :mod:`devit_mq.kernels.codec` (bit-identical to their
numpy references, which stay as the test oracle and the fallback: :func:`use_kernels`). Measured on
this project's 2-core machine at feature sizes (N = B*P vectors of D = 192/384, B 1-64, P 1-2), best
of 5-7 repeats, numpy vs Numba: int8 quantise 10-90 us vs 1.4-10 us (per vector) and 15-160 us vs
1.5-55 us (blocks of 32); int8 dequantise 1.4-16 us vs 1.0-2.7 us; float32->float16 5.4 us vs 0.6 us
at 192 values and 85 us vs 11 us at 49,152; float16->float32 0.7 vs 0.3 us and 61 vs 9 us; the NaN/Inf
check 1.0 vs 0.4 us and 4.2 vs 1.7 us. Numba wins at every size, so it is always used when
installed. The NaN/Inf check reads the payload's bits (exponent all ones) before the array is
built, for fp32, fp16 and bf16 alike: one kernel call, and nothing decoded for a refused message.
The kernels compile on first use (about 1 s, then cached on disk; importing Numba costs 0.3 s): call
:func:`warmup` at node start to keep that off the first message.
"""

from __future__ import annotations

import importlib.util
import io
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np

from devit_mq.kernels import codec as _k
from devit_mq.protocol import CODEC_NAMES, DEFAULT_JPEG_QUALITY, JPEG_QUALITY_RANGE

from .errors import WireError

DEFAULT_BLOCK_SIZE = 32
MAX_BLOCK_SIZE = 1 << 16

#: dtypes the ``raw`` codec carries (no bool, no complex, no object), name -> little-endian dtype.
RAW_DTYPES: Mapping[str, np.dtype] = MappingProxyType(
    {
        name: np.dtype(name).newbyteorder("<")
        for name in ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float16",
                     "float32", "float64")
    }
)

_F32 = np.dtype("<f4")


class EncodedArray(NamedTuple):
    """An array as it travels: the header fields that describe it plus the payload bytes."""

    codec: str
    dtype: str  # payload element type: "float32", "float16", "bfloat16", "int8", or raw's own dtype
    shape: tuple[int, ...]
    block_size: int  # elements per int8 scale: D for "int8", the chosen size for "int8-block", else 0
    payload: bytes | memoryview


@dataclass(frozen=True)
class Codec:
    """One codec: its payload element type and its pure encode/decode pair."""

    name: str
    wire_dtype: str | None  # None: the array's own dtype (raw)
    itemsize: int  # bytes per element in the payload (0 for raw: the dtype's own)
    scaled: bool  # carries float32 scales in front of the payload
    encode: Callable[[np.ndarray, int], bytes]  # (C-contiguous array, block) -> payload
    decode: Callable[[Any, tuple[int, ...], int, str], np.ndarray]  # (payload, shape, block, dtype)
    variable: bool = False  # payload length depends on the content (jpeg): the decoder checks it


# ----------------------------------------------------------------------------------------------
# kernel switch: Numba kernels (default) or their numpy references
# ----------------------------------------------------------------------------------------------

_NUMPY_OPS: dict[str, Callable[..., Any]] = {
    "quantize": _k.quantize_int8_ref,
    "dequantize": _k.dequantize_int8_ref,
    "f32_to_f16": _k.f32_to_f16_ref,
    "f16_to_f32": _k.f16_to_f32_ref,
    "f32_to_bf16": _k.f32_to_bf16_ref,
    "bf16_to_f32": _k.bf16_to_f32_ref,
    "finite_bits": _k.finite_bits_ref,
}
_NUMBA_OPS: dict[str, Callable[..., Any]] = {
    "quantize": _k.quantize_int8_numba,
    "dequantize": _k.dequantize_int8_numba,
    "f32_to_f16": _k.f32_to_f16_numba,
    "f16_to_f32": _k.f16_to_f32_numba,
    "f32_to_bf16": _k.f32_to_bf16_numba,
    "bf16_to_f32": _k.bf16_to_f32_numba,
    "finite_bits": _k.finite_bits_numba,
}
_HAVE_NUMBA = importlib.util.find_spec("numba") is not None
_ops = _NUMBA_OPS if _HAVE_NUMBA else _NUMPY_OPS


def use_kernels(enabled: bool) -> None:
    """Use the Numba kernels (the default when Numba is installed) or the numpy references."""
    global _ops
    _ops = _NUMBA_OPS if enabled and _HAVE_NUMBA else _NUMPY_OPS


def kernels_enabled() -> bool:
    return _ops is _NUMBA_OPS


def warmup() -> None:
    """Compile (or load from the on-disk cache) every kernel now rather than on the first message."""
    x = np.ones((2, 4), dtype=np.float32)
    q, scales = _ops["quantize"](x, 2)
    _ops["dequantize"](q, scales, 2)
    _ops["f16_to_f32"](_ops["f32_to_f16"](x))
    _ops["bf16_to_f32"](_ops["f32_to_bf16"](x))
    for bits, mask in _FLOAT_BITS.values():
        _ops["finite_bits"](np.zeros(2, bits), mask)


# ----------------------------------------------------------------------------------------------
# the codecs
# ----------------------------------------------------------------------------------------------


def _rows(shape: tuple[int, ...]) -> int:
    rows = 1
    for dim in shape[:-1]:
        rows *= dim
    return rows


def _exact_encode(x: np.ndarray, block: int) -> bytes:  # fp32, and raw with the array's own dtype
    return x.tobytes()


# A view of the frame in one call (``np.frombuffer(...).reshape`` is two, 0.6 us more at batch 1); the
# caller has checked that the length is exact.
def _fp32_decode(buf: Any, shape: tuple[int, ...], block: int, dtype: str) -> np.ndarray:
    return np.ndarray(shape, _F32, buf)


def _raw_decode(buf: Any, shape: tuple[int, ...], block: int, dtype: str) -> np.ndarray:
    return np.ndarray(shape, RAW_DTYPES[dtype], buf)


def _fp16_encode(x: np.ndarray, block: int) -> bytes:
    return _ops["f32_to_f16"](x).tobytes()


def _fp16_decode(buf: Any, shape: tuple[int, ...], block: int, dtype: str) -> np.ndarray:
    return _ops["f16_to_f32"](np.frombuffer(buf, dtype="<u2")).reshape(shape)


def _bf16_encode(x: np.ndarray, block: int) -> bytes:
    return _ops["f32_to_bf16"](x).tobytes()


def _bf16_decode(buf: Any, shape: tuple[int, ...], block: int, dtype: str) -> np.ndarray:
    return _ops["bf16_to_f32"](np.frombuffer(buf, dtype="<u2")).reshape(shape)


def _int8_encode(x: np.ndarray, block: int) -> bytes:
    q, scales = _ops["quantize"](x.reshape(_rows(x.shape), x.shape[-1]), block)
    return b"".join((scales.data, q.data))


def _int8_decode(buf: Any, shape: tuple[int, ...], block: int, dtype: str) -> np.ndarray:
    rows, width = _rows(shape), shape[-1]
    nb = _k.num_blocks(width, block)
    scales = np.frombuffer(buf, dtype=_F32, count=rows * nb).reshape(rows, nb)
    q = np.frombuffer(buf, dtype=np.int8, offset=4 * rows * nb).reshape(rows, width)
    return _ops["dequantize"](q, scales, block).reshape(shape)


_JPEG_MODES = {1: "L", 3: "RGB"}


def check_jpeg_quality(quality: object) -> int:
    lo, hi = JPEG_QUALITY_RANGE
    if type(quality) is not int or not lo <= quality <= hi:
        raise WireError("quality", f"JPEG quality must be an int in [{lo}, {hi}], got {quality!r:.40}")
    return quality


def _jpeg_encode(x: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    if x.ndim != 4 or x.shape[-1] not in _JPEG_MODES:
        raise WireError("shape", f"jpeg carries [B, H, W, C] images with C = 1 or 3, got {x.shape}")
    files = []
    for image in x:
        buf = io.BytesIO()
        Image.fromarray(image[..., 0] if x.shape[-1] == 1 else image).save(buf, format="JPEG", quality=quality)
        files.append(buf.getvalue())
    return np.array([len(f) for f in files], dtype="<u4").tobytes() + b"".join(files)


def _jpeg_decode(buf: Any, shape: tuple[int, ...], block: int, dtype: str) -> np.ndarray:
    from PIL import Image

    if len(shape) != 4 or shape[-1] not in _JPEG_MODES:
        raise WireError("shape", f"jpeg carries [B, H, W, C] images with C = 1 or 3, got {shape!r:.80}")
    batch, height, width, channels = shape
    if len(buf) < 4 * batch:
        raise WireError("payload", f"{len(buf)} bytes cannot hold the {batch} JPEG lengths")
    lengths = np.frombuffer(buf, dtype="<u4", count=batch).astype(np.int64)
    if lengths.min() < 1 or 4 * batch + int(lengths.sum()) != len(buf):
        raise WireError("payload", f"{len(buf)} bytes, but the JPEG lengths table says {4 * batch + int(lengths.sum())}")
    out = np.empty(shape, np.uint8)
    offset = 4 * batch
    for i, n in enumerate(lengths.tolist()):
        data = bytes(buf[offset:offset + n])
        offset += n
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data), formats=("JPEG",))  # reads the header only
                if image.size != (width, height) or image.mode != _JPEG_MODES[channels]:
                    raise WireError("payload", f"JPEG {i} is {image.size[0]}x{image.size[1]} {image.mode}, the header "
                                               f"says {width}x{height} {_JPEG_MODES[channels]}")
                image.load()
        except WireError:
            raise
        except Exception as exc:  # not a JPEG, truncated, a bomb: Pillow's many exception types
            raise WireError("payload", f"JPEG {i} does not decode: {type(exc).__name__}: {exc}"[:300]) from None
        out[i] = np.asarray(image).reshape(height, width, channels)
    return out


CODECS: Mapping[str, Codec] = MappingProxyType(
    {
        "raw": Codec("raw", None, 0, False, _exact_encode, _raw_decode),
        "fp32": Codec("fp32", "float32", 4, False, _exact_encode, _fp32_decode),
        "fp16": Codec("fp16", "float16", 2, False, _fp16_encode, _fp16_decode),
        "bf16": Codec("bf16", "bfloat16", 2, False, _bf16_encode, _bf16_decode),
        "int8": Codec("int8", "int8", 1, True, _int8_encode, _int8_decode),
        "int8-block": Codec("int8-block", "int8", 1, True, _int8_encode, _int8_decode),
        "jpeg": Codec("jpeg", "uint8", 1, False, _jpeg_encode, _jpeg_decode, variable=True),
    }
)
assert tuple(CODECS) == CODEC_NAMES, "the codec table and devit_mq.protocol.CODEC_NAMES must list the same names"


# ----------------------------------------------------------------------------------------------
# public entry points
# ----------------------------------------------------------------------------------------------


def _codec(name: object) -> Codec:
    spec = CODECS.get(name) if type(name) is str else None
    if spec is None:
        raise WireError("codec", f"unknown codec {name!r:.40}; known: {', '.join(CODECS)}")
    return spec


def block_size_for(spec: Codec, width: int, block_size: object) -> int:
    """The block size the payload uses: the vector width for int8, the chosen one for int8-block."""
    if not spec.scaled:
        return 0
    if spec.name == "int8":
        return width
    if type(block_size) is not int or not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise WireError("block_size", f"int8-block needs an int block size in [1, {MAX_BLOCK_SIZE}], got {block_size!r:.40}")
    return block_size


def _nbytes(spec: Codec, dtype: str, shape: tuple[int, ...], block: int) -> int:
    count = math.prod(shape)
    if spec.wire_dtype is None:
        return count * RAW_DTYPES[dtype].itemsize
    if spec.scaled:
        return count + 4 * (count // shape[-1]) * _k.num_blocks(shape[-1], block)
    return count * spec.itemsize


def payload_nbytes(codec: str, dtype: str, shape: tuple[int, ...], block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Exact payload length of an array of ``shape`` under ``codec`` (``dtype``: the payload element
    type, which only ``raw`` needs; ``block_size``: only ``int8-block``'s). ``jpeg`` has none."""
    spec = _codec(codec)
    if spec.variable:
        raise WireError("codec", f"{codec} payloads depend on the content: encode to know their length")
    shape = check_shape(tuple(shape))
    check_dtype(spec, dtype)
    return _nbytes(spec, dtype, shape, block_size_for(spec, shape[-1], block_size))


def encode_array(array: np.ndarray, codec: str = "fp32", *, block_size: int = DEFAULT_BLOCK_SIZE,
                 quality: int = DEFAULT_JPEG_QUALITY) -> EncodedArray:
    """Encode ``array`` with ``codec``. Float codecs accept any real numeric dtype (cast to float32
    first); ``raw`` accepts the dtypes in :data:`RAW_DTYPES` and keeps them; ``jpeg`` uint8
    ``[B, H, W, C]`` images (C = 1 or 3) at ``quality``. ``block_size`` is used by ``int8-block``
    only. Raises :class:`WireError` for anything it cannot carry."""
    spec = _codec(codec)
    if not isinstance(array, np.ndarray):
        raise WireError("array", f"expected a numpy array, got {type(array).__name__}")
    shape = array.shape
    if not shape or 0 in shape:
        raise WireError("shape", f"arrays must have at least one axis and no empty axis, got {shape}")
    if spec.wire_dtype is None:
        name = array.dtype.name
        if name not in RAW_DTYPES:
            raise WireError("dtype", f"raw codec cannot carry {array.dtype}; allowed: {', '.join(RAW_DTYPES)}")
        data = np.ascontiguousarray(array, dtype=RAW_DTYPES[name])
        return EncodedArray("raw", name, shape, 0, data.tobytes())
    if spec.variable:
        if array.dtype != np.uint8:
            raise WireError("dtype", f"jpeg carries uint8 images, got {array.dtype}")
        payload = _jpeg_encode(np.ascontiguousarray(array), check_jpeg_quality(quality))
        return EncodedArray(spec.name, "uint8", shape, 0, payload)
    if array.dtype.kind not in "iuf":
        raise WireError("dtype", f"codec {codec!r} encodes real numbers, got {array.dtype}")
    block = block_size_for(spec, shape[-1], block_size)
    if array.dtype is not _F32 or not array.flags.c_contiguous:
        array = np.ascontiguousarray(array, dtype=_F32)
    return EncodedArray(spec.name, spec.wire_dtype, shape, block, spec.encode(array, block))


def byte_view(buffer: Any, field: str) -> bytes | memoryview:
    """``buffer`` as bytes or a flat unsigned-byte memoryview (so ``len`` counts bytes), without a
    copy; anything that is not a contiguous buffer is a :class:`WireError` on ``field``."""
    if type(buffer) is bytes:
        return buffer
    try:
        view = memoryview(buffer)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
    except (TypeError, ValueError) as exc:
        raise WireError(field, f"not a contiguous byte buffer ({type(buffer).__name__}): {exc}") from None
    return view


def check_shape(shape: object) -> tuple[int, ...]:
    """``shape`` if it is a non-empty tuple of positive ints, else a :class:`WireError` on "shape"."""
    if type(shape) is not tuple or not shape:
        raise WireError("shape", f"expected a non-empty tuple of positive ints, got {shape!r:.80}")
    for dim in shape:
        if type(dim) is not int or dim < 1:
            raise WireError("shape", f"expected a non-empty tuple of positive ints, got {shape!r:.80}")
    return shape


def check_dtype(spec: Codec, dtype: object) -> None:
    if spec.wire_dtype is None:
        if type(dtype) is not str or dtype not in RAW_DTYPES:
            raise WireError("dtype", f"raw codec cannot carry dtype {dtype!r:.40}")
    elif dtype != spec.wire_dtype:
        raise WireError("dtype", f"codec {spec.name!r} carries {spec.wire_dtype}, header says {dtype!r:.40}")


#: Payload element type -> (its bits as unsigned ints, the exponent mask that marks NaN and inf).
#: A float payload is vetted on its bits before it is decoded: one pass over the frame, no array built
#: for a message that is then refused.
_FLOAT_BITS: Mapping[str, tuple[np.dtype, Any]] = MappingProxyType({
    "float32": (np.dtype("<u4"), np.uint32(0x7F800000)),
    "float16": (np.dtype("<u2"), np.uint16(0x7C00)),
    "bfloat16": (np.dtype("<u2"), np.uint16(0x7F80)),
})
_FLOATS = frozenset((*_FLOAT_BITS, "float64"))  # payload types that can hold NaN or inf


def _finite_payload(payload: Any, dtype: str) -> bool:
    """No NaN or inf among a float payload's elements (float64 raw arrays: checked by NumPy)."""
    bits = _FLOAT_BITS.get(dtype)
    if bits is None:
        return bool(np.isfinite(np.frombuffer(payload, RAW_DTYPES[dtype])).all())
    return _ops["finite_bits"](np.frombuffer(payload, bits[0]), bits[1])


def decode_array(encoded: EncodedArray, *, allow_nonfinite: bool = False) -> np.ndarray:
    """Decode an :class:`EncodedArray` (e.g. rebuilt from a header) after checking that its dtype fits
    its codec, its block size fits the codec and width, and the payload length is exactly what the
    shape implies. Returns float32 for every codec but ``raw`` (its own dtype); see the module
    docstring about read-only views. Raises only :class:`WireError`."""
    spec = _codec(encoded.codec)
    shape = check_shape(encoded.shape)
    check_dtype(spec, encoded.dtype)
    block = encoded.block_size
    if block != block_size_for(spec, shape[-1], block):
        raise WireError("block_size", f"codec {spec.name!r} with vectors of {shape[-1]} cannot use block {block!r:.40}")
    return decode_checked(spec, encoded.dtype, shape, block, byte_view(encoded.payload, "payload"), allow_nonfinite)


def decode_checked(spec: Codec, dtype: str, shape: tuple[int, ...], block: int, payload: Any,
                    allow_nonfinite: bool) -> np.ndarray:
    """Decode once codec, dtype, shape and block are known to be consistent."""
    if spec.variable:
        return spec.decode(payload, shape, block, dtype)
    expected = _nbytes(spec, dtype, shape, block)
    if len(payload) != expected:
        raise WireError("payload", f"{len(payload)} bytes, but {spec.name} {dtype} {shape} needs {expected}")
    if spec.scaled:  # int8 output is finite exactly when its scales are: check those instead
        _check_scales(payload, expected - math.prod(shape), allow_nonfinite)
    elif not allow_nonfinite and dtype in _FLOATS and not _finite_payload(payload, dtype):
        # fp16 and bf16 widen to float32 exactly, so a finite payload decodes to finite values
        raise WireError("payload", f"{spec.name} array holds NaN or Inf")
    return spec.decode(payload, shape, block, dtype)


#: Largest int8 scale a receiver accepts: 127 * scale stays below float32's max, so finite scales
#: always dequantise to finite values (vectors with max|x| above 2**128 * 127/128 cannot travel as int8).
MAX_INT8_SCALE = np.float32(2.0**121)


def _check_scales(payload: Any, nbytes: int, allow_nonfinite: bool) -> None:
    scales = np.frombuffer(payload, dtype=_F32, count=nbytes // 4)
    if scales.min() >= 0 and scales.max() <= MAX_INT8_SCALE:  # the common case, in two reductions (NaN fails)
        return
    if (scales < 0).any():
        raise WireError("scale", "int8 scale is negative")
    if not allow_nonfinite:
        raise WireError("scale", "int8 scale is NaN, Inf or above 2**121 (the values would overflow float32)")
