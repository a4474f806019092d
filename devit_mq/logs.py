"""Logging that a flood cannot turn into a disk-filling stream.

A node that receives 10,000 bad frames must say so, but not 10,000 times: :class:`RateLimitedLog`
writes the first occurrence of each kind of event at once and then at most one line per ``interval_s``
for it, saying how many were folded into that line.
"""

from __future__ import annotations

import argparse
import json
import logging
import time


class RateLimitedLog:
    """``log.warn("wire", "%s: dropped malformed message (%s)", name, exc)``: one line per ``key``
    per ``interval_s``, the next one carrying ``(+N similar)``. At most ``max_keys`` keys are tracked
    (keys are the code's own event names, not peer-chosen strings)."""

    def __init__(self, logger: logging.Logger, interval_s: float = 5.0, max_keys: int = 256) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, key: str, fmt: str, *args: object, exc_info: bool = False) -> None:
        if not self.logger.isEnabledFor(level):
            return
        now = time.monotonic()
        if key not in self._last and len(self._last) >= self.max_keys:
            key = "other"  # before the throttle lookup, so the shared key is rate-limited too
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        folded = self._suppressed.pop(key, 0)
        self._last[key] = now
        extra = {"event": key}
        if folded:
            fmt += f" (+{folded} similar in the last {now - (last or now):.0f} s)"
            extra["similar"] = folded  # a field of its own in JSON logs
        self.logger.log(level, fmt, *args, exc_info=exc_info, extra=extra)

    def warning(self, key: str, fmt: str, *args: object) -> None:
        self.log(logging.WARNING, key, fmt, *args)

    def info(self, key: str, fmt: str, *args: object) -> None:
        self.log(logging.INFO, key, fmt, *args)


# -- command-line logging: one set of options for every long-running command -----------------------

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line (what log shippers such as Loki, Fluent Bit or journald's JSON
    mode ingest without a parse rule): ``ts`` (UTC, ISO 8601, ms), ``level``, ``logger``, ``node``
    (when the process runs one), ``msg``, ``exc`` (a traceback, when there is one), and any
    ``extra=`` fields of the call, e.g. ``similar`` from :class:`RateLimitedLog`."""

    def __init__(self, node: str | None = None) -> None:
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        out: dict[str, object] = {"ts": ts, "level": record.levelname.lower(), "logger": record.name}
        if self.node:
            out["node"] = self.node
        out["msg"] = record.getMessage()
        out.update({k: v for k, v in vars(record).items() if k not in _RESERVED and not k.startswith("_")})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def add_log_arguments(parser: argparse.ArgumentParser, default_level: str = "warning") -> None:
    """``--log-level`` and ``--log-format`` (and ``-v`` = ``--log-level info``, kept for habit)."""
    group = parser.add_argument_group("logging")
    group.add_argument("--log-level", choices=LOG_LEVELS, default=None,
                       help=f"the lowest level written to stderr (default: {default_level})")
    group.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                       help="text lines, or one JSON object per line (for log shippers)")
    group.add_argument("-v", "--verbose", action="store_true", help="same as --log-level info")
    parser.set_defaults(_default_log_level=default_level)


def log_level(args: argparse.Namespace) -> str:
    """The level the options ask for (``--log-level`` wins over ``-v``)."""
    return args.log_level or ("info" if args.verbose else args._default_log_level)


def setup_logging(args: argparse.Namespace, node: str | None = None) -> None:
    """Configure the root logger from :func:`add_log_arguments`' options; ``node`` names the node in
    every line (text) or as a field (JSON)."""
    configure_logging(log_level(args), args.log_format, node)


def configure_logging(level: str, fmt: str = "text", node: str | None = None) -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter(node))
    else:
        who = f" {node}" if node else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s{who} %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):  # a second call (tests, a command calling another) replaces, not adds
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


def log_arguments(args: argparse.Namespace) -> list[str]:
    """The same options for a child process (a launcher's nodes log as their launcher was told)."""
    return ["--log-level", log_level(args), "--log-format", args.log_format]
