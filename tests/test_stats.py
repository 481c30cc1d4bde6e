"""`CacheStatsTracker`: counters, families, gauges, bounded history, trends, threads; `get_stats` of the caches."""

from __future__ import annotations

import itertools
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest
import torch

from kv_cache import BaseKVCache, CacheMemoryError, CacheValidationError, KVCacheConfig
from kv_cache import stats as stats_module
from kv_cache.stats import MAX_LABEL_VALUES, CacheStatsTracker, Trend


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """A fake clock for the stats module: `clock.now` is both wall and monotonic time, in seconds."""
    fake = SimpleNamespace(now=1000.0)
    fake.time = lambda: fake.now
    fake.monotonic = lambda: fake.now
    monkeypatch.setattr(stats_module, "time", fake)
    return fake


def test_counters_hit_rate_and_families() -> None:
    tracker = CacheStatsTracker()
    assert tracker.hit_rate == 0.0
    tracker.record_read(cached_tokens=30, new_tokens=10)
    tracker.increment("preemptions", 2)
    tracker.record_eviction("lru", 16)
    tracker.record_eviction("lru", 16)
    tracker.record_eviction("adaptive")
    tracker.record_error(CacheMemoryError("out of blocks"))
    tracker.record_error(CacheValidationError("bad shape"))
    tracker.record_error(KeyError("x"))
    tracker.record_error("tier_timeout")
    tracker.set_tier_usage("cpu", tokens=64, nbytes=4096)
    tracker.set_gauge("queue_bytes", 12.5)
    stats = tracker.get_stats()
    assert stats["hit_rate"] == pytest.approx(0.75) and stats["cached_tokens_read"] == 30
    assert stats["preemptions"] == 2 and stats["queue_bytes"] == 12.5
    assert stats["evictions_by_policy"] == {"lru": 32, "adaptive": 1}
    assert stats["errors_by_kind"] == {"memory": 1, "validation": 1, "other": 1, "tier_timeout": 1}
    assert stats["tier_tokens_by_tier"] == {"cpu": 64} and stats["tier_bytes_by_tier"] == {"cpu": 4096}
    assert "history" not in stats and tracker.counters() == {
        "cached_tokens_read": 30,
        "new_tokens_read": 10,
        "preemptions": 2,
    }
    tracker.reset()
    assert tracker.get_stats() == {"cached_tokens_read": 0, "new_tokens_read": 0, "hit_rate": 0.0}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda t: t.increment("Bad-Name"), "lower_snake_case"),
        (lambda t: t.increment("hits", -1), "counters only grow"),
        (lambda t: t.increment("hits", label="lru"), "_by_"),
        (lambda t: t.increment("evictions_by_policy"), "_by_"),
        (lambda t: t.record_eviction("lru policy"), "label='lru policy'"),
        (lambda t: t.record_read(-1, 0), "cached_tokens=-1"),
        (lambda t: (t.increment("hits"), t.set_gauge("hits", 1.0)), "already a counter"),
        (lambda t: (t.set_gauge("memory", 1.0), t.increment("memory")), "already a gauge"),
        (lambda t: (t.record_eviction("lru"), t.set_gauge("evictions_by_policy", 1, "lru")), "counter family"),
        (lambda t: t.trend("hit_rate", window=1), "window=1"),
    ],
)
def test_bad_arguments_name_the_argument(call: Callable[[CacheStatsTracker], object], message: str) -> None:
    tracker = CacheStatsTracker()
    with pytest.raises(CacheValidationError, match=message):
        call(tracker)
    tracker.record_read(1, 1)  # still usable
    assert tracker.hit_rate == 0.5


def test_constructor_checks_its_arguments() -> None:
    with pytest.raises(CacheValidationError, match="history_size=0"):
        CacheStatsTracker(history_size=0)
    with pytest.raises(CacheValidationError, match="snapshot_interval_s=-1"):
        CacheStatsTracker(snapshot_interval_s=-1)


def test_label_values_are_capped_against_high_cardinality() -> None:
    tracker = CacheStatsTracker()
    for request in range(MAX_LABEL_VALUES):
        tracker.record_eviction(f"policy{request}")
    tracker.record_eviction("policy0")  # an existing label is always fine
    with pytest.raises(CacheValidationError, match="never requests"):
        tracker.record_eviction("request-12345")


def test_history_is_bounded_and_carries_counters_families_and_gauges() -> None:
    tracker = CacheStatsTracker(history_size=3)
    for step in range(5):
        tracker.record_read(step, 1)
        tracker.record_eviction("lfu", 2)
        assert tracker.snapshot({"tokens": step})
    history = tracker.get_stats(include_history=True)["history"]
    assert [entry["tokens"] for entry in history] == [2, 3, 4]
    last = history[-1]
    assert last["evictions"] == 10 and last["cached_tokens_read"] == 10 and last["hit_rate"] == pytest.approx(10 / 15)
    assert set(last) >= {"time", "hit_rate", "new_tokens_read"}


def test_snapshot_interval_skips_and_defers_the_gauges(clock: SimpleNamespace) -> None:
    tracker = CacheStatsTracker(snapshot_interval_s=1.0)
    calls = itertools.count()

    def gauges() -> dict[str, int]:
        return {"tokens": next(calls)}

    assert tracker.snapshot(gauges)  # the first is always due
    clock.now += 0.5
    assert not tracker.snapshot(gauges)
    assert tracker.snapshot(gauges, force=True)
    clock.now += 1.0
    assert tracker.snapshot(gauges)
    assert [e["tokens"] for e in tracker.history()] == [0, 1, 2]  # `gauges` ran only for the three taken


def test_trend_slope_ratio_and_window(clock: SimpleNamespace) -> None:
    tracker = CacheStatsTracker()
    assert tracker.trend("used_memory_mb") is None  # empty history
    for memory in (10.0, 12.0, 14.0, 20.0):
        tracker.snapshot({"used_memory_mb": memory})
        clock.now += 2.0
    trend = tracker.trend("used_memory_mb")
    assert trend is not None and trend.samples == 4 and trend.change == 10.0 and trend.ratio == 2.0
    assert trend.slope_per_s == pytest.approx(1.6)  # least squares of (0,10) (2,12) (4,14) (6,20)
    assert tracker.trend("used_memory_mb", window=2) == Trend(2, 14.0, 20.0, 6.0, 20.0 / 14.0, 3.0)
    with pytest.raises(CacheValidationError, match=r"used_memory_mib.*known:.*used_memory_mb"):
        tracker.trend("used_memory_mib")


def test_trend_without_time_spread_or_start_value(clock: SimpleNamespace) -> None:
    tracker = CacheStatsTracker()
    tracker.snapshot({"tokens": 0})
    assert tracker.trend("tokens") is None  # one sample
    tracker.snapshot({"tokens": 8})
    assert tracker.trend("tokens") == Trend(2, 0.0, 8.0, 8.0, None, None)


@pytest.fixture
def frequent_switches() -> Iterator[None]:
    """Switch threads every microsecond (default 5 ms), so unlocked read-modify-writes would lose counts."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


@pytest.mark.usefixtures("frequent_switches")
def test_eight_threads_lose_no_counts() -> None:
    tracker = CacheStatsTracker(history_size=16, snapshot_interval_s=0.001)
    threads, rounds = 8, 5000
    start = threading.Barrier(threads)

    def hammer(index: int) -> None:
        start.wait()
        for step in range(rounds):
            tracker.record_read(2, 1)
            tracker.increment("steps")
            tracker.record_eviction("lru" if step % 2 else "lfu")
            tracker.set_gauge("last_step", step)
            tracker.snapshot(lambda: {"thread": index})
            if step % 500 == 0:
                tracker.get_stats(include_history=True)

    workers = [threading.Thread(target=hammer, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    stats = tracker.get_stats(include_history=True)
    total = threads * rounds
    assert stats["cached_tokens_read"] == 2 * total and stats["new_tokens_read"] == total
    assert stats["steps"] == total and stats["evictions_by_policy"] == {"lfu": total // 2, "lru": total // 2}
    assert stats["last_step"] == rounds - 1 and 1 <= len(stats["history"]) <= 16
    times = [entry["time"] for entry in stats["history"]]
    assert times == sorted(times) and stats["hit_rate"] == pytest.approx(2 / 3)


def test_cache_stats_include_tracker_families_and_history() -> None:
    cache = BaseKVCache(KVCacheConfig(max_tokens=64, block_size=4, history_size=2))
    for _ in range(3):
        cache.forward(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8))
    cache.tracker.record_eviction("lru", 4)
    stats = cache.get_stats(include_history=True)
    assert stats["tokens"] == 9 and stats["evictions_by_policy"] == {"lru": 4}
    assert [entry["tokens"] for entry in stats["history"]] == [6, 9]
    assert stats["hit_rate"] == pytest.approx((0 + 3 + 6) / (0 + 3 + 6 + 9))
    trend = cache.tracker.trend("blocks_used")
    assert trend is not None and trend.change == 1  # 6 -> 9 tokens: 2 -> 3 blocks of 4
    assert time.time() - stats["history"][-1]["time"] < 60
