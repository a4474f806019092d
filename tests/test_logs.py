"""Logging options shared by every long-running command: levels, JSON lines, rate-limited floods."""

from __future__ import annotations

import argparse
import json
import logging

import pytest

from devit_mq.logs import (
    JsonFormatter,
    RateLimitedLog,
    add_log_arguments,
    configure_logging,
    log_arguments,
    log_level,
)


def _parse(argv: list[str], default: str = "warning") -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_log_arguments(p, default_level=default)
    return p.parse_args(argv)


def test_level_options_and_their_precedence():
    assert log_level(_parse([])) == "warning"
    assert log_level(_parse([], default="info")) == "info"
    assert log_level(_parse(["-v"])) == "info"
    assert log_level(_parse(["-v", "--log-level", "error"])) == "error"  # the explicit level wins
    assert log_arguments(_parse(["--log-level", "debug", "--log-format", "json"])) == [
        "--log-level", "debug", "--log-format", "json"]


def test_unknown_level_or_format_is_a_usage_error(capsys):
    for argv in (["--log-level", "loud"], ["--log-format", "xml"]):
        with pytest.raises(SystemExit) as exc:
            _parse(argv)
        assert exc.value.code == 2
        assert "invalid choice" in capsys.readouterr().err


def _record(msg: str, *args, exc_info=None, **extra) -> logging.LogRecord:
    rec = logging.LogRecord("devit_mq.nodes", logging.WARNING, __file__, 1, msg, args, exc_info)
    for k, v in extra.items():
        setattr(rec, k, v)
    return rec


def test_json_lines_carry_node_message_and_extra_fields():
    line = JsonFormatter(node="edge0").format(_record("dropped %d frames", 3, similar=41, event="wire"))
    out = json.loads(line)
    assert out["level"] == "warning" and out["logger"] == "devit_mq.nodes" and out["node"] == "edge0"
    assert out["msg"] == "dropped 3 frames" and out["similar"] == 41 and out["event"] == "wire"
    assert out["ts"].endswith("Z") and "T" in out["ts"]
    assert "\n" not in line


def test_json_lines_keep_a_traceback_on_one_line():
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        rec = _record("handler failed", exc_info=sys.exc_info())
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    assert "ValueError: boom" in json.loads(line)["exc"]


def test_flood_is_folded_with_a_count_field(caplog):
    log = RateLimitedLog(logging.getLogger("test.flood.json"), interval_s=0.0)
    log.interval_s = 3600
    with caplog.at_level(logging.WARNING, logger="test.flood.json"):
        for i in range(100):
            log.warning("wire", "dropped frame %d", i)
        log._last["wire"] -= 7200  # the interval has passed: the next line reports what was folded
        log.warning("wire", "dropped frame %d", 100)
    assert len(caplog.records) == 2
    assert not hasattr(caplog.records[0], "similar")
    assert caplog.records[1].similar == 99 and "+99 similar" in caplog.records[1].getMessage()
    assert json.loads(JsonFormatter().format(caplog.records[1]))["similar"] == 99


def test_configure_replaces_its_handler(capsys):
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("info", "json", node="agg")
        configure_logging("info", "json", node="agg")  # twice: still one line per event
        logging.getLogger("devit_mq.test").info("hello %s", "there")
        logging.getLogger("devit_mq.test").debug("not shown")
        lines = [line for line in capsys.readouterr().err.splitlines() if line]
        assert len(lines) == 1 and json.loads(lines[0])["msg"] == "hello there"
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
