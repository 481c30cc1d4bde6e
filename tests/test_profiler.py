r"""`Profiler`: the disabled no-op, host timings, CUDA events and memory, nesting, threads, the table, traces.

Overhead is measured, not asserted (tests never assert on time); the numbers are in kv_cache/profiler.py:

    python -m timeit -s "from kv_cache import Profiler; p = Profiler()" "with p.record('update'): pass"
    python -m timeit -s "from kv_cache import Profiler; p = Profiler(True)" "with p.record('update'): pass"
    python3 -m timeit -s "import torch; from kv_cache import Profiler; p = Profiler(False, 'cuda'); \
        x = torch.ones(1, device='cuda')" "with p.record('update'): x.add_(1)"  # and without the `with`
"""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import pytest
import torch
from rich.console import Console

from kv_cache import BaseKVCache, KVCacheConfig, Profiler

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_disabled_record_is_one_shared_no_op() -> None:
    profiler = Profiler()
    first, second = profiler.record("update"), profiler.record("read", torch.device("cpu"))
    assert first is second
    with first:
        pass
    assert profiler.summary() == {}


def test_host_timings_are_accumulated_per_operation() -> None:
    profiler = Profiler(enabled=True)
    for _ in range(3):
        with profiler.record("append"):
            torch.randn(64, 64).sum()
    with pytest.raises(KeyError), profiler.record("read"):  # a failing operation is still timed
        raise KeyError("missing")
    summary = profiler.summary()
    assert list(summary) == ["append", "read"]
    append = summary["append"]
    assert append["count"] == 3 and 0 < append["max_ms"] <= append["total_ms"]
    assert append["mean_ms"] == pytest.approx(append["total_ms"] / 3)
    assert append["peak_memory_bytes"] is None and append["memory_delta_bytes"] is None  # documented: CPU
    profiler.reset()
    assert profiler.summary() == {}


def test_threads_lose_no_operations() -> None:
    profiler = Profiler(enabled=True)

    def work() -> None:
        for _ in range(500):
            with profiler.record("update"), profiler.record("read"):
                pass

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    summary = profiler.summary()
    assert summary["update"]["count"] == summary["read"]["count"] == 8 * 500


def test_print_stats_renders_a_table() -> None:
    profiler = Profiler(enabled=True)
    with profiler.record("forward"):
        pass
    out = io.StringIO()
    profiler.print_stats(Console(file=out, width=120))
    text = out.getvalue()
    assert "kv_cache profile" in text and "forward" in text and "peak MiB" in text
    assert text.splitlines()[-2].split("│")[-2].strip() == "-"  # no memory counters on CPU


def test_trace_writes_a_chrome_trace_with_our_labels(tmp_path: Path) -> None:
    profiler = Profiler()  # disabled: trace enables it for its duration
    path = tmp_path / "trace.json"
    with profiler.trace(path) as profile:
        with profiler.record("append"):
            torch.randn(32, 32) @ torch.randn(32, 32)
        assert profile is not None
    assert not profiler.enabled and profiler.summary()["append"]["count"] == 1
    events = json.loads(path.read_text())["traceEvents"]
    names = {event.get("name") for event in events}
    assert "kv_cache::append" in names and "aten::mm" in names


def test_cache_profiling_in_get_stats() -> None:
    cache = BaseKVCache(KVCacheConfig(block_size=4, enable_profiling=True))
    cache.forward(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8))
    row = cache.get_stats()["profiling"]["forward"]
    assert row["count"] == 1 and row["total_ms"] > 0 and row["peak_memory_bytes"] is None


@cuda
def test_cuda_events_and_memory() -> None:
    device = torch.device("cuda")
    profiler = Profiler(enabled=True, device=device)
    keep = []
    for _ in range(2):
        with profiler.record("grow"):
            keep.append(torch.empty(2**20, dtype=torch.float32, device=device))  # 4 MiB kept
    with profiler.record("spike"):
        torch.ones(4 * 2**20, dtype=torch.float32, device=device).sum()  # 16 MiB, freed at once
    summary = profiler.summary()
    assert summary["grow"]["count"] == 2 and summary["grow"]["memory_delta_bytes"] == 2 * 4 * 2**20
    assert summary["grow"]["peak_memory_bytes"] == 4 * 2**20
    assert summary["spike"]["peak_memory_bytes"] >= 16 * 2**20 and summary["spike"]["memory_delta_bytes"] == 0
    assert summary["spike"]["total_ms"] > 0


@cuda
def test_cuda_nested_operations_keep_the_outer_peak() -> None:
    device = torch.device("cuda")
    profiler = Profiler(enabled=True)
    with profiler.record("outer", device):
        big = torch.empty(8 * 2**20, dtype=torch.uint8, device=device)
        del big  # 8 MiB peak before the inner operation resets the allocator's peak counter
        with profiler.record("inner", device):
            torch.empty(2**20, dtype=torch.uint8, device=device)
    summary = profiler.summary()
    assert summary["outer"]["peak_memory_bytes"] >= 8 * 2**20
    assert 2**20 <= summary["inner"]["peak_memory_bytes"] < 8 * 2**20
