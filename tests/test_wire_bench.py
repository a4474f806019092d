"""The wire benchmark and the ``devit-mq bench`` dispatcher run and report consistent figures."""

from __future__ import annotations

import json
import sys
import types

import pytest

from devit_mq.bench import cli as bench_cli
from devit_mq.bench import wire as bench_wire


@pytest.mark.timeout(120)
def test_bench_wire_quick_writes_consistent_json(tmp_path, capsys):
    out = tmp_path / "wire.json"
    assert bench_wire.main(["--quick", "--dims", "64", "--batches", "1", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| d | tokens | codec |" in printed and "int8 vs fp32" in printed
    report = json.loads(out.read_text())
    sizes = {(r["tokens"], r["codec"]): r for r in report["sizes"]}
    assert sizes[("CLS", "fp32")]["payload_bytes"] == 4 * 64
    assert sizes[("CLS+DIST", "int8")]["payload_bytes"] == 2 * 64 + 2 * 4
    assert sizes[("CLS", "int8")]["shrink_payload"] == pytest.approx(256 / 68)
    assert all(r["message_bytes_b1"] > r["payload_bytes"] for r in report["sizes"])
    assert {(r["P"], r["B"]) for r in report["times"]} == {(1, 1), (1, 2), (2, 1), (2, 2)}
    for row in report["times"]:
        assert row["codec_us"] > 0 and row["bare_fp32_us"] > 0
        assert row["ratio_vs_bare_fp32"] == pytest.approx(row["codec_us"] / row["bare_fp32_us"])
    assert {r["codec"] for r in report["kernels"]} == {"fp16", "bf16", "int8", "int8-block"}


def test_bench_dispatcher(monkeypatch, capsys):
    calls = []
    for name in ("devit_mq.bench.kernels", "devit_mq.bench.runtime"):
        fake = types.ModuleType(name)
        fake.main = lambda argv, name=name: calls.append((name, list(argv))) or 0
        monkeypatch.setitem(sys.modules, name, fake)
    monkeypatch.setattr(bench_wire, "main", lambda argv: calls.append(("wire", list(argv))) or 0)
    assert bench_cli.main(["wire", "--quick"]) == 0
    assert bench_cli.main(["kernels", "-x"]) == 0
    assert bench_cli.main(["topologies/local-2edge.yaml", "--requests", "5"]) == 0
    assert calls == [("wire", ["--quick"]), ("devit_mq.bench.kernels", ["-x"]),
                     ("devit_mq.bench.runtime", ["topologies/local-2edge.yaml", "--requests", "5"])]
    assert bench_cli.main(["--help"]) == 0 and "wire" in capsys.readouterr().out
    assert bench_cli.main([]) == 2


def test_bench_dispatcher_reports_a_missing_benchmark(monkeypatch, capsys):
    monkeypatch.setitem(bench_cli.TARGETS, "nope", "devit_mq.bench.does_not_exist:main")
    assert bench_cli.main(["nope"]) == 2
    assert "not available" in capsys.readouterr().err
