"""The `kv-cache` command line: each command runs, prints JSON on request, and maps errors to exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kv_cache.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict]:
    code = main(list(argv))
    out = capsys.readouterr().out
    return code, (json.loads(out) if code == 0 and "--json" in argv else {})


def test_inspect_reports_every_format(capsys: pytest.CaptureFixture[str]) -> None:
    code, result = run(capsys, "inspect", "--layers", "2", "--kv-heads", "2", "--head-dim", "64", "--json")
    assert code == 0
    assert result["full"]["bytes_per_token"] == 2 * 2 * 2 * 64 * 2
    assert result["INT4"]["bytes_per_token"] / result["full"]["bytes_per_token"] == pytest.approx(0.28125)


def test_generate_streams_a_completion(capsys: pytest.CaptureFixture[str]) -> None:
    code, result = run(capsys, "generate", "def add(a, b):", "--max-new-tokens", "12", "--bits", "4", "--json")
    assert code == 0 and len(result["tokens"]) == 12 and result["tokens_per_s"] > 0


def test_invalid_options_exit_with_code_3(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "x", "--token-budget", "0"]) == 3
    assert "token_budget=0" in capsys.readouterr().err


def test_demo_writes_its_plot(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    plot = tmp_path / "demo.png"
    code, result = run(capsys, "demo", "--new-tokens", "16", "--plot", str(plot), "--json")
    assert code == 0 and plot.stat().st_size > 1000
    assert 0.0 <= result["agreement"] <= 1.0 and len(result["runs"]) == 2


@pytest.mark.slow
def test_quick_eval_produces_a_table_and_plot(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out, plot = tmp_path / "table.txt", tmp_path / "fidelity.png"
    code, result = run(capsys, "eval", "--quick", "--configs", "INT4,window+sinks 4x", "--out", str(out), "--plot",
                       str(plot), "--json")  # fmt: skip
    assert code == 0 and [row["name"] for row in result["rows"]] == ["full", "INT4", "window+sinks 4x"]
    assert result["rows"][0]["agreement"] == 1.0 and "ppl/byte" in out.read_text() and plot.exists()
