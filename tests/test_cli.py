"""The `kv-cache` command line: each command runs, prints JSON on request, and maps errors to exit codes."""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path

import pytest

from kv_cache import cli_bench
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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def assert_png(path: Path, size: tuple[int, int]) -> None:
    """A PNG of `size` (width, height) pixels with something drawn on it (not a blank canvas)."""
    from matplotlib.image import imread

    pixels = imread(path)
    assert (pixels.shape[1], pixels.shape[0]) == size
    assert (pixels[..., :3] < 0.9).any(-1).mean() > 0.02


@pytest.mark.timeout(600)
def test_bench_quick_writes_results_and_plots_holding_the_data(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port, scraped = free_port(), {}
    decode = cli_bench.bench_decode

    def decode_then_scrape(quick: bool, served: cli_bench.ServedCache, step: cli_bench.Step) -> dict:
        result = decode(quick, served, step)  # the endpoint is still up, serving the cache the bench used last
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            scraped.update(text=response.read().decode(), stats=served.stats())
        return result

    monkeypatch.setattr(cli_bench, "bench_decode", decode_then_scrape)
    code, result = run(capsys, "bench", "--quick", "--out", str(tmp_path), "--metrics-port", str(port), "--json")
    assert code == 0 and json.loads((tmp_path / "results.json").read_text()) == result
    sizes = {"append": (770, 495), "memory": (660, 440), "fidelity": (770, 495), "decode": (770, 495)}
    series = {}
    for name, size in sizes.items():
        assert result["plots"][name] == str(tmp_path / f"{name}.png")
        assert_png(tmp_path / f"{name}.png", size)
        series[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert_plots_hold_the_results(series, result)
    assert_metrics_match(scraped, (tmp_path / "metrics.prom").read_text(), result)
    with socket.socket() as probe, pytest.raises(OSError):  # the CLI stopped its endpoint
        probe.settimeout(1)
        probe.connect(("127.0.0.1", port))


def assert_plots_hold_the_results(series: dict, result: dict) -> None:
    """Each plot's series, read back from its figure, equals the numbers in results.json."""
    rows, lengths = result["append"]["rows"], result["append"]["lengths"]
    for method in dict.fromkeys(row["method"] for row in rows):
        curve = series["append"]["us per token, last 10%"][method]
        assert curve == {"x": lengths, "y": [row["last_us"] for row in rows if row["method"] == method]}
    memory = result["memory"]["rows"]
    assert series["memory"]["bytes per token (all layers)"]["bytes"] == {
        "x": list(memory), "y": [row["bytes_per_token"] for row in memory.values()]
    }  # fmt: skip
    assert list(memory) == ["bf16", "INT8", "INT4", "INT2"] and memory["INT4"]["vs_first"] == pytest.approx(0.28125)
    quality = series["fidelity"]["greedy agreement (o) / needle accuracy (x)"]
    fidelity = result["fidelity"]["rows"]
    assert [row["name"] for row in fidelity] == ["full", "INT4", "INT2"]
    for label, key in (("greedy agreement", "agreement"), ("needle accuracy", "needle_accuracy")):
        assert quality[label] == {"x": [r["bytes_per_token"] for r in fidelity], "y": [r[key] for r in fidelity]}
    for name, run in result["decode"]["runs"].items():
        seen, mib = (list(column) for column in zip(*run["memory_curve"], strict=True))
        assert series["decode"]["KV blocks in use (MiB)"][name] == {"x": seen, "y": mib}


def assert_metrics_match(scraped: dict, saved: str, result: dict) -> None:
    """The test's own GET and the CLI's last scrape both export the INT4 decode cache's stats."""
    from test_metrics import scrape

    stats = result["decode"]["runs"]["INT4"]["stats"]
    for text in (scraped["text"], saved):
        samples = scrape(text)
        assert samples[("kv_cache_tokens", ())] == stats["tokens"] == scraped["stats"]["tokens"] > 0
        assert samples[("kv_cache_hit_tokens_total", ())] == stats["cached_tokens_read"] > 0
        assert samples[("kv_cache_blocks", (("state", "used"),))] == stats["blocks_used"]
        assert samples[("kv_cache_operation_duration_seconds_count", (("operation", "update"),))] > 0
    assert result["metrics"]["samples"] == len([line for line in saved.splitlines() if not line.startswith("#")])
