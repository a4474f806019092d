"""``devit-mq bench wire``: what each feature codec costs in bytes and in time, in one run.

1. Bytes per image per edge for a FEATURES message (CLS only, P=1, and CLS+DIST, P=2; d = 192/384):
   the payload alone, the whole message at batch 1 with the header an edge really sends (source,
   reply_to, request id, ``{"part"}`` meta, three timestamps), and the whole message per image at
   batch 64, where the header is amortised.
2. Encode + decode time per message (``decode(encode(msg))``, header included) against the bare cost
   of the same array without any of the wire layer: ``msgpack.packb({"dtype", "shape"})`` +
   ``array.tobytes()``, then ``msgpack.unpackb`` + ``np.frombuffer``. "bare fp32" packs the float32
   features themselves; "bare same bytes" packs an array of the codec's payload size, so the ratio
   shows what the codec and the validation add on top of moving those bytes.
3. The codecs' Numba kernels against their numpy references (same messages, same run).

Timings interleave the contenders sample by sample (each sample times a burst of calls), so load from
other processes on a shared machine hits them alike, and report the median per call. Targets (from the
issue): codec path at most 1.5x the bare pack, int8 at least 3.5x smaller than fp32. The figures are
printed whether or not a target is met.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import numpy as np

from devit_mq.protocol import FEATURE_CODECS, FeaturesMeta
from devit_mq.wire import Kind, Message, decode, encode
from devit_mq.wire import codecs as wire_codecs

CODECS = FEATURE_CODECS
BLOCK_SIZE = 32
TARGET_TIME_RATIO = 1.5
TARGET_INT8_SHRINK = 3.5


def feature_message(array: np.ndarray, codec: str, typical_header: bool) -> Message:
    ids = tuple(range(1_000_000, 1_000_000 + array.shape[0]))
    if not typical_header:
        return Message(Kind.FEATURES, "edge0", ids, array, codec=codec, block_size=BLOCK_SIZE,
                       meta=FeaturesMeta(part=0))
    now = time.time()
    return Message(Kind.FEATURES, "edge0", ids, array, codec=codec, block_size=BLOCK_SIZE, reply_to="client-12345",
                   meta=FeaturesMeta(part=0), timestamps={"client_sent": now, "edge_recv": now, "edge_sent": now})


def bare_roundtrip(array: np.ndarray) -> Callable[[], np.ndarray]:
    """The floor: a msgpack header with dtype and shape, the raw bytes, and back."""

    def run() -> np.ndarray:
        head = msgpack.packb({"dtype": array.dtype.str, "shape": array.shape})
        body = array.tobytes()
        meta = msgpack.unpackb(head)
        return np.frombuffer(body, dtype=meta["dtype"]).reshape(meta["shape"])

    return run


def interleaved_medians(fns: dict[str, Callable[[], Any]], samples: int, burst: int) -> dict[str, float]:
    """Median seconds per call of each function; each sample times ``burst`` calls of one function,
    and the functions take turns sample by sample."""
    for fn in fns.values():  # warm-up (kernel compilation, caches)
        for _ in range(burst):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(samples):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(burst):
                fn()
            times[name].append((time.perf_counter() - start) / burst)
    return {name: statistics.median(values) for name, values in times.items()}


def size_rows(dims: Sequence[int]) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    rows = []
    for d in dims:
        for p in (1, 2):
            per_batch: dict[str, dict[int, int]] = {}
            payloads: dict[str, int] = {}
            for codec in CODECS:
                per_batch[codec] = {}
                for b in (1, 64):
                    frames = encode(feature_message(rng.standard_normal((b, p, d)).astype(np.float32), codec, True))
                    per_batch[codec][b] = len(frames[0]) + len(frames[1])
                    payloads[codec] = len(frames[1]) // b
            for codec in CODECS:
                rows.append({
                    "d": d, "tokens": "CLS" if p == 1 else "CLS+DIST", "codec": codec,
                    "payload_bytes": payloads[codec],
                    "message_bytes_b1": per_batch[codec][1],
                    "message_bytes_per_image_b64": per_batch[codec][64] / 64,
                    "shrink_payload": payloads["fp32"] / payloads[codec],
                    "shrink_message_b1": per_batch["fp32"][1] / per_batch[codec][1],
                    "shrink_message_b64": per_batch["fp32"][64] / per_batch[codec][64],
                })
    return rows


def time_rows(dims: Sequence[int], batches: Sequence[int], samples: int, burst: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(1)
    rows = []
    for d in dims:
        for p in (1, 2):
            for b in batches:
                x = rng.standard_normal((b, p, d)).astype(np.float32)
                fns: dict[str, Callable[[], Any]] = {"bare fp32": bare_roundtrip(x)}
                sizes = {}
                for codec in CODECS:
                    msg = feature_message(x, codec, False)
                    full = feature_message(x, codec, True)
                    sizes[codec] = len(encode(msg)[1])
                    fns[codec] = lambda msg=msg: decode(encode(msg))
                    fns[codec + " +header"] = lambda full=full: decode(encode(full))
                    fns["bare " + codec] = bare_roundtrip(np.zeros(sizes[codec], np.uint8))
                med = interleaved_medians(fns, samples, burst)
                for codec in CODECS:
                    rows.append({
                        "d": d, "P": p, "B": b, "codec": codec, "payload_bytes": sizes[codec],
                        "codec_us": med[codec] * 1e6, "codec_typical_header_us": med[codec + " +header"] * 1e6,
                        "bare_fp32_us": med["bare fp32"] * 1e6, "bare_same_bytes_us": med["bare " + codec] * 1e6,
                        "ratio_vs_bare_fp32": med[codec] / med["bare fp32"],
                        "ratio_vs_bare_same_bytes": med[codec] / med["bare " + codec],
                    })
    return rows


def kernel_rows(dims: Sequence[int], batches: Sequence[int], samples: int, burst: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(2)
    rows = []
    for d in dims:
        for b in batches:
            x = rng.standard_normal((b, 2, d)).astype(np.float32)
            for codec in CODECS[1:]:
                msg = feature_message(x, codec, False)
                frames = encode(msg)

                def with_kernels(enabled: bool, what: str, msg: Message = msg, frames: list[bytes] = frames) -> Callable[[], Any]:
                    def run() -> Any:
                        wire_codecs.use_kernels(enabled)
                        return encode(msg) if what == "encode" else decode(frames)
                    return run

                fns = {f"{what} {impl}": with_kernels(impl == "numba", what)
                       for what in ("encode", "decode") for impl in ("numpy", "numba")}
                try:
                    med = interleaved_medians(fns, samples, burst)
                finally:
                    wire_codecs.use_kernels(True)
                rows.append({
                    "d": d, "P": 2, "B": b, "codec": codec,
                    **{f"{key.replace(' ', '_')}_us": value * 1e6 for key, value in med.items()},
                })
    return rows


def markdown(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |",
             "|" + "|".join("---:" if fmt else "---" for _, _, fmt in columns) + "|"]
    for row in rows:
        cells = [format(row[key], fmt) if fmt else str(row[key]) for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="devit-mq bench wire", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[192, 384], help="token widths d")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64], help="images per message")
    parser.add_argument("--samples", type=int, default=200, help="timing samples per contender (median)")
    parser.add_argument("--burst", type=int, default=10, help="calls per timing sample")
    parser.add_argument("--quick", action="store_true", help="a few samples only (smoke test)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure as JSON")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.quick:
        args.samples, args.burst = 5, 2
    if min(args.dims) < 1 or min(args.batches) < 1 or args.samples < 1 or args.burst < 1:
        parser.error("--dims, --batches, --samples and --burst must be positive")

    wire_codecs.warmup()
    sizes = size_rows(args.dims)
    print("## Bytes per image per edge (FEATURES message)\n")
    print(markdown(sizes, [
        ("d", "d", ""), ("tokens", "tokens", ""), ("codec", "codec", ""),
        ("payload_bytes", "payload B/img", "d"), ("shrink_payload", "fp32/this payload", ".2f"),
        ("message_bytes_b1", "message B/img, batch 1", "d"), ("shrink_message_b1", "fp32/this, batch 1", ".2f"),
        ("message_bytes_per_image_b64", "message B/img, batch 64", ".1f"),
        ("shrink_message_b64", "fp32/this, batch 64", ".2f"),
    ]))
    int8 = [r for r in sizes if r["codec"] == "int8"]
    worst_payload = min(r["shrink_payload"] for r in int8)
    worst_b1 = min(r["shrink_message_b1"] for r in int8)
    print(f"\nint8 vs fp32: payload >= {worst_payload:.2f}x smaller, whole batch-1 message >= {worst_b1:.2f}x "
          f"(target {TARGET_INT8_SHRINK}x: payload {'met' if worst_payload >= TARGET_INT8_SHRINK else 'MISSED'}, "
          f"batch-1 message {'met' if worst_b1 >= TARGET_INT8_SHRINK else 'MISSED'})")

    times = time_rows(args.dims, args.batches, args.samples, args.burst)
    print(f"\n## Encode + decode per message, median of {args.samples} samples x {args.burst} calls (us)\n")
    print(markdown(times, [
        ("d", "d", ""), ("P", "P", ""), ("B", "B", ""), ("codec", "codec", ""), ("payload_bytes", "payload B", "d"),
        ("codec_us", "codec path", ".2f"), ("codec_typical_header_us", "+ typical header", ".2f"),
        ("bare_fp32_us", "bare fp32", ".2f"), ("ratio_vs_bare_fp32", "ratio", ".2f"),
        ("bare_same_bytes_us", "bare same bytes", ".2f"), ("ratio_vs_bare_same_bytes", "ratio", ".2f"),
    ]))
    met = [r for r in times if r["ratio_vs_bare_fp32"] <= TARGET_TIME_RATIO]
    print(f"\n{len(met)} of {len(times)} cases within {TARGET_TIME_RATIO}x of the bare fp32 pack "
          f"(ratio range {min(r['ratio_vs_bare_fp32'] for r in times):.2f}-"
          f"{max(r['ratio_vs_bare_fp32'] for r in times):.2f}x)")

    kernels = kernel_rows(args.dims, sorted({min(args.batches), max(args.batches)}), args.samples // 2 or 1,
                          args.burst)
    print("\n## Codec kernels: numpy reference vs Numba, P=2, whole encode / decode (us)\n")
    print(markdown(kernels, [
        ("d", "d", ""), ("B", "B", ""), ("codec", "codec", ""),
        ("encode_numpy_us", "encode numpy", ".2f"), ("encode_numba_us", "encode numba", ".2f"),
        ("decode_numpy_us", "decode numpy", ".2f"), ("decode_numba_us", "decode numba", ".2f"),
    ]))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"machine": platform.platform(), "python": platform.python_version(),
                       "numpy": np.__version__, "msgpack": ".".join(map(str, msgpack.version)),
                       "samples": args.samples, "burst": args.burst,
                       "sizes": sizes, "times": times, "kernels": kernels}, fh, indent=1)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
